"""The decisions of SPEC 6 and 7, as pure functions of plain data.

Each ``decide_*`` reads a ``View`` of the working state, what arrived (``Inbound``), what
was gathered about it outside the lock (``Context``) and the time (``Now``), and returns a
``Decision``: the store changes to make, the events to publish once they are durable, the
effects to carry out, log lines, or the drop of the input. Nothing here holds a
lock, reads a clock, opens a socket or calls the runtime: the Manager (``core``) gathers,
calls a decision under its lock on the live working state (so the checks made outside the
lock are re-checked, SPEC 16), commits the changes and then runs the effects.

The table of SPEC 6 is ``REQUEST_ROWS``: one ``Row`` per line of the SPEC's table, in its
order, first match wins.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import Any, Callable

from ..constants import REVOKE_COOLDOWN
from ..drops import Drop, DropKind
from ..events import (
    APPROVED,
    AUTO_APPROVED,
    CONFLICT,
    PENDING_EVENT,
    RECEIVED,
    REJECTED_BY_PEER,
    REJECTED_EVENT,
    REVOKED,
    REVOKED_BY_PEER,
    TRUST_CHANGED,
)
from ..identity import b64encode, decode_key
from ..messages import HANDSHAKE_ACCEPT, HANDSHAKE_REJECT, HANDSHAKE_REVOKE, WITHDRAWN
from ..runtime import AllowlistEntry
from ..store import (
    ACCEPTED,
    DIRECT,
    EXPIRED,
    HISTORY,
    OUTGOING,
    PENDING,
    REJECTED,
    TRUSTED,
    WAITING,
    Change,
    FormerTrust,
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
)
from ..store import WITHDRAWN as REQUEST_WITHDRAWN
from .auth import Pin, PinKind, pin_of, pin_problem
from .clock import Now
from .droplog import quote
from .effects import (
    Backfill,
    Effect,
    RemoveTunnelPeer,
    ReplyAccept,
    ReportTrust,
    Respond,
    RevokeAtRegistry,
    Send,
)
from .outbox import REJECT, REVOKE, WITHDRAW
from .queue import QueueLimits, admit, in_history

# trust.changed's reason (Go's), also kept in the trust record: why a peer is trusted, or
# who ended it. A row of SPEC 6 grants with its own name, "_relayed" added for the rows
# Go marks so (trusted_agent, auto_approve) when the request came through the registry.
APPROVED_REASON = "approved"  # the operator approved a pending request
ACCEPTED_REASON = "mutual"  # the peer accepted our request: mutual, as Go records it
LOCAL = "local"  # we revoked it
BY_PEER = "by_peer"  # the peer revoked it

Event = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Inbound:
    """An authenticated message's origin and text, as the decisions see it."""

    node_id: int
    key: bytes | None  # authenticated (direct), or carried / from the registry (relayed)
    bound: bool  # registry-bound; a relayed message always counts as bound
    pin: PinKind | None = None  # the kind of pin ``key`` matched when it was checked
    relayed: bool = False
    source: str = ""  # the source address (direct) or "relay", for per-source quotas
    remote: str = ""  # for log lines
    text: str = ""  # justification (request) or reason (reject, revoke), truncated
    registry_key: bytes | None = None
    networks: tuple[int, ...] = ()

    @property
    def pinned(self) -> bool:
        """The key equals the key of our trust record for the sender (in conflict or not)."""
        return self.pin is not None and self.pin.record


@dataclass(frozen=True)
class Context:
    """Runtime settings and registry answers a decision needs, gathered outside the lock."""

    strict: bool = True
    has_registry: bool = False
    auto_approve: bool = False
    agent: AllowlistEntry | None = None  # the sender's allowlist entry (row 4), if any
    network: int = 0  # first shared non-backbone network in our own order, 0 if none
    limits: QueueLimits = field(default_factory=QueueLimits)


