"""The embedded registry's store: a snapshot file and a journal beside it (SPEC 15, 17).

It holds what must survive a restart: every node (ID, key, address, visibility, hostname),
so that node IDs stay put (issue 11 item 7); the vouches that gate ``resolve``; the next ID;
and the relay inboxes (issue 20 item 3: a request acknowledged as relayed must reach its
target after a restart). The online set and rate-limit buckets are not stored.

**A change costs the same whatever the store's size** (issue 15 item 2). Every change is an
*op* (``StoreState.apply`` is the one place that says what each op does, live and on replay);
the ops of one request are one journal line, appended and fsynced before the request is
answered. Lines are written by group commit: a writer takes every line staged so far, so
concurrent requests share one fsync. When the journal outgrows the snapshot, a background
thread writes a new snapshot from a copy of the state taken under the registry's lock (a
dictionary copy, never an encoding) and then cuts the journal to the lines the snapshot
does not hold. No request ever rewrites the store.

Snapshot (``registry.json``), version 3::

    {"version": 3, "journal_seq": 812, "next_id": 4,
     "nodes": [{"node_id": 1, "public_key": "<b64>", "real_addr": "h:p", "public": false,
                "hostname": ""}, ...],
     "vouches": [[voucher, vouchee], ...],
     "requests": [[to, source, {"from_node_id": 2, "justification": "...",
                                "timestamp": 1700000000, "public_key": "<b64>"}], ...],
     "responses": [[to, source, {"from_node_id": 1, "accept": true,
                                 "timestamp": 1700000000, "reason": "..."}], ...]}

``[a, b]`` in ``vouches`` means node ``a`` vouched for node ``b`` (``b`` may resolve ``a``).
``journal_seq`` is the last journal line the snapshot holds. Versions 1 (``"trust": [[a,
b], ...]``, undirected pairs, read as vouched both ways) and 2 (no journal, no inboxes)
still load.

Journal (``registry.json.journal``): one line per request that changed something,
``<crc32 of the JSON, 8 hex digits> [seq, [op, ...]]\\n``. A line commits when its fsync
returns; on load, lines with ``seq <= journal_seq`` are skipped (the snapshot holds them),
the rest must continue the snapshot without a gap, a last line without its newline or
failing its checksum is a write cut off by a crash (dropped), and a bad line anywhere else
is damage: an error naming the journal and the line, never a silent half-load.

Ops (JSON lists)::

    ["node", id, key_b64, real_addr, public, hostname]   a node as it now is
    ["vouch", a, b] / ["unvouch", a, b]                  a vouch given / taken back
    ["request", to, source, entry]                       a relayed request queued
    ["response", to, source, entry]                      a relayed response queued
    ["evict_request", to, from] / ["evict_response", to, from]
    ["drain", to]                                        both inboxes polled
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import filelock

from .. import fsutil
from ..constants import MAX_NODE_ID
from ..errors import StoreError
from ..identity import b64encode, decode_key

__all__ = [
    "COMPACT_AT",
    "JOURNAL_SUFFIX",
    "Changes",
    "Inbox",
    "Node",
    "Op",
    "Queued",
    "Store",
    "StoreState",
    "decode",
    "encode",
    "read_state",
]

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
_VERSION = 3
# Compact when the journal is larger than the snapshot and than this (small stores
# compact rarely; a big one at most once per snapshot's worth of changes).
COMPACT_AT = 1 << 20

Op = list[Any]


@dataclass(frozen=True)
class Node:
    """A registered node: what ``lookup`` and ``resolve`` answer from. Immutable: a change
    is a new ``Node``, so readers outside the registry's lock see a consistent one."""

    node_id: int
    public_key: bytes
    real_addr: str
    public: bool = False
    hostname: str = ""


@dataclass(frozen=True)
class Queued:
    """A relayed request or response waiting in an inbox: the entry as ``poll_handshakes``
    answers it (its ``timestamp``, Unix seconds, dates it) and the source prefix it came
    from (for the inbox's fairness between sources)."""

    source: str
    entry: dict[str, Any]


# An inbox: sender node ID -> what it sent. Dicts keep insertion order: oldest first.
Inbox = dict[int, Queued]


