"""SPEC 6 (with SPEC 5's pin and SPEC 15's pending queue) as a table of plain data: a view
of the state, what arrived, what was gathered, and what the decision must be. No keys are
generated, no signatures made, nothing touches the disk and no thread runs: ``decide`` is
pure. SPEC 7 (answers, the operator's calls, our own requests) is in ``test_decide_answers``."""

from __future__ import annotations

from dataclasses import replace

import pytest
from decidetools import (
    A64,
    AGENT,
    ASKED,
    B64,
    EMPTY,
    GRANT_EFFECTS,
    GRANTED,
    HELD,
    HOST,
    LEGACY,
    NOW,
    PINNED,
    REGISTRY,
    SAYS_NO,
    T0,
    TOFU,
    A,
    B,
    Case,
    check,
    direct,
    pending,
    relayed,
    state,
    trusted,
)

from pilothandshake.drops import Drop, DropKind
from pilothandshake.manager.decide import (
    REQUEST_ROWS,
    Action,
    Context,
    View,
    decide_peer_request,
)
from pilothandshake.manager.effects import (
    Backfill,
    ReplyAccept,
    ReportTrust,
)
from pilothandshake.manager.queue import QueueLimits
from pilothandshake.runtime import AllowlistEntry
from pilothandshake.store import (
    FormerTrust,
    PendingHandshake,
)

MISMATCH = Drop(DropKind.KEY_MISMATCH, "public key differs from the allowlist's pinned key")

