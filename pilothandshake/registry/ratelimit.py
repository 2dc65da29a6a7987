"""Token buckets: requests per source or per node, and log lines a hostile client provokes.

Buckets take the time as an argument (monotonic seconds) so that tests age them without
sleeping. ``source_prefix`` says what "one source" is for the per-source rules of SPEC 17:
an IPv4 /24 or an IPv6 /64, since one host usually holds many addresses of its prefix.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable

from ..logthrottle import LogThrottle

__all__ = ["PerKey", "RateLimitedLog", "TokenBucket", "quote", "source_prefix"]

# Keys (sources, nodes) remembered at once; the least recently used bucket is forgotten
# beyond this (a forgotten key starts full again, which only an attacker cycling through
# this many sources or identities within a minute can exploit).
_MAX_KEYS = 16384
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


@functools.lru_cache(maxsize=4096)
def source_prefix(address: str) -> str:
    """The source an address counts as: its IPv4 /24 or IPv6 /64 (an IPv4-mapped IPv6
    address counts as its IPv4 address); anything that is not an IP address, itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network((ip, bits), strict=False))


class PerKey:
    """One ``TokenBucket`` per key (a source, a node ID), ``per_minute`` tokens each, full
    at first. Thread-safe; ``per_minute`` may be changed live (a config reload)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: Hashable, now: float) -> bool:
        """Spend one of ``key``'s tokens; False when it has none left."""
        with self._lock:
            bucket = self._buckets.pop(key, None)
            if bucket is None or bucket.capacity != self.per_minute:
                bucket = TokenBucket(self.per_minute, self.per_minute / 60.0, now)
                if len(self._buckets) >= _MAX_KEYS:
                    self._buckets.popitem(last=False)
            self._buckets[key] = bucket
            return bucket.take(now)


class RateLimitedLog:
    """At most ``per_second`` lines a second to ``logger``; the rest are counted, and the
    count is logged with the next line that gets through."""

    def __init__(self, logger: logging.Logger, per_second: int) -> None:
        self._logger = logger
        self._throttle = LogThrottle(1.0, per_second)

    def log(self, level: int, now: float, message: str, *args: object) -> None:
        """``logger.log(level, message, *args)`` if the rate allows it at ``now``."""
        suppressed = self._throttle.admit(now)
        if suppressed is None:
            return
        if suppressed:
            self._logger.log(level, "%d similar lines were not logged (rate limit)", suppressed)
        self._logger.log(level, message, *args)
