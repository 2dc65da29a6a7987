"""What the Manager's message tests share: our node ID, a peer's address, a time, and
``assert_dropped``."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
from fakeruntime import settle, snapshot

from pilothandshake.manager import Manager
from pilothandshake.testing import MemoryRuntime
from pilothandshake.wire import peer_text

OWN = 1
REMOTE = ("127.0.0.1", 40000)
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def assert_dropped(
    manager: Manager,
    runtime: MemoryRuntime,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    reason: str,
    remote: tuple[str, int] = REMOTE,
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
    assert peer_text(remote) in line and reason in line
    assert [r.levelno for r in loud] == ([level] if level >= logging.WARNING else [])
