"""The embedded registry's store: one JSON file, replaced atomically after every change.

It holds what must survive a restart for node IDs to stay put (SPEC 11, issue 11 item 7):
every node (ID, key, address, visibility, hostname), the vouches that gate ``resolve``, and
the next ID. Relay inboxes, the online set and rate-limit buckets are not stored.

Format, version 2::

    {"version": 2, "next_id": 4,
     "nodes": [{"node_id": 1, "public_key": "<b64>", "real_addr": "h:p", "public": false,
                "hostname": ""}, ...],
     "vouches": [[voucher, vouchee], ...]}

``[a, b]`` in ``vouches`` means node ``a`` vouched for node ``b`` (``b`` may resolve
``a``). A version-1 store (``"trust": [[a, b], ...]``, undirected pairs) is read with each
pair vouched both ways, which is what it granted.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

from .. import fsutil
from ..errors import StoreError
from ..identity import b64encode, decode_key

__all__ = ["Node", "Store", "StoreState"]

log = logging.getLogger(__name__)

_VERSION = 2


@dataclass
class Node:
    """A registered node: what ``lookup`` and ``resolve`` answer from."""

    node_id: int
    public_key: bytes
    real_addr: str
    public: bool = False
    hostname: str = ""


@dataclass
class StoreState:
    """The durable part of the registry's state."""

    nodes: dict[int, Node] = field(default_factory=dict)
    vouches: set[tuple[int, int]] = field(default_factory=set)
    next_id: int = 1


def encode(state: StoreState) -> bytes:
    """The store file's bytes for ``state``."""
    data = {
        "version": _VERSION,
        "next_id": state.next_id,
        "nodes": [
            {
                "node_id": n.node_id,
                "public_key": b64encode(n.public_key),
                "real_addr": n.real_addr,
                "public": n.public,
                "hostname": n.hostname,
            }
            for n in state.nodes.values()
        ],
        "vouches": sorted([a, b] for a, b in state.vouches),
    }
    return json.dumps(data, indent=1).encode("ascii")


def decode(raw: bytes, path: str) -> StoreState:
    """Parse a store file's bytes; ``StoreError`` names ``path`` and what is wrong."""

    def bad(problem: str) -> StoreError:
        return StoreError(f"{path}: corrupt registry store: {problem}")

    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise bad(str(exc)) from None
    version = data.get("version") if isinstance(data, dict) else None
    if version not in (1, _VERSION):
        raise bad(f"expected an object with version 1 or {_VERSION}")
    next_id, nodes_raw = data.get("next_id"), data.get("nodes")
    if type(next_id) is not int or next_id < 1:
        raise bad("next_id must be a positive integer")
    if not isinstance(nodes_raw, list):
        raise bad("nodes must be a list")
    state = StoreState(next_id=next_id)
    for item in nodes_raw:
        node = _node(item, next_id)
        if node is None:
            raise bad(f"invalid node entry {str(item)[:200]}")
        state.nodes[node.node_id] = node
    if len({n.public_key for n in state.nodes.values()}) != len(state.nodes):
        raise bad("two nodes share one public key")
    names = [n.hostname for n in state.nodes.values() if n.hostname]
    if len(set(names)) != len(names):
        raise bad("two nodes share one hostname")
    links = data.get("vouches" if version == _VERSION else "trust")
    if not isinstance(links, list):
        raise bad("vouches must be a list")
    for item in links:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(type(x) is int and x in state.nodes for x in item)
            or item[0] == item[1]
        ):
            raise bad(f"invalid vouch {str(item)[:200]}")
        state.vouches.add((item[0], item[1]))
        if version == 1:
            state.vouches.add((item[1], item[0]))
    return state


def _node(item: object, next_id: int) -> Node | None:
    if not isinstance(item, dict):
        return None
    node_id, key = item.get("node_id"), decode_key(item.get("public_key"))
    real_addr, public = item.get("real_addr"), item.get("public")
    hostname = item.get("hostname", "")
    if (
        type(node_id) is not int
        or not 0 < node_id < next_id
        or key is None
        or not isinstance(real_addr, str)
        or not isinstance(public, bool)
        or not isinstance(hostname, str)
    ):
        return None
    return Node(node_id, key, real_addr, public, hostname)


class Store:
    """The store file at ``path``: ``load`` once, then ``write`` numbered snapshots.

    Writers encode a snapshot under the registry's lock and write it after releasing it;
    numbering lets a writer holding an older snapshot skip it once a newer one is on disk.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._written = 0

    def load(self) -> StoreState:
        """The stored state; a missing file is created empty now, so an unwritable path
        fails at start rather than at the first registration. Raises ``StoreError``."""
        fsutil.remove_stale_temporaries(self.path)
        try:
            raw = fsutil.read_file(self.path)
        except FileNotFoundError:
            state = StoreState()
            try:
                fsutil.write_atomically(self.path, encode(state))
            except OSError as exc:
                raise StoreError(
                    f"{self.path}: cannot write registry store: {exc.strerror or exc}"
                ) from None
            return state
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot read registry store: {exc.strerror or exc}"
            ) from None
        return decode(raw, self.path)

    def write(self, seq: int, data: bytes) -> None:
        """Replace the file with snapshot number ``seq`` unless a newer one is there.

        Raises ``OSError``; the file then still holds the last snapshot written.
        """
        with self._write_lock:
            if seq > self._written:
                fsutil.write_atomically(self.path, data)
                self._written = seq
