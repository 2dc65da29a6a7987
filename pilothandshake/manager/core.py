"""The ``Manager``: lifecycle, the public API (SPEC 9), commits and the reaper.

Every change follows one path (SPEC 16):

1. gather, outside the lock: ``Intake`` (signatures, registry answers, runtime settings);
2. decide, under the lock, on the live working state: a pure ``decide_*`` returns a
   ``Decision``, whose changes go into ``store.working`` at once (``State.apply``) — so
   whatever changed while we gathered is seen, and the pin is checked again;
3. commit, outside the lock: ``store.commit`` returns once the changes are on disk;
4. only then: log lines, events, and the decision's effects (``Effects.run``), inline or on
   the background pool (``_finish``).

Readers (``is_trusted``, ``trusted_peers`` ...) see ``store.visible``: durable state only.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from ..constants import (
    MAX_PENDING,
    MAX_PENDING_BOUND_PER_SOURCE,
    MAX_PENDING_UNBOUND_PER_SOURCE,
    MAX_REPLAY,
    MAX_REPLAY_PER_SOURCE,
    MAX_TRUST_HISTORY,
    PORT_HANDSHAKE,
    REAP_INTERVAL,
    STOP_TIMEOUT,
    TRUST_FILE,
)
from ..errors import (
    HandshakeError,
    MessageError,
    NotTrustedError,
    RegistryError,
    SendError,
    StoreError,
)
from ..identity import decode_key
from ..messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    receipt_challenge,
    truncate_utf8,
)
from ..metrics import Metrics
from ..pool import BackgroundPool
from ..runtime import Closeable, Runtime, is_own_node
from ..store import RELAY, OutgoingRequest, PendingHandshake, TrustRecord
from ..wire import Peer, peer_text, serve_message
from .auth import approval_problem
from .binding import Binding, answer_key
from .clock import Clock, Now, SystemClock
from .decide import (
    Context,
    Decision,
    Inbound,
    View,
    decide_operator_approve,
    decide_operator_reject,
    decide_operator_revoke,
    decide_peer_accept,
    decide_peer_reject,
    decide_peer_request,
    decide_peer_revoke,
    decide_reap,
    decide_send,
    decide_sent,
    decide_unsent,
)
from .droplog import DropLog, ErrorLog
from .effects import Effects, ReplyAccept, Send, answer_kinds
from .intake import Intake
from .outbox import ACCEPT, OUTBOX_FILE, Outbox
from .queue import QueueLimits
from .reconcile import Reconcile
from .replay import ReplaySet
from .state import State

__all__ = ["Manager"]

log = logging.getLogger(__name__)

_QUIET = (RegistryError,)  # background failures logged at DEBUG: the registry is best effort
# At most one ERROR line per this many seconds for failed writes of inbound messages.
_STORE_ERROR_INTERVAL = 60.0
# What a decide function returns: a Decision, or None for some (nothing to decide).
_D = TypeVar("_D", bound=Optional[Decision])
# How an answer (accept, reject, revoke) is decided, by whichever path it came.
_AnswerRule = Callable[[View, Inbound, Context, Now], Decision]
# What each port-444 message type is decided by.
_DECIDE: dict[str, _AnswerRule] = {
    HANDSHAKE_ACCEPT: decide_peer_accept,
    HANDSHAKE_REJECT: decide_peer_reject,
}


class Manager:
    """The trust handshake of one node (Go ``Manager``); every public method is thread-safe.

    Loads ``trust.json`` beside ``runtime.identity_path()`` (memory only when that is "");
    a file that does not parse, or a directory used by another process, raises
    ``StoreError``. It publishes its events (SPEC 14) through ``runtime.publish_event`` once
    the change they announce is durable; their topics and payloads are listed once, in
    ``events``, and ``trust.changed``'s reasons in ``decide``. ``clock``
    (default: the system's) is read for every age, cooldown, cache and timestamp.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_replay: int = MAX_REPLAY,
        max_replay_per_source: int = MAX_REPLAY_PER_SOURCE,
        max_pending_per_source: int = MAX_PENDING_UNBOUND_PER_SOURCE,
        max_pending_bound_per_source: int = MAX_PENDING_BOUND_PER_SOURCE,
        max_trust_history: int = MAX_TRUST_HISTORY,
        reap_interval: float = REAP_INTERVAL,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Open the trust store of ``runtime``; nothing is bound until ``start()``.
        ``metrics`` (the daemon's) is counted into; without it the Manager has its own."""
        self._rt = runtime
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock: Clock = clock if clock is not None else SystemClock()
        identity_path = runtime.identity_path()
        path = os.path.join(os.path.dirname(identity_path), TRUST_FILE) if identity_path else ""
        self._state = State(path, self.metrics, runtime)
        self._lock = self._state.lock
        self._store = self._state.store
        self._pool = BackgroundPool()
        self._drops = DropLog(clock=self._clock.monotonic, count=self.metrics.drop)
        limits = QueueLimits(
            MAX_PENDING, max_pending_per_source, max_pending_bound_per_source, max_trust_history
        )
        replay = ReplaySet(max_replay, max_replay_per_source)
        self._binding = Binding(self._clock.monotonic)
        self._reconcile = Reconcile(runtime, self._state, self._binding, self._decide)
        self._intake = Intake(
            runtime,
            self._clock,
            self._state,
            self._drops,
            replay,
            limits,
            self.metrics,
            self._binding,
            self._reconcile,
        )
        self._limits = limits
        self._outbox = Outbox(
            os.path.join(os.path.dirname(path), OUTBOX_FILE) if path else "",
            lambda peer, kind, reason: self._effects.deliver_answer(peer, kind, reason),
            runtime.trust_outgoing_ttl,
            self._clock,
        )
        self._effects = Effects(
            runtime, self._clock, self._reconcile.backfill, self.metrics, self._answered
        )
        self._reap_interval = reap_interval
        # A full disk fails every inbound message: one ERROR line a minute says so.
        self._store_errors = ErrorLog(_STORE_ERROR_INTERVAL, clock=self._clock.monotonic)
        self._listener: Closeable | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False

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
        self._outbox.start()
        if self._rt.registry() is not None:
            self._pool.submit(self._reconcile.check_records, self._stopping)

    def stop(self) -> None:
        """Stop listening and reaping, wait for background work, release trust.json: all
        within ``STOP_TIMEOUT`` in total, however many background calls hang (one deadline
        for the whole stop; work still running then is abandoned, its threads are daemons,
        and a change it tries later fails: the store is closed).

        Does nothing before ``start()`` or when already stopped.
        """
        with self._lock:
            if not self._started or self._stopped:
                return
            self._stopped = True
        deadline = time.monotonic() + STOP_TIMEOUT
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                log.warning("closing the port %d listener failed", PORT_HANDSHAKE, exc_info=True)
        if self._reaper is not None:
            self._reaper.join(max(0.0, deadline - time.monotonic()))
        self._outbox.stop(max(0.0, deadline - time.monotonic()))
        self._drops.flush()
        self._close(deadline)

    def close(self) -> None:
        """Stop the background workers (waiting up to ``STOP_TIMEOUT``) and release the trust
        store and its directory lock (``stop()`` does this too); for a Manager that is never
        started. Later state changes fail with ``StoreError``."""
        self._close(time.monotonic() + STOP_TIMEOUT)

    def _close(self, deadline: float) -> None:
        self._pool.shutdown(max(0.0, deadline - time.monotonic()))
        self._store.close()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the background work queued so far; whether it
        all ran."""
        return self._pool.drain(timeout)

    # Readers: durable state only

    def is_trusted(self, node_id: int) -> bool:
        """Whether ``node_id`` is trusted (a node trusts itself once its ID is known)."""
        return self._state.trusted(node_id, self._rt.node_id())

    def trusted_peers(self) -> list[TrustRecord]:
        """Trust records, sorted by node ID."""
        return self._state.records()

    def pending_requests(self) -> list[PendingHandshake]:
        """Pending requests, sorted by node ID."""
        return self._state.pending()

    def outgoing_requests(self) -> list[OutgoingRequest]:
        """Our requests (SPEC 7), sorted by node ID: each ``waiting``, or ended (``accepted``,
        ``rejected`` with the peer's reason, ``expired``, ``withdrawn``) and kept for
        ``outgoing_ttl`` after it ended, so a caller can ask what became of it."""
        return self._state.outgoing()

    def conflicting_peers(self) -> list[int]:
        """Node IDs of trust records the registry now binds to a different key, sorted: not
        trusted until the operator approves the node again or removes the record."""
        return self._state.in_conflict()

    def peer_key(self, node_id: int) -> bytes | None:
        """The key ``node_id`` must prove, as the receipt of a direct send (SPEC 3): its trust
        record's key (in conflict or not: the record's pin wins over the registry), else
        the key the registry's ``lookup`` binds (cached), else None (no registry, no record:
        trust on first use)."""
        with self._lock:
            record = self._store.working.trusted.get(node_id)
        key = decode_key(record.public_key) if record is not None else None
        registry = self._rt.registry()
        if key is None and registry is not None:
            key = answer_key(self._binding.lookup(registry, node_id))
        return key

    def undelivered_answers(self) -> int:
        """How many of our answers (accept, reject, revoke, withdrawal) wait to be delivered:
        both the direct send and the registry failed, and they are being retried."""
        return self._outbox.count()

    def pending_count(self) -> int:
        """How many requests are pending."""
        with self._lock:
            return len(self._store.visible.pending)

    def wait_for_trust(self, node_id: int, timeout: float | None) -> bool:
        """Block until ``node_id`` is trusted (True) or ``timeout`` seconds pass (False);
        ``None`` waits without limit. Returns False as soon as our latest request to it is
        rejected (at once when it already is; ``outgoing_requests()`` has the peer's
        reason). Woken by a per-node condition, never by polling."""
        return self._state.wait(node_id, self._rt.node_id(), timeout)

    def waiting(self) -> int:
        """How many ``wait_for_trust`` calls are blocked now."""
        return self._state.waiting()

    # Decide, commit, announce

    def _decide(self, decide: Callable[..., _D], *args: Any, now: Now | None = None) -> _D:
        """Decide on the live working state under the lock (at ``now``, default: the clock's
        time now), apply, then ``_finish``."""
        now = now if now is not None else Now.read(self._clock)
        with self._lock:
            decision = decide(self._state.view(), *args, now)
            seq = None if decision is None or decision.drop else self._state.apply(decision)
        if decision is not None:
            inbound = args[0] if args and isinstance(args[0], Inbound) else None
            self._finish(decision, seq, inbound)
        return decision

    def _finish(self, decision: Decision, seq: int | None, inbound: Inbound | None) -> None:
        """Make the decision durable, then log, publish, and carry out its effects: inline
        ones now, in order, then the rest on the pool. Raises ``StoreError`` (nothing
        published) when the write failed."""
        if decision.drop:
            node = None if inbound is None else inbound.node_id
            self._drops.drop(node, "" if inbound is None else inbound.remote, decision.drop)
            return
        if decision.quiet:
            log.debug("%s", decision.quiet)
        for alarm in decision.alarms:
            log.error("%s", alarm)
        if seq is not None:
            self._store.commit(seq)
        for note in decision.notes:
            log.info("%s", note)
        for peer, kinds in decision.superseded.items():
            self._outbox.cancel(peer, kinds)
        for topic, payload in decision.events:
            self._rt.publish_event(topic, payload)
        background = [e for e in decision.effects if self._effects.needed(e)]
        for effect in [*decision.inline, *background]:
            # The answer this decision makes is kept until a path delivers it.
            if isinstance(effect, Send):
                kinds = answer_kinds(effect)
                if kinds:
                    self._outbox.expect(effect.peer, kinds[0], effect.reason)
            elif isinstance(effect, ReplyAccept):
                self._outbox.expect(effect.peer, ACCEPT)
        for effect in decision.inline:
            self._effects.run(effect)
        for effect in background:
            self._pool.submit(self._effects.run, effect, quiet=_QUIET)

    def _answered(self, peer: int, kinds: tuple[str, ...], delivered: bool) -> None:
        """An answer effect ran: what it delivered is done, what failed is kept on disk."""
        if delivered:
            self._outbox.delivered(peer, kinds)
        else:
            self._outbox.failed(peer)

    # Port 444 and relayed input

    def handle_connection(self, conn: socket.socket) -> None:
        """Serve one port-444 connection (``wire.serve_message``): read one message, process
        it, write the receipt when the message was taken (SPEC 3), close. Never raises."""
        serve_message(conn, self._receive, self._unreadable)

    def _receive(self, data: bytes, peer: Peer) -> bytes | None:
        """Process ``data``; the receipt's signature when it was taken, else None."""
        sender = self._take(data, peer)
        if sender is None:
            return None
        return self._rt.sign(receipt_challenge(self._rt.node_id(), sender, data))

    def _unreadable(self, peer: Peer, problem: MessageError) -> None:
        self._drops.drop(None, peer_text(peer), problem.drop)

    def process_message(self, data: bytes, peer: Peer) -> bool:
        """Process one received message (SPEC 5) from ``peer`` (``(host, port)``); whether
        it was taken: its changes are durable, or it changed nothing because it was a
        duplicate or already in effect (what earns a receipt, SPEC 3).

        Drops are logged (WARNING, rate-limited) and change nothing; a failed write of the
        resulting change is logged at ERROR. Never raises for bad input.
        """
        return self._take(data, peer) is not None

    def _take(self, data: bytes, peer: Peer) -> int | None:
        """``process_message``, returning the sender's node ID when the message was taken."""
        try:
            received = self._intake.message(data, peer)
            if received is not None and self._dispatch(*received):
                return received[1].node_id
        except StoreError as exc:
            self._store_errors.error(f"could not persist the message from {peer_text(peer)}: {exc}")
        return None

    def _dispatch(self, msg_type: str, inbound: Inbound) -> bool:
        """Decide a message that passed SPEC 5; whether it was taken (not dropped)."""
        if msg_type == HANDSHAKE_REQUEST:
            return self._on_request(inbound)
        context = self._intake.answer_context()
        decision = self._decide(_DECIDE.get(msg_type, decide_peer_revoke), inbound, context)
        return decision is not None and not decision.drop

    def _on_request(self, inbound: Inbound) -> bool:
        """SPEC 6, direct or relayed; a request arriving again by the other path is ignored.
        Whether it was taken (not dropped)."""
        mark = self._intake.claim(inbound)
        if mark is None:
            # The same request by the other path: a slow peer got it directly and the sender
            # then relayed it (SPEC 3). Decided already; nothing changes, nothing is announced.
            log.debug("node %d: duplicate request by the other path", inbound.node_id)
            return True
        try:
            decision = self._decide(
                decide_peer_request, inbound, self._intake.request_context(inbound)
            )
        except BaseException:
            # Not written: a copy by the other path (the sender relays it, having had no
            # receipt) must be decided, not ignored as a duplicate.
            self._intake.release(inbound, mark)
            raise
        if decision is None or decision.drop:
            self._intake.release(inbound, mark)
            return False
        return True

    def process_relayed_request(
        self, from_node_id: int, justification: str, public_key: str = ""
    ) -> None:
        """Decide a request relayed by the registry (SPEC 6). Raises ``StoreError`` when the
        resulting change cannot be written; bad input is dropped and logged."""
        self.metrics.relay(HANDSHAKE_REQUEST, "in")
        inbound = self._intake.relayed(from_node_id, public_key, justification, request=True)
        if inbound is not None:
            self._on_request(inbound)

    def process_relayed_approval(self, from_node_id: int) -> None:
        """Apply an accept relayed by the registry (SPEC 7)."""
        self.metrics.relay(HANDSHAKE_ACCEPT, "in")
        self._relayed_answer(decide_peer_accept, from_node_id)

    def process_relayed_rejection(self, from_node_id: int, reason: str = "") -> None:
        """Apply a reject relayed by the registry (SPEC 7), with the peer's ``reason`` when
        the registry passes one on ("" otherwise: the production registry drops it)."""
        self.metrics.relay(HANDSHAKE_REJECT, "in")
        self._relayed_answer(decide_peer_reject, from_node_id, reason)

    def _relayed_answer(self, decide: _AnswerRule, node: int, text: str = "") -> None:
        inbound = self._intake.relayed(node, text=text)
        if inbound is not None:
            self._decide(decide, inbound, self._intake.answer_context())

    # Operator API (SPEC 7)

    def send_request(self, peer_node_id: int, justification: str = "") -> str:
        """Ask ``peer_node_id`` for trust: "trusted" if it already is, "sent" when delivered
        directly, "relayed" when sent through the registry. Raises ``SendError`` when both
        fail (the outgoing entry is forgotten), ``StoreError`` before sending when the
        outgoing entry cannot be written."""
        peer = peer_node_id
        own = self._rt.node_id()
        if is_own_node(peer, own):
            raise HandshakeError(f"node {peer} is this node's own ID: a node cannot ask itself")
        if self.is_trusted(peer):
            return "trusted"
        # Raises HandshakeError before anything is written while this node has no ID yet.
        message = self._effects.message(
            HANDSHAKE_REQUEST, peer, justification=truncate_utf8(justification)
        )
        now = Now.read(self._clock)
        decision = self._decide(decide_send, peer, now=now)
        if decision.result == "trusted":
            return "trusted"
        sent_at = now.wall  # decide_send's request is sent now
        try:
            status = self._effects.deliver_request(peer, message)
        except SendError:
            self._after_send(decide_unsent, peer, sent_at)
            raise
        # Fresh intent, once it reached the peer: a kept "no" to it is stale. Not before: a
        # request that went nowhere leaves the peer as it was, and it must still hear the no.
        self._outbox.cancel(peer)
        if status == "relayed":
            self._after_send(decide_sent, peer, sent_at, RELAY)
        return status

    def _after_send(self, decide: Callable[..., Decision], peer: int, *args: Any) -> None:
        """Note how our request went (``decide_sent``, ``decide_unsent``): the request itself
        is already sent or failed, so a failed write is logged, not raised."""
        try:
            self._decide(decide, peer, *args)
        except StoreError as exc:
            log.error("could not note the outgoing request to node %d: %s", peer, exc)

    def approve_handshake(self, peer_node_id: int, new_key: str | None = None) -> bool:
        """Trust the pending requester ``peer_node_id`` (``mutual=False``), or a trust record
        in conflict with the registry again with its own key; False when neither. Raises
        ``StoreError`` (nothing announced) when the write fails.

        A KEY CHANGED request (SPEC 17: the node has a trust record with another key) is
        refused with ``HandshakeError`` unless ``new_key`` names its key: the hex
        fingerprint ``pending`` shows, a prefix of at least 16 hex digits, or the base64
        key."""
        peer = peer_node_id
        refused: list[str] = []

        def approve(view: Any, now: Now) -> Decision | None:
            request = view.state.pending.get(peer)
            if request is not None:
                problem = approval_problem(view.state.trusted.get(peer), request, new_key)
                if problem:
                    refused.append(problem)
                    return None
            elif new_key is not None:
                refused.append(f"nothing pending for node {peer}: --new-key names no request")
                return None
            return decide_operator_approve(view, peer, now)

        decision = self._decide(approve)
        if refused:
            raise HandshakeError(refused[0])
        return decision is not None

    def reject_handshake(self, peer_node_id: int, reason: str = "") -> bool:
        """Drop the pending request of ``peer_node_id`` and tell it why; False when nothing
        was pending. Raises ``StoreError`` when the write fails."""
        text = truncate_utf8(reason)
        return self._decide(decide_operator_reject, peer_node_id, text) is not None

    def revoke_trust(self, peer_node_id: int) -> str:
        """Stop trusting ``peer_node_id``: remove trust, pending and outgoing, start the
        revoke cooldown, persist, tell the peer (best effort), ``remove_tunnel_peer``; the
        registry hears of it in the background. Returns "revoked", or "withdrawn" when it
        was not trusted but we had asked it (our request ends ``withdrawn`` and the peer gets a
        signed revoke, which removes our pending request there). Raises ``NotTrustedError``
        when neither (the rest still happens), ``HandshakeError`` for our own node ID."""
        peer = peer_node_id
        if is_own_node(peer, self._rt.node_id()):
            raise HandshakeError("a node cannot stop trusting itself")

        decision = self._decide(decide_operator_revoke, peer, self._limits)
        if not decision.result:
            raise NotTrustedError(f"node {peer} is not trusted")
        return decision.result

    # Background work (on the pool or the reaper thread, never under the lock)

    def _reap_loop(self) -> None:
        while not self._stopping.wait(self._reap_interval):
            try:
                self.reap()
            except StoreError as exc:
                log.error("reaper could not persist: %s", exc)
            except Exception:
                log.warning("reaper failed", exc_info=True)

    def reap(self) -> None:
        """Forget outgoing and pending requests older than their TTLs, and expired cooldowns
        (SPEC 7; the reaper thread calls this every ``reap_interval``)."""
        outgoing_ttl = self._rt.trust_outgoing_ttl()
        pending_ttl = self._rt.trust_pending_ttl()

        self._effects.forget_relayed()
        self._decide(decide_reap, outgoing_ttl, pending_ttl)
