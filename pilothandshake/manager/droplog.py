"""The drop lines of SPEC 5 (one WARNING per dropped input, rate-limited; INFO for input
the operator asked to drop) and ``quote``, how every log line cites a value a peer sent."""

from __future__ import annotations

import logging
import time
from typing import Callable

from ..constants import DROP_LOG_PER_SECOND
from ..drops import Drop, DropKind
from ..logthrottle import LogThrottle

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
        self._throttle = LogThrottle(1.0, per_second, clock)

    def drop(
        self, node_id: int | None, remote: str, drop: Drop, level: int = logging.WARNING
    ) -> None:
        """Record one ``drop`` of input from ``node_id`` (None if not decoded) at ``remote``,
        logged at ``level`` (INFO for a drop the operator asked for, such as the deny list)
        with its detail, and counted by its kind."""
        self._count(drop.kind)
        held = self._throttle.admit()
        if held is None:
            return
        self._summarise(held)
        node = "?" if node_id is None else str(node_id)
        reason = drop.detail
        if len(reason) > _REASON_LIMIT:  # reasons may quote what the peer sent
            reason = f"{reason[:_REASON_LIMIT]}..."
        self._logger.log(level, "dropped message from node %s at %s: %s", node, remote, reason)

    def flush(self) -> None:
        """Log the count of suppressed lines now, if any."""
        self._summarise(self._throttle.take_held())

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
        self._logger = logger
        self._throttle = LogThrottle(interval, clock=clock)

    def error(self, line: str) -> None:
        """Log ``line`` at ERROR unless one was logged less than ``interval`` ago."""
        suppressed = self._throttle.admit()
        if suppressed is None:
            return
        if suppressed:
            line += f" ({suppressed} more failed writes were not logged)"
        self._logger.error("%s", line)
