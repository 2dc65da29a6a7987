"""The pending queue's rule (SPEC 6 row 6 and SPEC 15, written out in docs/PROTOCOL.md).

Pure, like ``decide``: it reads the working state and says what to evict or why to drop.
Protected requests (allowlisted, network-sharing or formerly trusted senders) count against
no quota and are never evicted for an unprotected one. An unprotected direct request counts
against its source address's quota: 16 unbound, 64 bound. When the queue is full a
protected newcomer evicts the oldest unprotected entry of the source holding the most; a
bound newcomer evicts the oldest unbound unprotected entry; otherwise the source holding the
most unprotected entries gives up its oldest one only when it holds more than the
newcomer's source plus one (fairness, the relay being one source). Else the newcomer is
dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from datetime import datetime

from ..constants import (
    MAX_PENDING,
    MAX_PENDING_BOUND_PER_SOURCE,
    MAX_PENDING_UNBOUND_PER_SOURCE,
    MAX_TRUST_HISTORY,
)
from ..identity import decode_key
from ..store import FormerTrust, PendingHandshake, TrustRecord, TrustState

__all__ = ["Admission", "Limits", "admit", "in_history"]


@dataclass(frozen=True)
class Limits:
    """The Manager's bounds that decisions apply (constructor parameters)."""

    max_pending: int = MAX_PENDING
    unbound_per_source: int = MAX_PENDING_UNBOUND_PER_SOURCE
    bound_per_source: int = MAX_PENDING_BOUND_PER_SOURCE
    max_history: int = MAX_TRUST_HISTORY


@dataclass(frozen=True)
class Admission:
    """Whether a new pending entry may be stored: ``drop`` "" when it may, after evicting the
    request of ``evict`` (None: nothing to evict)."""

    drop: str = ""
    evict: PendingHandshake | None = None


def admit(
    pending: Mapping[int, PendingHandshake],
    protected: Container[int],
    arrival: Mapping[int, int],
    limits: Limits,
    newcomer: PendingHandshake,
    *,
    relayed: bool,
    is_protected: bool,
    replacing: bool,
) -> Admission:
    """May ``newcomer`` enter the queue ``pending`` (``replacing`` an entry of its node)?
    ``arrival`` orders entries received in the same instant."""

    def age(request: PendingHandshake) -> tuple[datetime, int]:
        return request.received_at, arrival.get(request.node_id, -1)

    unprotected = [p for p in pending.values() if p.node_id not in protected]
    if not is_protected and not relayed:
        quota = limits.bound_per_source if newcomer.bound else limits.unbound_per_source
        same = sum(
            1
            for p in unprotected
            if p.source == newcomer.source
            and p.bound == newcomer.bound
            and p.node_id != newcomer.node_id
        )
        if same >= quota:
            return Admission("too many pending requests from this source address")
    if replacing or len(pending) < limits.max_pending:
        return Admission()
    counts = Counter(p.source for p in unprotected)
    unbound = [p for p in unprotected if not p.bound]
    if is_protected:
        victims = _of_largest_source(unprotected, counts, age)
    elif newcomer.bound and unbound:
        victims = unbound
    else:
        victims = _of_largest_source(unprotected, counts, age)
        if victims and len(victims) <= counts[newcomer.source] + 1:
            return Admission("pending queue full")
    if not victims:
        return Admission("pending queue full of protected requests")
    return Admission(evict=min(victims, key=age))


def _of_largest_source(
    entries: list[PendingHandshake],
    counts: Counter[str],
    age: Callable[[PendingHandshake], tuple[datetime, int]],
) -> list[PendingHandshake]:
    """The entries of the source holding the most of ``entries`` (ties: the one holding the
    oldest entry)."""
    if not counts:
        return []
    most = max(counts.values())
    tied = [p for p in entries if counts[p.source] == most]
    source = min(tied, key=age).source
    return [p for p in entries if p.source == source]


def in_history(state: TrustState, node: int, key: bytes | None, bound: bool) -> bool:
    """Whether ``node`` is trusted now or was before, and this is the node we knew: its key
    equals the one we trusted (or, when we had none, the registry vouched for it)."""
    known: TrustRecord | FormerTrust | None = state.trusted.get(node)
    if known is None:
        known = state.history.get(node)
    if known is None:
        return False
    known_key = decode_key(known.public_key)
    return key == known_key if known_key is not None else bound
