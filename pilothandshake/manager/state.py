"""The Manager's state: the trust store, the side tables decisions read, and the one lock.

``State`` owns the lock every decision runs under, the ``TrustStore`` (whose ``working``
copy decisions read and change, and whose ``visible`` copy readers see), and the tables that
are not persisted: conflicts with the registry, revoke times, the pending queue's arrival
order and protection, and the per-node waiters of ``wait_for_trust``. ``apply`` is the only
writer: every change comes from a ``Decision``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Container
from dataclasses import dataclass

from ..identity import decode_key
from ..metrics import Metrics
from ..runtime import Runtime, is_own_node
from ..store import (
    OUTGOING,
    PENDING,
    REJECTED,
    TRUSTED,
    Change,
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustStore,
)
from .decide import Decision, View
from .queue import in_history

__all__ = ["State"]


@dataclass
class _Waiters:
    condition: threading.Condition
    count: int = 0


class State:
    """The working and durable state of one Manager, at ``path`` ("" = memory only)."""

    def __init__(self, path: str, metrics: Metrics, runtime: Runtime) -> None:
        """Open the trust store (``StoreError`` when it does not parse or is in use), its
        writes counted into ``metrics``, and index its pending requests (``runtime`` says
        which come from trusted agents)."""
        self.lock = threading.RLock()
        self.store = TrustStore(path, self.lock, self._on_commit, metrics=metrics)
        # Trust records the registry contradicts (issue 11 item 7): node -> (that record,
        # the key the registry binds). Not trusted, not pinning, until approved again or
        # removed: a conflict holds while its record is the node's record (``_Conflicts``).
        self._conflicts: dict[int, tuple[TrustRecord, bytes]] = {}
        self._revoked_at: dict[int, float] = {}  # node -> monotonic time we revoked it
        self._arrivals = itertools.count()
        self._arrival: dict[int, int] = {}  # pending arrival order, for eviction ties
        self._protected: set[int] = set()  # pending requests never evicted for strangers
        self._waiters: dict[int, _Waiters] = {}
        self._index_pending(runtime)

    def _index_pending(self, runtime: Runtime) -> None:
        """Arrival order and protection of the pending requests loaded from trust.json (a
        shared network is known only on arrival: loaded entries are protected when
        allowlisted or in the trust history)."""
        state = self.store.working
        loaded = sorted(state.pending.values(), key=lambda p: p.received_at)
        for request in loaded:
            node = request.node_id
            self._arrival[node] = next(self._arrivals)
            key = decode_key(request.public_key)
            agent = runtime.trusted_agent(node) is not None
            if agent or in_history(state, node, key, request.bound):
                self._protected.add(node)

    # Deciding: call holding the lock.

    def view(self) -> View:
        """The live working state and side tables (nothing copied)."""
        working = self.store.working
        conflicts = _Conflicts(self._conflicts, working.trusted)
        return View(working, conflicts, self._revoked_at, self._arrival, self._protected)

    def trusts(self, node: int) -> bool:
        """Whether ``node`` has a trust record not in conflict (working state)."""
        return self.view().trusts(node)

    def apply(self, decision: Decision) -> int | None:
        """Make ``decision``'s changes: the side tables at once, the store's in the working
        state, keeping the pending queue's side tables in step; the last store change's
        sequence number (None: no store change). The only writer of the state."""
        for node, at in decision.cooldowns.items():
            if at is None:
                self._revoked_at.pop(node, None)
            else:
                self._revoked_at[node] = at
        for node, key in decision.conflicts.items():
            self._conflicts[node] = (self.store.working.trusted[node], key)
        seq = None
        for change in decision.changes:
            seq = self.store.change(change)
            if change.table != PENDING:
                continue
            node = change.node_id
            if change.value is None:
                self._arrival.pop(node, None)
            else:
                self._arrival[node] = next(self._arrivals)
            if change.value is not None and node in decision.protected:
                self._protected.add(node)
            else:
                self._protected.discard(node)
        return seq

    def _on_commit(self, changes: list[Change]) -> None:
        # Called by the store under the lock once changes are durable, so a waiter woken
        # here finds them in ``visible``, and no grant slips between a waiter's check and
        # its wait. Only the waiters of nodes that became trusted, or rejected our request,
        # are woken.
        for change in changes:
            if change.value is None:
                continue
            if change.table == TRUSTED or (change.table == OUTGOING and _rejected(change.value)):
                waiters = self._waiters.get(change.node_id)
                if waiters is not None:
                    waiters.condition.notify_all()

    # Readers: durable state only; each takes the lock.

    def trusted(self, node_id: int, own: int) -> bool:
        """Whether ``node_id`` is trusted (``own``, when known, always is)."""
        with self.lock:
            return self._visibly_trusted(node_id, own)

    def records(self) -> list[TrustRecord]:
        """Trust records, sorted by node ID."""
        with self.lock:
            return sorted(self.store.visible.trusted.values(), key=lambda r: r.node_id)

    def pending(self) -> list[PendingHandshake]:
        """Pending requests, sorted by node ID."""
        with self.lock:
            return sorted(self.store.visible.pending.values(), key=lambda p: p.node_id)

    def outgoing(self) -> list[OutgoingRequest]:
        """Our requests, waiting or ended, sorted by node ID."""
        with self.lock:
            return sorted(self.store.visible.outgoing.values(), key=lambda o: o.node_id)

    def in_conflict(self) -> list[int]:
        """Node IDs of trust records in conflict with the registry, sorted."""
        with self.lock:
            conflicts = _Conflicts(self._conflicts, self.store.visible.trusted)
            return sorted(node for node in self._conflicts if node in conflicts)

    def wait(self, node_id: int, own: int, timeout: float | None) -> bool:
        """Block until ``node_id`` is trusted (True), or our latest request to it is
        rejected or ``timeout`` passes (False)."""
        with self.lock:

            def ended() -> bool:
                request = self.store.visible.outgoing.get(node_id)
                return self._visibly_trusted(node_id, own) or _rejected(request)

            if ended():
                return self._visibly_trusted(node_id, own)
            waiters = self._waiters.get(node_id)
            if waiters is None:
                waiters = self._waiters[node_id] = _Waiters(threading.Condition(self.lock))
            waiters.count += 1
            try:
                waiters.condition.wait_for(ended, timeout)
                return self._visibly_trusted(node_id, own)
            finally:
                waiters.count -= 1
                if not waiters.count:
                    del self._waiters[node_id]

    def waiting(self) -> int:
        """How many ``wait`` calls are blocked now."""
        with self.lock:
            return sum(waiters.count for waiters in self._waiters.values())

    def _visibly_trusted(self, node_id: int, own: int) -> bool:
        if is_own_node(node_id, own):
            return True
        visible = self.store.visible.trusted
        return node_id in visible and node_id not in _Conflicts(self._conflicts, visible)


class _Conflicts(Container[int]):
    """The nodes whose conflict holds in ``trusted`` (the working or the visible table): the
    record the registry contradicts is still the node's record there. Records are replaced,
    never edited, so a new or removed record ends the conflict as soon as that table has it,
    and a failed write that puts the record back brings its conflict back. An ended entry
    stays in ``conflicts`` (one per node at most) until the node's next conflict."""

    def __init__(
        self, conflicts: dict[int, tuple[TrustRecord, bytes]], trusted: dict[int, TrustRecord]
    ) -> None:
        self._conflicts = conflicts
        self._trusted = trusted

    def __contains__(self, node: object) -> bool:
        if not isinstance(node, int):
            return False
        entry = self._conflicts.get(node)
        return entry is not None and self._trusted.get(node) is entry[0]


def _rejected(request: object) -> bool:
    return isinstance(request, OutgoingRequest) and request.state == REJECTED
