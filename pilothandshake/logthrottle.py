"""``LogThrottle``: at most so many log lines per interval, the rest counted.

Every part that logs what a peer, a client or a failing disk can provoke (dropped messages,
refused connections, failed accepts, failed writes, a webhook that is down) goes through one
of these, so a flood cannot fill the disk. The caller asks before each line; what it says
about the lines held back (a line of its own, or a count in the next line) is its own.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

__all__ = ["LogThrottle"]


class LogThrottle:
    """At most ``lines`` log lines per ``interval`` seconds by ``clock``. Thread-safe.

    An interval starts with the first line asked for after the last one ended, so a quiet
    spell costs nothing and the first line after it always gets through.
    """

    def __init__(
        self, interval: float, lines: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``lines`` a ``interval`` (seconds by ``clock``)."""
        self.interval = interval
        self.lines = lines
        self._clock = clock
        self._lock = threading.Lock()
        self._start = -math.inf
        self._used = 0
        self._held = 0

    def admit(self, now: float | None = None) -> int | None:
        """Whether a line may be logged now (``now`` by the clock, unless given): None when
        it must be held back (it is counted), else how many were held back since the last one
        admitted (0 or more), which the caller reports with it."""
        if now is None:
            now = self._clock()
        with self._lock:
            if now - self._start >= self.interval:
                self._start = now
                self._used = 0
            if self._used >= self.lines:
                self._held += 1
                return None
            self._used += 1
            held, self._held = self._held, 0
            return held

    def take_held(self) -> int:
        """How many lines were held back since the last one admitted, counting them as
        reported (for a summary at shutdown)."""
        with self._lock:
            held, self._held = self._held, 0
            return held
