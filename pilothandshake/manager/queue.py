"""The pending queue's rule (SPEC 6 row 6 and SPEC 15, written out in docs/PROTOCOL.md).

Pure, like ``decide``: it reads the working state and says what to evict or why to drop.
A source is an IPv4 /24 or an IPv6 /64 for a direct request (one host rarely owns a single
address), and each relayed request is a source of its own (the relay is not one big source
that any newcomer may take from). Protected requests (allowlisted, network-sharing or
formerly trusted senders) count against no quota and are never evicted for an unprotected
one. An unprotected direct request counts against its source's quota: 16 unbound, 64 bound.
When the queue is full a protected newcomer evicts the oldest unprotected entry of the
source holding the most; a bound (or relayed) newcomer evicts the oldest unbound
unprotected entry; otherwise the source holding the most entries the newcomer may evict
gives up its oldest one only when it holds more than the newcomer's source plus one
(fairness). An unbound newcomer may evict only unbound entries, never a bound or relayed
one. Else the newcomer is dropped.
"""

from __future__ import annotations

import ipaddress
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
from ..drops import Drop, DropKind
from ..identity import decode_key
from ..store import FormerTrust, PendingHandshake, TrustRecord, TrustState

__all__ = ["RELAY", "Admission", "QueueLimits", "admit", "in_history", "source_of"]

RELAY = "relay"  # the stored source of a relayed request (and its remote in log lines)


@dataclass(frozen=True)
class QueueLimits:
    """The Manager's bounds that decisions apply (constructor parameters)."""

    max_pending: int = MAX_PENDING
    unbound_per_source: int = MAX_PENDING_UNBOUND_PER_SOURCE
    bound_per_source: int = MAX_PENDING_BOUND_PER_SOURCE
    max_history: int = MAX_TRUST_HISTORY


@dataclass(frozen=True)
class Admission:
    """Whether a new pending entry may be stored: ``drop`` None when it may, after evicting
    the request of ``evict`` (None: nothing to evict)."""

    drop: Drop | None = None
    evict: PendingHandshake | None = None


def source_of(request: PendingHandshake) -> str:
    """The source ``request`` counts against: each relayed request its own; a direct one
    its address's IPv4 /24 or IPv6 /64 (the stored address, so entries of any age agree)."""
    if request.source == RELAY:
        return f"{RELAY}:{request.node_id}"
    try:
        address = ipaddress.ip_address(request.source)
    except ValueError:
        return request.source  # "" (loaded from an older file) or not an address
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def admit(
    pending: Mapping[int, PendingHandshake],
    protected: Container[int],
    arrival: Mapping[int, int],
    limits: QueueLimits,
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

    source = source_of(newcomer)
    unprotected = [p for p in pending.values() if p.node_id not in protected]
    if not is_protected and not relayed:
        quota = limits.bound_per_source if newcomer.bound else limits.unbound_per_source
        same = sum(
            1
            for p in unprotected
            if source_of(p) == source
            and p.bound == newcomer.bound
            and p.node_id != newcomer.node_id
        )
        if same >= quota:
            return _full("too many pending requests from this source address")
    if replacing or len(pending) < limits.max_pending:
        return Admission()
    unbound = [p for p in unprotected if not p.bound]
    if is_protected:
        victims = _of_largest_source(unprotected, age)
    elif newcomer.bound and unbound:
        victims = unbound
    else:
        # An unbound newcomer takes only from unbound entries: registering is free, but an
        # unbound request is anyone's (round 3).
        candidates = unprotected if newcomer.bound else unbound
        victims = _of_largest_source(candidates, age)
        held = sum(1 for p in candidates if source_of(p) == source)
        if victims and len(victims) <= held + 1:
            return _full("pending queue full")
    if not victims:
        return _full("pending queue full" + ("" if unprotected else " of protected requests"))
    return Admission(evict=min(victims, key=age))


def _full(detail: str) -> Admission:
    return Admission(Drop(DropKind.QUEUE_FULL, detail))


def _of_largest_source(
    entries: list[PendingHandshake],
    age: Callable[[PendingHandshake], tuple[datetime, int]],
) -> list[PendingHandshake]:
    """The entries of the source holding the most of ``entries`` (ties: the one holding the
    oldest entry)."""
    if not entries:
        return []
    counts = Counter(source_of(p) for p in entries)
    most = max(counts.values())
    tied = [p for p in entries if counts[source_of(p)] == most]
    source = source_of(min(tied, key=age))
    return [p for p in entries if source_of(p) == source]


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
