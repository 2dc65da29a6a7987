"""The trust handshake state machine (SPEC sections 5-9, 14-16).

``Manager`` decides; it touches the world only through its ``Runtime`` (sockets, registry,
events) and its ``TrustStore`` (trust.json). The locking discipline of SPEC 16 shapes every
method the same way:

1. outside the lock: Runtime and registry calls whose answers the decision needs;
2. under the lock: decide and mutate ``store.working``, collecting an ``_Outcome``;
3. outside the lock: ``store.commit`` (durability, group commit);
4. only after the commit succeeded: events, replies and registry calls (``_finish``).

Readers (``is_trusted``, ``trusted_peers`` ...) see ``store.visible``: durable state only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from .constants import (
    DROP_LOG_PER_SECOND,
    MAX_CLOCK_SKEW,
    MAX_MESSAGE_AGE,
    MAX_PENDING,
    MAX_PENDING_BOUND_PER_SOURCE,
    MAX_PENDING_UNBOUND_PER_SOURCE,
    MAX_REPLAY,
    MAX_REPLAY_PER_SOURCE,
    MAX_TRUST_HISTORY,
    PORT_HANDSHAKE,
    REAP_INTERVAL,
    REGISTRY_CACHE_TTL,
    REGISTRY_REASK_INTERVAL,
    RELAY_RECENT,
    REVOKE_COOLDOWN,
    STOP_TIMEOUT,
)
from .errors import (
    HandshakeError,
    MessageError,
    NotTrustedError,
    RegistryError,
    SendError,
    StoreError,
)
from .identity import b64encode, decode_key, decode_signature, verify
from .messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    HandshakeMsg,
    handshake_challenge,
    respond_challenge,
    truncate_utf8,
)
from .metrics import Metrics
from .pool import BackgroundPool
from .runtime import Closeable, RegistryClient, Runtime
from .store import (
    TRUSTED,
    Change,
    FormerTrust,
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustStore,
)
from .wire import read_message

__all__ = ["DropLog", "Manager"]

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
# Side tables keyed by node ID that invented IDs could grow are pruned past this size.
_SIDE_TABLE_LIMIT = 4096
_QUIET = (RegistryError,)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# How many characters of a peer-supplied value a log line quotes, and of a drop reason.
_QUOTE_LIMIT = 100
_REASON_LIMIT = 2 * _QUOTE_LIMIT
# At most one ERROR line per this many seconds for failed writes of inbound messages.
_STORE_ERROR_INTERVAL = 60.0
# A request arriving again by the other path (direct / relay) within this is a duplicate.
_DUPLICATE_WINDOW = MAX_MESSAGE_AGE


def _quote(value: str | int) -> str:
    """A peer-supplied value for a log line: escaped (``repr``: no forged line breaks) and cut
    to about ``_QUOTE_LIMIT`` characters, saying how long it was."""
    if isinstance(value, int):
        if value.bit_length() > 4 * _QUOTE_LIMIT:  # str() of it would be long (or refused)
            return f"<an integer of {value.bit_length()} bits>"
        return str(value)
    text = repr(value)
    if len(text) <= _QUOTE_LIMIT:
        return text
    return f"{text[:_QUOTE_LIMIT]}... ({len(value)} characters)"


def _source_host(remote: str) -> str:
    """The host part of ``"host:port"`` / ``"[v6]:port"``: quotas count per address, not port."""
    if remote.startswith("["):
        return remote[1:].partition("]")[0]
    host, sep, port = remote.rpartition(":")
    return host if sep and port.isdigit() else remote


class DropLog:
    """One WARNING line per dropped input, at most ``per_second`` a second (SPEC 5).

    Lines over the limit are counted; the count is logged once the second is over (with the
    next drop, or at ``flush``), so a flood cannot fill the disk.
    """

    def __init__(
        self,
        logger: logging.Logger = log,
        per_second: int = DROP_LOG_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        count: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """Log to ``logger``, ``per_second`` lines a second by ``clock``; ``count`` sees the
        reason of every drop, logged or not (the drop metric)."""
        self._logger = logger
        self._count = count
        self._per_second = per_second
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = -math.inf
        self._lines = 0
        self._suppressed = 0

    def drop(self, node_id: int | None, remote: str, reason: str) -> None:
        """Record one drop of input from ``node_id`` (None if not decoded) at ``remote``."""
        self._count(reason)
        with self._lock:
            summary = self._roll(self._clock())
            emit = self._lines < self._per_second
            if emit:
                self._lines += 1
            else:
                self._suppressed += 1
        self._summarise(summary)
        if emit:
            node = "?" if node_id is None else str(node_id)
            if len(reason) > _REASON_LIMIT:  # reasons may quote what the peer sent
                reason = f"{reason[:_REASON_LIMIT]}..."
            self._logger.warning("dropped message from node %s at %s: %s", node, remote, reason)

    def flush(self) -> None:
        """Log the count of suppressed lines now, if any."""
        with self._lock:
            summary = self._roll(math.inf)
        self._summarise(summary)

    def _roll(self, now: float) -> int:
        if now - self._window_start < 1.0:
            return 0
        suppressed = self._suppressed
        self._window_start = now
        self._lines = 0
        self._suppressed = 0
        return suppressed

    def _summarise(self, suppressed: int) -> None:
        if suppressed:
            self._logger.warning("%d more dropped messages were not logged", suppressed)


class _ReplaySet:
    """SPEC 5 step 4: digests of accepted messages, bounded in total and per source address.

    Each source keeps its digests in arrival order (for eviction); a heap orders them by
    expiry (the message timestamp leaving the window). Not thread-safe: the Manager's lock.
    """

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self._max_total = max_total
        self._max_per_source = max_per_source
        self._sources: dict[str, OrderedDict[bytes, float]] = {}
        self._owner: dict[bytes, str] = {}
        self._expiry: list[tuple[float, bytes]] = []

    def add(self, digest: bytes, source: str, expires: float, now: float, privileged: bool) -> str:
        """Enter ``digest``; returns "" or the reason to drop the message."""
        self._expire(now)
        if digest in self._owner:
            return "replayed message"
        entries = self._sources.get(source)
        if entries is not None and len(entries) >= self._max_per_source:
            if not privileged:
                return "replay set full for this source address"
            self._evict(source)
        elif len(self._owner) >= self._max_total:
            if not privileged:
                return "replay set full"
            self._evict(max(self._sources, key=lambda name: len(self._sources[name])))
        self._sources.setdefault(source, OrderedDict())[digest] = expires
        self._owner[digest] = source
        heapq.heappush(self._expiry, (expires, digest))
        if len(self._expiry) > 2 * self._max_total + 64:
            # Evicted digests leave stale heap entries; rebuild before they pile up.
            self._expiry = [
                (e, d) for entries in self._sources.values() for d, e in entries.items()
            ]
            heapq.heapify(self._expiry)
        return ""

    def _evict(self, source: str) -> None:
        entries = self._sources[source]
        digest, _ = entries.popitem(last=False)
        del self._owner[digest]
        if not entries:
            del self._sources[source]

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires, digest = heapq.heappop(self._expiry)
            source = self._owner.get(digest)
            if source is None:
                continue
            entries = self._sources[source]
            if entries.get(digest) != expires:
                continue  # evicted and entered again later: the newer entry has its own expiry
            del entries[digest]
            del self._owner[digest]
            if not entries:
                del self._sources[source]


@dataclass(frozen=True)
class _Inbound:
    """An authenticated message's origin, as the decisions of SPEC 6 and 7 see it."""

    node_id: int
    key: bytes | None  # the sender's key: authenticated (direct) or carried/registry (relayed)
    bound: bool  # registry-bound; a relayed message always counts as bound
    pinned: bool  # the key equals the key of our trust record for the sender
    strongly_pinned: bool  # ... or of a registry-bound / relayed pending request
    weakly_pinned: bool  # ... or of any other pending request (the sender's own request)
    relayed: bool
    source: str  # the source address (direct) for per-source quotas
    remote: str  # for log lines
    registry_key: bytes | None = None
    networks: tuple[int, ...] = ()


