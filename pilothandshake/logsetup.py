"""Logging of ``pilot-handshaked``: to stderr, as text or as JSON lines (config ``log_format``).

An exception that escapes a thread is logged through the same logging (``threading.excepthook``)
instead of as a raw traceback on stderr, at most ``UNCAUGHT_PER_MINUTE`` a minute.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

__all__ = ["JsonLogFormatter", "ThreadExceptionLog", "configure_logging"]

UNCAUGHT_PER_MINUTE = 10


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (``time``, ``level``, ``logger``, ``message``), for log
    shippers; a traceback goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Log to stderr at ``level`` as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Neither format shows the thread; without this, the first line logged by a port-444
    # handler thread (a raw ``_thread``, see ``server``) would register a dummy Thread object.
    logging.logThreads = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
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
        if args.exc_type is SystemExit or args.exc_value is None:
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
        logging.getLogger("pilothandshake").error(
            "uncaught exception in thread %s%s",
            name,
            more,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )
