"""SPEC 6 and 7 as one table of plain data: a view of the state, what arrived, what was
gathered, and what the decision must be. No keys are generated, no signatures made, nothing
touches the disk and no thread runs: ``decide`` is pure."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest

from pilothandshake.identity import b64encode
from pilothandshake.manager.auth import PinKind
from pilothandshake.manager.clock import Now
from pilothandshake.manager.decide import (
    REQUEST_ROWS,
    Action,
    Context,
    Decision,
    Inbound,
    View,
    decide_accept,
    decide_approve,
    decide_backfill,
    decide_conflict,
    decide_dismiss,
    decide_reap,
    decide_reject,
    decide_request,
    decide_revoke,
    decide_send,
    decide_sent,
    decide_unsent,
    decide_untrust,
)
from pilothandshake.manager.effects import (
    Backfill,
    RemoveTunnelPeer,
    ReplyAccept,
    ReportTrust,
    Respond,
    RevokeAtRegistry,
    Send,
)
from pilothandshake.manager.queue import Limits
from pilothandshake.runtime import AllowlistEntry
from pilothandshake.store import (
    FormerTrust,
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
)

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
NOW = Now(T0 + timedelta(days=1), 10_000.0)
A, B = b"A" * 32, b"B" * 32  # two 32-byte keys: never used to sign anything
A64, B64 = b64encode(A), b64encode(B)
HOST = "127.0.0.9"

REGISTRY = Context(has_registry=True)  # strict, with a registry
AGENT = AllowlistEntry(7, "ci")  # node 7 on the allowlist, no key pinned
PINNED = AllowlistEntry(7, "ci", B64)  # ... pinned to key B
TOFU = Context()  # strict, no registry: trust on first use
LEGACY = Context(strict=False, has_registry=True)


def direct(key: bytes | None = A, *, bound: bool = True, **kwargs: Any) -> Inbound:
    """A direct message from node 7 at ``HOST``."""
    return Inbound(7, key, bound, source=HOST, remote=f"{HOST}:4000", **kwargs)


def relayed(key: bytes | None = None, **kwargs: Any) -> Inbound:
    """Relayed input from node 7 (always bound)."""
    return Inbound(7, key, True, relayed=True, source="relay", remote="relay", **kwargs)


def trusted(key: str = A64, node: int = 7) -> TrustRecord:
    return TrustRecord(node, key, T0)


def pending(
    node: int = 7, key: str = A64, *, bound: bool = False, source: str = HOST
) -> PendingHandshake:
    return PendingHandshake(node, key, "hi", T0, bound, source)


def state(
    trusted_: tuple[TrustRecord, ...] = (),
    pending_: tuple[PendingHandshake, ...] = (),
    outgoing: tuple[int | OutgoingRequest, ...] = (),
    history: tuple[FormerTrust, ...] = (),
) -> TrustState:
    """A state; an ``outgoing`` node ID is a direct request of ``T0``, still waiting."""
    requests = [o if isinstance(o, OutgoingRequest) else OutgoingRequest(o, T0) for o in outgoing]
    return TrustState(
        {r.node_id: r for r in trusted_},
        {p.node_id: p for p in pending_},
        {o.node_id: o for o in requests},
        {f.node_id: f for f in history},
    )


@dataclass
class Case:
    """One line of the table: ``decide(view, inbound, context, now)`` and what it must give.

    ``changes`` lists ``(table, node, kept)`` (``kept``: a record is put, not removed; for
    our outgoing requests, the state it is put in);
    ``effects`` and ``inline`` are the effect dataclasses; ``drop`` a substring of the
    reason; ``record`` what the trust record of node 7 must hold, when one is put."""

    decide: Callable[[View, Inbound, Context, Now], Decision]
    view: View
    inbound: Inbound
    context: Context = REGISTRY
    events: list[str] = field(default_factory=list)
    changes: list[tuple[str, int, bool | str]] = field(default_factory=list)
    effects: list[Any] = field(default_factory=list)
    inline: list[Any] = field(default_factory=list)
    drop: str = ""
    quiet: bool = False
    record: tuple[str, bool, int] | None = None  # (public_key, mutual, network)
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] | None = None  # the INFO lines, when the case states them
    cooldowns: dict[int, float | None] = field(default_factory=dict)  # side-table changes
    conflicts: dict[int, bytes] = field(default_factory=dict)
    superseded: set[int] = field(default_factory=set)  # a kept "no" to them is stale


GRANTED = ["handshake.received", "handshake.auto_approved", "trust.changed"]
HELD = ["handshake.received", "handshake.pending"]
GRANT_EFFECTS = [ReportTrust(7), ReplyAccept(7, False)]
EMPTY = View(state())

CASES: dict[str, Case] = {
    # SPEC 6, first match wins
    "row 1: already trusted: reply accept, nothing changes": Case(
        decide_request,
        View(state((trusted(),))),
        direct(),
        events=["handshake.received"],
        effects=[ReplyAccept(7, False)],
    ),
    "row 1 skipped: a record in conflict with the registry waits for the operator": Case(
        decide_request,
        View(state((trusted(B64),)), conflicts={7}),
        direct(),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "row 2: our outgoing request: mutual trust": Case(
        decide_request,
        View(state(outgoing=(7,))),
        direct(),
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=GRANT_EFFECTS,
        record=(A64, True, 0),
        payloads={"handshake.auto_approved": {"peer_node_id": 7, "reason": "mutual"}},
        notes=["trusted node 7"],
        superseded={7},
    ),
    "row 2, relayed: the answer goes through the registry": Case(
        decide_request,
        View(state(outgoing=(7,))),
        relayed(A),
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7), ReplyAccept(7, True)],
        superseded={7},
    ),
    "row 2 needs registry-bound in strict mode with a registry": Case(
        decide_request,
        View(state(outgoing=(7,))),
        direct(bound=False),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "row 2 without a registry: trust on first use": Case(
        decide_request,
        View(state(outgoing=(7,))),
        direct(bound=False),
        context=TOFU,
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=GRANT_EFFECTS,
        superseded={7},
    ),
    "row 3: a shared network": Case(
        decide_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, network=5),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        record=(A64, False, 5),
        payloads={"handshake.auto_approved": {"peer_node_id": 7, "reason": "same_network"}},
        superseded={7},
    ),
    "row 4: a trusted agent bringing its pinned key: that key is stored": Case(
        decide_request,
        EMPTY,
        relayed(B, registry_key=B),
        context=Context(has_registry=True, agent=PINNED),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=[ReportTrust(7), ReplyAccept(7, True)],
        record=(B64, False, 0),
        payloads={
            "handshake.auto_approved": {"peer_node_id": 7, "reason": "trusted_agent", "agent": "ci"}
        },
        superseded={7},
    ),
    "row 4: a key other than the allowlist's pin is dropped, not even pending": Case(
        decide_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, agent=PINNED),
        drop="public key differs from the allowlist's pinned key",
    ),
    "row 4: the registry's key must equal the pin too, even for a bound request": Case(
        decide_request,
        EMPTY,
        direct(B, registry_key=A),
        context=Context(has_registry=True, agent=PINNED),
        drop="public key differs from the allowlist's pinned key",
    ),
    "row 4: a pin that is not a key refuses every key": Case(
        decide_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, agent=AllowlistEntry(7, "ci", "not a key")),
        drop="public key differs from the allowlist's pinned key",
    ),
    "row 4: a pinned agent whose request brings no key waits for the operator": Case(
        decide_request,
        EMPTY,
        relayed(None),
        context=Context(has_registry=True, agent=PINNED),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "row 4 without a pin: a registry-bound request is trusted with its own key": Case(
        decide_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, agent=AGENT),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        record=(A64, False, 0),
        superseded={7},
    ),
    "row 4 without a pin: an unbound request waits for the operator": Case(
        decide_request,
        EMPTY,
        direct(bound=False),
        context=Context(has_registry=True, agent=AGENT),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "row 4 also for a record in conflict? no: the operator decides": Case(
        decide_request,
        View(state((trusted(B64),)), conflicts={7}),
        direct(),
        context=Context(has_registry=True, agent=AGENT),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "row 5: auto_approve": Case(
        decide_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, auto_approve=True),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        record=(A64, False, 0),
        superseded={7},
    ),
    "row 5 does not trust an unbound request in strict mode with a registry": Case(
        decide_request,
        EMPTY,
        direct(bound=False),
        context=Context(has_registry=True, auto_approve=True),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "row 5 in legacy mode trusts an unbound request": Case(
        decide_request,
        EMPTY,
        direct(bound=False),
        context=Context(strict=False, has_registry=True, auto_approve=True),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        superseded={7},
    ),
    "row 6: otherwise pending": Case(
        decide_request,
        EMPTY,
        direct(text="please"),
        events=HELD,
        changes=[("pending", 7, True)],
        payloads={
            "handshake.received": {"peer_node_id": 7, "justification": "please", "relayed": False}
        },
    ),
    "a keyless grant backfills the key": Case(
        decide_request,
        View(state(outgoing=(7,))),
        relayed(None),
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7), Backfill(7), ReplyAccept(7, True)],
        record=("", True, 0),
        superseded={7},
    ),
    "a grant clears pending and history": Case(
        decide_request,
        View(state(pending_=(pending(),), history=(FormerTrust(7, A64, T0),)), arrival={7: 0}),
        direct(),
        context=Context(has_registry=True, auto_approve=True),
        events=GRANTED,
        changes=[("trusted", 7, True), ("history", 7, False), ("pending", 7, False)],
        effects=GRANT_EFFECTS,
        superseded={7},
    ),
    # SPEC 5 step 3: the pin, re-checked on the live state
    "strict: a key other than the trust record's is dropped": Case(
        decide_request,
        View(state((trusted(B64),))),
        direct(),
        drop="public key differs from the pinned key",
    ),
    "strict: a key other than a bound pending request's is dropped": Case(
        decide_request,
        View(state(pending_=(pending(key=B64, bound=True),))),
        direct(),
        drop="public key differs from the pinned key",
    ),
    "legacy: no pin check": Case(
        decide_request,
        View(state((trusted(B64),))),
        direct(),
        context=LEGACY,
        events=["handshake.received"],
        effects=[ReplyAccept(7, False)],
    ),
    # Pending queue (SPEC 6 row 6, SPEC 15)
    "a relayed request without a key keeps the pending key": Case(
        decide_request,
        View(state(pending_=(pending(key=B64, source="relay"),))),
        relayed(None),
        events=HELD,
        changes=[("pending", 7, True)],
    ),
    "per-source quota of unbound requests": Case(
        decide_request,
        View(state(pending_=(pending(8),))),
        direct(bound=False),
        context=Context(has_registry=True, limits=Limits(unbound_per_source=1)),
        drop="too many pending requests from this source address",
    ),
    "queue full: a bound request evicts the oldest unbound one": Case(
        decide_request,
        View(
            state(pending_=(pending(8, source="10.0.0.8"), pending(9, bound=True))),
            arrival={8: 0, 9: 1},
        ),
        direct(),
        context=Context(has_registry=True, limits=Limits(max_pending=2)),
        events=HELD,
        changes=[("pending", 8, False), ("pending", 7, True)],
    ),
    "queue full of protected requests: a stranger is dropped": Case(
        decide_request,
        View(state(pending_=(pending(8), pending(9))), protected={8, 9}),
        direct(),
        context=Context(has_registry=True, limits=Limits(max_pending=2)),
        drop="pending queue full of protected requests",
    ),
    # SPEC 7: accept
    "accept for our outgoing request: mutual trust": Case(
        decide_accept,
        View(state(outgoing=(7,))),
        direct(),
        events=["handshake.approved", "trust.changed"],
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7)],
        record=(A64, True, 0),
        payloads={"handshake.approved": {"peer_node_id": 7, "by": "peer"}},
        superseded={7},
    ),
    "accept from a node already trusted: ignored quietly": Case(
        decide_accept, View(state((trusted(),))), relayed(), quiet=True
    ),
    "accept without an outgoing request": Case(
        decide_accept, EMPTY, direct(), drop="accept without an outgoing request"
    ),
    "accept neither bound nor pinned, with a registry": Case(
        decide_accept,
        View(state(outgoing=(7,))),
        direct(bound=False),
        drop="accept neither registry-bound nor pinned",
    ),
    "accept within the revoke cooldown": Case(
        decide_accept,
        View(state(outgoing=(7,)), revoked_at={7: NOW.monotonic - 299.0}),
        direct(),
        drop="accept within the revoke cooldown",
    ),
    "accept once the cooldown is over": Case(
        decide_accept,
        View(state(outgoing=(7,)), revoked_at={7: NOW.monotonic - 300.0}),
        direct(),
        events=["handshake.approved", "trust.changed"],
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7)],
        superseded={7},
    ),
    "accept with a key other than the pin": Case(
        decide_accept,
        View(state(pending_=(pending(key=B64, bound=True),), outgoing=(7,))),
        direct(),
        drop="public key differs from the pinned key",
    ),
    # SPEC 7: reject
    "reject ends our request rejected, with the peer's reason": Case(
        decide_reject,
        View(state(outgoing=(7,))),
        direct(bound=False, pin=PinKind.TRUSTED, text="busy"),
        changes=[("outgoing", 7, "rejected")],
        events=["handshake.rejected_by_peer"],
        payloads={
            "handshake.rejected_by_peer": {"peer_node_id": 7, "reason": "busy", "relayed": False}
        },
        notes=["node 7 rejected our request: 'busy'"],
    ),
    "a relayed reject of our request carries the reason the registry passed on": Case(
        decide_reject,
        View(state(outgoing=(OutgoingRequest(7, T0, path="relay"),))),
        relayed(text="not today"),
        changes=[("outgoing", 7, "rejected")],
        events=["handshake.rejected_by_peer"],
        payloads={
            "handshake.rejected_by_peer": {
                "peer_node_id": 7,
                "reason": "not today",
                "relayed": True,
            }
        },
    ),
    "an accept after our request was rejected grants nothing": Case(
        decide_accept,
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected"),))),
        direct(),
        drop="accept without an outgoing request",
    ),
    "reject neither bound nor pinned, with a registry": Case(
        decide_reject,
        View(state(outgoing=(7,))),
        direct(bound=False),
        drop="reject neither registry-bound nor pinned",
    ),
    "a relayed reject from a node whose request we hold: it withdrew the request": Case(
        decide_reject,
        View(state(pending_=(pending(),))),
        relayed(),
        changes=[("pending", 7, False)],
        events=["trust.revoked_by_peer"],
        payloads={"trust.revoked_by_peer": {"peer_node_id": 7, "reason": "request withdrawn"}},
        notes=["node 7 withdrew its request"],
    ),
    "a direct reject never removes the sender's pending request": Case(
        decide_reject, View(state(pending_=(pending(),))), direct(), quiet=True
    ),
    "a reject from a node we never asked: DEBUG, not 'rejected our request'": Case(
        decide_reject, EMPTY, direct(bound=False), quiet=True
    ),
    "a rejection arriving again by the other path: once": Case(
        decide_reject,
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected", reason="busy"),))),
        relayed(text="busy"),
        quiet=True,
    ),
    "a reject of a request that was accepted changes nothing": Case(
        decide_reject,
        View(state((trusted(),), outgoing=(OutgoingRequest(7, T0, state="accepted"),))),
        relayed(),
        quiet=True,
    ),
    "reject without a registry is believed": Case(
        decide_reject,
        View(state(outgoing=(7,))),
        direct(bound=False),
        context=TOFU,
        changes=[("outgoing", 7, "rejected")],
        events=["handshake.rejected_by_peer"],
    ),
    # SPEC 7: revoke
    "revoke from the trusted peer: forgotten, remembered in the history": Case(
        decide_revoke,
        View(state((trusted(),), outgoing=(7,))),
        direct(pin=PinKind.TRUSTED, bound=False, text="bye"),
        events=["trust.revoked_by_peer", "trust.changed"],
        changes=[("trusted", 7, False), ("history", 7, True), ("outgoing", 7, False)],
        effects=[RevokeAtRegistry(7)],
        inline=[RemoveTunnelPeer(7)],
        payloads={"trust.revoked_by_peer": {"peer_node_id": 7, "reason": "bye"}},
        notes=["node 7 revoked trust: 'bye'"],
    ),
    "revoke neither bound nor signed with the pinned key": Case(
        decide_revoke,
        View(state((trusted(),))),
        direct(bound=False),
        drop="revoke neither registry-bound nor signed with the pinned key",
    ),
    "revoke signed with a pending request's own key withdraws it": Case(
        decide_revoke,
        View(state(pending_=(pending(),))),
        direct(bound=False, pin=PinKind.WEAK),
        events=["trust.revoked_by_peer"],
        changes=[("pending", 7, False)],
        inline=[RemoveTunnelPeer(7)],
    ),
    "a weak pin cannot revoke a trust record": Case(
        decide_revoke,
        View(state((trusted(""),), pending_=(pending(),))),
        direct(bound=False, pin=PinKind.WEAK),
        drop="revoke neither registry-bound nor signed with the pinned key",
    ),
    "revoke of trust we never had: quiet": Case(decide_revoke, EMPTY, direct(), quiet=True),
    "the history is bounded: the entry that ended longest ago goes": Case(
        decide_revoke,
        View(
            state(
                (trusted(),),
                history=(FormerTrust(9, B64, T0 + timedelta(1)), FormerTrust(8, B64, T0)),
            )
        ),
        direct(),
        context=Context(has_registry=True, limits=Limits(max_history=2)),
        events=["trust.revoked_by_peer", "trust.changed"],
        changes=[("trusted", 7, False), ("history", 8, False), ("history", 7, True)],
        effects=[RevokeAtRegistry(7)],
        inline=[RemoveTunnelPeer(7)],
    ),
    # SPEC 7: our own requests, every transition a decision (the operator's and the reaper's
    # decisions take no Inbound: the table calls them on node 7)
    "send: a fresh request, waiting; the revoke cooldown ends, a kept no is stale": Case(
        lambda v, i, c, n: decide_send(v, 7, n),
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected"),)), revoked_at={7: 1.0}),
        direct(),
        changes=[("outgoing", 7, "waiting")],
        cooldowns={7: None},
        superseded={7},
    ),
    "send to a trusted node: nothing changes": Case(
        lambda v, i, c, n: decide_send(v, 7, n), View(state((trusted(),))), direct()
    ),
    "sent through the relay: the path is noted": Case(
        lambda v, i, c, n: decide_sent(v, 7, T0, "relay", n),
        View(state(outgoing=(7,))),
        direct(),
        changes=[("outgoing", 7, "waiting")],
    ),
    "sent by neither path: forgotten": Case(
        lambda v, i, c, n: decide_unsent(v, 7, T0, n),
        View(state(outgoing=(7,))),
        direct(),
        changes=[("outgoing", 7, False)],
    ),
    "untrust before an answer: withdrawn, cooldown starts": Case(
        lambda v, i, c, n: decide_untrust(v, 7, Limits(), n),
        View(state(outgoing=(7,))),
        direct(),
        changes=[("outgoing", 7, "withdrawn")],
        effects=[Respond(7, False)],
        inline=[Send(7, "handshake_revoke", "request withdrawn")],
        cooldowns={7: NOW.monotonic},
    ),
    "reaper: a request waiting past outgoing_ttl expires": Case(
        lambda v, i, c, n: decide_reap(v, 3600.0, 3600.0, n),
        View(state(outgoing=(7,))),
        direct(),
        changes=[("outgoing", 7, "expired")],
    ),
    "reaper: an ended request is forgotten outgoing_ttl after it ended": Case(
        lambda v, i, c, n: decide_reap(v, 3600.0, 3600.0, n),
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected", ended_at=T0),))),
        direct(),
        changes=[("outgoing", 7, False)],
    ),
    "backfill: the registry's key fills in a keyless record": Case(
        lambda v, i, c, n: decide_backfill(v, 7, A, n),
        View(state((trusted(""),))),
        direct(),
        changes=[("trusted", 7, True)],
    ),
    "conflict: the registry binds the node to another key": Case(
        lambda v, i, c, n: decide_conflict(v, 7, A, B, n),
        View(state((trusted(),))),
        direct(),
        events=["trust.conflict"],
        conflicts={7: B},
    ),
}


def changes_of(decision: Decision) -> list[tuple[str, int, bool | str]]:
    """``(table, node, kept)``; for an outgoing request put, its state instead of True."""
    return [
        (
            c.table,
            c.node_id,
            c.value.state if isinstance(c.value, OutgoingRequest) else c.value is not None,
        )
        for c in decision.changes
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_decision_table(name: str) -> None:
    case = CASES[name]
    decision = case.decide(case.view, case.inbound, case.context, NOW)
    assert decision.drop == case.drop
    assert bool(decision.quiet) == case.quiet
    if decision.drop or decision.quiet:
        assert (decision.events, decision.changes, decision.effects, decision.inline) == (
            [],
            [],
            [],
            [],
        )
        return
    assert [topic for topic, _ in decision.events] == case.events
    assert changes_of(decision) == case.changes
    assert (decision.cooldowns, decision.conflicts) == (case.cooldowns, case.conflicts)
    assert decision.superseded == case.superseded
    assert decision.effects == case.effects
    assert decision.inline == case.inline
    payloads = dict(decision.events)
    for topic, payload in case.payloads.items():
        assert payloads[topic] == payload
    if case.notes is not None:
        assert decision.notes == case.notes
    if case.record is not None:
        (record,) = [c.value for c in decision.changes if c.table == "trusted"]
        assert isinstance(record, TrustRecord)
        assert (record.public_key, record.mutual, record.network) == case.record
        assert record.approved_at == NOW.wall


def test_the_table_of_spec_6_is_in_the_spec_s_order_and_names_each_action() -> None:
    rows = [(row.name, row.action, row.relayed_reason) for row in REQUEST_ROWS]
    assert rows == [
        ("already_trusted", Action.REPLY, False),
        ("mutual", Action.GRANT, False),
        ("same_network", Action.GRANT, False),
        ("trusted_agent", Action.GRANT, True),
        ("auto_approve", Action.GRANT, True),
        ("pending", Action.HOLD, False),
    ]
    with pytest.raises(TypeError, match="grants nothing"):
        REQUEST_ROWS[0].grants(direct(), REGISTRY)


def test_a_pending_request_stores_what_arrived() -> None:
    decision = decide_request(EMPTY, direct(text="please"), REGISTRY, NOW)
    (change,) = decision.changes
    assert change.value == PendingHandshake(7, A64, "please", NOW.wall, True, HOST)
    assert decision.protected == set()


def test_a_relayed_request_without_a_key_keeps_the_pending_key_and_its_bound_flag() -> None:
    view = View(state(pending_=(pending(key=B64, bound=True, source="relay"),)))
    (change,) = decide_request(view, relayed(None, text="again"), REGISTRY, NOW).changes
    assert change.value == PendingHandshake(7, B64, "again", NOW.wall, True, "relay")


def test_formerly_trusted_allowlisted_and_network_sharing_senders_are_protected() -> None:
    former = View(state(history=(FormerTrust(7, A64, T0),)))
    assert decide_request(former, direct(bound=False), REGISTRY, NOW).protected == {7}
    impostor = direct(B, bound=False)
    assert decide_request(former, impostor, REGISTRY, NOW).protected == set()
    agent = Context(has_registry=True, agent=AGENT)
    assert decide_request(EMPTY, direct(bound=False), agent, NOW).protected == {7}
    nameless = Context(has_registry=True, agent=AllowlistEntry(7, ""))  # as when loaded
    assert decide_request(EMPTY, direct(bound=False), nameless, NOW).protected == {7}


def test_eviction_is_logged_with_the_victim() -> None:
    view = View(state(pending_=(pending(8, source="10.0.0.8"),)), arrival={8: 0})
    context = Context(has_registry=True, limits=Limits(max_pending=1))
    decision = decide_request(view, direct(), context, NOW)
    assert decision.notes == [
        "pending queue full: evicted the request of node 8 (source '10.0.0.8')"
    ]


# The operator's calls (SPEC 7)


def test_approve_grants_and_answers_both_ways() -> None:
    view = View(state(pending_=(pending(key=""),)))
    decision = decide_approve(view, 7, NOW)
    assert decision is not None
    assert [t for t, _ in decision.events] == ["handshake.approved", "trust.changed"]
    assert decision.events[0][1] == {"peer_node_id": 7, "by": "operator"}
    assert changes_of(decision) == [("trusted", 7, True), ("pending", 7, False)]
    assert decision.superseded == {7}
    assert decision.effects == [
        ReportTrust(7),
        Backfill(7),
        Respond(7, True),
        Send(7, "handshake_accept"),
    ]
    assert decide_approve(EMPTY, 7, NOW) is None


def test_dismiss_drops_the_pending_request_and_tells_why() -> None:
    decision = decide_dismiss(View(state(pending_=(pending(),))), 7, "no", NOW)
    assert decision is not None
    assert changes_of(decision) == [("pending", 7, False)]
    assert decision.events == [("handshake.rejected", {"peer_node_id": 7, "reason": "no"})]
    # The reason goes both ways: directly, and through the relay (SPEC 11).
    assert decision.effects == [Respond(7, False, "no"), Send(7, "handshake_reject", "no")]
    assert decide_dismiss(EMPTY, 7, "no", NOW) is None


def test_untrust_revokes_withdraws_or_finds_nothing() -> None:
    revoked = decide_untrust(View(state((trusted(),))), 7, Limits(), NOW)
    assert revoked.result == "revoked"
    assert [t for t, _ in revoked.events] == ["trust.revoked", "trust.changed"]
    assert revoked.inline == [Send(7, "handshake_revoke"), RemoveTunnelPeer(7)]
    assert revoked.effects == [RevokeAtRegistry(7)]
    withdrawn = decide_untrust(View(state(outgoing=(7,))), 7, Limits(), NOW)
    assert withdrawn.result == "withdrawn" and withdrawn.events == []
    assert withdrawn.inline == [Send(7, "handshake_revoke", "request withdrawn")]
    # A private peer asked through the relay hears of it as a relayed rejection.
    assert withdrawn.effects == [Respond(7, False)]
    assert changes_of(withdrawn) == [("outgoing", 7, "withdrawn")]
    nothing = decide_untrust(View(state(pending_=(pending(),))), 7, Limits(), NOW)
    assert (nothing.result, changes_of(nothing), nothing.inline) == (
        "",
        [("pending", 7, False)],
        [],
    )


def test_reap_forgets_requests_older_than_their_ttls() -> None:
    day = 24 * 3600.0
    view = View(
        TrustState(
            outgoing={
                7: OutgoingRequest(7, NOW.wall - timedelta(days=1)),
                8: OutgoingRequest(8, NOW.wall - timedelta(days=1, seconds=1)),
            },
            pending={
                9: PendingHandshake(9, "", "", NOW.wall - timedelta(days=2)),
                10: PendingHandshake(10, "", "", NOW.wall - timedelta(days=2, seconds=1)),
            },
        )
    )
    decision = decide_reap(view, day, 2 * day, NOW)
    assert changes_of(decision) == [("outgoing", 8, "expired"), ("pending", 10, False)]
    assert decision.notes == ["1 pending requests expired"]
    assert decide_reap(view, 2 * day, 3 * day, NOW).changes == []


def test_an_ended_request_is_kept_outgoing_ttl_after_it_ended_then_forgotten() -> None:
    day = 24 * 3600.0
    sent = NOW.wall - timedelta(days=30)

    def ended(node: int, state_: str, ago: timedelta) -> OutgoingRequest:
        return OutgoingRequest(node, sent, state=state_, ended_at=NOW.wall - ago)

    view = View(
        state(
            outgoing=(
                ended(7, "rejected", timedelta(hours=23)),
                ended(8, "rejected", timedelta(days=1, seconds=1)),
                ended(9, "expired", timedelta(days=2)),
                ended(10, "withdrawn", timedelta(hours=1)),
            )
        )
    )
    decision = decide_reap(view, day, day, NOW)
    assert changes_of(decision) == [("outgoing", 8, False), ("outgoing", 9, False)]
    (expired,) = decide_reap(View(state(outgoing=(7,))), 3600.0, day, NOW).changes
    assert expired.value == OutgoingRequest(7, T0, state="expired", ended_at=NOW.wall)


def test_reap_ends_revoke_cooldowns_that_are_over() -> None:
    view = View(state(), revoked_at={7: NOW.monotonic - 300.0, 8: NOW.monotonic - 299.0})
    assert decide_reap(view, 1.0, 1.0, NOW).cooldowns == {7: None}


def test_the_operator_s_revoke_announces_itself() -> None:
    decision = decide_untrust(View(state((trusted(),))), 7, Limits(), NOW)
    assert decision.events == [
        ("trust.revoked", {"peer_node_id": 7}),
        ("trust.changed", {"peer_node_id": 7, "state": "revoked", "reason": "local"}),
    ]
    assert decision.cooldowns == {7: NOW.monotonic}
    assert decision.notes == ["revoked trust in node 7"]
    withdrawn = decide_untrust(View(state(outgoing=(7,))), 7, Limits(), NOW)
    assert withdrawn.notes == ["withdrew our request to node 7"]


@pytest.mark.parametrize("relayed_", [False, True])
def test_a_request_replacing_its_own_pending_one_is_not_held_to_the_quota(relayed_: bool) -> None:
    """Same node, same source: a replacement, admitted even with the queue full."""
    source = "relay" if relayed_ else HOST
    view = View(state(pending_=(pending(source=source),)), arrival={7: 0})
    inbound = relayed(A) if relayed_ else direct(bound=False)
    context = Context(has_registry=True, limits=Limits(max_pending=1, unbound_per_source=0))
    (change,) = decide_request(view, inbound, context, NOW).changes
    assert change.value is not None and change.value.public_key == A64


def test_a_request_from_a_new_source_counts_as_new_against_a_full_queue() -> None:
    view = View(state(pending_=(pending(source="10.0.0.1"),)), arrival={7: 0})
    context = Context(has_registry=True, limits=Limits(max_pending=1))
    decision = decide_request(view, direct(bound=False), context, NOW)
    # One entry, ours, from another source: replacing it is always admitted.
    assert [c.node_id for c in decision.changes] == [7]
    full = View(state(pending_=(pending(8), pending(9))), arrival={8: 0, 9: 1})
    crowded = Context(has_registry=True, limits=Limits(max_pending=2))
    assert decide_request(full, direct(bound=False), crowded, NOW).drop == "pending queue full"


def test_the_bound_flag_of_a_pending_request() -> None:
    bound_pending = View(state(pending_=(pending(bound=True, source="relay"),)))
    same_key = decide_request(bound_pending, relayed(None), REGISTRY, NOW).changes[0].value
    assert same_key is not None and same_key.bound
    unbound_pending = View(state(pending_=(pending(bound=False),)))
    request = decide_request(unbound_pending, direct(bound=False), REGISTRY, NOW).changes[0].value
    assert request is not None and not request.bound
    other_key = View(state(pending_=(pending(key=B64, bound=True),)))
    legacy = Context(strict=False, has_registry=True)
    request = decide_request(other_key, direct(bound=False), legacy, NOW).changes[0].value
    assert request is not None and (request.public_key, request.bound) == (A64, False)


def test_a_formerly_trusted_node_without_a_key_is_protected_only_when_bound() -> None:
    former = View(state(history=(FormerTrust(7, "", T0),)))
    assert decide_request(former, relayed(None), REGISTRY, NOW).protected == {7}
    assert decide_request(former, direct(bound=False), REGISTRY, NOW).protected == set()


def test_eviction_names_an_unknown_source() -> None:
    view = View(state(pending_=(pending(8, source=""),)), arrival={8: 0})
    context = Context(has_registry=True, limits=Limits(max_pending=1))
    decision = decide_request(view, direct(), context, NOW)
    assert decision.notes == [
        "pending queue full: evicted the request of node 8 (source 'unknown')"
    ]


def test_a_reject_without_a_reason_is_logged_with_a_dash() -> None:
    decision = decide_reject(View(state(outgoing=(7,))), direct(), REGISTRY, NOW)
    assert decision.notes == ["node 7 rejected our request: -"]


def test_relayed_and_protected_requests_count_against_no_source_quota() -> None:
    view = View(state(pending_=(pending(8, bound=True, source="relay"),)))
    quota = Context(has_registry=True, limits=Limits(bound_per_source=1, unbound_per_source=1))
    assert decide_request(view, relayed(A), quota, NOW).drop == ""
    hosts = View(state(pending_=(pending(8),)))
    agent = replace(quota, agent=AGENT)
    assert decide_request(hosts, direct(bound=False), agent, NOW).drop == ""
    assert decide_request(hosts, direct(bound=False), quota, NOW).drop == (
        "too many pending requests from this source address"
    )


def test_an_unbound_request_with_the_same_key_keeps_the_pending_request_bound() -> None:
    view = View(state(pending_=(pending(bound=True),)))
    request = decide_request(view, direct(bound=False), TOFU, NOW).changes[0].value
    assert isinstance(request, PendingHandshake) and request.bound


# Our own requests (SPEC 7): every transition is a decision.


def test_send_records_a_fresh_waiting_request_and_ends_the_cooldown() -> None:
    ended = OutgoingRequest(7, T0, state="rejected", reason="no", ended_at=T0)
    view = View(state(outgoing=(ended,)), revoked_at={7: NOW.monotonic})
    decision = decide_send(view, 7, NOW)
    assert [c.value for c in decision.changes] == [OutgoingRequest(7, NOW.wall)]
    assert decision.cooldowns == {7: None}
    assert decision.result == ""
    trusted_ = decide_send(View(state((trusted(),))), 7, NOW)
    assert (trusted_.result, trusted_.changes, trusted_.cooldowns) == ("trusted", [], {})


def test_a_relayed_send_notes_the_path_of_that_request_only() -> None:
    view = View(state(outgoing=(7,)))
    (change,) = decide_sent(view, 7, T0, "relay", NOW).changes
    assert change.value == OutgoingRequest(7, T0, path="relay")
    assert decide_sent(view, 7, NOW.wall, "relay", NOW).changes == []  # a newer request
    assert decide_sent(EMPTY, 7, T0, "relay", NOW).changes == []


def test_a_request_that_reached_nobody_is_forgotten_unless_answered_meanwhile() -> None:
    assert changes_of(decide_unsent(View(state(outgoing=(7,))), 7, T0, NOW)) == [
        ("outgoing", 7, False)
    ]
    answered = View(state(outgoing=(OutgoingRequest(7, T0, state="rejected"),)))
    assert decide_unsent(answered, 7, T0, NOW).changes == []
    assert decide_unsent(View(state(outgoing=(7,))), 7, NOW.wall, NOW).changes == []


def test_withdrawing_keeps_the_request_as_withdrawn() -> None:
    decision = decide_untrust(View(state(outgoing=(7,))), 7, Limits(), NOW)
    (change,) = decision.changes
    assert change.value == OutgoingRequest(7, T0, state="withdrawn", ended_at=NOW.wall)
    # A trusted peer's accepted request goes with the trust.
    accepted = OutgoingRequest(7, T0, state="accepted", ended_at=T0)
    revoked = decide_untrust(View(state((trusted(),), outgoing=(accepted,))), 7, Limits(), NOW)
    assert ("outgoing", 7, False) in changes_of(revoked)


def test_backfill_fills_in_a_missing_key_only() -> None:
    (change,) = decide_backfill(View(state((trusted(""),))), 7, A, NOW).changes
    assert change.value == TrustRecord(7, A64, T0)
    assert decide_backfill(View(state((trusted(B64),))), 7, A, NOW).changes == []
    assert decide_backfill(EMPTY, 7, A, NOW).changes == []


def test_a_conflict_with_the_registry_is_noted_once_with_an_alarm() -> None:
    view = View(state((trusted(),)))
    decision = decide_conflict(view, 7, A, B, NOW)
    assert decision.conflicts == {7: B}
    assert decision.events == [("trust.conflict", {"peer_node_id": 7, "registry_key": B64})]
    assert "conflicts with the registry" in decision.alarms[0]
    assert decide_conflict(View(state((trusted(),)), conflicts={7}), 7, A, B, NOW) == Decision()
    changed = decide_conflict(view, 7, B, A, NOW)  # the record's key changed meanwhile
    assert changed == Decision()


# Go's payloads (SPEC 14) and the reason a peer is trusted


@pytest.mark.parametrize(
    ("view", "inbound", "context", "reason", "extra"),
    [
        (View(state(outgoing=(7,))), direct(), REGISTRY, "mutual", {}),
        (View(state(outgoing=(7,))), relayed(A), REGISTRY, "mutual", {}),
        (EMPTY, direct(), replace(REGISTRY, network=3), "same_network", {}),
        (EMPTY, relayed(A), replace(REGISTRY, network=3), "same_network", {}),
        (
            EMPTY,
            direct(),
            replace(REGISTRY, agent=AGENT),
            "trusted_agent",
            {"agent": "ci"},
        ),
        (
            EMPTY,
            relayed(A),
            replace(REGISTRY, agent=AGENT),
            "trusted_agent_relayed",
            {"agent": "ci"},
        ),
        (EMPTY, direct(), replace(REGISTRY, auto_approve=True), "auto_approve", {}),
        (EMPTY, relayed(A), replace(REGISTRY, auto_approve=True), "auto_approve_relayed", {}),
    ],
)
def test_trust_changed_says_why_as_go_does_and_the_record_keeps_it(
    view: View, inbound: Inbound, context: Context, reason: str, extra: dict[str, Any]
) -> None:
    decision = decide_request(view, inbound, context, NOW)
    payload = dict(decision.events)["trust.changed"]
    assert payload == {"peer_node_id": 7, "state": "granted", "reason": reason, **extra}
    (record,) = [c.value for c in decision.changes if c.table == "trusted"]
    assert isinstance(record, TrustRecord) and record.reason == reason


def test_operator_approval_and_peer_accept_give_their_reasons() -> None:
    approved = decide_approve(View(state(pending_=(pending(),))), 7, NOW)
    assert approved is not None
    assert dict(approved.events)["trust.changed"]["reason"] == "approved"
    accepted = decide_accept(View(state(outgoing=(7,))), direct(), REGISTRY, NOW)
    assert dict(accepted.events)["trust.changed"]["reason"] == "mutual"


def test_a_peer_s_revoke_says_by_peer() -> None:
    view = View(state((trusted(),)))
    decision = decide_revoke(view, direct(pin=PinKind.TRUSTED), REGISTRY, NOW)
    assert dict(decision.events)["trust.changed"] == {
        "peer_node_id": 7,
        "state": "revoked",
        "reason": "by_peer",
    }


def test_pending_and_received_carry_the_justification() -> None:
    decision = decide_request(EMPTY, direct(text="nightly sync"), REGISTRY, NOW)
    assert decision.events == [
        (
            "handshake.received",
            {"peer_node_id": 7, "justification": "nightly sync", "relayed": False},
        ),
        ("handshake.pending", {"peer_node_id": 7, "justification": "nightly sync"}),
    ]
