"""The records of trust.json and the changes that make them (SPEC 10): data only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Union

# The tables of the state, in the order trust.json lists them.
TRUSTED = "trusted"
PENDING = "pending"
OUTGOING = "outgoing"
HISTORY = "history"
TABLES = (TRUSTED, PENDING, OUTGOING, HISTORY)


@dataclass(frozen=True)
class TrustRecord:
    """A trusted peer (Go ``TrustRecord``).

    ``public_key`` is standard base64 of the peer's Ed25519 key; files written by Go may hold
    "" or something that is not a key. ``mutual`` is true when both sides asked; ``network`` is
    the shared network that granted trust automatically (0: none). ``reason`` says why the
    peer is trusted (``trust.changed``'s reason, SPEC 14: ``mutual``, ``same_network``,
    ``trusted_agent``, ``auto_approve``, ``approved``, ``trusted_agent_relayed``,
    ``auto_approve_relayed``; "" when unknown, as in Go's files, which ignore it).
    """

    node_id: int
    public_key: str
    approved_at: datetime
    mutual: bool = False
    network: int = 0
    reason: str = ""


@dataclass(frozen=True)
class PendingHandshake:
    """A handshake request waiting for the operator (Go ``PendingHandshake``).

    ``bound`` records that the registry vouched for the request (SPEC 6); ``source`` is where
    it came from ("relay", or the sender's address for a direct one; "" when unknown), for
    the pending queue's per-source quotas. Go ignores both.
    """

    node_id: int
    public_key: str
    justification: str
    received_at: datetime
    bound: bool = False
    source: str = ""


# How an outgoing request went (OutgoingRequest.path) and where it stands (.state, SPEC 7).
DIRECT = "direct"
RELAY = "relay"
WAITING = "waiting"
ACCEPTED = "accepted"
REJECTED = "rejected"
EXPIRED = "expired"
WITHDRAWN = "withdrawn"
OUTGOING_STATES = (WAITING, ACCEPTED, REJECTED, EXPIRED, WITHDRAWN)


@dataclass(frozen=True)
class OutgoingRequest:
    """A handshake request we sent (SPEC 7): how it went (``path``: ``direct`` or ``relay``)
    and what became of it (``state``: ``waiting`` for an answer, or ended as ``accepted``,
    ``rejected`` with the peer's ``reason``, ``expired`` or ``withdrawn``). An ended request
    is kept ``outgoing_ttl`` after ``ended_at`` so a caller can ask what happened. Go's
    files hold only ``node_id`` and ``sent_at`` (it ignores the rest): such an entry is a
    direct request still waiting."""

    node_id: int
    sent_at: datetime
    path: str = DIRECT
    state: str = WAITING
    reason: str = ""
    ended_at: datetime | None = None

    @property
    def waiting(self) -> bool:
        """Still waiting for an answer: the request an accept may answer (SPEC 8)."""
        return self.state == WAITING


@dataclass(frozen=True)
class FormerTrust:
    """A node we trusted once and no longer do, with the key it had and when trust ended:
    the trust history that protects its later requests in the pending queue (not in Go)."""

    node_id: int
    public_key: str
    ended_at: datetime


Record = Union[TrustRecord, PendingHandshake, OutgoingRequest, FormerTrust]


class Change(NamedTuple):
    """One mutation: ``value`` is the new record of ``node_id`` in ``table``, None if removed."""

    table: str
    node_id: int
    value: Record | None


@dataclass
class TrustState:
    """The tables of trust.json, each keyed by node ID."""

    trusted: dict[int, TrustRecord] = field(default_factory=dict)
    pending: dict[int, PendingHandshake] = field(default_factory=dict)
    outgoing: dict[int, OutgoingRequest] = field(default_factory=dict)
    history: dict[int, FormerTrust] = field(default_factory=dict)

    def copy(self) -> TrustState:
        """Return a state with copies of the dicts (the records are immutable)."""
        return TrustState(
            dict(self.trusted), dict(self.pending), dict(self.outgoing), dict(self.history)
        )

    def table(self, name: str) -> dict[int, Any]:
        """Return the dict of table ``name`` (one of ``TABLES``)."""
        table: dict[int, Any] = getattr(self, name)
        return table

    def apply(self, change: Change) -> None:
        """Put or remove the record ``change`` names."""
        table = self.table(change.table)
        if change.value is None:
            table.pop(change.node_id, None)
        else:
            table[change.node_id] = change.value