@dataclass(frozen=True)
class View:
    """The working state a decision reads, with the Manager's side tables."""

    state: TrustState
    conflicts: Container[int] = frozenset()  # trust records the registry contradicts
    revoked_at: Mapping[int, float] = field(default_factory=dict)  # monotonic revoke times
    arrival: Mapping[int, int] = field(default_factory=dict)  # pending arrival order
    protected: Container[int] = frozenset()  # pending requests never evicted for strangers

    def trusts(self, node: int) -> bool:
        """Whether ``node`` has a trust record not in conflict."""
        return node in self.state.trusted and node not in self.conflicts

    def asked(self, node: int) -> bool:
        """Whether our request to ``node`` waits for an answer (SPEC 7, 8)."""
        request = self.state.outgoing.get(node)
        return request is not None and request.waiting

    def answerable(self, node: int) -> bool:
        """Whether an accept from ``node`` answers a request of ours: one that waits, or one
        a rejection ended. Our answers travel by two paths and are retried, so a late copy
        of the rejection of an earlier request can end a newer one; the peer's accept is
        then its newer word, and we did ask (a withdrawn or expired request answers
        nothing)."""
        request = self.state.outgoing.get(node)
        return request is not None and (request.waiting or request.state == REJECTED)


@dataclass
class Decision:
    """What a decision wants: made durable first (``changes``), then announced.

    ``changes`` go to the trust store; ``cooldowns`` (node -> monotonic revoke time, None to
    end it) and ``conflicts`` (node -> the key the registry binds instead of its trust
    record's; the conflict ends with that record) to the side tables that are not
    persisted. ``State.apply`` makes all of them: nothing else writes state. ``superseded``
    (peer -> outbox kinds) names the undelivered answers that say no and are stale once the
    changes are durable: every kind when we trust the peer again, a revoke when it asks
    us. (A request of ours makes them stale only once it reached the peer:
    ``Manager.send_request``.)"""

    changes: list[Change] = field(default_factory=list)
    cooldowns: dict[int, float | None] = field(default_factory=dict)
    conflicts: dict[int, bytes] = field(default_factory=dict)
    superseded: dict[int, tuple[str, ...]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)  # on the background pool
    inline: list[Effect] = field(default_factory=list)  # before the call returns, in order
    notes: list[str] = field(default_factory=list)  # INFO lines, logged once durable
    alarms: list[str] = field(default_factory=list)  # ERROR lines, logged once applied
    protected: set[int] = field(default_factory=set)  # new pending entries that are protected
    drop: Drop | None = None  # the input is dropped: a WARNING, nothing else
    quiet: str = ""  # the input is ignored: a DEBUG line, nothing else
    result: str = ""  # what an operator call returns

    def dropped(self, drop: Drop) -> Decision:
        """A decision that only drops the input (``drop``)."""
        return Decision(drop=drop)


# SPEC 6


class Action(Enum):
    """What a row of SPEC 6 does with the request."""

    REPLY = "reply"  # accept it again: the peer is trusted already, nothing changes
    GRANT = "grant"  # trust the peer (``Row.grant``) and accept
    HOLD = "hold"  # keep it pending for the operator


@dataclass(frozen=True)
class Grant:
    """The trust record a row grants: its key (base64), ``mutual`` and ``network``; for a
    trusted agent, its allowlist name (``agent``, in the events' payload)."""

    key: str
    mutual: bool = False
    network: int = 0
    agent: str | None = None


@dataclass(frozen=True)
class Row:
    """One line of SPEC 6's table: ``when`` it applies and its ``action``; for a grant, what
    ``grant`` trusts. ``relayed_reason``: the reason gets "_relayed" when the request came
    through the registry (Go marks those rows so)."""

    name: str
    action: Action
    when: Callable[[View, Inbound, Context], bool]
    grant: Callable[[Inbound, Context], Grant] | None = None
    relayed_reason: bool = False

    def grants(self, inbound: Inbound, context: Context) -> Grant:
        """What this ``Action.GRANT`` row trusts for ``inbound``."""
        if self.grant is None:
            raise TypeError(f"row {self.name!r} grants nothing")
        return self.grant(inbound, context)


def _vouched(view: View, inbound: Inbound, context: Context) -> bool:
    # Strict mode with a registry: an unbound request must not be trusted automatically, or
    # an impostor could take a real node's ID while the registry is unreachable. A trust
    # record in conflict with the registry: the operator decides (row 6).
    unbound_ok = not (context.strict and context.has_registry)
    return (inbound.bound or unbound_ok) and inbound.node_id not in view.conflicts


def _key(inbound: Inbound) -> str:
    return b64encode(inbound.key) if inbound.key is not None else ""


def _brought(inbound: Inbound) -> list[bytes]:
    """The keys a request brings: the message's or the relay's, and the registry's."""
    return [key for key in (inbound.key, inbound.registry_key) if key is not None]