CASES: dict[str, Case] = {
    # SPEC 6, first match wins
    "row 1: already trusted: reply accept, nothing changes": Case(
        decide_peer_request,
        View(state((trusted(),))),
        direct(),
        events=["handshake.received"],
        effects=[ReplyAccept(7, False)],
        superseded={7: ASKED},
    ),
    "row 1 skipped: a record in conflict with the registry waits for the operator": Case(
        decide_peer_request,
        View(state((trusted(B64),)), conflicts={7}),
        direct(),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "row 2: our outgoing request: mutual trust": Case(
        decide_peer_request,
        View(state(outgoing=(7,))),
        direct(),
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=GRANT_EFFECTS,
        record=(A64, True, 0),
        payloads={"handshake.auto_approved": {"peer_node_id": 7, "reason": "mutual"}},
        notes=["trusted node 7"],
        superseded={7: SAYS_NO},
    ),
    "row 2, relayed: the answer goes through the registry": Case(
        decide_peer_request,
        View(state(outgoing=(7,))),
        relayed(A),
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7), ReplyAccept(7, True)],
        superseded={7: SAYS_NO},
    ),
    "row 2 needs registry-bound in strict mode with a registry": Case(
        decide_peer_request,
        View(state(outgoing=(7,))),
        direct(bound=False),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "row 2 without a registry: trust on first use": Case(
        decide_peer_request,
        View(state(outgoing=(7,))),
        direct(bound=False),
        context=TOFU,
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=GRANT_EFFECTS,
        superseded={7: SAYS_NO},
    ),
    "row 3: a shared network": Case(
        decide_peer_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, network=5),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        record=(A64, False, 5),
        payloads={"handshake.auto_approved": {"peer_node_id": 7, "reason": "same_network"}},
        superseded={7: SAYS_NO},
    ),
    "row 4: a trusted agent bringing its pinned key: that key is stored": Case(
        decide_peer_request,
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
        superseded={7: SAYS_NO},
    ),
    "row 4: a key other than the allowlist's pin is dropped, not even pending": Case(
        decide_peer_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, agent=PINNED),
        drop=MISMATCH,
    ),
    "row 4: the registry's key must equal the pin too, even for a bound request": Case(
        decide_peer_request,
        EMPTY,
        direct(B, registry_key=A),
        context=Context(has_registry=True, agent=PINNED),
        drop=MISMATCH,
    ),
    "row 4: a pin that is not a key refuses every key": Case(
        decide_peer_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, agent=AllowlistEntry(7, "ci", "not a key")),
        drop=MISMATCH,
    ),
    "row 4: a pinned agent whose request brings no key waits for the operator": Case(
        decide_peer_request,
        EMPTY,
        relayed(None),
        context=Context(has_registry=True, agent=PINNED),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "row 4 without a pin: a registry-bound request is trusted with its own key": Case(
        decide_peer_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, agent=AGENT),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        record=(A64, False, 0),
        superseded={7: SAYS_NO},
    ),
    "row 4 without a pin: an unbound request waits for the operator": Case(
        decide_peer_request,
        EMPTY,
        direct(bound=False),
        context=Context(has_registry=True, agent=AGENT),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "row 4 also for a record in conflict? no: the operator decides": Case(
        decide_peer_request,
        View(state((trusted(B64),)), conflicts={7}),
        direct(),
        context=Context(has_registry=True, agent=AGENT),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "row 5: auto_approve": Case(
        decide_peer_request,
        EMPTY,
        direct(),
        context=Context(has_registry=True, auto_approve=True),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        record=(A64, False, 0),
        superseded={7: SAYS_NO},
    ),
    "row 5 does not trust an unbound request in strict mode with a registry": Case(
        decide_peer_request,
        EMPTY,
        direct(bound=False),
        context=Context(has_registry=True, auto_approve=True),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "row 5 in legacy mode trusts an unbound request": Case(
        decide_peer_request,
        EMPTY,
        direct(bound=False),
        context=Context(strict=False, has_registry=True, auto_approve=True),
        events=GRANTED,
        changes=[("trusted", 7, True)],
        effects=GRANT_EFFECTS,
        superseded={7: SAYS_NO},
    ),
    "row 6: otherwise pending": Case(
        decide_peer_request,
        EMPTY,
        direct(text="please"),
        events=HELD,
        changes=[("pending", 7, True)],
        payloads={
            "handshake.received": {"peer_node_id": 7, "justification": "please", "relayed": False}
        },
        superseded={7: ASKED},
    ),
    "a keyless grant backfills the key": Case(
        decide_peer_request,
        View(state(outgoing=(7,))),
        relayed(None),
        events=GRANTED,
        changes=[("trusted", 7, True), ("outgoing", 7, "accepted")],
        effects=[ReportTrust(7), Backfill(7), ReplyAccept(7, True)],
        record=("", True, 0),
        superseded={7: SAYS_NO},
    ),
    "a grant clears pending and history": Case(
        decide_peer_request,
        View(state(pending_=(pending(),), history=(FormerTrust(7, A64, T0),)), arrival={7: 0}),
        direct(),
        context=Context(has_registry=True, auto_approve=True),
        events=GRANTED,
        changes=[("trusted", 7, True), ("history", 7, False), ("pending", 7, False)],
        effects=GRANT_EFFECTS,
        superseded={7: SAYS_NO},
    ),
    # SPEC 5 step 3: the pin, re-checked on the live state
    "strict: a key other than the trust record's is dropped": Case(
        decide_peer_request,
        View(state((trusted(B64),))),
        direct(),
        drop=Drop(DropKind.KEY_MISMATCH, "public key differs from the pinned key"),
    ),
    "strict: a key other than a bound pending request's is dropped": Case(
        decide_peer_request,
        View(state(pending_=(pending(key=B64, bound=True),))),
        direct(),
        drop=Drop(DropKind.KEY_MISMATCH, "public key differs from the pinned key"),
    ),
    "legacy: no pin check": Case(
        decide_peer_request,
        View(state((trusted(B64),))),
        direct(),
        context=LEGACY,
        events=["handshake.received"],
        effects=[ReplyAccept(7, False)],
        superseded={7: ASKED},
    ),
    # Pending queue (SPEC 6 row 6, SPEC 15)
    "a relayed request without a key keeps the pending key": Case(
        decide_peer_request,
        View(state(pending_=(pending(key=B64, source="relay"),))),
        relayed(None),
        events=HELD,
        changes=[("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "per-source quota of unbound requests": Case(
        decide_peer_request,
        View(state(pending_=(pending(8),))),
        direct(bound=False),
        context=Context(has_registry=True, limits=QueueLimits(unbound_per_source=1)),
        drop=Drop(DropKind.QUEUE_FULL, "too many pending requests from this source address"),
    ),
    "queue full: a bound request evicts the oldest unbound one": Case(
        decide_peer_request,
        View(
            state(pending_=(pending(8, source="10.0.0.8"), pending(9, bound=True))),
            arrival={8: 0, 9: 1},
        ),
        direct(),
        context=Context(has_registry=True, limits=QueueLimits(max_pending=2)),
        events=HELD,
        changes=[("pending", 8, False), ("pending", 7, True)],
        superseded={7: ASKED},
    ),
    "queue full of protected requests: a stranger is dropped": Case(
        decide_peer_request,
        View(state(pending_=(pending(8), pending(9))), protected={8, 9}),
        direct(),
        context=Context(has_registry=True, limits=QueueLimits(max_pending=2)),
        drop=Drop(DropKind.QUEUE_FULL, "pending queue full of protected requests"),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decision_table(name: str) -> None:
    check(CASES[name])


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
    decision = decide_peer_request(EMPTY, direct(text="please"), REGISTRY, NOW)
    (change,) = decision.changes
    assert change.value == PendingHandshake(7, A64, "please", NOW.wall, True, HOST)
    assert decision.protected == set()


def test_a_relayed_request_without_a_key_keeps_the_pending_key_and_its_bound_flag() -> None:
    view = View(state(pending_=(pending(key=B64, bound=True, source="relay"),)))
    (change,) = decide_peer_request(view, relayed(None, text="again"), REGISTRY, NOW).changes
    assert change.value == PendingHandshake(7, B64, "again", NOW.wall, True, "relay")


def test_formerly_trusted_allowlisted_and_network_sharing_senders_are_protected() -> None:
    former = View(state(history=(FormerTrust(7, A64, T0),)))
    assert decide_peer_request(former, direct(bound=False), REGISTRY, NOW).protected == {7}
    impostor = direct(B, bound=False)
    assert decide_peer_request(former, impostor, REGISTRY, NOW).protected == set()
    agent = Context(has_registry=True, agent=AGENT)
    assert decide_peer_request(EMPTY, direct(bound=False), agent, NOW).protected == {7}
    nameless = Context(has_registry=True, agent=AllowlistEntry(7, ""))  # as when loaded
    assert decide_peer_request(EMPTY, direct(bound=False), nameless, NOW).protected == {7}


def test_eviction_is_logged_with_the_victim() -> None:
    view = View(state(pending_=(pending(8, source="10.0.0.8"),)), arrival={8: 0})
    context = Context(has_registry=True, limits=QueueLimits(max_pending=1))
    decision = decide_peer_request(view, direct(), context, NOW)
    assert decision.notes == [
        "pending queue full: evicted the request of node 8 (source '10.0.0.8')"
    ]


@pytest.mark.parametrize("relayed_", [False, True])
def test_a_request_replacing_its_own_pending_one_is_not_held_to_the_quota(relayed_: bool) -> None:
    """Same node, same source: a replacement, admitted even with the queue full."""
    source = "relay" if relayed_ else HOST
    view = View(state(pending_=(pending(source=source),)), arrival={7: 0})
    inbound = relayed(A) if relayed_ else direct(bound=False)
    context = Context(has_registry=True, limits=QueueLimits(max_pending=1, unbound_per_source=0))
    (change,) = decide_peer_request(view, inbound, context, NOW).changes
    assert change.value is not None and change.value.public_key == A64


def test_a_request_from_a_new_source_counts_as_new_against_a_full_queue() -> None:
    view = View(state(pending_=(pending(source="10.0.0.1"),)), arrival={7: 0})
    context = Context(has_registry=True, limits=QueueLimits(max_pending=1))
    decision = decide_peer_request(view, direct(bound=False), context, NOW)
    # One entry, ours, from another source: replacing it is always admitted.
    assert [c.node_id for c in decision.changes] == [7]
    full = View(state(pending_=(pending(8), pending(9))), arrival={8: 0, 9: 1})
    crowded = Context(has_registry=True, limits=QueueLimits(max_pending=2))
    dropped = decide_peer_request(full, direct(bound=False), crowded, NOW).drop
    assert dropped == Drop(DropKind.QUEUE_FULL, "pending queue full")


def test_the_bound_flag_of_a_pending_request() -> None:
    bound_pending = View(state(pending_=(pending(bound=True, source="relay"),)))
    same_key = decide_peer_request(bound_pending, relayed(None), REGISTRY, NOW).changes[0].value
    assert same_key is not None and same_key.bound
    unbound_pending = View(state(pending_=(pending(bound=False),)))
    request = (
        decide_peer_request(unbound_pending, direct(bound=False), REGISTRY, NOW).changes[0].value
    )
    assert request is not None and not request.bound
    other_key = View(state(pending_=(pending(key=B64, bound=True),)))
    legacy = Context(strict=False, has_registry=True)
    request = decide_peer_request(other_key, direct(bound=False), legacy, NOW).changes[0].value
    assert request is not None and (request.public_key, request.bound) == (A64, False)


def test_a_formerly_trusted_node_without_a_key_is_protected_only_when_bound() -> None:
    former = View(state(history=(FormerTrust(7, "", T0),)))
    assert decide_peer_request(former, relayed(None), REGISTRY, NOW).protected == {7}
    assert decide_peer_request(former, direct(bound=False), REGISTRY, NOW).protected == set()


def test_eviction_names_an_unknown_source() -> None:
    view = View(state(pending_=(pending(8, source=""),)), arrival={8: 0})
    context = Context(has_registry=True, limits=QueueLimits(max_pending=1))
    decision = decide_peer_request(view, direct(), context, NOW)
    assert decision.notes == [
        "pending queue full: evicted the request of node 8 (source 'unknown')"
    ]


def test_relayed_and_protected_requests_count_against_no_source_quota() -> None:
    view = View(state(pending_=(pending(8, bound=True, source="relay"),)))
    quota = Context(has_registry=True, limits=QueueLimits(bound_per_source=1, unbound_per_source=1))
    assert decide_peer_request(view, relayed(A), quota, NOW).drop is None
    hosts = View(state(pending_=(pending(8),)))
    agent = replace(quota, agent=AGENT)
    assert decide_peer_request(hosts, direct(bound=False), agent, NOW).drop is None
    assert decide_peer_request(hosts, direct(bound=False), quota, NOW).drop == Drop(
        DropKind.QUEUE_FULL, "too many pending requests from this source address"
    )


def test_an_unbound_request_with_the_same_key_keeps_the_pending_request_bound() -> None:
    view = View(state(pending_=(pending(bound=True),)))
    request = decide_peer_request(view, direct(bound=False), TOFU, NOW).changes[0].value
    assert isinstance(request, PendingHandshake) and request.bound
