"""SPEC 5 step 4: the replay set, bounded in total and per source address."""

from __future__ import annotations

import heapq
from collections import OrderedDict

from ..drops import Drop, DropKind

__all__ = ["ReplaySet"]


class ReplaySet:
    """SPEC 5 step 4: digests of accepted messages, bounded in total and per source address.

    Each source keeps its digests in arrival order (for eviction); a heap orders them by
    expiry (the message timestamp leaving the window). Not thread-safe: the Manager's lock.
    """

    def __init__(self, max_total: int, max_per_source: int) -> None:
        """At most ``max_total`` digests, ``max_per_source`` from one source address."""
        self._max_total = max_total
        self._max_per_source = max_per_source
        self._sources: dict[str, OrderedDict[bytes, float]] = {}
        self._owner: dict[bytes, str] = {}
        self._expiry: list[tuple[float, bytes]] = []

    def add(
        self, digest: bytes, source: str, expires: float, now: float, privileged: bool
    ) -> Drop | None:
        """Enter ``digest``; returns None, or the drop of the message."""
        self._expire(now)
        if digest in self._owner:
            return Drop(DropKind.REPLAY, "replayed message")
        entries = self._sources.get(source)
        if entries is not None and len(entries) >= self._max_per_source:
            if not privileged:
                return Drop(DropKind.REPLAY, "replay set full for this source address")
            self._evict(source)
        elif len(self._owner) >= self._max_total:
            if not privileged:
                return Drop(DropKind.REPLAY, "replay set full")
            self._evict(max(self._sources, key=lambda name: len(self._sources[name])))
        self._sources.setdefault(source, OrderedDict())[digest] = expires
        self._owner[digest] = source
        heapq.heappush(self._expiry, (expires, digest))
        if len(self._expiry) > 2 * self._max_total + 64:
            # Evicted digests leave stale heap entries; rebuild before they pile up.
            self._expiry = [
                (e, d) for entries in self._sources.values() for d, e in entries.items()
            ]
            heapq.heapify(self._expiry)
        return None

    def _evict(self, source: str) -> None:
        entries = self._sources[source]
        digest, _ = entries.popitem(last=False)
        del self._owner[digest]
        if not entries:
            del self._sources[source]

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires, digest = heapq.heappop(self._expiry)
            source = self._owner.get(digest)
            if source is None:
                continue
            entries = self._sources[source]
            if entries.get(digest) != expires:
                continue  # evicted and entered again later: the newer entry has its own expiry
            del entries[digest]
            del self._owner[digest]
            if not entries:
                del self._sources[source]
