"""What the Manager's message tests share: our node ID, a peer's address, a time, and
``assert_dropped``."""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timezone

import pytest
from fakeruntime import settle, snapshot

from pilothandshake.manager import Manager
from pilothandshake.testing import MemoryRuntime

OWN = 1
REMOTE = "127.0.0.1:40000"
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def assert_dropped(
    manager: Manager,
    runtime: MemoryRuntime,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    reason: str,
    remote: str = REMOTE,
    level: int = logging.WARNING,
) -> None:
    """Processing ``data`` changes nothing, publishes nothing and logs exactly one line at
    ``level`` (and none above INFO besides) naming the remote address and ``reason``."""
    before = snapshot(manager)
    events = list(runtime.events)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        manager.process_message(data, remote)
    settle(manager)
    assert snapshot(manager) == before
    assert runtime.events == events
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    (line,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert remote in line and reason in line
    assert [r.levelno for r in loud] == ([level] if level >= logging.WARNING else [])


def respell(b64: str) -> str:
    """Another base64 spelling of the same bytes (non-zero unused bits before the padding)."""
    stripped = b64.rstrip("=")
    last = stripped[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    respelled = stripped[:-1] + alphabet[alphabet.index(last) + 1] + b64[len(stripped) :]
    assert respelled != b64 and base64.b64decode(respelled) == base64.b64decode(b64)
    return respelled
