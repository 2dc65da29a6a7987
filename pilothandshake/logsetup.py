"""Logging of ``pilot-handshaked``: to stderr, as text or as JSON lines (config ``log_format``).

Text lines are ``TIME LEVEL LOGGER: MESSAGE`` with TIME in ISO 8601 with the local offset
(``2026-11-26T01:18:53.911+01:00``); JSON lines are objects with ``time`` in UTC (the form
the events use). With JSON, every line the daemon writes is JSON: the start line and a start
failure (``announce``), and an exception no code caught in a thread (``configure_logging``
routes it through the log, at most ``UNCAUGHT_PER_MINUTE`` a minute).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any

__all__ = [
    "JsonLogFormatter",
    "TextLogFormatter",
    "ThreadExceptionLog",
    "announce",
    "configure_logging",
]

UNCAUGHT_PER_MINUTE = 10


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (``time``, ``level``, ``logger``, ``message``), for log
    shippers; a traceback goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        stamp = datetime.fromtimestamp(record.created, timezone.utc)
        entry: dict[str, Any] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextLogFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, TIME in ISO 8601 with the local UTC offset, so a line
    read on another machine (or after a time zone change) still tells when it happened."""

    def __init__(self) -> None:
        """The line format above."""
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``record``'s time as ``2026-11-26T01:18:53.911+01:00`` (local time)."""
        local = datetime.fromtimestamp(record.created, timezone.utc).astimezone()
        return local.isoformat(timespec="milliseconds")


def _formatter(log_format: str) -> logging.Formatter:
    return JsonLogFormatter() if log_format == "json" else TextLogFormatter()


def configure_logging(level: str, log_format: str) -> None:
    """Log to stderr at ``level`` as text or JSON lines. An exception that escapes a thread
    is logged at ERROR through the same handler (not printed raw by ``threading``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format))
    # Neither format shows the thread; without this, the first line logged by a port-444
    # handler thread (a raw ``_thread``, see ``server``) would register a dummy Thread object.
    logging.logThreads = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    threading.excepthook = ThreadExceptionLog()


class ThreadExceptionLog:
    """A ``threading.excepthook`` that logs an exception ending a thread as one ERROR with
    its traceback, in the configured format, at most ``per_minute`` a minute; the ones over
    the limit are counted and the next line logged says how many were not shown."""

    def __init__(self, per_minute: int = UNCAUGHT_PER_MINUTE) -> None:
        self._per_minute = per_minute
        self._lock = threading.Lock()
        self._window = -60.0
        self._logged = 0
        self._hidden = 0

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        """Log ``args`` (the default hook ignores ``SystemExit``; so does this one)."""
        if args.exc_type is SystemExit:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._window >= 60.0:
                self._window, self._logged = now, 0
            if self._logged >= self._per_minute:
                self._hidden += 1
                return
            self._logged += 1
            hidden, self._hidden = self._hidden, 0
        name = args.thread.name if args.thread is not None else "?"
        more = f" ({hidden} more not shown)" if hidden else ""
        log = logging.getLogger(__name__)
        if args.exc_value is None:
            log.error("unhandled %s in thread %s%s", args.exc_type.__name__, name, more)
            return
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        log.error("unhandled exception in thread %s%s", name, more, exc_info=exc_info)


def announce(
    logger: str, message: str, log_format: str, stream: IO[str], level: int = logging.INFO
) -> None:
    """Print ``message`` on ``stream`` as the program's own line (the start line on stdout,
    a start failure on stderr): as written with the text format, as a JSON log line (from
    ``logger`` at ``level``) with the JSON format, so a log shipper reads every line."""
    if log_format == "json":
        record = logging.LogRecord(logger, level, "", 0, message, None, None)
        message = JsonLogFormatter().format(record)
    print(message, file=stream, flush=True)
