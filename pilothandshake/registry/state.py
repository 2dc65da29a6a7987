"""The embedded registry's state and its answer to one request: no sockets, no threads.

``Registry.handle(request, source) -> response`` is the whole protocol of SPEC 11 as this
registry speaks it; the socket server (``server.py``) only moves frames. Decisions it
makes where SPEC leaves room:

- **Errors say why** ("node 99 is not online"), in the production shape
  ``{"type": "error", "error": <text>}``; the production registry says ``request failed``
  for everything. A refused ``register`` (rate limit) and an internal fault say
  ``request failed`` here too. Client-supplied values appear only quoted and cut short.
- **Resolve is gated by vouches.** A vouch is directed: ``(a, b)`` means node ``a`` vouched
  for node ``b``, and then ``b`` may resolve ``a``. Every path that creates a trust pair
  records a vouch by the node that *signed* the request, for its peer, through
  ``_vouch``: ``report_trust`` (N vouches for P), an accepting ``respond_handshake``
  (N vouches for the requester P) and a queued ``request_handshake`` (the sender vouches
  for its target, who needs to dial it back). So an attacker's own calls let only its
  victim resolve it, never the reverse. A trust pair, for ``revoke_trust``, is a vouch in
  either direction; revoking removes both.
- **Offline is not gone.** A node that misses heartbeats for ``expiry`` seconds is offline:
  ``lookup``, ``resolve``, ``resolve_hostname`` and ``request_handshake`` no longer find
  it and its ``heartbeat`` fails (so the daemon re-registers). It keeps its ID, key,
  hostname and vouches; its own signed requests still verify against its kept key.
  Nodes loaded from the store count as online from start-up.
- **Hostnames** as the production registry (SPEC 11): ``register`` with a taken or invalid
  name registers without it (the answer has no ``hostname`` and says why in
  ``hostname_error``); ``register`` without one keeps the node's current name.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..constants import DROP_LOG_PER_SECOND, REGISTRY_NODE_EXPIRY
from ..identity import b64encode, decode_key, decode_signature, verify
from ..messages import (
    handshake_challenge,
    heartbeat_challenge,
    poll_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
    set_hostname_challenge,
    set_visibility_challenge,
)
from .config import Limits, Members
from .fields import (
    FAILED,
    Refused,
    address_text,
    bool_field,
    hostname_problem,
    node_field,
    real_addr,
    refuse,
    str_field,
)
from .inbox import Inboxes
from .ratelimit import PerSource, RateLimitedLog, quote
from .storage import Node, Store, StoreState, encode

__all__ = ["Registry"]

log = logging.getLogger(__name__)

_Handler = Callable[[dict[str, Any], str], dict[str, Any]]


class Registry:
    """The registry's state and the handling of one decoded request. Thread-safe.

    ``store`` persists nodes and vouches (None: memory only); ``networks`` places nodes
    into networks; ``expiry`` is how long a node stays online without a heartbeat;
    ``clock`` (monotonic seconds) ages nodes, inboxes and rate limits. Raises
    ``StoreError`` when the store cannot be read or created.
    """

    def __init__(
        self,
        store: Store | None = None,
        networks: dict[int, Members] | None = None,
        *,
        limits: Limits | None = None,
        expiry: float = REGISTRY_NODE_EXPIRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._networks = networks or {}
        self._expiry = expiry
        self._clock = clock
        self._lock = threading.Lock()
        self._state = store.load() if store is not None else StoreState()
        self._by_key = {n.public_key: n.node_id for n in self._state.nodes.values()}
        self._by_hostname = {
            n.hostname: n.node_id for n in self._state.nodes.values() if n.hostname
        }
        self._last_seen = dict.fromkeys(self._state.nodes, clock())
        self._inboxes = Inboxes()
        self._register_limit = PerSource((limits or Limits()).register_per_minute)
        self._refusals = RateLimitedLog(log, DROP_LOG_PER_SECOND)
        self._seq = 0
        self._handlers: dict[str, _Handler] = {
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
            "set_hostname": self._set_hostname,
            "resolve_hostname": self._resolve_hostname,
        }

    def handle(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        """The response to one request from the address ``source``."""
        kind = request.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        try:
            if handler is None:
                refuse(f"unknown request type {quote(kind)}")
            return handler(request, source)
        except Refused as exc:
            self._refusals.log(
                logging.INFO, self._clock(), "refused %s from %s: %s", quote(kind), source, exc
            )
            return {"type": "error", "error": exc.answer}
        except Exception:
            log.exception("internal error handling %s from %s", quote(kind), source)
            return {"type": "error", "error": FAILED}

    def inbox_entries(self) -> int:
        """How many relayed requests and responses are held (for tests and bounds)."""
        with self._lock:
            return self._inboxes.entries()

    # -- helpers (call holding self._lock unless noted) --

    def _online_node(self, node_id: int) -> Node:
        node = self._state.nodes.get(node_id)
        seen = self._last_seen.get(node_id)
        if node is None or seen is None:
            refuse(f"node {node_id} is not online")
        if self._clock() - seen > self._expiry:
            del self._last_seen[node_id]
            log.info("node %d missed its heartbeats: offline", node_id)
            refuse(f"node {node_id} is not online")
        return node

    def _networks_of(self, node: Node) -> list[int]:
        """The node's networks, backbone 0 first."""
        joined = sorted(
            network
            for network, members in self._networks.items()
            if node.node_id in members.node_ids or node.public_key in members.keys
        )
        return [0, *joined]

    def _vouch(self, voucher: int, vouchee: int) -> bool:
        """Record that ``voucher`` (who signed the request) vouched for ``vouchee``, who
        may now resolve it: the one rule for every request that creates a trust pair.
        Returns whether anything changed."""
        if vouchee not in self._state.nodes or vouchee == voucher:
            refuse(f"node {vouchee} is not a registered other node")
        if (voucher, vouchee) in self._state.vouches:
            return False
        self._state.vouches.add((voucher, vouchee))
        return True

    def _may_resolve(self, requester: Node, target: Node) -> bool:
        shared = set(self._networks_of(target)) & set(self._networks_of(requester))
        return (
            target.public
            or bool(shared - {0})
            or (target.node_id, requester.node_id) in self._state.vouches
        )

    def _give_hostname(self, node: Node, hostname: str) -> str:
        """Give ``node`` the (valid) ``hostname``; "" clears. Returns why not, or ""."""
        holder = self._by_hostname.get(hostname) if hostname else None
        if holder is not None and holder != node.node_id:
            return f"hostname {hostname!r} is taken by node {holder}"
        self._by_hostname.pop(node.hostname, None)
        node.hostname = hostname
        if hostname:
            self._by_hostname[hostname] = node.node_id
        return ""

    def _snapshot(self) -> tuple[int, bytes] | None:
        """The durable state, numbered, to write after releasing the lock."""
        if self._store is None:
            return None
        self._seq += 1
        return self._seq, encode(self._state)

    def _save(self, snapshot: tuple[int, bytes] | None) -> None:
        """Write ``snapshot`` (call without the lock); a failed write refuses the request
        (the change stays in memory and goes to disk with the next successful write)."""
        if snapshot is None or self._store is None:
            return
        try:
            self._store.write(*snapshot)
        except OSError as exc:
            log.error("cannot write registry store %s: %s", self._store.path, exc)
            refuse("store write failed", "the registry cannot write its store")

    def _verified(self, request: dict[str, Any], node_id: int, challenge: bytes) -> Node:
        """Refuse unless ``signature`` is ``node_id``'s signature of ``challenge``.

        Call without self._lock: verification is CPU work, and a node's key never changes.
        """
        with self._lock:
            node = self._state.nodes.get(node_id)
        if node is None:
            refuse(f"node {node_id} is not registered")
        signature = decode_signature(request.get("signature"))
        if signature is None:
            refuse(f"missing or malformed signature from node {node_id}")
        if not verify(node.public_key, challenge, signature):
            refuse(f"bad signature from node {node_id}")
        return node

    # -- the messages --

    def _register(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        key = decode_key(request.get("public_key"))
        if key is None:
            refuse("public_key is not a base64 Ed25519 key")
        str_field(request, "owner", "")
        hostname = str_field(request, "hostname", "")
        address = real_addr(str_field(request, "listen_addr"), source)
        hostname_error = hostname_problem(hostname) if hostname else ""
        now = self._clock()
        with self._lock:
            node_id = self._by_key.get(key)
            if node_id is None:
                # Only new keys cost a token: a known node re-registers freely (as in the
                # production registry), so a restart wave never locks a fleet out.
                if not self._register_limit.take(source, now):
                    refuse(f"register rate limit for {source}", FAILED)
                node_id = self._state.next_id
                self._state.next_id += 1
                self._state.nodes[node_id] = Node(node_id, key, address)
                self._by_key[key] = node_id
                log.info("registered node %d at %s", node_id, quote(address))
            node = self._state.nodes[node_id]
            node.real_addr = address
            self._last_seen[node_id] = now
            response: dict[str, Any] = {
                "type": "register_ok",
                "node_id": node_id,
                "address": address_text(node_id),
                "public_key": b64encode(key),
            }
            if hostname and not hostname_error:
                hostname_error = self._give_hostname(node, hostname)
                if not hostname_error:
                    response["hostname"] = hostname
            snapshot = self._snapshot()
        self._save(snapshot)
        if hostname_error:
            # Not in SPEC's table; the production registry adds it for an invalid name.
            response["hostname_error"] = hostname_error
        return response

    def _heartbeat(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        self._verified(request, node_id, heartbeat_challenge(node_id))
        with self._lock:
            self._online_node(node_id)
            self._last_seen[node_id] = self._clock()
        return {"type": "heartbeat_ok", "time": int(time.time())}

    def _lookup(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
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
            if node.hostname:
                response["hostname"] = node.hostname
        return response

    def _resolve(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        target_id = node_field(request, "node_id")
        requester_id = node_field(request, "requester_id")
        requester = self._verified(
            request, requester_id, resolve_challenge(requester_id, target_id)
        )
        with self._lock:
            target = self._online_node(target_id)
            if not self._may_resolve(requester, target):
                refuse(
                    f"node {requester_id} may not resolve private node {target_id} (it has "
                    "not vouched for the requester and they share no network)"
                )
            return {"type": "resolve_ok", "node_id": target_id, "real_addr": target.real_addr}

    def _set_visibility(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        public = bool_field(request, "public")
        node = self._verified(request, node_id, set_visibility_challenge(node_id))
        snapshot = None
        with self._lock:
            if node.public != public:
                node.public = public
                snapshot = self._snapshot()
        self._save(snapshot)
        return {"type": "set_visibility_ok"}

    def _report_trust(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        peer_id = node_field(request, "peer_id")
        self._verified(request, node_id, report_trust_challenge(node_id, peer_id))
        with self._lock:
            snapshot = self._snapshot() if self._vouch(node_id, peer_id) else None
        self._save(snapshot)
        return {"type": "report_trust_ok"}

    def _revoke_trust(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        peer_id = node_field(request, "peer_id")
        self._verified(request, node_id, revoke_trust_challenge(node_id, peer_id))
        with self._lock:
            vouches = self._state.vouches
            if (node_id, peer_id) not in vouches and (peer_id, node_id) not in vouches:
                refuse(f"no trust pair {node_id}-{peer_id} to revoke")
            vouches.discard((node_id, peer_id))
            vouches.discard((peer_id, node_id))
            snapshot = self._snapshot()
        self._save(snapshot)
        return {"type": "revoke_trust_ok"}

    def _request_handshake(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        from_id = node_field(request, "from_node_id")
        to_id = node_field(request, "to_node_id")
        justification = str_field(request, "justification", "")
        sender = self._verified(request, from_id, handshake_challenge(from_id, to_id))
        entry = {
            "from_node_id": from_id,
            "justification": justification,
            "timestamp": int(time.time()),
            "public_key": b64encode(sender.public_key),
        }
        with self._lock:
            self._online_node(to_id)
            refusal = self._inboxes.add_request(to_id, entry, self._clock())
            if refusal:
                refuse(refusal)
            snapshot = self._snapshot() if self._vouch(from_id, to_id) else None
        self._save(snapshot)
        return {"type": "request_handshake_ok", "status": "delivered"}

    def _poll_handshakes(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        self._verified(request, node_id, poll_challenge(node_id))
        with self._lock:
            requests, responses = self._inboxes.drain(node_id, self._clock())
        return {"type": "poll_handshakes_ok", "requests": requests, "responses": responses}

    def _respond_handshake(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        peer_id = node_field(request, "peer_id")
        accept = bool_field(request, "accept")
        self._verified(request, node_id, respond_challenge(node_id, peer_id))
        entry = {"from_node_id": node_id, "accept": accept, "timestamp": int(time.time())}
        with self._lock:
            if peer_id not in self._state.nodes or peer_id == node_id:
                refuse(f"node {peer_id} is not a registered other node")
            changed = accept and self._vouch(node_id, peer_id)
            if not self._inboxes.add_response(peer_id, entry, self._clock()):
                log.info("response inbox of node %d full: dropped its oldest", peer_id)
            snapshot = self._snapshot() if changed else None
        self._save(snapshot)
        return {"type": "respond_handshake_ok"}

    def _set_hostname(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        hostname = str_field(request, "hostname")
        node = self._verified(request, node_id, set_hostname_challenge(node_id))
        problem = hostname_problem(hostname) if hostname else ""
        if problem:
            refuse(problem)
        with self._lock:
            problem = self._give_hostname(node, hostname)
            if problem:
                refuse(problem)
            snapshot = self._snapshot()
        self._save(snapshot)
        return {"type": "set_hostname_ok", "node_id": node_id, "hostname": hostname}

    def _resolve_hostname(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        hostname = str_field(request, "hostname")
        with self._lock:
            node_id = self._by_hostname.get(hostname)
            if node_id is None:
                refuse(f"hostname {quote(hostname)} is not registered")
            node = self._online_node(node_id)
            return {
                "type": "resolve_hostname_ok",
                "node_id": node_id,
                "address": address_text(node_id),
                "public": node.public,
                "hostname": hostname,
            }
