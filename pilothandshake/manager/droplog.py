"""The drop lines of SPEC 5 (one WARNING per dropped input, rate-limited; INFO for input
the operator asked to drop) and ``quote``, how every log line cites a value a peer sent."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from ..constants import DROP_LOG_PER_SECOND
from ..drops import Drop, DropKind

__all__ = ["DropLog", "ErrorLog", "quote"]

log = logging.getLogger(__name__)

# How many characters of a peer-supplied value a log line quotes, and of a drop reason.
_QUOTE_LIMIT = 100
_REASON_LIMIT = 2 * _QUOTE_LIMIT


def quote(value: str | int) -> str:
    """A peer-supplied value for a log line: escaped (``repr``: no forged line breaks) and cut
    to about 100 characters, saying how long it was."""
    if isinstance(value, int):
        if value.bit_length() > 4 * _QUOTE_LIMIT:  # str() of it would be long (or refused)
            return f"<an integer of {value.bit_length()} bits>"
        return str(value)
    text = repr(value)
    if len(text) <= _QUOTE_LIMIT:
        return text
    return f"{text[:_QUOTE_LIMIT]}... ({len(value)} characters)"


class DropLog:
    """One WARNING line per dropped input, at most ``per_second`` a second (SPEC 5).

    Lines over the limit are counted; the count is logged once the second is over (with the
    next drop, or at ``flush``), so a flood cannot fill the disk.
    """

    def __init__(
        self,
        logger: logging.Logger = log,
        per_second: int = DROP_LOG_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        count: Callable[[DropKind], None] = lambda kind: None,
    ) -> None:
        """Log to ``logger``, ``per_second`` lines a second by ``clock``; ``count`` sees the
        kind of every drop, logged or not (the drop metric)."""
        self._logger = logger
        self._count = count
        self._per_second = per_second
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = -math.inf
        self._lines = 0
        self._suppressed = 0

    def drop(
        self, node_id: int | None, remote: str, drop: Drop, level: int = logging.WARNING
    ) -> None:
        """Record one ``drop`` of input from ``node_id`` (None if not decoded) at ``remote``,
        logged at ``level`` (INFO for a drop the operator asked for, such as the deny list)
        with its detail, and counted by its kind."""
        self._count(drop.kind)
        with self._lock:
            summary = self._roll(self._clock())
            emit = self._lines < self._per_second
            if emit:
                self._lines += 1
            else:
                self._suppressed += 1
        self._summarise(summary)
        if emit:
            node = "?" if node_id is None else str(node_id)
            reason = drop.detail
            if len(reason) > _REASON_LIMIT:  # reasons may quote what the peer sent
                reason = f"{reason[:_REASON_LIMIT]}..."
            self._logger.log(level, "dropped message from node %s at %s: %s", node, remote, reason)

    def flush(self) -> None:
        """Log the count of suppressed lines now, if any."""
        with self._lock:
            summary = self._roll(math.inf)
        self._summarise(summary)

    def _roll(self, now: float) -> int:
        if now - self._window_start < 1.0:
            return 0
        suppressed = self._suppressed
        self._window_start = now
        self._lines = 0
        self._suppressed = 0
        return suppressed

    def _summarise(self, suppressed: int) -> None:
        if suppressed:
            self._logger.warning("%d more dropped messages were not logged", suppressed)


class ErrorLog:
    """ERROR lines at most one per ``interval`` seconds by ``clock``; the count of the lines
    held back comes with the next one logged."""

    def __init__(
        self,
        interval: float,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """One line per ``interval`` to ``logger``."""
        self._interval = interval
        self._logger = logger
        self._clock = clock
        self._lock = threading.Lock()
        self._last = -math.inf
        self._suppressed = 0

    def error(self, line: str) -> None:
        """Log ``line`` at ERROR unless one was logged less than ``interval`` ago."""
        now = self._clock()
        with self._lock:
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            self._last = now
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            line += f" ({suppressed} more failed writes were not logged)"
        self._logger.error("%s", line)
