"""The embedded registry (``pilot-registryd``): the SPEC section 11 messages on one machine.

It answers like the production registry: every refusal, whatever its cause, is the error
``request failed`` (the cause is logged at INFO). Decisions it makes where SPEC is silent:

- A node that misses heartbeats for ``expiry`` seconds goes offline: ``lookup``,
  ``resolve`` and ``request_handshake`` no longer find it, and its ``heartbeat`` fails
  (which makes a daemon re-register). It keeps its ID, key and trust pairs; registering
  again with the same key brings it back. Its own signed requests (poll, respond, trust)
  still verify against its kept key.
- With ``--store``, nodes (ID, key, visibility, address), trust pairs and the next ID are
  persisted after every change; relay inboxes and the online set are not. Nodes loaded
  from the store count as online from start-up, so a registry restart does not knock the
  fleet offline.
- The response inbox is bounded like the request inbox (100 per node); when full, the
  oldest response is dropped rather than failing the responder.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, NoReturn, Union

import yaml

from .._version import __version__
from ..constants import (
    MAX_REGISTRY_FRAME_SERVER,
    REGISTRY_IDLE_TIMEOUT,
    REGISTRY_INBOX,
    REGISTRY_NODE_EXPIRY,
    REGISTRY_TIMEOUT,
)
from ..errors import ConfigError, HandshakeError, RegistryError, StoreError
from ..identity import b64encode, decode_key, decode_signature, verify
from ..messages import (
    handshake_challenge,
    heartbeat_challenge,
    parse_address,
    poll_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
    set_visibility_challenge,
)
from .client import encode_frame, read_frame

__all__ = ["RegistryServer", "load_config", "main"]

log = logging.getLogger(__name__)

_MAX_NODE_ID = 2**32 - 1
_MAX_NETWORK_ID = 2**16 - 1
_MAX_ADDR_LEN = 512
_FAILED = "request failed"
_STORE_VERSION = 1
# How often serve_forever checks for shutdown: bounds how long stop() takes.
_SHUTDOWN_POLL = 0.1

NetworkEntry = Union[int, str]


class _Refused(Exception):
    """A request the registry refuses; the text is logged, never sent."""


def _refuse(cause: str) -> NoReturn:
    raise _Refused(cause)


@dataclass
class _Node:
    node_id: int
    public_key: bytes
    real_addr: str
    public: bool = False


@dataclass(frozen=True)
class _Members:
    node_ids: frozenset[int]
    keys: frozenset[bytes]


# -- config ----------------------------------------------------------------------------


def _parse_int(value: object, low: int, high: int) -> int | None:
    """An integer (or its decimal text) within low..high; None for anything else."""
    if type(value) is int:
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        return None
    return number if low <= number <= high else None


def parse_networks(raw: object, source: str) -> dict[int, _Members]:
    """Validate ``{network_id: [node_id or base64 key, ...]}``; ``ConfigError`` names ``source``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: networks: expected a mapping of network ID to members")
    result: dict[int, _Members] = {}
    for key, members in raw.items():
        network = _parse_int(key, 1, _MAX_NETWORK_ID)
        if network is None:
            raise ConfigError(
                f"{source}: networks.{key}: expected a network ID 1..{_MAX_NETWORK_ID} "
                "(0 is the backbone every node is on)"
            )
        if not isinstance(members, Sequence) or isinstance(members, str):
            raise ConfigError(f"{source}: networks.{key}: expected a list of members")
        node_ids: set[int] = set()
        keys: set[bytes] = set()
        for index, member in enumerate(members):
            node_id = _parse_int(member, 1, _MAX_NODE_ID)
            raw_key = decode_key(member) if node_id is None else None
            if node_id is not None:
                node_ids.add(node_id)
            elif raw_key is not None:
                keys.add(raw_key)
            else:
                raise ConfigError(
                    f"{source}: networks.{key}[{index}]: expected a node ID "
                    f"1..{_MAX_NODE_ID} or a base64 Ed25519 public key, got {member!r}"
                )
        result[network] = _Members(frozenset(node_ids), frozenset(keys))
    return result


