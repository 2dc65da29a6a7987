"""BackgroundPool: best-effort bounded background work (SPEC 15)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pilothandshake.errors import RegistryError
from pilothandshake.pool import BackgroundPool

WAIT = 5.0


def test_submitted_tasks_run_with_their_arguments() -> None:
    pool = BackgroundPool(workers=2, queue=8)
    done: list[int] = []
    lock = threading.Lock()

    def add(value: int) -> None:
        with lock:
            done.append(value)

    for value in range(5):
        assert pool.submit(add, value)
    assert pool.drain(WAIT)
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert pool.shutdown(WAIT)


def test_full_queue_drops_the_task_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    pool = BackgroundPool(workers=1, queue=1)
    gate = threading.Event()
    running = threading.Event()

    def block() -> None:
        running.set()
        gate.wait(WAIT)

    assert pool.submit(block)
    assert running.wait(WAIT)
    assert pool.submit(block)  # queued
    with caplog.at_level(logging.WARNING):
        assert pool.submit(block) is False
    assert "queue full" in caplog.records[-1].getMessage()
    gate.set()
    assert pool.shutdown(WAIT)


def test_failing_task_is_logged_and_the_worker_survives(caplog: pytest.LogCaptureFixture) -> None:
    pool = BackgroundPool(workers=1, queue=8)
    ran = threading.Event()

    def boom() -> None:
        raise ValueError("boom")

    def quiet() -> None:
        raise RegistryError("request failed")

    with caplog.at_level(logging.DEBUG, logger="pilothandshake.pool"):
        pool.submit(boom)
        pool.submit(quiet, quiet=(RegistryError,))
        pool.submit(ran.set)
        assert ran.wait(WAIT)
        assert pool.drain(WAIT)
    levels = [(r.levelname, "boom" in (r.exc_text or "")) for r in caplog.records]
    assert ("WARNING", True) in levels
    assert [r.levelname for r in caplog.records if "quiet" in r.getMessage()] == ["DEBUG"]
    pool.shutdown(WAIT)


def test_shutdown_waits_with_a_bound_and_then_refuses_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = BackgroundPool(workers=1, queue=4)
    gate = threading.Event()
    pool.submit(gate.wait, WAIT)
    started = time.monotonic()
    assert pool.shutdown(0.05) is False
    assert time.monotonic() - started < 2
    with caplog.at_level(logging.WARNING):
        assert pool.submit(print) is False
    gate.set()
    assert pool.drain(WAIT)


def test_shutdown_of_an_unused_pool_returns_at_once() -> None:
    pool = BackgroundPool()
    started = time.monotonic()
    assert pool.shutdown(WAIT)
    assert pool.shutdown(WAIT)
    assert time.monotonic() - started < 1


def test_shutdown_keeps_one_deadline_for_draining_and_joining_and_a_second_call_waits_not() -> None:
    """Issue 16 item 5: with a hung task the drain used the whole timeout, then joining its
    worker used it again, and a second shutdown (Manager.close after stop) a third time."""
    pool = BackgroundPool(workers=2, queue=4)
    gate = threading.Event()
    try:
        pool.submit(gate.wait, 60)
        started = time.monotonic()
        assert pool.shutdown(1.0) is False
        assert pool.shutdown(1.0) is False  # still busy, and it does not wait again
        elapsed = time.monotonic() - started
        assert elapsed < 1.9, f"two shutdowns of 1 s took {elapsed:.2f} s"
    finally:
        gate.set()