@dataclass
class StoreState:
    """The durable state, with its lookup indexes. ``apply`` is its only writer."""

    nodes: dict[int, Node] = field(default_factory=dict)
    vouches: set[tuple[int, int]] = field(default_factory=set)
    next_id: int = 1
    requests: dict[int, Inbox] = field(default_factory=dict)
    responses: dict[int, Inbox] = field(default_factory=dict)
    # Derived, never stored: key -> ID, hostname -> ID, voucher -> how many it gave.
    by_key: dict[bytes, int] = field(default_factory=dict)
    by_hostname: dict[str, int] = field(default_factory=dict)
    vouches_by: dict[int, int] = field(default_factory=dict)

    def apply(self, op: Op) -> None:
        """Apply one op (see the module doc); the same code runs live and on replay."""
        kind = op[0]
        if kind == "node":
            node = Node(op[1], decode_key(op[2]) or b"", op[3], op[4], op[5])
            old = self.nodes.get(node.node_id)
            if old is not None and old.hostname:
                self.by_hostname.pop(old.hostname, None)
            self.nodes[node.node_id] = node
            self.by_key[node.public_key] = node.node_id
            if node.hostname:
                self.by_hostname[node.hostname] = node.node_id
            self.next_id = max(self.next_id, node.node_id + 1)
        elif kind == "vouch":
            pair = (op[1], op[2])
            if pair not in self.vouches:
                self.vouches.add(pair)
                self.vouches_by[op[1]] = self.vouches_by.get(op[1], 0) + 1
        elif kind == "unvouch":
            pair = (op[1], op[2])
            if pair in self.vouches:
                self.vouches.discard(pair)
                left = self.vouches_by[op[1]] - 1
                if left:
                    self.vouches_by[op[1]] = left
                else:
                    del self.vouches_by[op[1]]
        elif kind in ("request", "response"):
            boxes = self.requests if kind == "request" else self.responses
            inbox = boxes.setdefault(op[1], {})
            sender = op[3]["from_node_id"]
            inbox.pop(sender, None)  # a replaced entry moves to the end: it is the newest
            inbox[sender] = Queued(op[2], op[3])
        elif kind in ("evict_request", "evict_response"):
            boxes = self.requests if kind == "evict_request" else self.responses
            inbox = boxes.get(op[1], {})
            inbox.pop(op[2], None)
            if not inbox:
                boxes.pop(op[1], None)
        elif kind == "drain":
            self.requests.pop(op[1], None)
            self.responses.pop(op[1], None)
        else:  # pragma: no cover - ops are checked before they are applied
            raise ValueError(f"unknown op {kind!r}")

    def copy(self) -> StoreState:
        """A copy that later changes do not reach (nodes and entries are never mutated, so
        copying the containers is enough). Cheap enough to take under the registry's lock."""
        return StoreState(
            nodes=dict(self.nodes),
            vouches=set(self.vouches),
            next_id=self.next_id,
            requests={to: dict(inbox) for to, inbox in self.requests.items()},
            responses={to: dict(inbox) for to, inbox in self.responses.items()},
        )


class Changes:
    """The ops of one request: each is applied to ``state`` at once and kept, in order, to be
    journaled as one line. Use under the registry's lock."""

    def __init__(self, state: StoreState) -> None:
        self.state = state
        self.ops: list[Op] = []

    def apply(self, op: Op) -> None:
        """Apply ``op`` now and remember it for the journal."""
        self.state.apply(op)
        self.ops.append(op)


def node_op(node: Node) -> Op:
    """The op that records ``node`` as it now is."""
    return [
        "node",
        node.node_id,
        b64encode(node.public_key),
        node.real_addr,
        node.public,
        node.hostname,
    ]


# -- checking what was read from disk ----------------------------------------------------