def load_config(path: str) -> dict[int, list[NetworkEntry]]:
    """Read and validate the registry's YAML config; returns its ``networks`` mapping.

    Raises ``ConfigError`` naming the file, the key and what was expected.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(str(k) for k in data if k != "networks")
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (expected only 'networks')")
    raw = data.get("networks")
    parse_networks(raw, path)
    return {int(k): list(v) for k, v in (raw or {}).items()}


# -- request fields ----------------------------------------------------------------------


def _node_field(request: dict[str, Any], name: str) -> int:
    value = request.get(name)
    if type(value) is not int or not 0 < value <= _MAX_NODE_ID:
        _refuse(f"field {name!r} is not a node ID: {value!r}")
    return value


def _str_field(request: dict[str, Any], name: str, default: str | None = None) -> str:
    value = request.get(name, default)
    if not isinstance(value, str):
        _refuse(f"field {name!r} is not a string")
    return value


def _bool_field(request: dict[str, Any], name: str) -> bool:
    value = request.get(name)
    if not isinstance(value, bool):
        _refuse(f"field {name!r} is not a boolean")
    return value


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _real_addr(listen_addr: str, source_ip: str) -> str:
    """The address others dial: ``listen_addr``, with an unspecified host replaced by the
    connection's source IP (a node listening on 0.0.0.0 is reachable where it came from)."""
    if len(listen_addr) > _MAX_ADDR_LEN:
        _refuse("listen_addr too long")
    # Go nodes send ":port" for "all interfaces"; parse_address wants a host.
    text = "0.0.0.0" + listen_addr if listen_addr.startswith(":") else listen_addr
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        _refuse(f"listen_addr: {exc}")
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    return _format_address(source_ip if unspecified else host, port)


def _address_text(node_id: int) -> str:
    """The Pilot virtual address of a node on the backbone: ``0:0000.XXXX.XXXX``."""
    return f"0:0000.{node_id >> 16:04X}.{node_id & 0xFFFF:04X}"


def _pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


# -- persistence --------------------------------------------------------------------------


def _temporary_prefix(path: str) -> str:
    """How the names of the store's temporary files begin (they end in ``.tmp``)."""
    return f".{os.path.basename(path)}."


