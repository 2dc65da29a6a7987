"""The two clocks of the Manager, injected so tests can age caches, cooldowns and windows.

SPEC 16: monotonic time for ages, cooldowns and caches; wall time only for message
timestamps and persisted times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    """What the Manager reads the time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (ages, cooldowns, caches)."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (message timestamps, persisted times)."""
        ...


class SystemClock:
    """The real clocks: ``time.monotonic`` and ``time.time``."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def time(self) -> float:
        """``time.time()``."""
        return time.time()


@dataclass(frozen=True)
class Now:
    """One reading of both clocks, handed to the decisions (which read no clock)."""

    wall: datetime  # aware UTC: what records store
    monotonic: float

    @classmethod
    def read(cls, clock: Clock) -> Now:
        """Read ``clock`` once."""
        return cls(datetime.fromtimestamp(clock.time(), timezone.utc), clock.monotonic())
