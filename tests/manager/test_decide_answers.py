"""SPEC 7 as a table of plain data: answers to our requests (accept, reject, revoke), the
operator's calls, our own requests and the reaper, and Go's event payloads (SPEC 14). Pure,
like ``test_decide`` (SPEC 6), whose vocabulary (``decidetools``) it shares."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from decidetools import (
    A64,
    AGENT,
    B64,
    EMPTY,
    NOW,
    REGISTRY,
    SAYS_NO,
    T0,
    TOFU,
    A,
    B,
    Case,
    changes_of,
    check,
    direct,
    pending,
    relayed,
    state,
    trusted,
)

from pilothandshake.drops import Drop, DropKind
from pilothandshake.manager.auth import PinKind
from pilothandshake.manager.decide import (
    Context,
    Decision,
    Inbound,
    View,
    decide_backfill,
    decide_conflict,
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
from pilothandshake.manager.effects import (
    Backfill,
    RemoveTunnelPeer,
    ReportTrust,
    Respond,
    RevokeAtRegistry,
    Send,
)
from pilothandshake.manager.queue import QueueLimits
from pilothandshake.store import (
    FormerTrust,
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
)

CASES: dict[str, Case] = {
    # SPEC 7: accept
    "accept for our outgoing request: mutual trust": Case(
        decide_peer_accept,
        View(state(outgoing=(7,))),
        direct(),
        events=["handshake.approved", "trust.changed"],
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7)],
        record=(A64, True, 0),
        payloads={"handshake.approved": {"peer_node_id": 7, "by": "peer"}},
        superseded={7: SAYS_NO},
    ),
    "accept from a node already trusted: ignored quietly": Case(
        decide_peer_accept, View(state((trusted(),))), relayed(), quiet=True
    ),
    "accept without an outgoing request": Case(
        decide_peer_accept,
        EMPTY,
        direct(),
        drop=Drop(DropKind.UNSOLICITED, "accept without an outgoing request"),
    ),
    "accept neither bound nor pinned, with a registry": Case(
        decide_peer_accept,
        View(state(outgoing=(7,))),
        direct(bound=False),
        drop=Drop(DropKind.SIGNATURE, "accept neither registry-bound nor pinned"),
    ),
    "accept within the revoke cooldown": Case(
        decide_peer_accept,
        View(state(outgoing=(7,)), revoked_at={7: NOW.monotonic - 299.0}),
        direct(),
        drop=Drop(DropKind.UNSOLICITED, "accept within the revoke cooldown"),
    ),
    "accept once the cooldown is over": Case(
        decide_peer_accept,
        View(state(outgoing=(7,)), revoked_at={7: NOW.monotonic - 300.0}),
        direct(),
        events=["handshake.approved", "trust.changed"],
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7)],
        superseded={7: SAYS_NO},
    ),
    "accept with a key other than the pin": Case(
        decide_peer_accept,
        View(state(pending_=(pending(key=B64, bound=True),), outgoing=(7,))),
        direct(),
        drop=Drop(DropKind.KEY_MISMATCH, "public key differs from the pinned key"),
    ),
    # SPEC 7: reject
    "reject ends our request rejected, with the peer's reason": Case(
        decide_peer_reject,
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
        decide_peer_reject,
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
    "an accept after a rejection ended our request: the peer's newer word, trust": Case(
        decide_peer_accept,
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected"),))),
        direct(),
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        events=["handshake.approved", "trust.changed"],
        effects=[ReportTrust(7)],
        superseded={7: SAYS_NO},
    ),
    "an accept after we withdrew our request grants nothing": Case(
        decide_peer_accept,
        View(state(outgoing=(OutgoingRequest(7, T0, state="withdrawn"),))),
        direct(),
        drop=Drop(DropKind.UNSOLICITED, "accept without an outgoing request"),
    ),
    "an accept after our request expired grants nothing": Case(
        decide_peer_accept,
        View(state(outgoing=(OutgoingRequest(7, T0, state="expired"),))),
        direct(),
        drop=Drop(DropKind.UNSOLICITED, "accept without an outgoing request"),
    ),
    "reject neither bound nor pinned, with a registry": Case(
        decide_peer_reject,
        View(state(outgoing=(7,))),
        direct(bound=False),
        drop=Drop(DropKind.SIGNATURE, "reject neither registry-bound nor pinned"),
    ),
    "a relayed reject from a node whose request we hold: it withdrew the request": Case(
        decide_peer_reject,
        View(state(pending_=(pending(),))),
        relayed(),
        changes=[("pending", 7, False)],
        events=["trust.revoked_by_peer"],
        payloads={"trust.revoked_by_peer": {"peer_node_id": 7, "reason": "request withdrawn"}},
        notes=["node 7 withdrew its request"],
    ),
    "a relayed withdrawal never ends the request we sent it since (its reason says so)": Case(
        decide_peer_reject,
        View(state(outgoing=(7,))),
        relayed(text="request withdrawn"),
        quiet=True,
    ),
    "a relayed withdrawal removes the request we hold even when we asked it too": Case(
        decide_peer_reject,
        View(state(outgoing=(7,), pending_=(pending(),))),
        relayed(text="request withdrawn"),
        changes=[("pending", 7, False)],
        events=["trust.revoked_by_peer"],
        notes=["node 7 withdrew its request"],
    ),
    "a relayed rejection with another reason ends our request": Case(
        decide_peer_reject,
        View(state(outgoing=(7,))),
        relayed(text="not today"),
        changes=[("outgoing", 7, "rejected")],
        events=["handshake.rejected_by_peer"],
        notes=["node 7 rejected our request: 'not today'"],
    ),
    "a direct reject never removes the sender's pending request": Case(
        decide_peer_reject, View(state(pending_=(pending(),))), direct(), quiet=True
    ),
    "a reject from a node we never asked: DEBUG, not 'rejected our request'": Case(
        decide_peer_reject, EMPTY, direct(bound=False), quiet=True
    ),
    "a rejection arriving again by the other path: once": Case(
        decide_peer_reject,
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected", reason="busy"),))),
        relayed(text="busy"),
        quiet=True,
    ),
    "a reject of a request that was accepted changes nothing": Case(
        decide_peer_reject,
        View(state((trusted(),), outgoing=(OutgoingRequest(7, T0, state="accepted"),))),
        relayed(),
        quiet=True,
    ),
    "reject without a registry is believed": Case(
        decide_peer_reject,
        View(state(outgoing=(7,))),
        direct(bound=False),
        context=TOFU,
        changes=[("outgoing", 7, "rejected")],
        events=["handshake.rejected_by_peer"],
    ),
    # SPEC 7: revoke
    "revoke from the trusted peer: forgotten, remembered in the history": Case(
        decide_peer_revoke,
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
        decide_peer_revoke,
        View(state((trusted(),))),
        direct(bound=False),
        drop=Drop(
            DropKind.SIGNATURE, "revoke neither registry-bound nor signed with the pinned key"
        ),
    ),
    "revoke signed with a pending request's own key withdraws it": Case(
        decide_peer_revoke,
        View(state(pending_=(pending(),))),
        direct(bound=False, pin=PinKind.WEAK),
        events=["trust.revoked_by_peer"],
        changes=[("pending", 7, False)],
        inline=[RemoveTunnelPeer(7)],
    ),
    "a withdrawal (revoke 'request withdrawn') leaves the request we sent it since": Case(
        decide_peer_revoke,
        View(state(outgoing=(7,), pending_=(pending(),))),
        direct(bound=False, pin=PinKind.WEAK, text="request withdrawn"),
        changes=[("pending", 7, False)],
        events=["trust.revoked_by_peer"],
        notes=["node 7 withdrew its request"],
    ),
    "a late withdrawal of a request we no longer hold: quiet, our own request stays": Case(
        decide_peer_revoke,
        View(state(outgoing=(7,))),
        direct(text="request withdrawn"),
        quiet=True,
    ),
    "a weak pin cannot revoke a trust record": Case(
        decide_peer_revoke,
        View(state((trusted(""),), pending_=(pending(),))),
        direct(bound=False, pin=PinKind.WEAK),
        drop=Drop(
            DropKind.SIGNATURE, "revoke neither registry-bound nor signed with the pinned key"
        ),
    ),
    "revoke of trust we never had: quiet": Case(decide_peer_revoke, EMPTY, direct(), quiet=True),
    "the history is bounded: the entry that ended longest ago goes": Case(
        decide_peer_revoke,
        View(
            state(
                (trusted(),),
                history=(FormerTrust(9, B64, T0 + timedelta(1)), FormerTrust(8, B64, T0)),
            )
        ),
        direct(),
        context=Context(has_registry=True, limits=QueueLimits(max_history=2)),
        events=["trust.revoked_by_peer", "trust.changed"],
        changes=[("trusted", 7, False), ("history", 8, False), ("history", 7, True)],
        effects=[RevokeAtRegistry(7)],
        inline=[RemoveTunnelPeer(7)],
    ),
    # SPEC 7: our own requests, every transition a decision (the operator's and the reaper's
    # decisions take no Inbound: the table calls them on node 7)
    "send: a fresh request, waiting, and the revoke cooldown ends": Case(
        lambda v, i, c, n: decide_send(v, 7, n),
        View(state(outgoing=(OutgoingRequest(7, T0, state="rejected"),)), revoked_at={7: 1.0}),
        direct(),
        changes=[("outgoing", 7, "waiting")],
        cooldowns={7: None},
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
        lambda v, i, c, n: decide_operator_revoke(v, 7, QueueLimits(), n),
        View(state(outgoing=(7,))),
        direct(),
        changes=[("outgoing", 7, "withdrawn")],
        effects=[Respond(7, False, "request withdrawn")],
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


@pytest.mark.parametrize("name", list(CASES))
def test_answer_table(name: str) -> None:
    check(CASES[name])


# The operator's calls (SPEC 7)


def test_approve_grants_and_answers_both_ways() -> None:
    view = View(state(pending_=(pending(key=""),)))
    decision = decide_operator_approve(view, 7, NOW)
    assert decision is not None
    assert [t for t, _ in decision.events] == ["handshake.approved", "trust.changed"]
    assert decision.events[0][1] == {"peer_node_id": 7, "by": "operator"}
    assert changes_of(decision) == [("trusted", 7, True), ("pending", 7, False)]
    assert decision.superseded == {7: SAYS_NO}
    assert decision.effects == [
        ReportTrust(7),
        Backfill(7),
        Respond(7, True),
        Send(7, "handshake_accept"),
    ]
    assert decide_operator_approve(EMPTY, 7, NOW) is None


def test_dismiss_drops_the_pending_request_and_tells_why() -> None:
    decision = decide_operator_reject(View(state(pending_=(pending(),))), 7, "no", NOW)
    assert decision is not None
    assert changes_of(decision) == [("pending", 7, False)]
    assert decision.events == [("handshake.rejected", {"peer_node_id": 7, "reason": "no"})]
    # The reason goes both ways: directly, and through the relay (SPEC 11).
    assert decision.effects == [Respond(7, False, "no"), Send(7, "handshake_reject", "no")]
    assert decide_operator_reject(EMPTY, 7, "no", NOW) is None


def test_untrust_revokes_withdraws_or_finds_nothing() -> None:
    revoked = decide_operator_revoke(View(state((trusted(),))), 7, QueueLimits(), NOW)
    assert revoked.result == "revoked"
    assert [t for t, _ in revoked.events] == ["trust.revoked", "trust.changed"]
    assert revoked.inline == [Send(7, "handshake_revoke"), RemoveTunnelPeer(7)]
    assert revoked.effects == [RevokeAtRegistry(7)]
    withdrawn = decide_operator_revoke(View(state(outgoing=(7,))), 7, QueueLimits(), NOW)
    assert withdrawn.result == "withdrawn" and withdrawn.events == []
    assert withdrawn.inline == [Send(7, "handshake_revoke", "request withdrawn")]
    # A private peer asked through the relay hears of it as a relayed rejection.
    assert withdrawn.effects == [Respond(7, False, "request withdrawn")]
    assert changes_of(withdrawn) == [("outgoing", 7, "withdrawn")]
    nothing = decide_operator_revoke(View(state(pending_=(pending(),))), 7, QueueLimits(), NOW)
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
    decision = decide_operator_revoke(View(state((trusted(),))), 7, QueueLimits(), NOW)
    assert decision.events == [
        ("trust.revoked", {"peer_node_id": 7}),
        ("trust.changed", {"peer_node_id": 7, "state": "revoked", "reason": "local"}),
    ]
    assert decision.cooldowns == {7: NOW.monotonic}
    assert decision.notes == ["revoked trust in node 7"]
    withdrawn = decide_operator_revoke(View(state(outgoing=(7,))), 7, QueueLimits(), NOW)
    assert withdrawn.notes == ["withdrew our request to node 7"]


def test_a_reject_without_a_reason_is_logged_with_a_dash() -> None:
    decision = decide_peer_reject(View(state(outgoing=(7,))), direct(), REGISTRY, NOW)
    assert decision.notes == ["node 7 rejected our request: -"]


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
    decision = decide_operator_revoke(View(state(outgoing=(7,))), 7, QueueLimits(), NOW)
    (change,) = decision.changes
    assert change.value == OutgoingRequest(7, T0, state="withdrawn", ended_at=NOW.wall)
    # A trusted peer's accepted request goes with the trust.
    accepted = OutgoingRequest(7, T0, state="accepted", ended_at=T0)
    revoked = decide_operator_revoke(
        View(state((trusted(),), outgoing=(accepted,))), 7, QueueLimits(), NOW
    )
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
    decision = decide_peer_request(view, inbound, context, NOW)
    payload = dict(decision.events)["trust.changed"]
    assert payload == {"peer_node_id": 7, "state": "granted", "reason": reason, **extra}
    (record,) = [c.value for c in decision.changes if c.table == "trusted"]
    assert isinstance(record, TrustRecord) and record.reason == reason


def test_operator_approval_and_peer_accept_give_their_reasons() -> None:
    approved = decide_operator_approve(View(state(pending_=(pending(),))), 7, NOW)
    assert approved is not None
    assert dict(approved.events)["trust.changed"]["reason"] == "approved"
    accepted = decide_peer_accept(View(state(outgoing=(7,))), direct(), REGISTRY, NOW)
    assert dict(accepted.events)["trust.changed"]["reason"] == "mutual"


def test_a_peer_s_revoke_says_by_peer() -> None:
    view = View(state((trusted(),)))
    decision = decide_peer_revoke(view, direct(pin=PinKind.TRUSTED), REGISTRY, NOW)
    assert dict(decision.events)["trust.changed"] == {
        "peer_node_id": 7,
        "state": "revoked",
        "reason": "by_peer",
    }


def test_pending_and_received_carry_the_justification() -> None:
    decision = decide_peer_request(EMPTY, direct(text="nightly sync"), REGISTRY, NOW)
    assert decision.events == [
        (
            "handshake.received",
            {"peer_node_id": 7, "justification": "nightly sync", "relayed": False},
        ),
        ("handshake.pending", {"peer_node_id": 7, "justification": "nightly sync"}),
    ]