def _remove_stale_temporaries(path: str) -> None:
    """Delete temporary files a killed registry left beside the store ``path``: they are
    never read as state, and without this every crash would leave one more behind. Only
    files named after this store are touched (one registry per store file)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    try:
        names = os.listdir(directory)
    except OSError as exc:
        log.warning("cannot list %s for stale temporary files: %s", directory, exc)
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove stale temporary file %s: %s", name, exc)


def _write_atomically(path: str, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load_store(path: str) -> tuple[dict[int, _Node], set[tuple[int, int]], int]:
    """Nodes, trust pairs and the next ID from ``path``; a missing file is an empty store."""

    def bad(problem: str) -> StoreError:
        return StoreError(f"{path}: corrupt registry store: {problem}")

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return {}, set(), 1
    except OSError as exc:
        raise StoreError(f"{path}: cannot read registry store: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise bad(str(exc)) from None
    if not isinstance(data, dict) or data.get("version") != _STORE_VERSION:
        raise bad(f"expected an object with version {_STORE_VERSION}")
    next_id = data.get("next_id")
    nodes_raw, trust_raw = data.get("nodes"), data.get("trust")
    if type(next_id) is not int or next_id < 1:
        raise bad("next_id must be a positive integer")
    if not isinstance(nodes_raw, list) or not isinstance(trust_raw, list):
        raise bad("nodes and trust must be lists")
    nodes: dict[int, _Node] = {}
    for item in nodes_raw:
        if not isinstance(item, dict):
            raise bad("a node is not an object")
        node_id, key = item.get("node_id"), decode_key(item.get("public_key"))
        real_addr, public = item.get("real_addr"), item.get("public")
        if (
            type(node_id) is not int
            or not 0 < node_id < next_id
            or key is None
            or not isinstance(real_addr, str)
            or not isinstance(public, bool)
        ):
            raise bad(f"invalid node entry {item!r}")
        nodes[node_id] = _Node(node_id, key, real_addr, public)
    if len({n.public_key for n in nodes.values()}) != len(nodes):
        raise bad("two nodes share one public key")
    trust: set[tuple[int, int]] = set()
    for item in trust_raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(type(x) is int and x in nodes for x in item)
        ):
            raise bad(f"invalid trust pair {item!r}")
        trust.add(_pair(item[0], item[1]))
    return nodes, trust, next_id


# -- the registry state ---------------------------------------------------------------------


class _Registry:
    """The registry's state and the handling of one decoded request. Thread-safe."""

    def __init__(self, store_path: str, networks: dict[int, _Members], expiry: float) -> None:
        self._store_path = store_path
        self._networks = networks
        self._expiry = expiry
        self._lock = threading.Lock()
        if store_path:
            _remove_stale_temporaries(store_path)
        self._nodes, self._trust, self._next_id = (
            _load_store(store_path) if store_path else ({}, set(), 1)
        )
        self._by_key = {n.public_key: n.node_id for n in self._nodes.values()}
        now = time.monotonic()
        self._last_seen = dict.fromkeys(self._nodes, now)
        self._requests: dict[int, dict[int, dict[str, Any]]] = {}
        self._responses: dict[int, list[dict[str, Any]]] = {}
        # Snapshots are numbered so that a writer holding an older one skips it once a
        # newer one is on disk; _write_lock only orders the file writes.
        self._seq = 0
        self._written_seq = 0
        self._write_lock = threading.Lock()
        if store_path and not os.path.exists(store_path):
            # Fail at start, not at the first registration, when the path is unwritable.
            try:
                self._write(self._snapshot())
            except OSError as exc:
                raise StoreError(
                    f"{store_path}: cannot write registry store: {exc.strerror or exc}"
                ) from None
        self._handlers: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
            "register": self._register,
            "heartbeat": self._heartbeat,
            "lookup": self._lookup,
            "resolve": self._resolve,
            "set_visibility": self._set_visibility,
            "report_trust": self._report_trust,
            "revoke_trust": self._revoke_trust,
            "request_handshake": self._request_handshake,
            "poll_handshakes": self._poll_handshakes,
            "respond_handshake": self._respond_handshake,
        }

    def handle(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        """The response to one request; every refusal is ``request failed``."""
        kind = request.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        try:
            if handler is None:
                _refuse(f"unknown request type {kind!r}")
            return handler(request, source_ip)
        except _Refused as exc:
            log.info("refused %s from %s: %s", kind, source_ip, exc)
        except Exception:
            log.exception("internal error handling %s from %s", kind, source_ip)
        return {"type": "error", "error": _FAILED}

    # -- helpers (call holding self._lock unless noted) --

    def _online(self, node_id: int) -> bool:
        seen = self._last_seen.get(node_id)
        if seen is None:
            return False
        if time.monotonic() - seen > self._expiry:
            del self._last_seen[node_id]
            log.info("node %d missed its heartbeats: offline", node_id)
            return False
        return True

    def _online_node(self, node_id: int) -> _Node:
        node = self._nodes.get(node_id)
        if node is None or not self._online(node_id):
            _refuse(f"node {node_id} is not online")
        return node

    def _networks_of(self, node: _Node) -> list[int]:
        """The node's networks, backbone 0 first."""
        joined = sorted(
            network
            for network, members in self._networks.items()
            if node.node_id in members.node_ids or node.public_key in members.keys
        )
        return [0, *joined]

    def _snapshot(self) -> tuple[int, bytes] | None:
        """The durable state, numbered, to write after releasing the lock."""
        if not self._store_path:
            return None
        self._seq += 1
        data = {
            "version": _STORE_VERSION,
            "next_id": self._next_id,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "public_key": b64encode(n.public_key),
                    "public": n.public,
                    "real_addr": n.real_addr,
                }
                for n in self._nodes.values()
            ],
            "trust": sorted([a, b] for a, b in self._trust),
        }
        return self._seq, json.dumps(data, indent=1).encode("ascii")

    def _write(self, snapshot: tuple[int, bytes] | None) -> None:
        """Write ``snapshot`` unless a newer one is on disk (call without self._lock)."""
        if snapshot is None:
            return
        seq, data = snapshot
        with self._write_lock:
            if seq > self._written_seq:
                _write_atomically(self._store_path, data)
                self._written_seq = seq

    def _save(self, snapshot: tuple[int, bytes] | None) -> None:
        """``_write``, refusing the request when the write fails (the change stays in
        memory and goes to disk with the next successful write)."""
        try:
            self._write(snapshot)
        except OSError as exc:
            log.error("cannot write registry store %s: %s", self._store_path, exc)
            _refuse("store write failed")

    def _verified(self, request: dict[str, Any], node_id: int, challenge: bytes) -> None:
        """Refuse unless ``signature`` is ``node_id``'s signature of ``challenge``.

        Call without self._lock: verification is CPU work, and a node's key never changes.
        """
        with self._lock:
            node = self._nodes.get(node_id)
        if node is None:
            _refuse(f"node {node_id} is not registered")
        signature = decode_signature(request.get("signature"))
        if signature is None:
            _refuse(f"missing or malformed signature from node {node_id}")
        if not verify(node.public_key, challenge, signature):
            _refuse(f"bad signature from node {node_id}")

    # -- the messages --

    def _register(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        key = decode_key(request.get("public_key"))
        if key is None:
            _refuse("public_key is not a base64 Ed25519 key")
        for optional in ("owner", "hostname"):
            _str_field(request, optional, "")
        real_addr = _real_addr(_str_field(request, "listen_addr"), source_ip)
        snapshot = None
        with self._lock:
            node_id = self._by_key.get(key)
            if node_id is None:
                node_id = self._next_id
                self._next_id += 1
                self._nodes[node_id] = _Node(node_id, key, real_addr)
                self._by_key[key] = node_id
                snapshot = self._snapshot()
                log.info("registered node %d at %s", node_id, real_addr)
            elif self._nodes[node_id].real_addr != real_addr:
                self._nodes[node_id].real_addr = real_addr
                snapshot = self._snapshot()
            self._last_seen[node_id] = time.monotonic()
        self._save(snapshot)
        return {
            "type": "register_ok",
            "node_id": node_id,
            "address": _address_text(node_id),
            "public_key": b64encode(key),
        }

    def _heartbeat(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        self._verified(request, node_id, heartbeat_challenge(node_id))
        with self._lock:
            self._online_node(node_id)
            self._last_seen[node_id] = time.monotonic()
        return {"type": "heartbeat_ok", "time": int(time.time())}

    def _lookup(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        with self._lock:
            node = self._online_node(node_id)
            response: dict[str, Any] = {
                "type": "lookup_ok",
                "node_id": node_id,
                "public_key": b64encode(node.public_key),
                "networks": self._networks_of(node),
                "public": node.public,
            }
            if node.public:
                response["real_addr"] = node.real_addr
        return response

    def _resolve(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        target_id = _node_field(request, "node_id")
        requester_id = _node_field(request, "requester_id")
        self._verified(request, requester_id, resolve_challenge(requester_id, target_id))
        with self._lock:
            target = self._online_node(target_id)
            requester = self._nodes[requester_id]
            shared = set(self._networks_of(target)) & set(self._networks_of(requester))
            allowed = (
                target.public or bool(shared - {0}) or _pair(target_id, requester_id) in self._trust
            )
            real_addr = target.real_addr
        if not allowed:
            _refuse(f"node {requester_id} may not resolve private node {target_id}")
        return {"type": "resolve_ok", "node_id": target_id, "real_addr": real_addr}

    def _set_visibility(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        public = _bool_field(request, "public")
        self._verified(request, node_id, set_visibility_challenge(node_id))
        snapshot = None
        with self._lock:
            node = self._nodes[node_id]
            if node.public != public:
                node.public = public
                snapshot = self._snapshot()
        self._save(snapshot)
        return {"type": "set_visibility_ok"}

    def _report_trust(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        peer_id = _node_field(request, "peer_id")
        self._verified(request, node_id, report_trust_challenge(node_id, peer_id))
        snapshot = None
        with self._lock:
            if peer_id not in self._nodes or peer_id == node_id:
                _refuse(f"trust pair {node_id}-{peer_id}: peer is not a registered other node")
            if _pair(node_id, peer_id) not in self._trust:
                self._trust.add(_pair(node_id, peer_id))
                snapshot = self._snapshot()
        self._save(snapshot)
        return {"type": "report_trust_ok"}

    def _revoke_trust(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        peer_id = _node_field(request, "peer_id")
        self._verified(request, node_id, revoke_trust_challenge(node_id, peer_id))
        with self._lock:
            if _pair(node_id, peer_id) not in self._trust:
                _refuse(f"no trust pair {node_id}-{peer_id} to revoke")
            self._trust.discard(_pair(node_id, peer_id))
            snapshot = self._snapshot()
        self._save(snapshot)
        return {"type": "revoke_trust_ok"}

    def _request_handshake(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        from_id = _node_field(request, "from_node_id")
        to_id = _node_field(request, "to_node_id")
        justification = _str_field(request, "justification", "")
        self._verified(request, from_id, handshake_challenge(from_id, to_id))
        with self._lock:
            self._online_node(to_id)
            inbox = self._requests.setdefault(to_id, {})
            if from_id in inbox:
                _refuse(f"a request from {from_id} already waits in {to_id}'s inbox")
            if len(inbox) >= REGISTRY_INBOX:
                _refuse(f"inbox of node {to_id} is full")
            inbox[from_id] = {
                "from_node_id": from_id,
                "justification": justification,
                "timestamp": int(time.time()),
                "public_key": b64encode(self._nodes[from_id].public_key),
            }
        return {"type": "request_handshake_ok", "status": "delivered"}

    def _poll_handshakes(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        self._verified(request, node_id, poll_challenge(node_id))
        with self._lock:
            requests = self._requests.pop(node_id, {})
            responses = self._responses.pop(node_id, [])
        return {
            "type": "poll_handshakes_ok",
            "requests": list(requests.values()),
            "responses": responses,
        }

    def _respond_handshake(self, request: dict[str, Any], source_ip: str) -> dict[str, Any]:
        node_id = _node_field(request, "node_id")
        peer_id = _node_field(request, "peer_id")
        accept = _bool_field(request, "accept")
        self._verified(request, node_id, respond_challenge(node_id, peer_id))
        snapshot = None
        with self._lock:
            if peer_id not in self._nodes or peer_id == node_id:
                _refuse(f"respond to {peer_id}: not a registered other node")
            if accept and _pair(node_id, peer_id) not in self._trust:
                self._trust.add(_pair(node_id, peer_id))
                snapshot = self._snapshot()
            inbox = self._responses.setdefault(peer_id, [])
            if len(inbox) >= REGISTRY_INBOX:
                dropped = inbox.pop(0)
                log.info("response inbox of %d full: dropped %r", peer_id, dropped)
            inbox.append({"from_node_id": node_id, "accept": accept, "timestamp": int(time.time())})
        self._save(snapshot)
        return {"type": "respond_handshake_ok"}


# -- the network side ------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    """One connection: frames in, frames out, until the peer closes or misbehaves."""

    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        source_ip = str(self.client_address[0])
        try:
            if self.server.tls is not None:
                sock.settimeout(REGISTRY_TIMEOUT)
                sock = self.server.tls.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:
            log.info("TLS handshake with %s failed: %s", source_ip, exc)
            return
        with self.server.tracked(sock):
            self._serve(sock, source_ip)
        if sock is not self.request:
            sock.close()

    def _serve(self, sock: socket.socket, source_ip: str) -> None:
        registry = self.server.registry
        while True:
            try:
                request = read_frame(
                    sock, MAX_REGISTRY_FRAME_SERVER, REGISTRY_IDLE_TIMEOUT, REGISTRY_TIMEOUT
                )
            except RegistryError as exc:
                log.info("bad frame from %s: %s; closing", source_ip, exc)
                with contextlib.suppress(OSError):
                    sock.sendall(encode_frame({"type": "error", "error": _FAILED}))
                return
            except OSError as exc:
                log.debug("connection from %s ended: %s", source_ip, exc)
                return
            if request is None:
                return
            try:
                sock.sendall(encode_frame(registry.handle(request, source_ip)))
            except OSError as exc:
                log.debug("cannot answer %s: %s", source_ip, exc)
                return


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], registry: _Registry, tls: ssl.SSLContext | None
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.tls = tls
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    @contextlib.contextmanager
    def tracked(self, sock: socket.socket) -> Iterator[None]:
        """Register an open connection so ``close_connections`` can end it."""
        with self._connections_lock:
            self._connections.add(sock)
        try:
            yield
        finally:
            with self._connections_lock:
                self._connections.discard(sock)

    def close_connections(self) -> None:
        """Shut down every open connection (their handler threads then end)."""
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class RegistryServer:
    """The embedded registry on ``(host, port)`` (port 0 picks a free one; see ``.address``).

    ``store_path`` persists nodes and trust pairs (""; memory only); ``networks`` maps a
    network ID to members (node IDs or base64 keys); ``expiry`` is how long a node stays
    online without a heartbeat; ``certfile``/``keyfile`` serve TLS. Raises ``StoreError``
    for an unreadable store, ``ConfigError`` for bad networks, ``OSError`` when it cannot
    bind.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        store_path: str = "",
        networks: Mapping[int, Sequence[NetworkEntry]] | None = None,
        expiry: float = REGISTRY_NODE_EXPIRY,
        certfile: str = "",
        keyfile: str = "",
    ) -> None:
        registry = _Registry(store_path, parse_networks(networks, "networks"), expiry)
        tls = None
        if certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                tls.load_cert_chain(certfile, keyfile or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{certfile}: cannot load TLS certificate: {exc}") from None
        self._server = _TCPServer((host, port), registry, tls)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_SHUTDOWN_POLL,),
            name="pilot-registryd",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open connection. Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``pilot-registryd``: run the embedded registry until SIGTERM/SIGINT; the exit code."""
    parser = argparse.ArgumentParser(
        prog="pilot-registryd", description="Run the embedded Pilot registry."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--store", default="", metavar="PATH", help="persist state here")
    parser.add_argument("--config", default="", metavar="PATH", help="YAML: networks")
    parser.add_argument("--tls-cert", default="", metavar="PATH", help="serve TLS (PEM)")
    parser.add_argument("--tls-key", default="", metavar="PATH", help="key of --tls-cert")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    try:
        networks = load_config(args.config) if args.config else None
        server = RegistryServer(
            host,
            port,
            store_path=args.store,
            networks=networks,
            certfile=args.tls_cert,
            keyfile=args.tls_key,
        )
    except HandshakeError as exc:
        print(f"pilot-registryd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"pilot-registryd: cannot listen on {args.listen}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"pilot-registryd listening on {_format_address(*server.address)}", flush=True)
    # A bounded wait keeps the main thread responsive to signals on every platform.
    while not stop.wait(1.0):
        pass
    server.stop()
    log.info("pilot-registryd stopped")
    return 0
