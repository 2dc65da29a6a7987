"""The embedded registry's state and its answer to one request: no sockets.

``Registry.handle(request, source) -> response`` is the whole protocol of SPEC 11 as this
registry speaks it; the socket server (``server.py``) only moves frames. Decisions it
makes where SPEC leaves room:

- **Errors say why** ("node 99 is not online"), in the production shape
  ``{"type": "error", "error": <text>}``; the production registry says ``request failed``
  for everything. A rate-limited or capped request and an internal fault say
  ``request failed`` here too. Client-supplied values appear only quoted and cut short.
- **Resolve is gated by vouches.** A vouch is directed: ``(a, b)`` means node ``a`` vouched
  for node ``b``, and then ``b`` may resolve ``a``. Every path that creates a trust pair
  records a vouch by the node that *signed* the request, for its peer, through
  ``_vouch``: ``report_trust`` (N vouches for P), an accepting ``respond_handshake``
  (N vouches for the requester P) and a queued ``request_handshake`` (the sender vouches
  for its target, who needs to dial it back). So an attacker's own calls let only its
  victim resolve it, never the reverse. A trust pair, for ``revoke_trust``, is a vouch in
  either direction; revoking removes both. A node gives at most
  ``limits.max_vouches_per_node`` vouches: beyond, ``report_trust`` is refused and a
  relayed request or accept is still relayed, without the vouch.
- **The registry is a directory, not an authority** (SPEC 17, issue 15 item 1). A
  ``register`` of a key that already has a record changes nothing (address, hostname,
  liveness) unless signed by that key over ``register:<key>:<timestamp>`` with a timestamp
  within ``REGISTER_SKEW`` of the registry's clock; unsigned, it answers the existing node
  ID. A bad or stale signature is refused, saying which. Only a signed re-register is
  exempt from the per-address ``register`` bucket. ``owner`` is read and ignored: it never
  binds a node ID to a key.
- **Every mutating request is rate-limited** (``register``, ``set_hostname``,
  ``set_visibility``, ``report_trust``, ``revoke_trust``, ``request_handshake``,
  ``respond_handshake``): per source prefix (IPv4 /24, IPv6 /64) before any signature is
  checked, and per node after its signature verified (so nobody can spend a victim's
  tokens). A request that changes nothing writes nothing. At most ``limits.max_nodes``
  nodes: a new key beyond is refused.
- **Offline is not gone.** A node that misses heartbeats for ``expiry`` seconds is offline:
  ``lookup``, ``resolve``, ``resolve_hostname`` and ``request_handshake`` no longer find
  it. It keeps its ID, key, hostname and vouches; its own signed requests still verify,
  and a signed ``heartbeat`` (or a signed ``register``) brings it back online. Nodes
  loaded from the store count as online from start-up.
- **Hostnames** as the production registry (SPEC 11): ``register`` with a taken or invalid
  name registers without it (the answer has no ``hostname`` and says why in
  ``hostname_error``); ``register`` without one keeps the node's current name.
- **Push** (SPEC 18): ``register_ok`` carries ``"features": ["wait_poll"]``; a
  ``poll_handshakes`` with ``wait`` (seconds, at most ``REGISTRY_MAX_POLL_WAIT``) with
  nothing waiting is held until an item is queued for the node (woken at once), the wait
  ends, a newer held poll of the same node takes over, or the registry closes; then it
  answers what is there (possibly nothing). One held poll per node, at most
  ``limits.max_held_polls`` at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from ..constants import DROP_LOG_PER_SECOND, REGISTRY_MAX_POLL_WAIT, REGISTRY_NODE_EXPIRY
from ..identity import b64encode, decode_key, decode_signature, verify
from ..messages import handshake_challenge
from .challenges import (
    heartbeat_challenge,
    poll_challenge,
    register_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
    set_hostname_challenge,
    set_visibility_challenge,
)
from .config import Members, RegistryLimits
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
from .ratelimit import PerKey, RateLimitedLog, quote, source_prefix
from .storage import Changes, Node, Store, StoreState, node_op

__all__ = ["FEATURES", "REGISTER_SKEW", "Registry"]

log = logging.getLogger(__name__)

# What register_ok advertises (SPEC 18).
FEATURES = ("wait_poll",)
# How far a signed register's timestamp may be from the registry's clock (SPEC 17).
REGISTER_SKEW = 300

_Handler = Callable[[dict[str, Any], str], dict[str, Any]]


def _commit(store: Store, seq: int) -> None:
    """Wait until journal line ``seq`` is durable (call without the lock); a failed write
    refuses the request (the change stays in memory and is written with the next write that
    succeeds)."""
    try:
        store.commit(seq)
    except OSError as exc:
        log.error("cannot write registry store %s: %s", store.path, exc)
        refuse("store write failed", "the registry cannot write its store")


class _Hold:
    """A held poll: woken when an item is queued for its node or when it must end."""

    def __init__(self, lock: threading.Lock) -> None:
        self.wake = threading.Condition(lock)
        self.ended = False


class Registry:
    """The registry's state and the handling of one decoded request. Thread-safe.

    ``store`` persists nodes, vouches and inboxes (None: memory only); ``networks`` places
    nodes into networks; ``limits`` bounds floods; ``expiry`` is how long a node stays
    online without a heartbeat; ``clock`` (monotonic seconds) ages nodes and rate limits,
    ``wall`` (Unix seconds) dates inbox entries and checks signed registers. Raises
    ``StoreError`` when the store cannot be read or created. ``close`` when done.
    """

    def __init__(
        self,
        store: Store | None = None,
        networks: dict[int, Members] | None = None,
        *,
        limits: RegistryLimits | None = None,
        expiry: float = REGISTRY_NODE_EXPIRY,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._networks = networks or {}
        self._limits = limits or RegistryLimits()
        self._expiry = expiry
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._state = store.load() if store is not None else StoreState()
        self._last_seen = dict.fromkeys(self._state.nodes, clock())
        self._inboxes = Inboxes(self._state)
        self._register_limit = PerKey(self._limits.register_per_minute)
        self._by_node = PerKey(self._limits.mutations_per_minute_per_node)
        self._by_source = PerKey(self._limits.mutations_per_minute_per_source)
        self._holds: dict[int, _Hold] = {}
        self._closed = False
        self._refusals = RateLimitedLog(log, DROP_LOG_PER_SECOND)
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
        if store is not None:
            store.start_compactor(functools.partial(self._capture, store))

    def handle(
        self, request: dict[str, Any], source: str, alive: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """The response to one request from the address ``source``. ``alive`` tells whether
        the connection that asked is still open (a held poll checks it before it drains)."""
        kind = request.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        try:
            if handler is None:
                refuse(f"unknown request type {quote(kind)}")
            if handler == self._poll_handshakes:
                return self._poll_handshakes(request, source, alive)
            return handler(request, source)
        except Refused as exc:
            self._refusals.log(
                logging.INFO, self._clock(), "refused %s from %s: %s", quote(kind), source, exc
            )
            return {"type": "error", "error": exc.answer}
        except Exception:
            log.exception("internal error handling %s from %s", quote(kind), source)
            return {"type": "error", "error": FAILED}

    def reconfigure(self, networks: dict[int, Members], limits: RegistryLimits) -> None:
        """Use new networks and limits from now on (a config reload); buckets keep their
        keys and start full at the new rates."""
        with self._lock:
            self._networks = networks
            self._limits = limits
            self._register_limit.per_minute = limits.register_per_minute
            self._by_node.per_minute = limits.mutations_per_minute_per_node
            self._by_source.per_minute = limits.mutations_per_minute_per_source

    def end_polls(self) -> None:
        """Answer every held poll now (with what is there) and hold no more: the first
        step of a stop."""
        with self._lock:
            self._closed = True
            for hold in self._holds.values():
                hold.ended = True
                hold.wake.notify()

    def close(self) -> None:
        """``end_polls``, then close the store, leaving its snapshot alone current."""
        self.end_polls()
        if self._store is not None:
            self._store.close()

    def inbox_entries(self) -> int:
        """How many relayed requests and responses are held (for tests and bounds)."""
        with self._lock:
            return self._inboxes.entries()

    def held_polls(self) -> int:
        """How many polls are held open right now."""
        with self._lock:
            return len(self._holds)

    # -- helpers (call holding self._lock unless noted) --

    @contextlib.contextmanager
    def _change(self) -> Iterator[Changes]:
        """Take the lock and collect the request's ops; after releasing it, make them
        durable (one journal line) before the request is answered. Ops applied before a
        refusal are journaled too: memory and disk never part."""
        changes = Changes(self._state)
        seq = 0
        try:
            with self._lock:
                try:
                    yield changes
                finally:
                    if changes.ops and self._store is not None:
                        seq = self._store.stage(changes.ops)
        finally:
            if seq and self._store is not None:
                _commit(self._store, seq)

    def _capture(self, store: Store) -> tuple[int, StoreState]:
        """For the compactor: the last staged line and a copy of the state holding it."""
        with self._lock:
            return store.staged, self._state.copy()

    def _limit_source(self, source: str) -> None:
        """Spend a mutation token of ``source``'s prefix (before any signature is checked:
        a flood costs no verify). Thread-safe."""
        prefix = source_prefix(source)
        if not self._by_source.take(prefix, self._clock()):
            refuse(f"mutation rate limit for source {prefix}", FAILED)

    def _limit_node(self, node_id: int) -> None:
        """Spend a mutation token of ``node_id`` (after its signature verified, so only the
        node itself can spend them). Thread-safe."""
        if not self._by_node.take(node_id, self._clock()):
            refuse(f"mutation rate limit for node {node_id}", FAILED)

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

    def _registered_other(self, node_id: int, peer_id: int) -> None:
        if peer_id not in self._state.nodes or peer_id == node_id:
            refuse(f"node {peer_id} is not a registered other node")

    def _vouch(self, changes: Changes, voucher: int, vouchee: int) -> bool:
        """Record that ``voucher`` (who signed the request) vouched for ``vouchee``, who
        may now resolve it: the one rule for every request that creates a trust pair.
        Returns False when the voucher is at ``max_vouches_per_node`` (nothing recorded)."""
        if (voucher, vouchee) in self._state.vouches:
            return True
        if self._state.vouches_by.get(voucher, 0) >= self._limits.max_vouches_per_node:
            self._refusals.log(
                logging.WARNING,
                self._clock(),
                "node %d has vouched for %d nodes (limits.max_vouches_per_node): no more",
                voucher,
                self._limits.max_vouches_per_node,
            )
            return False
        changes.apply(["vouch", voucher, vouchee])
        return True

    def _may_resolve(self, requester: Node, target: Node) -> bool:
        shared = set(self._networks_of(target)) & set(self._networks_of(requester))
        return (
            target.public
            or bool(shared - {0})
            or (target.node_id, requester.node_id) in self._state.vouches
        )

    def _hostname_holder(self, node: Node, hostname: str) -> str:
        """Why ``node`` cannot take the (valid) ``hostname``, or "" when it can."""
        holder = self._state.by_hostname.get(hostname) if hostname else None
        if holder is not None and holder != node.node_id:
            return f"hostname {hostname!r} is taken by node {holder}"
        return ""

    def _put(self, changes: Changes, node: Node) -> None:
        """Record ``node`` as it now is, unless that is how it already is."""
        if self._state.nodes.get(node.node_id) != node:
            changes.apply(node_op(node))

    def _mutation(
        self, request: dict[str, Any], source: str, node_id: int, challenge: bytes
    ) -> Node:
        """The checks of every mutating request (SPEC 17), cheapest first: a token of
        ``source``'s prefix, ``node_id``'s signature of ``challenge``, a token of the node."""
        self._limit_source(source)
        node = self._verified(request, node_id, challenge)
        self._limit_node(node_id)
        return node

    def _pair_mutation(
        self, request: dict[str, Any], source: str, challenge: Callable[[int, int], bytes]
    ) -> tuple[int, int]:
        """``node_id`` and ``peer_id`` of a request about a trust pair, checked as a
        mutation signed by ``node_id`` over ``challenge(node_id, peer_id)``."""
        node_id = node_field(request, "node_id")
        peer_id = node_field(request, "peer_id")
        self._mutation(request, source, node_id, challenge(node_id, peer_id))
        return node_id, peer_id

    def _verified(self, request: dict[str, Any], node_id: int, challenge: bytes) -> Node:
        """Refuse unless ``signature`` is ``node_id``'s signature of ``challenge``.

        Call without self._lock: verification is CPU work, and a node's key never changes.
        """
        node = self._state.nodes.get(node_id)  # one dict read: atomic, nodes are immutable
        if node is None:
            refuse(f"node {node_id} is not registered")
        signature = decode_signature(request.get("signature"))
        if signature is None:
            refuse(f"missing or malformed signature from node {node_id}")
        if not verify(node.public_key, challenge, signature):
            refuse(f"bad signature from node {node_id}")
        return node

    def _register_signed(self, request: dict[str, Any], key: bytes) -> bool:
        """Whether ``register`` carries a valid signature of ``key`` with a fresh
        ``timestamp``; False when it carries none. Refuses a bad or stale one."""
        if "signature" not in request and "timestamp" not in request:
            return False
        stamp = request.get("timestamp")
        if type(stamp) is not int:
            refuse(f"field 'timestamp' is not Unix seconds: {quote(stamp)}")
        skew = stamp - self._wall()
        if abs(skew) > REGISTER_SKEW:
            refuse(
                f"register timestamp is {skew:+.0f} s from the registry's clock (more than "
                f"{REGISTER_SKEW} s): check the node's clock"
            )
        signature = decode_signature(request.get("signature"))
        if signature is None:
            refuse("register has a timestamp but no valid base64 signature")
        if not verify(key, register_challenge(b64encode(key), stamp), signature):
            refuse("bad register signature: not made by the key being registered")
        return True

    # -- the messages --

    def _register(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        key = decode_key(request.get("public_key"))
        if key is None:
            refuse("public_key is not a base64 Ed25519 key")
        str_field(request, "owner", "")  # checked, never used: it binds nothing (SPEC 17)
        hostname = str_field(request, "hostname", "")
        address = real_addr(str_field(request, "listen_addr"), source)
        hostname_error = hostname_problem(hostname) if hostname else ""
        self._limit_source(source)
        signed = self._register_signed(request, key)
        tick = self._clock()
        with self._change() as changes:
            node_id = self._state.by_key.get(key)
            if node_id is not None and signed:
                self._limit_node(node_id)
            elif not self._register_limit.take(source, tick):
                # Only a signed re-register is exempt, so a restart wave never locks a
                # fleet out and nobody else can spend or skip a node's budget.
                refuse(f"register rate limit for {source}", FAILED)
            if node_id is None:
                if len(self._state.nodes) >= self._limits.max_nodes:
                    self._refusals.log(
                        logging.WARNING,
                        tick,
                        "refused a new node: limits.max_nodes (%d) reached",
                        self._limits.max_nodes,
                    )
                    refuse(f"limits.max_nodes ({self._limits.max_nodes}) reached", FAILED)
                node_id = self._state.next_id
                changes.apply(node_op(Node(node_id, key, address)))
                log.info("registered node %d at %s", node_id, quote(address))
                signed = True  # a new key's first record is its own
            node = self._state.nodes[node_id]
            response: dict[str, Any] = {
                "type": "register_ok",
                "node_id": node_id,
                "address": address_text(node_id),
                "public_key": b64encode(key),
                "features": list(FEATURES),
            }
            if not signed:
                # Anyone who read the key from a lookup can send this: answer, change nothing.
                if hostname and hostname == node.hostname:
                    response["hostname"] = hostname
                elif hostname and not hostname_error:
                    hostname_error = "an unsigned register of a registered key changes nothing"
            else:
                self._last_seen[node_id] = tick
                if hostname and not hostname_error:
                    hostname_error = self._hostname_holder(node, hostname)
                if hostname and not hostname_error:
                    node = Node(node_id, key, address, node.public, hostname)
                    response["hostname"] = hostname
                else:
                    node = Node(node_id, key, address, node.public, node.hostname)
                self._put(changes, node)
        if hostname_error:
            # Not in SPEC's table; the production registry adds it for an invalid name.
            response["hostname_error"] = hostname_error
        return response

    def _heartbeat(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        self._verified(request, node_id, heartbeat_challenge(node_id))
        with self._lock:
            if node_id not in self._last_seen:
                log.info("node %d is back online (signed heartbeat)", node_id)
            self._last_seen[node_id] = self._clock()
        return {"type": "heartbeat_ok", "time": int(self._wall())}

    def _lookup(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        with self._lock:
            node = self._online_node(node_id)
            networks = self._networks_of(node)
        response: dict[str, Any] = {
            "type": "lookup_ok",
            "node_id": node_id,
            "public_key": b64encode(node.public_key),
            "networks": networks,
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
        node = self._mutation(request, source, node_id, set_visibility_challenge(node_id))
        with self._change() as changes:
            node = self._state.nodes[node_id]
            self._put(
                changes, Node(node_id, node.public_key, node.real_addr, public, node.hostname)
            )
        return {"type": "set_visibility_ok"}

    def _report_trust(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id, peer_id = self._pair_mutation(request, source, report_trust_challenge)
        with self._change() as changes:
            self._registered_other(node_id, peer_id)
            if not self._vouch(changes, node_id, peer_id):
                refuse(
                    f"node {node_id} has vouched for {self._limits.max_vouches_per_node} "
                    "nodes (limits.max_vouches_per_node): revoke some first"
                )
        return {"type": "report_trust_ok"}

    def _revoke_trust(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id, peer_id = self._pair_mutation(request, source, revoke_trust_challenge)
        with self._change() as changes:
            vouches = self._state.vouches
            if (node_id, peer_id) not in vouches and (peer_id, node_id) not in vouches:
                refuse(f"no trust pair {node_id}-{peer_id} to revoke")
            for pair in ((node_id, peer_id), (peer_id, node_id)):
                if pair in vouches:
                    changes.apply(["unvouch", *pair])
        return {"type": "revoke_trust_ok"}

    def _request_handshake(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        from_id = node_field(request, "from_node_id")
        to_id = node_field(request, "to_node_id")
        justification = str_field(request, "justification", "")
        sender = self._mutation(request, source, from_id, handshake_challenge(from_id, to_id))
        entry = {
            "from_node_id": from_id,
            "justification": justification,
            "timestamp": int(self._wall()),
            "public_key": b64encode(sender.public_key),
        }
        with self._change() as changes:
            self._online_node(to_id)
            self._registered_other(from_id, to_id)
            self._inboxes.add_request(changes, to_id, entry, source_prefix(source), self._wall())
            self._vouch(changes, from_id, to_id)
            self._wake(to_id)
        return {"type": "request_handshake_ok", "status": "delivered"}

    def _respond_handshake(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        peer_id = node_field(request, "peer_id")
        accept = bool_field(request, "accept")
        reason = str_field(request, "reason", "")
        self._mutation(request, source, node_id, respond_challenge(node_id, peer_id))
        entry: dict[str, Any] = {
            "from_node_id": node_id,
            "accept": accept,
            "timestamp": int(self._wall()),
        }
        if reason:
            entry["reason"] = reason
        with self._change() as changes:
            self._registered_other(node_id, peer_id)
            # Queued before this accept's own vouch: its rank is the tie the pair had.
            self._inboxes.add_response(
                changes, peer_id, entry, source_prefix(source), self._wall(), self._clock()
            )
            if accept:
                self._vouch(changes, node_id, peer_id)
            self._wake(peer_id)
        return {"type": "respond_handshake_ok"}

    def _poll_handshakes(
        self, request: dict[str, Any], source: str, alive: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        wait = request.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            refuse(f"field 'wait' is not a number of seconds: {quote(wait)}")
        wait = min(float(wait), REGISTRY_MAX_POLL_WAIT)
        self._verified(request, node_id, poll_challenge(node_id))
        with self._change() as changes:
            if wait and not self._closed and not self._inboxes.waiting(node_id):
                self._hold(node_id, wait)
                if alive is not None and not alive():
                    # The poller went away while its poll was held (a daemon killed or
                    # restarted): what arrived stays queued for its next poll instead of
                    # being drained into a closed connection and lost.
                    return {"type": "poll_handshakes_ok", "requests": [], "responses": []}
            requests, responses = self._inboxes.drain(changes, node_id, self._wall())
        return {"type": "poll_handshakes_ok", "requests": requests, "responses": responses}

    def _hold(self, node_id: int, wait: float) -> None:
        """Wait (releasing the lock meanwhile) until something is queued for ``node_id``,
        ``wait`` seconds pass, a newer poll of the node takes over or the registry closes.
        Real time, not ``clock``: a held poll is a socket's wait."""
        previous = self._holds.get(node_id)
        if previous is not None:
            previous.ended = True
            previous.wake.notify()
        elif len(self._holds) >= self._limits.max_held_polls:
            refuse(
                f"{len(self._holds)} polls are held (limits.max_held_polls): poll without wait",
                FAILED,
            )
        hold = self._holds[node_id] = _Hold(self._lock)
        deadline = time.monotonic() + wait
        try:
            while not (hold.ended or self._inboxes.waiting(node_id)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                hold.wake.wait(remaining)
        finally:
            if self._holds.get(node_id) is hold:
                del self._holds[node_id]

    def _wake(self, node_id: int) -> None:
        """Answer ``node_id``'s held poll now: something was queued for it."""
        hold = self._holds.get(node_id)
        if hold is not None:
            hold.wake.notify()

    def _set_hostname(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        node_id = node_field(request, "node_id")
        hostname = str_field(request, "hostname")
        self._mutation(request, source, node_id, set_hostname_challenge(node_id))
        problem = hostname_problem(hostname) if hostname else ""
        if problem:
            refuse(problem)
        with self._change() as changes:
            node = self._state.nodes[node_id]
            problem = self._hostname_holder(node, hostname)
            if problem:
                refuse(problem)
            self._put(
                changes, Node(node_id, node.public_key, node.real_addr, node.public, hostname)
            )
        return {"type": "set_hostname_ok", "node_id": node_id, "hostname": hostname}

    def _resolve_hostname(self, request: dict[str, Any], source: str) -> dict[str, Any]:
        hostname = str_field(request, "hostname")
        with self._lock:
            node_id = self._state.by_hostname.get(hostname)
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