def _agent_mismatch(inbound: Inbound, context: Context) -> bool:
    """Row 4: an allowlist entry that pins a key requires every key the request brings to
    equal it, even for a registry-bound request (a pin that is not a valid key equals
    none: every key the request brings is refused)."""
    agent = context.agent
    if agent is None or not agent.public_key:
        return False
    pinned = decode_key(agent.public_key)
    return any(key != pinned for key in _brought(inbound))


def _agent_vouched(view: View, inbound: Inbound, context: Context) -> bool:
    """Row 4: an allowlisted sender whose record is not in conflict, bringing its pinned key
    (and nothing else, ``_agent_mismatch``); an entry without a pin requires the request
    to be registry-bound (a relayed one always is)."""
    agent = context.agent
    if agent is None or inbound.node_id in view.conflicts:
        return False
    if not agent.public_key:
        return inbound.bound
    pinned = decode_key(agent.public_key) is not None
    return pinned and bool(_brought(inbound)) and not _agent_mismatch(inbound, context)


def _agent_grant(inbound: Inbound, context: Context) -> Grant:
    """Row 4 stores the allowlist's pinned key, else the request's."""
    agent = context.agent
    pinned = decode_key(agent.public_key) if agent is not None else None
    key = b64encode(pinned) if pinned is not None else _key(inbound)
    return Grant(key, agent=agent.name if agent is not None else None)


REQUEST_ROWS: tuple[Row, ...] = (
    Row("already_trusted", Action.REPLY, lambda v, i, c: v.trusts(i.node_id)),
    Row(
        "mutual",
        Action.GRANT,
        lambda v, i, c: _vouched(v, i, c) and v.asked(i.node_id),
        lambda i, c: Grant(_key(i), mutual=True),
    ),
    Row(
        "same_network",
        Action.GRANT,
        lambda v, i, c: _vouched(v, i, c) and c.network != 0,
        lambda i, c: Grant(_key(i), network=c.network),
    ),
    Row("trusted_agent", Action.GRANT, _agent_vouched, _agent_grant, relayed_reason=True),
    Row(
        "auto_approve",
        Action.GRANT,
        lambda v, i, c: _vouched(v, i, c) and c.auto_approve,
        lambda i, c: Grant(_key(i)),
        relayed_reason=True,
    ),
    Row("pending", Action.HOLD, lambda v, i, c: True),
)


def decide_peer_request(view: View, inbound: Inbound, context: Context, now: Now) -> Decision:
    """A handshake request, direct or relayed (SPEC 6)."""
    node = inbound.node_id
    payload = {"peer_node_id": node, "justification": inbound.text, "relayed": inbound.relayed}
    # The peer asks: it does not trust us, or it would not ask, so a kept revoke has nothing
    # left to end but the request it just sent. (A kept rejection stays: the request may be
    # a copy of the one it rejects, sent again after a registry outage, and a newer request
    # it ends is still answerable.)
    decision = Decision(events=[(RECEIVED, payload)], superseded={node: (REVOKE,)})
    problem = pin_problem(_pin(view, node), inbound.key, context.strict)
    if problem:
        return decision.dropped(problem)
    if _agent_mismatch(inbound, context):
        # Not even pending: its key would pin the node and lock the real agent out.
        mismatch = "public key differs from the allowlist's pinned key"
        return decision.dropped(Drop(DropKind.KEY_MISMATCH, mismatch))
    row = next(row for row in REQUEST_ROWS if row.when(view, inbound, context))
    if row.action is Action.HOLD:
        return _hold(decision, view, inbound, context, now)
    if row.action is Action.GRANT:
        grant = row.grants(inbound, context)
        relayed = inbound.relayed and row.relayed_reason
        reason = f"{row.name}_relayed" if relayed else row.name
        extra = {} if grant.agent is None else {"agent": grant.agent}
        decision.events.append((AUTO_APPROVED, {"peer_node_id": node, "reason": row.name, **extra}))
        _grant(decision, view, node, grant, now, reason)
    decision.effects.append(ReplyAccept(node, inbound.relayed))
    return decision


