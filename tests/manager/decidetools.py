"""The decision table's vocabulary, shared by ``test_decide`` (SPEC 6, requests) and
``test_decide_answers`` (SPEC 7, answers and the operator's calls): plain data for a view of
the state, what arrived and what was gathered, and ``check``, which runs one ``Case``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from pilothandshake.drops import Drop
from pilothandshake.identity import b64encode
from pilothandshake.manager.clock import Now
from pilothandshake.manager.decide import (
    Context,
    Decision,
    Inbound,
    View,
)
from pilothandshake.manager.effects import (
    ReplyAccept,
    ReportTrust,
)
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
# Kept answers (outbox kinds) a decision makes stale: any "no" once we trust the peer, a
# revoke once the peer asks us.
SAYS_NO = ("reject", "revoke", "withdraw")
ASKED = ("revoke",)
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
    ``effects`` and ``inline`` are the effect dataclasses; ``drop`` the drop (kind and
    detail); ``record`` what the trust record of node 7 must hold, when one is put."""

    decide: Callable[[View, Inbound, Context, Now], Decision]
    view: View
    inbound: Inbound
    context: Context = REGISTRY
    events: list[str] = field(default_factory=list)
    changes: list[tuple[str, int, bool | str]] = field(default_factory=list)
    effects: list[Any] = field(default_factory=list)
    inline: list[Any] = field(default_factory=list)
    drop: Drop | None = None
    quiet: bool = False
    record: tuple[str, bool, int] | None = None  # (public_key, mutual, network)
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] | None = None  # the INFO lines, when the case states them
    cooldowns: dict[int, float | None] = field(default_factory=dict)  # side-table changes
    conflicts: dict[int, bytes] = field(default_factory=dict)
    superseded: dict[int, tuple[str, ...]] = field(default_factory=dict)  # kept "no"s gone


GRANTED = ["handshake.received", "handshake.auto_approved", "trust.changed"]
HELD = ["handshake.received", "handshake.pending"]
GRANT_EFFECTS = [ReportTrust(7), ReplyAccept(7, False)]
EMPTY = View(state())


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


def check(case: Case) -> None:
    """Run ``case`` and assert all it states."""
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
