"""Logging of pilot-handshaked: an exception that ends a thread is logged in the configured
format, once, and at a bounded rate."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from pilothandshake.logsetup import ThreadExceptionLog, configure_logging


@pytest.fixture
def restored() -> Iterator[None]:
    """The root logger and the thread hook as they were, after the test."""
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, threading.excepthook
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        threading.excepthook = hook


def logging_to_buffer(monkeypatch: pytest.MonkeyPatch, log_format: str) -> io.StringIO:
    """configure_logging() with stderr a buffer (patched in the test itself: pytest puts its
    own capture back on sys.stderr between a fixture's setup and the test)."""
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    configure_logging("info", log_format)
    return buffer


def crash(times: int = 1) -> None:
    def boom() -> None:
        raise ValueError("boom")

    for _ in range(times):
        thread = threading.Thread(target=boom, name="registry-loop")
        thread.start()
        thread.join()


def test_an_exception_ending_a_thread_is_one_json_line_in_the_configured_format(
    restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 20.1: the traceback of the dead registry loop went to stderr past the log format.
    stderr = logging_to_buffer(monkeypatch, "json")
    crash()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "error"
    assert entry["message"] == "unhandled exception in thread registry-loop"
    assert "ValueError: boom" in entry["exception"]


def test_uncaught_exceptions_are_rate_limited_and_the_hidden_ones_counted(
    restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = logging_to_buffer(monkeypatch, "text")
    crash(25)
    text = stderr.getvalue()
    assert text.count("unhandled exception in thread registry-loop") == 10
    hook = threading.excepthook
    assert isinstance(hook, ThreadExceptionLog)
    monkeypatch.setattr(hook, "_window", hook._window - 60.0)  # a minute later
    crash()
    assert "unhandled exception in thread registry-loop (15 more not shown)" in stderr.getvalue()