@dataclass
class _Outcome:
    """What a decision did under the lock, for ``_finish`` to make durable and announce."""

    seq: int | None = None
    drop: str = ""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tasks: list[tuple[Callable[..., object], tuple[Any, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # INFO lines, logged once durable


@dataclass
class _Waiters:
    condition: threading.Condition
    count: int = 0


@dataclass(frozen=True)
class _RequestContext:
    """Runtime and registry answers a request decision needs, gathered outside the lock."""

    strict: bool
    has_registry: bool
    auto_approve: bool
    agent_name: str  # allowlist name, "" when not on the allowlist
    agent_ok: bool  # allowlisted and vouched for (row 4)
    agent_key: bytes | None  # the allowlist entry's pinned key: what row 4 stores
    agent_mismatch: bool  # a key the request brings differs from that pin
    network: int  # first shared non-backbone network in our own order, 0 if none


def _answer_key(answer: dict[str, Any] | None) -> bytes | None:
    return None if answer is None else decode_key(answer.get("public_key"))


def _answer_networks(answer: dict[str, Any] | None) -> tuple[int, ...]:
    networks = None if answer is None else answer.get("networks")
    if not isinstance(networks, list):
        return ()
    return tuple(n for n in networks if type(n) is int and n != 0)


class Manager:
    """The trust handshake of one node (Go ``Manager``); every public method is thread-safe.

    Loads ``trust.json`` beside ``runtime.identity_path()`` (memory only when that is "");
    a file that does not parse, or a directory used by another process, raises
    ``StoreError``. Events (SPEC 14), all with ``peer_node_id``: ``handshake.received``
    (``justification``, ``relayed``), ``handshake.pending``, ``handshake.approved`` (``by``:
    ``operator``, or ``peer`` when our request was accepted), ``handshake.rejected``
    (``reason``), ``handshake.auto_approved`` (``reason``; ``agent`` for trusted agents),
    ``trust.changed`` (``state``: granted / revoked), ``trust.revoked`` (by us),
    ``trust.revoked_by_peer`` (``reason``) and ``trust.conflict`` (``registry_key``: a trust
    record's node ID now bound to another key).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_replay_per_source: int = MAX_REPLAY_PER_SOURCE,
        max_pending_per_source: int = MAX_PENDING_UNBOUND_PER_SOURCE,
        max_pending_bound_per_source: int = MAX_PENDING_BOUND_PER_SOURCE,
        reap_interval: float = REAP_INTERVAL,
        metrics: Metrics | None = None,
    ) -> None:
        """Open the trust store of ``runtime``; nothing is bound until ``start()``.
        ``metrics`` (the daemon's) is counted into; without it the Manager has its own."""
        self._rt = runtime
        self.metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.RLock()
        identity_path = runtime.identity_path()
        path = os.path.join(os.path.dirname(identity_path), TRUST_FILE) if identity_path else ""
        self._store = TrustStore(path, self._lock, self._on_commit, metrics=self.metrics)
        self._pool = BackgroundPool()
        self._drops = DropLog(count=self.metrics.drop)
        self._replay = _ReplaySet(MAX_REPLAY, max_replay_per_source)
        self._max_pending_per_source = max_pending_per_source
        self._max_pending_bound = max_pending_bound_per_source
        self._reap_interval = reap_interval
        self._arrivals = itertools.count()
        self._pending_arrival: dict[int, int] = {}  # arrival order, for eviction ties
        self._pending_protected: set[int] = set()  # pending requests never evicted for strangers
        self._cooldown: dict[int, float] = {}  # node -> monotonic time we revoked it
        self._relayed_at: dict[int, float] = {}  # node -> monotonic time of our relayed request
        self._lookups: dict[int, tuple[float, dict[str, Any]]] = {}
        self._reasked: dict[int, float] = {}
        self._store_error_at = -math.inf
        self._store_errors_suppressed = 0
        # Requests decided lately: (node, SHA-256 of the text) -> (relayed, monotonic time).
        self._recent_requests: OrderedDict[tuple[int, bytes], tuple[bool, float]] = OrderedDict()
        # Trust records whose node ID the registry now binds to another key (issue 11 item 7):
        # node -> that key. Not trusted, not pinning, until approved again or removed.
        self._conflicts: dict[int, bytes] = {}
        self._waiters: dict[int, _Waiters] = {}
        self._listener: Closeable | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False
        self._index_pending()

    def _index_pending(self) -> None:
        """Arrival order and protection of the pending requests loaded from trust.json (a
        shared network is known only on arrival: loaded entries are protected when
        allowlisted or in the trust history)."""
        with self._lock:
            loaded = sorted(self._store.working.pending.values(), key=lambda p: p.received_at)
        agents = {p.node_id for p in loaded if self._rt.trusted_agent(p.node_id) is not None}
        with self._lock:
            for request in loaded:
                node = request.node_id
                self._pending_arrival[node] = next(self._arrivals)
                key = decode_key(request.public_key)
                if node in agents or self._in_history(node, key, request.bound):
                    self._pending_protected.add(node)

    # Lifecycle

    def start(self) -> None:
        """Bind port 444 through the runtime, start the reaper, backfill keyless trust records
        in the background (with a registry). A second call does nothing."""
        with self._lock:
            if self._stopped:
                raise HandshakeError("a stopped Manager cannot be started again")
            if self._started:
                return
            self._started = True
        try:
            self._listener = self._rt.port_listener(PORT_HANDSHAKE, self.handle_connection)
        except BaseException:
            with self._lock:
                self._started = False
            raise
        self._reaper = threading.Thread(
            target=self._reap_loop, name="handshake-reaper", daemon=True
        )
        self._reaper.start()
        if self._rt.registry() is not None:
            self._pool.submit(self._check_records)

    def stop(self) -> None:
        """Stop listening and reaping, wait (bounded) for background work, release trust.json.

        Does nothing before ``start()`` or when already stopped.
        """
        with self._lock:
            if not self._started or self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                log.warning("closing the port %d listener failed", PORT_HANDSHAKE, exc_info=True)
        if self._reaper is not None:
            self._reaper.join(STOP_TIMEOUT)
        self._pool.shutdown(STOP_TIMEOUT)
        self._drops.flush()
        self.close()

    def close(self) -> None:
        """Stop the background workers and release the trust store and its directory lock
        (``stop()`` does this too); for a Manager that is never started. Later state changes
        fail with ``StoreError``."""
        self._pool.shutdown(STOP_TIMEOUT)
        self._store.close()

    # Readers: durable state only

    def is_trusted(self, node_id: int) -> bool:
        """Whether ``node_id`` is trusted (a node trusts itself once its ID is known)."""
        own = self._rt.node_id()
        with self._lock:
            return self._visibly_trusted(node_id, own)

    def trusted_peers(self) -> list[TrustRecord]:
        """Trust records, sorted by node ID."""
        with self._lock:
            records = list(self._store.visible.trusted.values())
        return sorted(records, key=lambda record: record.node_id)

    def pending_requests(self) -> list[PendingHandshake]:
        """Pending requests, sorted by node ID."""
        with self._lock:
            requests = list(self._store.visible.pending.values())
        return sorted(requests, key=lambda request: request.node_id)

    def conflicting_peers(self) -> list[int]:
        """Node IDs of trust records the registry now binds to a different key, sorted: not
        trusted until the operator approves the node again or removes the record."""
        with self._lock:
            return sorted(self._conflicts)

    def pending_count(self) -> int:
        """How many requests are pending."""
        with self._lock:
            return len(self._store.visible.pending)

    def outgoing_count(self) -> int:
        """How many of our requests wait for an answer."""
        with self._lock:
            return len(self._store.visible.outgoing)

    def wait_for_trust(self, node_id: int, timeout: float | None) -> bool:
        """Block until ``node_id`` is trusted (True) or ``timeout`` seconds pass (False);
        ``None`` waits without limit. Woken by a per-node condition, never by polling."""
        own = self._rt.node_id()
        with self._lock:
            if self._visibly_trusted(node_id, own):
                return True
            waiters = self._waiters.get(node_id)
            if waiters is None:
                waiters = self._waiters[node_id] = _Waiters(threading.Condition(self._lock))
            waiters.count += 1
            try:
                return waiters.condition.wait_for(
                    lambda: self._visibly_trusted(node_id, own), timeout
                )
            finally:
                waiters.count -= 1
                if not waiters.count:
                    del self._waiters[node_id]

    def _visibly_trusted(self, node_id: int, own: int) -> bool:
        if own != 0 and node_id == own:
            return True
        return node_id in self._store.visible.trusted and node_id not in self._conflicts

    def _trusts(self, node: int) -> bool:
        """Whether ``node`` has a trust record that is not in conflict (working state). Call
        holding the lock."""
        return node in self._store.working.trusted and node not in self._conflicts

    def _on_commit(self, changes: list[Change]) -> None:
        # Called by the store under the lock once changes are durable: a new or removed
        # trust record ends a conflict; wake only the waiters of nodes that became trusted.
        for change in changes:
            if change.table == TRUSTED:
                self._conflicts.pop(change.node_id, None)
            if change.table == TRUSTED and change.value is not None:
                waiters = self._waiters.get(change.node_id)
                if waiters is not None:
                    waiters.condition.notify_all()

    # Port 444

    def handle_connection(self, conn: socket.socket) -> None:
        """Serve one port-444 connection: read one message, process it, close. Never raises."""
        try:
            remote = _remote_address(conn)
            try:
                data = read_message(conn)
            except MessageError as exc:
                self._drops.drop(None, remote, str(exc))
                return
            self.process_message(data, remote)
        except Exception:
            log.error(
                "unexpected error serving a port %d connection", PORT_HANDSHAKE, exc_info=True
            )
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def process_message(self, data: bytes, remote: str) -> None:
        """Process one received message (SPEC 5) from ``remote`` (``"host:port"``).

        Drops are logged (WARNING, rate-limited) and change nothing; a failed write of the
        resulting change is logged at ERROR. Never raises for bad input.
        """
        try:
            self._process(data, remote)
        except StoreError as exc:
            self._store_error(f"could not persist the message from {remote}: {exc}")

    def _store_error(self, line: str) -> None:
        """Log a failed write of inbound input at ERROR, at most once a minute (a full disk
        fails every message): the count of the others comes with the next line."""
        now = time.monotonic()
        with self._lock:
            if now - self._store_error_at < _STORE_ERROR_INTERVAL:
                self._store_errors_suppressed += 1
                return
            self._store_error_at = now
            suppressed, self._store_errors_suppressed = self._store_errors_suppressed, 0
        if suppressed:
            line += f" ({suppressed} more failed writes were not logged)"
        log.error("%s", line)

    def _process(self, data: bytes, remote: str) -> None:
        try:
            msg = HandshakeMsg.from_json(data)
        except MessageError as exc:
            self._drops.drop(None, remote, str(exc))
            return
        self.metrics.message(msg.type, "received")
        node = msg.node_id
        own = self._rt.node_id()
        if node == own:
            self._drops.drop(node, remote, "message claims our own node ID")
            return
        if self._rt.is_denied(node):
            self._drops.drop(node, remote, "node is on the deny list")
            return
        now = time.time()
        if not now - MAX_MESSAGE_AGE <= msg.timestamp <= now + MAX_CLOCK_SKEW:
            self._drops.drop(node, remote, f"timestamp {_quote(msg.timestamp)} outside the window")
            return
        strict = self._rt.trust_strict()
        authenticated = _authenticate(msg, own, strict)
        if isinstance(authenticated, str):
            self._drops.drop(node, remote, authenticated)
            return
        key, material, go_style = authenticated
        with self._lock:
            pin, pin_kind = self._pin(node)
        same_as_pin = key == pin
        registry = self._rt.registry()
        binding: tuple[bool, dict[str, Any] | None] | str | None = None
        if strict and pin_kind in ("trusted", "bound") and not same_as_pin:
            if pin_kind == "trusted" and registry is not None:
                # The registry may now bind this node ID to this key: then the record is in
                # conflict (issue 11 item 7) and no longer pins.
                binding = self._bind(registry, node, key)
                with self._lock:
                    pin, pin_kind = self._pin(node)
                same_as_pin = key == pin
            if pin_kind in ("trusted", "bound") and not same_as_pin:
                self._drops.drop(node, remote, "public key differs from the pinned key")
                return
        bound = False
        answer: dict[str, Any] | None = None
        if registry is not None:
            if binding is None:
                binding = self._bind(registry, node, key)
            if isinstance(binding, str):
                self._drops.drop(node, remote, binding)
                return
            bound, answer = binding
        if go_style and not bound:
            # The Go signature never changes between messages from S to R: only a key the
            # registry vouches for may use it (SPEC 8).
            self._drops.drop(node, remote, "Go-style signature without a registry-bound key")
            return
        if strict and pin_kind == "weak" and not same_as_pin and not bound:
            self._drops.drop(node, remote, "public key differs from the pending request's key")
            return
        inbound = _Inbound(
            node_id=node,
            key=key,
            bound=bound,
            pinned=same_as_pin and pin_kind == "trusted",
            strongly_pinned=same_as_pin and pin_kind in ("trusted", "bound"),
            weakly_pinned=same_as_pin and pin_kind == "weak",
            relayed=False,
            source=_source_host(remote),
            remote=remote,
            registry_key=_answer_key(answer),
            networks=_answer_networks(answer),
        )
        digest = hashlib.sha256(material).digest()
        with self._lock:
            reason = self._replay.add(
                digest,
                inbound.source,
                msg.timestamp + MAX_MESSAGE_AGE,
                time.time(),
                privileged=bound or inbound.pinned,
            )
        if reason:
            self._drops.drop(node, remote, reason)
            return
        if msg.type == HANDSHAKE_REQUEST:
            self._on_request(inbound, msg.justification)
        elif msg.type == HANDSHAKE_ACCEPT:
            self._on_accept(inbound)
        elif msg.type == HANDSHAKE_REJECT:
            self._on_reject(inbound, msg.reason)
        else:
            self._on_revoke(inbound, msg.reason)

    def _pin(self, node: int) -> tuple[bytes | None, str]:
        """The pinned key of ``node`` and its kind: "trusted", "bound" (a registry-bound or
        relayed pending request), "weak" (any other pending request) or "" (none). A stored
        key that is not a valid key pins nothing, nor does a record in conflict with the
        registry. Call holding the lock."""
        record = self._store.working.trusted.get(node)
        if record is not None and node not in self._conflicts:
            key = decode_key(record.public_key)
            if key is not None:
                return key, "trusted"
        pending = self._store.working.pending.get(node)
        if pending is not None:
            key = decode_key(pending.public_key)
            if key is not None:
                return key, "bound" if pending.bound else "weak"
        return None, ""

    def _pin_conflict(self, inbound: _Inbound) -> bool:
        """Whether the sender's key now differs from a strong pin: state may have changed
        since the checks made outside the lock. Call holding the lock."""
        pin, kind = self._pin(inbound.node_id)
        return kind in ("trusted", "bound") and inbound.key is not None and inbound.key != pin

    # Registry key binding (SPEC 5 step 3)

    def _lookup(
        self, registry: RegistryClient, node: int, fresh: bool = False
    ) -> dict[str, Any] | None:
        """The registry's answer for ``node`` (cached 30 s unless ``fresh``); None on error."""
        now = time.monotonic()
        if not fresh:
            with self._lock:
                cached = self._lookups.get(node)
            if cached is not None and now - cached[0] < REGISTRY_CACHE_TTL:
                return cached[1]
        try:
            answer = registry.lookup(node)
        except RegistryError as exc:
            log.debug("registry lookup of node %d failed: %s", node, exc)
            return None
        if not isinstance(answer, dict):
            return None
        with self._lock:
            if len(self._lookups) >= _SIDE_TABLE_LIMIT:
                self._lookups = {
                    n: hit for n, hit in self._lookups.items() if now - hit[0] < REGISTRY_CACHE_TTL
                }
            self._lookups[node] = (now, answer)
        return answer

    def _bind(
        self, registry: RegistryClient, node: int, key: bytes
    ) -> tuple[bool, dict[str, Any] | None] | str:
        """(registry-bound?, the lookup answer), or the reason to drop the message."""
        answer, problem = self._checked_lookup(registry, node, key)
        registered = _answer_key(answer)
        if registered is None:
            return False, answer
        if registered == key:
            return True, answer
        if problem:
            return f"public key differs from the registry's ({problem})"
        return "public key differs from the registry's"

    def _checked_lookup(
        self, registry: RegistryClient, node: int, key: bytes | None
    ) -> tuple[dict[str, Any] | None, str]:
        """The registry's answer for ``node`` and "", re-asked (SPEC 5: bypassing the cache,
        at most once per node per 5 s) when its key differs from ``key`` or from the node's
        trust record; when it cannot be re-asked, the first answer and why. A trust record
        the re-asked registry still contradicts becomes a conflict (issue 11 item 7)."""
        answer = self._lookup(registry, node)
        registered = _answer_key(answer)
        with self._lock:
            record_key = self._record_key(node)
        if registered is None or (key in (None, registered) and record_key in (None, registered)):
            return answer, ""
        now = time.monotonic()
        with self._lock:
            last = self._reasked.get(node)
            allowed = last is None or now - last >= REGISTRY_REASK_INTERVAL
            if allowed:
                if len(self._reasked) >= _SIDE_TABLE_LIMIT:
                    self._reasked = {
                        n: t for n, t in self._reasked.items() if now - t < REGISTRY_REASK_INTERVAL
                    }
                self._reasked[node] = now
        if not allowed:
            return answer, "re-ask not allowed yet"
        fresh = self._lookup(registry, node, fresh=True)
        if fresh is None:
            return answer, "re-ask failed"
        registered = _answer_key(fresh)
        if record_key is not None and registered is not None and registered != record_key:
            self._mark_conflict(node, record_key, registered)
        return fresh, ""

    def _record_key(self, node: int) -> bytes | None:
        """The valid key of ``node``'s trust record not in conflict, else None. Lock held."""
        record = self._store.working.trusted.get(node)
        if record is None or node in self._conflicts:
            return None
        return decode_key(record.public_key)

    def _mark_conflict(self, node: int, record_key: bytes, registry_key: bytes) -> None:
        """The registry binds ``node`` to ``registry_key``, not to the key we trusted: stop
        trusting and pinning the record until it is approved again or removed."""
        with self._lock:
            if self._record_key(node) != record_key:
                return  # changed meanwhile, or already in conflict
            self._conflicts[node] = registry_key
        log.error(
            "trust record of node %d conflicts with the registry: it now binds that node ID "
            "to another key (%s); not trusted until approved again or removed",
            node,
            b64encode(registry_key),
        )
        self._rt.publish_event(
            "trust.conflict", {"peer_node_id": node, "registry_key": b64encode(registry_key)}
        )

    # Requests (SPEC 6): one decision for direct and relayed requests

    def _on_request(self, inbound: _Inbound, justification: str) -> None:
        text = truncate_utf8(justification)
        fingerprint = (inbound.node_id, hashlib.sha256(text.encode("utf-8")).digest())
        now = time.monotonic()
        mark = (inbound.relayed, now)
        with self._lock:
            # Checked and claimed in one step: after a SIGSTOP both copies arrive at once.
            seen = self._recent_requests.get(fingerprint)
            duplicate = (
                seen is not None
                and seen[0] != inbound.relayed
                and now - seen[1] < _DUPLICATE_WINDOW
            )
            if not duplicate:
                self._recent_requests[fingerprint] = mark
                self._recent_requests.move_to_end(fingerprint)
                while len(self._recent_requests) > _SIDE_TABLE_LIMIT:
                    self._recent_requests.popitem(last=False)
        if duplicate:
            # The same request by the other path: a slow peer got it directly and the sender
            # then relayed it (SPEC 3). Decided already; nothing changes, nothing is announced.
            log.debug("node %d: duplicate request by the other path", inbound.node_id)
            return
        context = self._request_context(inbound)
        with self._lock:
            outcome = self._decide_request(inbound, text, context)
        self._finish(outcome, inbound)
        if outcome.drop:
            with self._lock:
                if self._recent_requests.get(fingerprint) == mark:
                    del self._recent_requests[fingerprint]

    def _request_context(self, inbound: _Inbound) -> _RequestContext:
        """Gather what the decision needs without holding the lock.

        Row 4: an allowlist entry that pins a key requires every key the request brings (the
        message's or the relay's, and the registry's) to equal it, even for a registry-bound
        request, and the pin is what is stored (a request bringing another key is dropped);
        an entry without a pin requires the request to be registry-bound (a relayed one
        always is).
        """
        strict = self._rt.trust_strict()
        registry = self._rt.registry()
        agent = self._rt.trusted_agent(inbound.node_id)
        agent_ok = agent_mismatch = False
        agent_key = None
        if agent is not None:
            if agent.public_key:
                agent_key = decode_key(agent.public_key)
                brought = [k for k in (inbound.key, inbound.registry_key) if k is not None]
                agent_mismatch = any(k != agent_key for k in brought)
                agent_ok = agent_key is not None and bool(brought) and not agent_mismatch
            else:
                agent_ok = inbound.bound
        network = 0
        own = self._rt.node_id()
        if registry is not None and inbound.networks and own != 0:
            ours = _answer_networks(self._lookup(registry, own))
            shared = [n for n in ours if n in inbound.networks]
            network = shared[0] if shared else 0
        return _RequestContext(
            strict=strict,
            has_registry=registry is not None,
            auto_approve=self._rt.trust_auto_approve(),
            agent_name=agent.name if agent is not None else "",
            agent_ok=agent_ok,
            agent_key=agent_key,
            agent_mismatch=agent_mismatch,
            network=network,
        )

    def _decide_request(
        self, inbound: _Inbound, justification: str, context: _RequestContext
    ) -> _Outcome:
        """The table of SPEC 6, first match wins. Call holding the lock."""
        node = inbound.node_id
        working = self._store.working
        received: tuple[str, dict[str, Any]] = (
            "handshake.received",
            {"peer_node_id": node, "justification": justification, "relayed": inbound.relayed},
        )
        outcome = _Outcome(events=[received])
        key = b64encode(inbound.key) if inbound.key is not None else ""
        # Strict mode with a registry: an unbound request must not be trusted automatically,
        # or an impostor could take a real node's ID while the registry is unreachable.
        vouched = inbound.bound or not (context.strict and context.has_registry)
        # A trust record in conflict with the registry: the operator decides (row 6).
        automatic = node not in self._conflicts
        vouched = vouched and automatic
        if context.strict and self._pin_conflict(inbound):
            outcome.drop = "public key differs from the pinned key"
            return outcome
        if context.agent_mismatch:
            # Not even pending: its key would pin the node and lock the real agent out.
            outcome.drop = "public key differs from the allowlist's pinned key"
            return outcome
        if self._trusts(node):
            outcome.tasks.append((self._reply_accept, (node, inbound.relayed)))
            return outcome
        if vouched and node in working.outgoing:
            auto: dict[str, Any] = {"reason": "mutual"}
            self._grant(outcome, node, key, mutual=True)
        elif vouched and context.network:
            auto = {"reason": "same_network"}
            self._grant(outcome, node, key, network=context.network)
        elif automatic and context.agent_ok:
            auto = {"reason": "trusted_agent", "agent": context.agent_name}
            agent_key = b64encode(context.agent_key) if context.agent_key is not None else key
            self._grant(outcome, node, agent_key)
        elif vouched and context.auto_approve:
            auto = {"reason": "auto_approve"}
            self._grant(outcome, node, key)
        else:
            protected = bool(context.agent_name or context.network) or self._in_history(
                node, inbound.key, inbound.bound
            )
            outcome.drop = self._hold(outcome, inbound, key, justification, protected)
            if not outcome.drop:
                outcome.events.append(("handshake.pending", {"peer_node_id": node}))
            return outcome
        outcome.events.insert(1, ("handshake.auto_approved", {"peer_node_id": node, **auto}))
        outcome.tasks.append((self._reply_accept, (node, inbound.relayed)))
        return outcome

    def _hold(
        self,
        outcome: _Outcome,
        inbound: _Inbound,
        key: str,
        justification: str,
        protected: bool,
    ) -> str:
        """Row 6: store the request as pending, within the queue's rule (``_admit``);
        returns "" or a drop reason. Call holding the lock."""
        node = inbound.node_id
        existing = self._store.working.pending.get(node)
        if existing is None or existing.source != inbound.source:
            reason = self._admit(outcome, inbound, protected, replacing=existing is not None)
            if reason:
                return reason
        if not key and existing is not None:
            key = existing.public_key  # a relayed request without a key keeps the pending one
        bound = inbound.bound or (
            existing is not None and existing.bound and existing.public_key == key
        )
        request = PendingHandshake(node, key, justification, _utcnow(), bound, inbound.source)
        outcome.seq = self._store.put_pending(request)
        self._pending_arrival[node] = next(self._arrivals)
        if protected:
            self._pending_protected.add(node)
        else:
            self._pending_protected.discard(node)
        return ""

    def _admit(self, outcome: _Outcome, inbound: _Inbound, protected: bool, replacing: bool) -> str:
        """The pending queue's rule (SPEC 6 and 15, written out in docs/PROTOCOL.md): "" when
        a new entry from ``inbound`` may be stored (after evicting one if the queue is full),
        else the drop reason. Call holding the lock.

        Protected requests (allowlisted, network-sharing or formerly trusted senders) count
        against no quota and are never evicted for an unprotected one. An unprotected direct
        request counts against its source address's quota: 16 unbound, 64 bound. When the
        queue is full a protected newcomer evicts the oldest unprotected entry of the source
        holding the most; a bound newcomer evicts the oldest unbound unprotected entry;
        otherwise the source holding the most unprotected entries gives up its oldest one
        only when it holds more than the newcomer's source plus one (fairness, the relay
        being one source). Else the newcomer is dropped.
        """
        pending = self._store.working.pending
        unprotected = [p for p in pending.values() if p.node_id not in self._pending_protected]
        if not protected and not inbound.relayed:
            quota = self._max_pending_bound if inbound.bound else self._max_pending_per_source
            same = sum(
                1
                for p in unprotected
                if p.source == inbound.source
                and p.bound == inbound.bound
                and p.node_id != inbound.node_id
            )
            if same >= quota:
                return "too many pending requests from this source address"
        if replacing or len(pending) < MAX_PENDING:
            return ""
        counts = Counter(p.source for p in unprotected)
        unbound = [p for p in unprotected if not p.bound]
        if protected:
            victims = self._of_largest_source(unprotected, counts)
        elif inbound.bound and unbound:
            victims = unbound
        else:
            victims = self._of_largest_source(unprotected, counts)
            if victims and len(victims) <= counts[inbound.source] + 1:
                return "pending queue full"
        if not victims:
            return "pending queue full of protected requests"
        victim = min(victims, key=self._pending_age)
        outcome.notes.append(
            f"pending queue full: evicted the request of node {victim.node_id}"
            f" (source {_quote(victim.source or 'unknown')})"
        )
        self._forget_pending(outcome, victim.node_id)
        return ""

    def _of_largest_source(
        self, entries: list[PendingHandshake], counts: Counter[str]
    ) -> list[PendingHandshake]:
        """The entries of the source holding the most of ``entries`` (ties: the one holding
        the oldest entry)."""
        if not counts:
            return []
        most = max(counts.values())
        tied = [p for p in entries if counts[p.source] == most]
        source = min(tied, key=self._pending_age).source
        return [p for p in entries if p.source == source]

    def _pending_age(self, request: PendingHandshake) -> tuple[datetime, int]:
        return request.received_at, self._pending_arrival.get(request.node_id, -1)

    def _in_history(self, node: int, key: bytes | None, bound: bool) -> bool:
        """Whether ``node`` is trusted now or was before, and this is the node we knew: its
        key equals the one we trusted (or, when we had none, the registry vouched for it).
        Call holding the lock."""
        state = self._store.working
        known: TrustRecord | FormerTrust | None = state.trusted.get(node)
        if known is None:
            known = state.history.get(node)
        if known is None:
            return False
        known_key = decode_key(known.public_key)
        return key == known_key if known_key is not None else bound

    def _forget_pending(self, outcome: _Outcome, node: int) -> None:
        outcome.seq = self._store.drop_pending(node)
        self._pending_arrival.pop(node, None)
        self._pending_protected.discard(node)

    def _grant(
        self, outcome: _Outcome, node: int, key: str, *, mutual: bool = False, network: int = 0
    ) -> None:
        """Trust ``node``: the one place trust is granted. Call holding the lock; the events
        and background work it adds run only once ``_finish`` has made the change durable."""
        working = self._store.working
        record = TrustRecord(node, key, _utcnow(), mutual, network)
        outcome.seq = self._store.put_trusted(record)
        if node in working.history:
            outcome.seq = self._store.drop_history(node)  # trusted now: the record says so
        if node in working.pending:
            self._forget_pending(outcome, node)
        if node in working.outgoing:
            outcome.seq = self._store.drop_outgoing(node)
        outcome.events.append(("trust.changed", {"peer_node_id": node, "state": "granted"}))
        outcome.tasks.append((self._report_trust, (node,)))
        if decode_key(key) is None:
            outcome.tasks.append((self._backfill, (node,)))
        outcome.notes.append(f"trusted node {node}")

    def _finish(self, outcome: _Outcome, inbound: _Inbound | None = None) -> None:
        """Make the outcome durable, then publish its events and queue its background work.

        Raises ``StoreError`` (nothing published) when the write failed."""
        if outcome.drop:
            node = None if inbound is None else inbound.node_id
            self._drops.drop(node, "" if inbound is None else inbound.remote, outcome.drop)
            return
        if outcome.seq is not None:
            self._store.commit(outcome.seq)
        for note in outcome.notes:
            log.info("%s", note)
        for topic, payload in outcome.events:
            self._rt.publish_event(topic, payload)
        for task, args in outcome.tasks:
            self._pool.submit(task, *args, quiet=_QUIET)

    # Accept, reject, revoke received (SPEC 7)

    def _on_accept(self, inbound: _Inbound) -> None:
        node = inbound.node_id
        strict = self._rt.trust_strict()
        has_registry = self._rt.registry() is not None
        outcome = _Outcome()
        with self._lock:
            working = self._store.working
            revoked_at = self._cooldown.get(node)
            if revoked_at is not None and time.monotonic() - revoked_at < REVOKE_COOLDOWN:
                outcome.drop = "accept within the revoke cooldown"
            elif strict and self._pin_conflict(inbound):
                outcome.drop = "public key differs from the pinned key"
            elif node not in working.outgoing:
                outcome.drop = "accept without an outgoing request"
            elif strict and has_registry and not (inbound.bound or inbound.pinned):
                outcome.drop = "accept neither registry-bound nor pinned"
            elif not self._trusts(node):
                key = b64encode(inbound.key) if inbound.key is not None else ""
                outcome.events.append(("handshake.approved", {"peer_node_id": node, "by": "peer"}))
                self._grant(outcome, node, key, mutual=True)
        self._finish(outcome, inbound)

    def _on_reject(self, inbound: _Inbound, reason: str) -> None:
        node = inbound.node_id
        strict = self._rt.trust_strict()
        has_registry = self._rt.registry() is not None
        outcome = _Outcome()
        with self._lock:
            if strict and has_registry and not (inbound.bound or inbound.pinned):
                outcome.drop = "reject neither registry-bound nor pinned"
            elif node in self._store.working.outgoing:
                outcome.seq = self._store.drop_outgoing(node)
        self._finish(outcome, inbound)
        if not outcome.drop:
            log.info("node %d rejected our request: %s", node, _quote(reason) if reason else "-")

    def _on_revoke(self, inbound: _Inbound, reason: str) -> None:
        node = inbound.node_id
        outcome = _Outcome()
        with self._lock:
            # In every mode (SPEC 8): otherwise anyone with a key of their own could revoke.
            # The key of a node's own pending request pins only that request (the weak pin
            # is never a trusted node's): enough for the sender to withdraw it.
            withdrawal = inbound.weakly_pinned and node not in self._store.working.trusted
            if not (inbound.bound or inbound.strongly_pinned or withdrawal):
                outcome.drop = "revoke neither registry-bound nor signed with the pinned key"
                was_trusted = False
            else:
                was_trusted = self._forget(outcome, node)
        if outcome.drop:
            self._finish(outcome, inbound)
            return
        if outcome.seq is None:
            log.debug("node %d revoked trust we never had", node)
            return
        payload = {"peer_node_id": node, "reason": truncate_utf8(reason)}
        outcome.events.append(("trust.revoked_by_peer", payload))
        if was_trusted:
            outcome.events.append(("trust.changed", {"peer_node_id": node, "state": "revoked"}))
            outcome.tasks.append((self._revoke_at_registry, (node,)))
        self._finish(outcome)
        self._rt.remove_tunnel_peer(node)
        log.info("node %d revoked trust: %s", node, _quote(reason) if reason else "-")

    def _forget(self, outcome: _Outcome, node: int) -> bool:
        """Remove trust, pending and outgoing for ``node``; whether it was trusted. Lock held."""
        working = self._store.working
        record = working.trusted.get(node)
        was_trusted = record is not None
        if record is not None:
            outcome.seq = self._store.drop_trusted(node)
            self._remember(outcome, record)
        if node in working.pending:
            self._forget_pending(outcome, node)
        if node in working.outgoing:
            outcome.seq = self._store.drop_outgoing(node)
        return was_trusted

    def _remember(self, outcome: _Outcome, record: TrustRecord) -> None:
        """Put ``record``'s node in the trust history, forgetting the entry that ended
        longest ago beyond ``MAX_TRUST_HISTORY``. Call holding the lock."""
        history = self._store.working.history
        if record.node_id not in history and len(history) >= MAX_TRUST_HISTORY:
            oldest = min(history.values(), key=lambda former: former.ended_at)
            outcome.seq = self._store.drop_history(oldest.node_id)
        former = FormerTrust(record.node_id, record.public_key, _utcnow())
        outcome.seq = self._store.put_history(former)

    # Relayed input (from the registry poll): counts as registry-bound

    def process_relayed_request(
        self, from_node_id: int, justification: str, public_key: str = ""
    ) -> None:
        """Decide a request relayed by the registry (SPEC 6). Raises ``StoreError`` when the
        resulting change cannot be written; bad input is dropped and logged."""
        self.metrics.relay(HANDSHAKE_REQUEST, "in")
        node = from_node_id
        if self._relayed_refused(node):
            return
        carried = decode_key(public_key) if public_key else None
        if public_key and carried is None:
            self._drops.drop(node, "relay", "relayed public_key is not a valid key")
            return
        registry = self._rt.registry()
        answer = None
        if registry is not None:
            answer, _ = self._checked_lookup(registry, node, carried)
        registry_key = _answer_key(answer)
        key = carried if carried is not None else registry_key
        with self._lock:
            pin, pin_kind = self._pin(node)
        strict = self._rt.trust_strict()
        if strict and pin_kind in ("trusted", "bound") and key is not None and key != pin:
            self._drops.drop(node, "relay", "relayed key differs from the pinned key")
            return
        inbound = _Inbound(
            node_id=node,
            key=key,
            bound=True,
            pinned=key is not None and key == pin and pin_kind == "trusted",
            strongly_pinned=key is not None and key == pin and pin_kind in ("trusted", "bound"),
            weakly_pinned=key is not None and key == pin and pin_kind == "weak",
            relayed=True,
            source="relay",
            remote="relay",
            registry_key=registry_key,
            networks=_answer_networks(answer),
        )
        self._on_request(inbound, justification)

    def process_relayed_approval(self, from_node_id: int) -> None:
        """Apply an accept relayed by the registry (SPEC 7)."""
        self.metrics.relay(HANDSHAKE_ACCEPT, "in")
        if not self._relayed_refused(from_node_id):
            self._on_accept(self._relayed(from_node_id))

    def process_relayed_rejection(self, from_node_id: int) -> None:
        """Apply a reject relayed by the registry (SPEC 7)."""
        self.metrics.relay(HANDSHAKE_REJECT, "in")
        if not self._relayed_refused(from_node_id):
            self._on_reject(self._relayed(from_node_id), "")

    def _relayed_refused(self, node: int) -> bool:
        if node == self._rt.node_id():
            self._drops.drop(node, "relay", "relayed message claims our own node ID")
            return True
        if self._rt.is_denied(node):
            self._drops.drop(node, "relay", "node is on the deny list")
            return True
        return False

    @staticmethod
    def _relayed(node: int) -> _Inbound:
        return _Inbound(
            node_id=node,
            key=None,
            bound=True,
            pinned=False,
            strongly_pinned=False,
            weakly_pinned=False,
            relayed=True,
            source="relay",
            remote="relay",
        )

    # Operator API (SPEC 7)

    def send_request(self, peer_node_id: int, justification: str) -> str:
        """Ask ``peer_node_id`` for trust: "trusted" if it already is, "sent" when delivered
        directly, "relayed" when sent through the registry. Raises ``SendError`` when both
        fail (the outgoing entry is forgotten), ``StoreError`` before sending when the
        outgoing entry cannot be written."""
        peer = peer_node_id
        own = self._rt.node_id()
        if own != 0 and peer == own:
            raise HandshakeError(f"node {peer} is this node's own ID: a node cannot ask itself")
        if self.is_trusted(peer):
            return "trusted"
        if own == 0:
            raise HandshakeError("this node has no node ID yet (not registered)")
        text = truncate_utf8(justification)
        message = self._message(HANDSHAKE_REQUEST, peer, justification=text)
        with self._lock:
            if self._trusts(peer):
                return "trusted"
            self._cooldown.pop(peer, None)  # an explicit request is fresh intent
            seq = self._store.put_outgoing(OutgoingRequest(peer, _utcnow()))
        self._store.commit(seq)
        try:
            self._dial(peer, message)
            return "sent"
        except SendError as exc:
            direct = str(exc)
        relay = self._relay_request(peer, text)
        if not relay:
            return "relayed"
        with self._lock:
            undo = self._store.drop_outgoing(peer) if peer in self._store.working.outgoing else None
        if undo is not None:
            try:
                self._store.commit(undo)
            except StoreError as exc:
                log.error("could not forget the outgoing request to node %d: %s", peer, exc)
        raise SendError(f"cannot reach node {peer}: direct: {direct}; relay: {relay}")

    def _relay_request(self, peer: int, justification: str) -> str:
        """Send a request through the registry; "" on success, else why it failed."""
        registry = self._rt.registry()
        if registry is None:
            return "no registry configured"
        own = self._rt.node_id()
        signature = self._registry_signature(handshake_challenge(own, peer))
        now = time.monotonic()
        with self._lock:
            previous = self._relayed_at.get(peer)
        try:
            registry.request_handshake(own, peer, justification, signature)
            self.metrics.relay(HANDSHAKE_REQUEST, "out")
        except RegistryError as exc:
            if previous is not None and now - previous < RELAY_RECENT:
                return f"{exc} (an earlier relayed request may still be waiting for node {peer})"
            return str(exc)
        with self._lock:
            self._relayed_at[peer] = now
        return ""

    def approve_handshake(self, peer_node_id: int) -> bool:
        """Trust the pending requester ``peer_node_id`` (``mutual=False``); False when nothing
        was pending. Raises ``StoreError`` (nothing announced) when the write fails."""
        peer = peer_node_id
        outcome = _Outcome(
            events=[("handshake.approved", {"peer_node_id": peer, "by": "operator"})]
        )
        with self._lock:
            request = self._store.working.pending.get(peer)
            if request is None:
                return False
            self._grant(outcome, peer, request.public_key)
        outcome.tasks.append((self._respond, (peer, True)))
        # respond_handshake already relays the answer: the direct send has no fallback.
        outcome.tasks.append((self._send_best_effort, (peer, HANDSHAKE_ACCEPT, "")))
        self._finish(outcome)
        return True

    def reject_handshake(self, peer_node_id: int, reason: str = "") -> bool:
        """Drop the pending request of ``peer_node_id`` and tell it why; False when nothing
        was pending. Raises ``StoreError`` when the write fails."""
        peer = peer_node_id
        text = truncate_utf8(reason)
        outcome = _Outcome(
            events=[("handshake.rejected", {"peer_node_id": peer, "reason": text})],
            tasks=[
                (self._respond, (peer, False)),
                (self._send_best_effort, (peer, HANDSHAKE_REJECT, text)),
            ],
        )
        with self._lock:
            if peer not in self._store.working.pending:
                return False
            self._forget_pending(outcome, peer)
        self._finish(outcome)
        return True

    def revoke_trust(self, peer_node_id: int) -> str:
        """Stop trusting ``peer_node_id``: remove trust, pending and outgoing, start the
        revoke cooldown, persist, tell the peer (best effort), ``remove_tunnel_peer``; the
        registry hears of it in the background. Returns "revoked", or "withdrawn" when it
        was not trusted but we had asked it (the request is cancelled and the peer gets a
        signed revoke, which removes our pending request there). Raises ``NotTrustedError``
        when neither (the rest still happens), ``HandshakeError`` for our own node ID."""
        peer = peer_node_id
        own = self._rt.node_id()
        if own != 0 and peer == own:
            raise HandshakeError("a node cannot stop trusting itself")
        outcome = _Outcome()
        with self._lock:
            asked = peer in self._store.working.outgoing
            was_trusted = self._forget(outcome, peer)
            self._cooldown[peer] = time.monotonic()
        if not was_trusted:
            self._finish(outcome)
            if not asked:
                raise NotTrustedError(f"node {peer} is not trusted")
            self._send_best_effort(peer, HANDSHAKE_REVOKE, "request withdrawn")
            log.info("withdrew our request to node %d", peer)
            return "withdrawn"
        outcome.events.append(("trust.revoked", {"peer_node_id": peer}))
        outcome.events.append(("trust.changed", {"peer_node_id": peer, "state": "revoked"}))
        self._finish(outcome)
        # Synchronous, before remove_tunnel_peer: the peer should hear it while reachable.
        # The registry hears last: once it drops the trust pair it no longer resolves a
        # private peer for us, and the direct revoke could not be dialled.
        self._send_best_effort(peer, HANDSHAKE_REVOKE, "")
        self._rt.remove_tunnel_peer(peer)
        self._pool.submit(self._revoke_at_registry, peer, quiet=_QUIET)
        log.info("revoked trust in node %d", peer)
        return "revoked"

    # Outgoing messages and background work (run on the pool, never under the lock)

    def _message(
        self, msg_type: str, peer: int, *, justification: str = "", reason: str = ""
    ) -> HandshakeMsg:
        """A signed message to ``peer``: ``signature_v2`` only (SPEC 4)."""
        public_key = self._rt.public_key()
        if public_key is None:
            raise HandshakeError("this node has no identity: cannot sign")
        message = HandshakeMsg(
            type=msg_type,
            node_id=self._rt.node_id(),
            public_key=b64encode(public_key),
            justification=justification,
            reason=reason,
            timestamp=int(time.time()),
        )
        signature = self._rt.sign(message.v2_challenge(peer))
        if signature is None:
            raise HandshakeError("this node has no identity: cannot sign")
        message.signature_v2 = b64encode(signature)
        return message

    def _registry_signature(self, challenge: bytes) -> str:
        signature = self._rt.sign(challenge)
        if signature is None:
            raise HandshakeError("this node has no identity: cannot sign")
        return b64encode(signature)

    def _dial(self, peer: int, message: HandshakeMsg) -> None:
        """Deliver ``message`` to the peer's port 444, counted by result; ``SendError``."""
        try:
            self._rt.dial_and_send(peer, PORT_HANDSHAKE, message.to_json())
        except SendError:
            self.metrics.message(message.type, "failed")
            raise
        self.metrics.message(message.type, "sent")

    def _send_best_effort(self, peer: int, msg_type: str, reason: str) -> None:
        try:
            self._dial(peer, self._message(msg_type, peer, reason=reason))
        except HandshakeError as exc:
            log.info("could not send %s to node %d: %s", msg_type, peer, exc)

    def _reply_accept(self, peer: int, relayed: bool) -> None:
        """Accept a request: dial back, else (or for a relayed request) through the registry."""
        if not relayed:
            try:
                self._dial(peer, self._message(HANDSHAKE_ACCEPT, peer))
                return
            except SendError as exc:
                log.info("direct accept to node %d failed (%s); relaying", peer, exc)
        self._respond(peer, True)

    def _respond(self, peer: int, accept: bool) -> None:
        registry = self._rt.registry()
        if registry is None:
            return
        own = self._rt.node_id()
        signature = self._registry_signature(respond_challenge(own, peer))
        registry.respond_handshake(own, peer, accept, signature)
        self.metrics.relay(HANDSHAKE_ACCEPT if accept else HANDSHAKE_REJECT, "out")

    def _report_trust(self, peer: int) -> None:
        registry = self._rt.registry()
        if registry is not None:
            registry.report_trust(self._rt.node_id(), peer)

    def _revoke_at_registry(self, peer: int) -> None:
        registry = self._rt.registry()
        if registry is not None:
            registry.revoke_trust(self._rt.node_id(), peer)

    def _backfill(self, node: int) -> None:
        """Fill in the key of a trust record that has none from the registry (SPEC 6)."""
        registry = self._rt.registry()
        if registry is None:
            return
        # Fresh: a cached answer is likely the very one that had no key.
        key = _answer_key(self._lookup(registry, node, fresh=True))
        if key is None:
            log.debug("no key to backfill for node %d", node)
            return
        with self._lock:
            record = self._store.working.trusted.get(node)
            if record is None or decode_key(record.public_key) is not None:
                return
            seq = self._store.put_trusted(dataclasses.replace(record, public_key=b64encode(key)))
        self._store.commit(seq)

    def _check_records(self) -> None:
        """At start, with a registry: backfill the keys of keyless trust records, and look
        up every other record for a conflict with the registry's binding (issue 11 item 7)."""
        registry = self._rt.registry()
        if registry is None:
            return
        with self._lock:
            records = [
                (n, decode_key(r.public_key)) for n, r in self._store.working.trusted.items()
            ]
        for node, key in records:
            if self._stopping.is_set():
                return
            if key is None:
                self._backfill(node)
            else:
                self._checked_lookup(registry, node, None)

    # Reaper (SPEC 7, last item)

    def _reap_loop(self) -> None:
        while not self._stopping.wait(self._reap_interval):
            try:
                self._reap()
            except StoreError as exc:
                log.error("reaper could not persist: %s", exc)
            except Exception:
                log.warning("reaper failed", exc_info=True)

    def _reap(self) -> None:
        """Forget outgoing and pending requests older than their TTLs, and expired cooldowns."""
        cutoff = _utcnow() - timedelta(seconds=self._rt.trust_outgoing_ttl())
        pending_cutoff = _utcnow() - timedelta(seconds=self._rt.trust_pending_ttl())
        now = time.monotonic()
        outcome = _Outcome()
        with self._lock:
            for node, request in list(self._store.working.outgoing.items()):
                if request.sent_at < cutoff:
                    outcome.seq = self._store.drop_outgoing(node)
            expired = [
                node
                for node, pending in self._store.working.pending.items()
                if pending.received_at < pending_cutoff
            ]
            for node in expired:
                self._forget_pending(outcome, node)
            if expired:
                outcome.notes.append(f"{len(expired)} pending requests expired")
            self._cooldown = {n: t for n, t in self._cooldown.items() if now - t < REVOKE_COOLDOWN}
            self._relayed_at = {n: t for n, t in self._relayed_at.items() if now - t < RELAY_RECENT}
        self._finish(outcome)


def _authenticate(msg: HandshakeMsg, own: int, strict: bool) -> tuple[bytes, bytes, bool] | str:
    """SPEC 5 step 3, local part, the same in every mode for the key: (the sender's key, the
    replay material, whether only the Go-style signature verified), or the reason to drop.
    The replay material is what the verified signature covered. Legacy mode also takes the
    Go-style ``signature`` over ``handshake:<S>:<R>``; the caller then requires the key to
    be registry-bound (SPEC 8)."""
    key = decode_key(msg.public_key)
    if key is None:
        return "public_key is not base64 of a 32-byte key"
    challenge = msg.v2_challenge(own)
    signature_v2 = decode_signature(msg.signature_v2)
    if signature_v2 is not None and verify(key, challenge, signature_v2):
        return key, challenge, False
    if strict:
        return "signature_v2 missing or invalid"
    signature = decode_signature(msg.signature)
    canonical = msg.canonical_bytes()
    if (
        signature is not None
        and canonical is not None
        and verify(key, handshake_challenge(msg.node_id, own), signature)
    ):
        return key, canonical, True
    return "no valid signature"


def _remote_address(conn: socket.socket) -> str:
    try:
        peer = conn.getpeername()
    except OSError:
        return "unknown"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer) or "local"