def _hold(decision: Decision, view: View, inbound: Inbound, context: Context, now: Now) -> Decision:
    """Row 6: store the request as pending, within the queue's rule (``queue.admit``)."""
    node = inbound.node_id
    pending = view.state.pending
    existing = pending.get(node)
    protected = (
        context.agent is not None
        or bool(context.network)
        or in_history(view.state, node, inbound.key, inbound.bound)
    )
    key = _key(inbound)
    request = PendingHandshake(node, key, inbound.text, now.wall, inbound.bound, inbound.source)
    if existing is None or existing.source != inbound.source:
        admission = admit(
            pending,
            view.protected,
            view.arrival,
            context.limits,
            request,
            relayed=inbound.relayed,
            is_protected=protected,
            replacing=existing is not None,
        )
        if admission.drop is not None:
            return decision.dropped(admission.drop)
        if admission.evict is not None:
            victim = admission.evict
            decision.notes.append(
                f"pending queue full: evicted the request of node {victim.node_id}"
                f" (source {quote(victim.source or 'unknown')})"
            )
            decision.changes.append(Change(PENDING, victim.node_id, None))
    record = view.state.trusted.get(node)
    if not key and record is not None and decode_key(record.public_key) is not None:
        # A relayed request without a key from a node we trusted: the key we know for it
        # (never one the registry hands out later, SPEC 17).
        key, bound = record.public_key, inbound.bound
    elif existing is not None and not key:
        # A relayed request without a key keeps the pending one, and its standing: the relay
        # vouched for no key, so a weakly pinned key must not become bound through it.
        key, bound = existing.public_key, existing.bound
    else:
        bound = inbound.bound or (
            existing is not None and existing.bound and existing.public_key == key
        )
    decision.changes.append(Change(PENDING, node, replace(request, public_key=key, bound=bound)))
    if protected:
        decision.protected.add(node)
    decision.events.append((PENDING_EVENT, {"peer_node_id": node, "justification": inbound.text}))
    return decision


def _grant(decision: Decision, view: View, node: int, grant: Grant, now: Now, reason: str) -> None:
    """Trust ``node`` as ``grant`` says, for ``reason`` (trust.changed's): the one place
    trust is granted. Our request to it, if it waits (or a rejection ended it:
    ``View.answerable``), ends ``accepted``; a kept "no" to it is superseded."""
    state = view.state
    record = TrustRecord(node, grant.key, now.wall, grant.mutual, grant.network, reason)
    decision.changes.append(Change(TRUSTED, node, record))
    if node in state.history:
        decision.changes.append(Change(HISTORY, node, None))  # trusted now: the record says so
    if node in state.pending:
        decision.changes.append(Change(PENDING, node, None))
    if view.answerable(node):
        decision.changes.append(_ended(state.outgoing[node], ACCEPTED, now))
    payload = {"peer_node_id": node, "state": "granted", "reason": reason}
    if grant.agent is not None:
        payload["agent"] = grant.agent
    decision.events.append((TRUST_CHANGED, payload))
    decision.superseded[node] = (REJECT, REVOKE, WITHDRAW)
    decision.effects.append(ReportTrust(node))
    if decode_key(grant.key) is None:
        decision.effects.append(Backfill(node))
    decision.notes.append(f"trusted node {node}")


def _ended(request: OutgoingRequest, state: str, now: Now, reason: str = "") -> Change:
    """The change that ends our ``request`` in ``state`` (SPEC 7)."""
    ended = replace(request, state=state, reason=reason, ended_at=now.wall)
    return Change(OUTGOING, request.node_id, ended)


def _forget(
    decision: Decision, view: View, node: int, now: Now, limits: QueueLimits, withdraw: bool = False
) -> bool:
    """Remove trust, pending and outgoing for ``node``, remembering a trust record in the
    history (forgetting the entry that ended longest ago beyond ``limits.max_history``);
    whether it was trusted. With ``withdraw`` our request, if it waits, ends ``withdrawn``
    instead of being removed: a caller can still ask what became of it."""
    state = view.state
    record = state.trusted.get(node)
    if record is not None:
        decision.changes.append(Change(TRUSTED, node, None))
        history = state.history
        if node not in history and len(history) >= limits.max_history:
            oldest = min(history.values(), key=lambda former: former.ended_at)
            decision.changes.append(Change(HISTORY, oldest.node_id, None))
        former = FormerTrust(node, record.public_key, now.wall)
        decision.changes.append(Change(HISTORY, node, former))
    if node in state.pending:
        decision.changes.append(Change(PENDING, node, None))
    if withdraw and view.asked(node):
        decision.changes.append(_ended(state.outgoing[node], REQUEST_WITHDRAWN, now))
    elif node in state.outgoing:
        decision.changes.append(Change(OUTGOING, node, None))
    return record is not None


