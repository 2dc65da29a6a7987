"""When the daemon polls the relay (SPEC 18): a pure schedule driven by an injected clock.

``PollSchedule`` does no I/O and starts no thread: the registry loop tells it what happened
(a poll started, a poll ended with or without items, an operator wants a fresh view) and
asks it when the next poll is due. With any registry:

- **idle**: one poll every ``idle`` seconds (``registry.poll_idle``, 60 s, Go's keep-alive);
- **fast window**: while one of our outgoing requests waits for an answer and was sent less
  than ``window`` (2 min) ago, one poll every ``fast`` seconds (``registry.poll_interval``,
  2 s); the window ends early when the request is answered (it no longer waits);
- **on demand**: ``demand()`` asks for one poll now, unless one started less than ``spacing``
  (2 s) ago;
- **failure**: after ``n`` failed polls in a row, wait ``backoff(n)`` (doubling from ``fast``
  up to ``MAX_BACKOFF``, with jitter).

With push (``pilot-registryd``'s ``wait_poll``) the next long poll opens as soon as the last
one ends, except after an empty answer that came back early (a registry that does not hold
polls): then not before ``fast`` after the last one started, so nothing ever spins.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Callable

from .constants import MAX_BACKOFF

__all__ = ["FAST_WINDOW", "ON_DEMAND_BOUND", "ON_DEMAND_SPACING", "PollSchedule", "backoff"]

FAST_WINDOW = 120.0  # seconds of fast polling after a request is sent
ON_DEMAND_SPACING = 2.0  # at most one on-demand poll this often
ON_DEMAND_BOUND = 3.0  # how long the control socket waits for an on-demand poll
# Doubling stops here: 2 ** 32 times any interval is far past MAX_BACKOFF, and the exponent
# must never grow with the length of an outage (2.0 ** 1024 overflows).
_MAX_DOUBLINGS = 32


def backoff(
    failures: int, base: float, cap: float, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after ``failures`` (>= 1) failures in a row: ``base`` doubled per
    failure, at most ``cap``, then between half and all of that (``jitter()`` in [0, 1)),
    so that daemons which lost the registry together do not come back in step."""
    ceiling = min(cap, base * 2.0 ** min(max(failures - 1, 0), _MAX_DOUBLINGS))
    return ceiling / 2 + jitter() * ceiling / 2


class PollSchedule:
    """The relay poll schedule of one node; times are ``clock()`` seconds (monotonic)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        fast: float,
        idle: float,
        window: float = FAST_WINDOW,
        spacing: float = ON_DEMAND_SPACING,
        cap: float = MAX_BACKOFF,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._fast = fast
        self._idle = idle
        self._window = window
        self._spacing = spacing
        self._cap = cap
        self._jitter = jitter
        self.push = False  # the registry holds polls (``wait_poll``)
        self._started: float | None = None  # when the last poll started
        self._retry_at: float | None = None  # set while polls fail
        self._failures = 0
        self._early = False  # the last push poll came back empty before ``fast``
        self._demanded = False

    def started(self) -> None:
        """A poll starts now (it serves any demand made so far)."""
        self._started = self._clock()
        self._demanded = False

    def finished(self, ok: bool, items: int = 0) -> None:
        """The poll that started last ended: ``ok`` or failed; ``items`` it delivered."""
        now = self._clock()
        if not ok:
            self._failures += 1
            self._retry_at = now + backoff(self._failures, self._fast, self._cap, self._jitter)
            return
        self._failures = 0
        self._retry_at = None
        began = now if self._started is None else self._started
        self._early = items == 0 and now - began < self._fast

    def demand(self) -> bool:
        """An operator wants a fresh view: True when a poll should run for it now (none
        started less than ``spacing`` ago, no push poll is open, polls are not failing)."""
        if self.push or self._failures:
            return False
        if self._started is not None and self._clock() - self._started < self._spacing:
            return False
        self._demanded = True
        return True

    def next_poll(self, waiting_since: Iterable[float] = ()) -> float:
        """When the next poll is due (``clock()`` time; now or earlier: poll now).
        ``waiting_since``: when each of our outgoing requests still waiting was sent."""
        if self._retry_at is not None:
            return self._retry_at
        if self._started is None or self._demanded:
            return self._clock()
        if self.push:
            return self._started + self._fast if self._early else self._clock()
        now = self._clock()
        fast = any(now - sent < self._window for sent in waiting_since)
        return self._started + (self._fast if fast else self._idle)
