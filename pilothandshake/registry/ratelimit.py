"""Token buckets: ``register`` per source address, and log lines a hostile client provokes.

Both take the time as an argument (monotonic seconds) so that tests age them without
sleeping.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

__all__ = ["PerSource", "RateLimitedLog", "TokenBucket", "quote"]

# Sources remembered at once; the least recently used bucket is forgotten beyond this (a
# forgotten source starts full again, which only an attacker holding this many addresses
# at once can exploit, and such an attacker needs no reset).
_MAX_SOURCES = 4096
_QUOTE_LIMIT = 100


def quote(value: object, limit: int = _QUOTE_LIMIT) -> str:
    """A client-supplied value as it may appear in a log line or an error: ``repr`` (so
    newlines and control characters are escaped), cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TokenBucket:
    """``capacity`` tokens, refilled at ``per_second``; ``take`` spends one if there is one."""

    def __init__(self, capacity: float, per_second: float, now: float) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self._tokens = capacity
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token; False (nothing spent) when the bucket is empty."""
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.per_second)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class PerSource:
    """One ``TokenBucket`` per source address, ``per_minute`` tokens each. Thread-safe."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, source: str, now: float) -> bool:
        """Spend one of ``source``'s tokens; False when it has none left."""
        with self._lock:
            bucket = self._buckets.pop(source, None)
            if bucket is None:
                bucket = TokenBucket(self._per_minute, self._per_minute / 60.0, now)
                if len(self._buckets) >= _MAX_SOURCES:
                    self._buckets.popitem(last=False)
            self._buckets[source] = bucket
            return bucket.take(now)


class RateLimitedLog:
    """At most ``per_second`` lines a second to ``logger``; the rest are counted, and the
    count is logged with the next line that gets through."""

    def __init__(self, logger: logging.Logger, per_second: int) -> None:
        self._logger = logger
        self._bucket = TokenBucket(per_second, per_second, float("-inf"))
        self._suppressed = 0
        self._lock = threading.Lock()

    def log(self, level: int, now: float, message: str, *args: object) -> None:
        """``logger.log(level, message, *args)`` if the rate allows it at ``now``."""
        with self._lock:
            if not self._bucket.take(now):
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            self._logger.log(level, "%d similar lines were not logged (rate limit)", suppressed)
        self._logger.log(level, message, *args)