def _pin(view: View, node: int) -> Pin:
    return pin_of(view.state.trusted, view.state.pending, view.conflicts, node)


def _believed(inbound: Inbound, context: Context) -> bool:
    """SPEC 8: with a registry, strict mode believes an answer only when it is registry-bound
    or matches a trust-record pin."""
    return not (context.strict and context.has_registry) or inbound.bound or inbound.pinned


# SPEC 7: received


def decide_peer_accept(view: View, inbound: Inbound, context: Context, now: Now) -> Decision:
    """An accept, direct or relayed (SPEC 7)."""
    node = inbound.node_id
    decision = Decision()
    revoked_at = view.revoked_at.get(node)
    problem = pin_problem(_pin(view, node), inbound.key, context.strict)
    if revoked_at is not None and now.monotonic - revoked_at < REVOKE_COOLDOWN:
        return decision.dropped(Drop(DropKind.UNSOLICITED, "accept within the revoke cooldown"))
    if problem:
        return decision.dropped(problem)
    if view.trusts(node):
        # The relayed copy of a direct accept, or a peer accepting twice: the happy path.
        decision.quiet = f"node {node}: accept from a node already trusted"
        return decision
    if not view.answerable(node):
        return decision.dropped(Drop(DropKind.UNSOLICITED, "accept without an outgoing request"))
    if not _believed(inbound, context):
        unverified = "accept neither registry-bound nor pinned"
        return decision.dropped(Drop(DropKind.SIGNATURE, unverified))
    decision.events.append((APPROVED, {"peer_node_id": node, "by": "peer"}))
    _grant(decision, view, node, Grant(_key(inbound), mutual=True), now, ACCEPTED_REASON)
    return decision


def decide_peer_reject(view: View, inbound: Inbound, context: Context, now: Now) -> Decision:
    """A reject of our request, direct or relayed (SPEC 7): the request ends ``rejected``
    with the peer's reason, once, however many paths bring the rejection."""
    node = inbound.node_id
    decision = Decision()
    request = view.state.outgoing.get(node)
    # The relay has no revoke: a requester withdraws through it with a rejection. One whose
    # reason says so (a registry that passes reasons on, as pilot-registryd does) is only
    # ever that: taken for a rejection of a request we sent meanwhile, it would end it.
    said = inbound.relayed and inbound.text == WITHDRAWN
    withdrawal = inbound.relayed and node in view.state.pending and (said or not view.asked(node))
    if said and not withdrawal:
        decision.quiet = f"node {node} withdrew a request we no longer hold"
        return decision
    if not (view.asked(node) or withdrawal):
        if request is not None and request.state == REJECTED:
            decision.quiet = f"node {node}: rejection of our request arrived again"
        else:
            decision.quiet = f"node {node} sent a rejection, but we have not asked it"
        return decision
    if not _believed(inbound, context):
        unverified = "reject neither registry-bound nor pinned"
        return decision.dropped(Drop(DropKind.SIGNATURE, unverified))
    if withdrawal:
        # It asked us: the requester withdrew its request through the relay
        # (decide_operator_revoke), the only way to reach a private node.
        return _withdrawn(decision, node)
    assert request is not None  # asked
    decision.changes.append(_ended(request, REJECTED, now, inbound.text))
    payload = {"peer_node_id": node, "reason": inbound.text, "relayed": inbound.relayed}
    decision.events.append((REJECTED_BY_PEER, payload))
    decision.notes.append(f"node {node} rejected our request: {_quoted(inbound.text)}")
    return decision