def _is_id(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_NODE_ID


def _check_entry(kind: str, entry: object) -> bool:
    """Whether ``entry`` has the shape of a queued request or response."""
    if not isinstance(entry, dict):
        return False
    common = _is_id(entry.get("from_node_id")) and type(entry.get("timestamp")) is int
    if kind == "request":
        return (
            common
            and isinstance(entry.get("justification"), str)
            and decode_key(entry.get("public_key")) is not None
        )
    return (
        common
        and isinstance(entry.get("accept"), bool)
        and isinstance(entry.get("reason", ""), str)
    )


def check_op(op: object) -> Op:
    """``op`` if it is a well-formed op; raises ``ValueError`` saying what is wrong."""
    if not isinstance(op, list) or not op or not isinstance(op[0], str):
        raise ValueError("an op is a list starting with its kind")
    kind, args = op[0], op[1:]
    if kind == "node":
        ok = (
            len(args) == 5
            and _is_id(args[0])
            and decode_key(args[1]) is not None
            and isinstance(args[2], str)
            and isinstance(args[3], bool)
            and isinstance(args[4], str)
        )
    elif kind in ("vouch", "unvouch", "evict_request", "evict_response"):
        ok = len(args) == 2 and _is_id(args[0]) and _is_id(args[1])
    elif kind in ("request", "response"):
        ok = (
            len(args) == 3
            and _is_id(args[0])
            and isinstance(args[1], str)
            and _check_entry(kind, args[2])
        )
    elif kind == "drain":
        ok = len(args) == 1 and _is_id(args[0])
    else:
        raise ValueError(f"unknown op {json.dumps(kind)[:40]}")
    if not ok:
        raise ValueError(f"malformed {kind} op {json.dumps(op)[:200]}")
    return op


# -- the snapshot -----------------------------------------------------------------------


def encode(state: StoreState, journal_seq: int = 0) -> bytes:
    """The snapshot file's bytes for ``state``, holding journal lines up to ``journal_seq``."""
    data = {
        "version": _VERSION,
        "journal_seq": journal_seq,
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
        "requests": [
            [to, q.source, q.entry] for to, inbox in state.requests.items() for q in inbox.values()
        ],
        "responses": [
            [to, q.source, q.entry] for to, inbox in state.responses.items() for q in inbox.values()
        ],
    }
    return json.dumps(data, separators=(",", ":")).encode("ascii")


def decode(raw: bytes, path: str) -> tuple[StoreState, int]:
    """Parse a snapshot's bytes into the state and its ``journal_seq``; ``StoreError``
    names ``path`` and what is wrong."""

    def bad(problem: str) -> StoreError:
        return StoreError(f"{path}: corrupt registry store: {problem}", path=path)

    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise bad(str(exc)) from None
    version = data.get("version") if isinstance(data, dict) else None
    if version not in (1, 2, _VERSION):
        raise bad(f"expected an object with version 1 to {_VERSION}")
    next_id, nodes_raw = data.get("next_id"), data.get("nodes")
    journal_seq = data.get("journal_seq", 0)
    if type(next_id) is not int or next_id < 1:
        raise bad("next_id must be a positive integer")
    if type(journal_seq) is not int or journal_seq < 0:
        raise bad("journal_seq must be a non-negative integer")
    if not isinstance(nodes_raw, list):
        raise bad("nodes must be a list")
    state = StoreState()
    for item in nodes_raw:
        node = _node(item, next_id)
        if node is None:
            raise bad(f"invalid node entry {str(item)[:200]}")
        state.apply(node_op(node))
    state.next_id = next_id
    if len(state.by_key) != len(state.nodes):
        raise bad("two nodes share one public key")
    if len(state.by_hostname) != sum(1 for n in state.nodes.values() if n.hostname):
        raise bad("two nodes share one hostname")
    links = data.get("trust" if version == 1 else "vouches")
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
        state.apply(["vouch", item[0], item[1]])
        if version == 1:
            state.apply(["vouch", item[1], item[0]])
    for kind in ("request", "response"):
        queued = data.get(kind + "s", [])
        if not isinstance(queued, list):
            raise bad(f"{kind}s must be a list")
        for item in queued:
            try:
                state.apply(check_op([kind, *item] if isinstance(item, list) else None))
            except ValueError:
                raise bad(f"invalid {kind} {str(item)[:200]}") from None
    return state, journal_seq


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


# -- the journal ------------------------------------------------------------------------


def encode_line(seq: int, ops: list[Op]) -> bytes:
    """One journal line: checksum, then ``[seq, ops]`` as compact JSON."""
    body = json.dumps([seq, ops], separators=(",", ":")).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_line(line: bytes) -> tuple[int, list[Op]]:
    """``(seq, ops)`` of one journal line without its newline; raises ``ValueError``."""
    crc, _, body = line.partition(b" ")
    if len(crc) != 8 or b"%08x" % zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    try:
        doc = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if not (isinstance(doc, list) and len(doc) == 2 and type(doc[0]) is int):
        raise ValueError("expected [seq, [op, ...]]")
    seq, ops = doc
    if seq < 1 or not isinstance(ops, list) or not ops:
        raise ValueError("expected a positive seq and a non-empty list of ops")
    return seq, [check_op(op) for op in ops]


def _replay(path: str, state: StoreState, after: int) -> tuple[int, int]:
    """Apply the journal at ``path`` to ``state`` (which holds lines up to ``after``).

    Returns the last seq applied (``after`` when none) and the length of the journal's
    good part in bytes (a torn last line excluded). Raises ``StoreError`` naming the
    journal and the line when it is damaged or does not continue the snapshot.
    """
    try:
        data = fsutil.read_file(path)
    except FileNotFoundError:
        return after, 0
    except OSError as exc:
        raise StoreError(
            f"cannot read registry journal {path}: {exc.strerror or exc}", path=path
        ) from None
    lines = data.split(b"\n")
    torn = lines.pop()  # what follows the last newline: a write cut off by a crash
    if torn:
        log.warning("ignoring %d bytes of an unfinished write at the end of %s", len(torn), path)
    last, good = after, 0
    for number, line in enumerate(lines, 1):
        try:
            seq, ops = _decode_line(line)
        except ValueError as exc:
            if number == len(lines) and not torn:
                log.warning("ignoring the unfinished last line %d of %s", number, path)
                break
            raise StoreError(
                f"registry journal {path} line {number} is damaged: {exc}", path=path
            ) from None
        if seq > after:
            if seq != last + 1:
                raise StoreError(
                    f"registry journal {path} line {number} has seq {seq}, expected "
                    f"{last + 1}: it does not continue the store beside it",
                    path=path,
                )
            for op in ops:
                state.apply(op)
            last = seq
        good += len(line) + 1
    return last, good


def read_state(path: str) -> StoreState:
    """The state the store at ``path`` holds (snapshot and journal), read without changing
    anything (for checks and tools). A missing snapshot is an empty state, whatever journal
    is beside it (see ``_read_snapshot``). Raises ``StoreError``."""
    state, seq = _read_snapshot(path)
    if seq >= 0:
        _replay(path + JOURNAL_SUFFIX, state, seq)
    return state


def _read_snapshot(path: str) -> tuple[StoreState, int]:
    """The snapshot's state and ``journal_seq``; -1 for a missing snapshot. The registry
    writes its snapshot before its first journal line and never removes it, so a journal
    without one was left by someone who removed the snapshot to start afresh: it is not
    applied."""
    try:
        raw = fsutil.read_file(path)
    except FileNotFoundError:
        return StoreState(), -1
    except OSError as exc:
        raise StoreError(
            f"{path}: cannot read registry store: {exc.strerror or exc}", path=path
        ) from None
    return decode(raw, path)


Capture = Callable[[], tuple[int, StoreState]]


class Store:
    """The store at ``path`` (snapshot) and ``path + ".journal"``, as its one writer sees it.

    ``load`` once (it takes ``path + ".lock"``: one registry per store); then, under the
    registry's lock, ``stage`` the ops of a request (which numbers its line), and after
    releasing the lock ``commit`` up to that number (group commit: one writer at a time
    writes every staged line and fsyncs). ``start_compactor`` runs the background
    compaction, when the journal is larger than the snapshot and than ``compact_at``
    bytes; ``close`` stops it, leaves the snapshot alone current and releases the lock.
    Thread-safe.
    """

    def __init__(self, path: str, compact_at: int = COMPACT_AT) -> None:
        self.path = path
        self.journal_path = path + JOURNAL_SUFFIX
        self._compact_at = compact_at
        self._file_lock: filelock.FileLock | None = None
        self._lock = threading.Lock()  # staged lines and numbers
        self._write_lock = threading.Lock()  # the journal file: one writer at a time
        self._pending: list[tuple[int, bytes]] = []
        self._staged = 0
        self._durable = 0
        self._fd: int | None = None
        self._size = 0  # bytes of the journal file
        self._ends: dict[int, int] = {}  # seq -> offset just past its line
        self._snapshot_size = 0
        self._capture: Capture | None = None
        self._wanted = threading.Event()
        self._closing = False
        self._compactor: threading.Thread | None = None

    @property
    def staged(self) -> int:
        """The number of the last line staged (call under the registry's lock)."""
        return self._staged

    def load(self) -> StoreState:
        """The stored state; creates an empty snapshot when there is none (so an unwritable
        path fails at start, not at the first registration), cuts off a torn last journal
        line and opens the journal for appending. Raises ``StoreError``."""
        self._file_lock = fsutil.hold_lock(self.path + ".lock", f"registry store {self.path}")
        try:
            return self._load()
        except BaseException:
            self._file_lock.release()
            self._file_lock = None
            raise

    def _load(self) -> StoreState:
        fsutil.remove_stale_temporaries(self.path)
        fsutil.remove_stale_temporaries(self.journal_path)
        state, seq = _read_snapshot(self.path)
        try:
            if seq < 0:
                self._set_aside_orphan_journal()
                seq = 0
            last, good = _replay(self.journal_path, state, seq)
            if not os.path.lexists(self.path):
                fsutil.write_atomically(self.path, encode(state, last))
            self._snapshot_size = os.lstat(self.path).st_size
            fd = fsutil.open_nofollow(self.journal_path, os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_size != good:
                    os.ftruncate(fd, good)  # drop a torn last line before appending
                    os.fsync(fd)
            except OSError:
                os.close(fd)
                raise
            fsutil.fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot write registry store: {exc.strerror or exc}", path=self.path
            ) from None
        self._fd, self._size = fd, good
        self._staged = self._durable = last
        self._ends = {last: good}
        return state

    def _set_aside_orphan_journal(self) -> None:
        """Move a journal found without its snapshot out of the way (kept, not applied)."""
        try:
            size = os.lstat(self.journal_path).st_size
        except FileNotFoundError:
            return
        if size:
            aside = f"{self.journal_path}.orphan-{int(time.time())}"
            os.replace(self.journal_path, aside)
            log.warning(
                "%s is missing: its journal (%d bytes) is not applied, moved to %s",
                self.path,
                size,
                aside,
            )

    def stage(self, ops: list[Op]) -> int:
        """Number and queue the journal line of ``ops``; returns its number for ``commit``.
        Call under the registry's lock, so lines are numbered in the order ops applied."""
        with self._lock:
            self._staged += 1
            self._pending.append((self._staged, encode_line(self._staged, ops)))
            return self._staged

    def commit(self, seq: int) -> None:
        """Return once line ``seq`` (and every line before it) is durable. Call without the
        registry's lock. Raises ``OSError`` when the write fails; its lines stay staged and
        go to disk with the next write that succeeds."""
        if self._durable >= seq:
            return
        with self._write_lock:
            if self._durable >= seq:
                return
            if self._fd is None:
                raise OSError("the registry store is closed")
            with self._lock:
                batch, self._pending = self._pending, []
            start = self._size
            data = b"".join(line for _, line in batch)
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(self._fd, data[written:], start + written)
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                with self._lock:
                    self._pending = batch + self._pending
                raise
            end = start
            for number, line in batch:
                end += len(line)
                self._ends[number] = end
            self._size, self._durable = end, batch[-1][0]
            if self._size > max(self._compact_at, self._snapshot_size):
                self._wanted.set()

    def start_compactor(self, capture: Capture) -> None:
        """Compact in a background thread whenever the journal outgrows the snapshot;
        ``capture`` returns, under the registry's lock, the last staged line's number and
        a ``StoreState.copy`` holding exactly the lines up to it."""
        self._capture = capture
        self._compactor = threading.Thread(
            target=self._compact_loop, name="registry-compactor", daemon=True
        )
        self._compactor.start()

    def compact(self) -> None:
        """Write a snapshot of the current state and cut the journal to the lines after it.
        Never under the registry's lock: ``capture`` takes it briefly. Raises ``OSError``,
        and ``RuntimeError`` before ``start_compactor`` (nothing to capture the state from)."""
        if self._capture is None:
            raise RuntimeError("compact() before start_compactor()")
        seq, state = self._capture()
        data = encode(state, seq)
        self.commit(seq)  # the lines the snapshot holds are on disk before it claims them
        fsutil.write_atomically(self.path, data)
        self._snapshot_size = len(data)
        with self._write_lock:
            if self._fd is None:
                return
            cut = self._ends[seq]
            tail = os.pread(self._fd, self._size - cut, cut) if self._size > cut else b""
            fsutil.write_atomically(self.journal_path, tail)
            fd = fsutil.open_nofollow(self.journal_path, os.O_RDWR)
            os.close(self._fd)
            self._fd, self._size = fd, len(tail)
            self._ends = {n: end - cut for n, end in self._ends.items() if n >= seq}
        log.debug("compacted the registry store at line %d (%d bytes)", seq, len(data))

    def _compact_loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                self.compact()
            except OSError as exc:
                log.error("cannot compact the registry store %s: %s", self.path, exc)

    def close(self) -> None:
        """Stop compacting, write what is staged, and leave the snapshot alone current (a
        last compaction) when it can. Later ``commit`` calls raise ``OSError``."""
        self._closing = True
        self._wanted.set()
        if self._compactor is not None:
            self._compactor.join()
            self._compactor = None
        try:
            with contextlib.suppress(OSError):
                self.commit(self._staged)
            if self._capture is not None and self._size:
                self.compact()
        except OSError as exc:
            log.error("cannot compact the registry store %s at stop: %s", self.path, exc)
        with self._write_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._file_lock is not None:
            self._file_lock.release()
            self._file_lock = None