def decide_peer_revoke(view: View, inbound: Inbound, context: Context, now: Now) -> Decision:
    """A revoke from a peer (SPEC 7), in every mode only when registry-bound or signed with
    the pinned key (SPEC 8): otherwise anyone with a key of their own could revoke."""
    node = inbound.node_id
    decision = Decision()
    # The key of a node's own pending request pins only that request (the weak pin is never
    # a trusted node's): enough for the sender to withdraw it.
    withdrawal = inbound.pin is PinKind.WEAK and node not in view.state.trusted
    pinned = inbound.pin is not None and inbound.pin is not PinKind.WEAK
    if not (inbound.bound or pinned or withdrawal):
        unverified = "revoke neither registry-bound nor signed with the pinned key"
        return decision.dropped(Drop(DropKind.SIGNATURE, unverified))
    if inbound.text == WITHDRAWN and node not in view.state.trusted:
        # The peer takes back its request, nothing of ours: a request we sent it since (a
        # late copy of the withdrawal may arrive after it) must stay.
        if node not in view.state.pending:
            decision.quiet = f"node {node} withdrew a request we no longer hold"
            return decision
        return _withdrawn(decision, node)
    was_trusted = _forget(decision, view, node, now, context.limits)
    if not decision.changes:
        decision.quiet = f"node {node} revoked trust we never had"
        return decision
    decision.events.append((REVOKED_BY_PEER, {"peer_node_id": node, "reason": inbound.text}))
    if was_trusted:
        revoked = {"peer_node_id": node, "state": "revoked", "reason": BY_PEER}
        decision.events.append((TRUST_CHANGED, revoked))
        decision.effects.append(RevokeAtRegistry(node))
    decision.inline.append(RemoveTunnelPeer(node))
    decision.notes.append(f"node {node} revoked trust: {_quoted(inbound.text)}")
    return decision


def _withdrawn(decision: Decision, node: int) -> Decision:
    """``node`` withdrew the request we hold from it."""
    decision.changes.append(Change(PENDING, node, None))
    decision.events.append((REVOKED_BY_PEER, {"peer_node_id": node, "reason": WITHDRAWN}))
    decision.notes.append(f"node {node} withdrew its request")
    return decision


def _quoted(text: str) -> str:
    return quote(text) if text else "-"


# SPEC 7: the operator's calls


def decide_operator_approve(view: View, node: int, now: Now) -> Decision | None:
    """``approve_handshake``: the pending request of ``node`` becomes trust (``mutual=False``),
    or a trust record in conflict with the registry is trusted again with its own key; None
    when neither. Whether a KEY CHANGED request may be approved is ``auth.approval_problem``,
    checked first."""
    request = view.state.pending.get(node)
    decision = Decision(events=[(APPROVED, {"peer_node_id": node, "by": "operator"})])
    if request is None:
        record = view.state.trusted.get(node)
        if record is None or node not in view.conflicts:
            return None
        # A record in conflict with the registry, approved again: its own key (SPEC 17).
        grant = Grant(record.public_key, record.mutual, record.network)
        _grant(decision, view, node, grant, now, APPROVED_REASON)
        return decision
    _grant(decision, view, node, Grant(request.public_key), now, APPROVED_REASON)
    # respond_handshake already relays the answer: the direct send has no fallback.
    decision.effects += [Respond(node, True), Send(node, HANDSHAKE_ACCEPT)]
    return decision


def decide_operator_reject(view: View, node: int, reason: str, now: Now) -> Decision | None:
    """``reject_handshake``: drop the pending request of ``node`` and tell it ``reason``
    (truncated); None when nothing is pending."""
    if node not in view.state.pending:
        return None
    return Decision(
        changes=[Change(PENDING, node, None)],
        events=[(REJECTED_EVENT, {"peer_node_id": node, "reason": reason})],
        effects=[Respond(node, False, reason), Send(node, HANDSHAKE_REJECT, reason)],
    )


def decide_operator_revoke(view: View, node: int, limits: QueueLimits, now: Now) -> Decision:
    """``revoke_trust``: remove trust, pending and outgoing, and start the revoke cooldown.
    ``result`` "revoked" when it was trusted, "withdrawn" when we had only asked it (our
    request ends ``withdrawn``; the peer gets a signed revoke, which removes our pending
    request there), "" when neither."""
    decision = Decision(cooldowns={node: now.monotonic})
    asked = view.asked(node)
    if _forget(decision, view, node, now, limits, withdraw=True):
        decision.result = "revoked"
        decision.events.append((REVOKED, {"peer_node_id": node}))
        revoked = {"peer_node_id": node, "state": "revoked", "reason": LOCAL}
        decision.events.append((TRUST_CHANGED, revoked))
        # Before remove_tunnel_peer: the peer should hear it while reachable. The registry
        # hears last: once it drops the trust pair it no longer resolves a private peer for
        # us, and the direct revoke could not be dialled.
        decision.inline += [Send(node, HANDSHAKE_REVOKE), RemoveTunnelPeer(node)]
        decision.effects.append(RevokeAtRegistry(node))
        decision.notes.append(f"revoked trust in node {node}")
    elif asked:
        decision.result = "withdrawn"
        decision.inline.append(Send(node, HANDSHAKE_REVOKE, WITHDRAWN))
        # A private peer we asked through the relay cannot be dialled, and the relay has no
        # revoke: a relayed rejection of the peer from us tells it (decide_peer_reject).
        decision.effects.append(Respond(node, False, WITHDRAWN))
        decision.notes.append(f"withdrew our request to node {node}")
    return decision


def decide_reap(view: View, outgoing_ttl: float, pending_ttl: float, now: Now) -> Decision:
    """The reaper (SPEC 7): a request of ours waiting longer than ``outgoing_ttl`` ends
    ``expired``, one that ended longer ago than that is forgotten; pending requests older
    than ``pending_ttl`` are forgotten; revoke cooldowns end."""
    decision = Decision()
    state = view.state
    for node, request in state.outgoing.items():
        if (now.wall - (request.ended_at or request.sent_at)).total_seconds() <= outgoing_ttl:
            continue
        ended = None if not request.waiting else _ended(request, EXPIRED, now)
        decision.changes.append(ended or Change(OUTGOING, node, None))
    for node, revoked_at in view.revoked_at.items():
        if now.monotonic - revoked_at >= REVOKE_COOLDOWN:
            decision.cooldowns[node] = None
    expired = [
        node
        for node, pending in state.pending.items()
        if (now.wall - pending.received_at).total_seconds() > pending_ttl
    ]
    decision.changes += [Change(PENDING, node, None) for node in expired]
    if expired:
        decision.notes.append(f"{len(expired)} pending requests expired")
    return decision


def decide_send(view: View, node: int, now: Now) -> Decision:
    """``send_request``, before sending: a fresh request to ``node``, sent at ``now.wall``,
    ``waiting``, recorded as direct (``decide_sent`` notes a relay); an explicit request is
    fresh intent, so it ends the revoke cooldown. ``result`` "trusted" (nothing changes)
    when it is trusted."""
    if view.trusts(node):
        return Decision(result="trusted")
    request = OutgoingRequest(node, now.wall, DIRECT, WAITING)
    return Decision(changes=[Change(OUTGOING, node, request)], cooldowns={node: None})


def decide_sent(view: View, node: int, sent_at: datetime, path: str, now: Now) -> Decision:
    """Our request to ``node`` of ``sent_at`` went by ``path``: noted while it waits."""
    request = view.state.outgoing.get(node)
    if request is None or request.sent_at != sent_at or request.path == path:
        return Decision()
    return Decision(changes=[Change(OUTGOING, node, replace(request, path=path))])


def decide_unsent(view: View, node: int, sent_at: datetime, now: Now) -> Decision:
    """Our request to ``node`` of ``sent_at`` reached it by no path: forget it, unless an
    answer or a newer request came meanwhile."""
    request = view.state.outgoing.get(node)
    if request is None or request.sent_at != sent_at or not request.waiting:
        return Decision()
    return Decision(changes=[Change(OUTGOING, node, None)])


def decide_backfill(view: View, node: int, key: bytes, now: Now) -> Decision:
    """The registry's ``key`` for a trust record of ``node`` that has no valid key (SPEC 6);
    nothing when the record went or got a key meanwhile."""
    record = view.state.trusted.get(node)
    if record is None or decode_key(record.public_key) is not None:
        return Decision()
    return Decision(changes=[Change(TRUSTED, node, replace(record, public_key=b64encode(key)))])


def decide_conflict(
    view: View, node: int, record_key: bytes, registry_key: bytes, now: Now
) -> Decision:
    """The registry binds ``node`` to ``registry_key``, not to ``record_key``, the key we
    trusted (issue 11 item 7): the record neither trusts nor pins until it is approved
    again or removed. Nothing when the record changed or is in conflict already."""
    record = view.state.trusted.get(node)
    if record is None or node in view.conflicts or decode_key(record.public_key) != record_key:
        return Decision()
    registry = b64encode(registry_key)
    return Decision(
        conflicts={node: registry_key},
        events=[(CONFLICT, {"peer_node_id": node, "registry_key": registry})],
        alarms=[
            f"trust record of node {node} conflicts with the registry: it now binds that "
            f"node ID to another key ({registry}); not trusted until approved again or removed"
        ],
    )
