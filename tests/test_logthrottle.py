"""``LogThrottle``: the one rate limit of every log line a peer, a client or a failing disk
can provoke (drops, refused connections, failed accepts and writes, a webhook that is down)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
from fakeruntime import TickClock, in_threads

from pilothandshake.drops import Drop, DropKind
from pilothandshake.logthrottle import LogThrottle
from pilothandshake.manager.droplog import DropLog, ErrorLog
from pilothandshake.registry.ratelimit import RateLimitedLog


def test_lines_up_to_the_limit_get_through_and_the_rest_are_counted() -> None:
    clock = TickClock(100.0)
    throttle = LogThrottle(1.0, lines=3, clock=clock)
    assert [throttle.admit() for _ in range(5)] == [0, 0, 0, None, None]
    clock.now += 0.99
    assert throttle.admit() is None
    clock.now += 0.01  # one interval after the first line: a new one starts
    assert throttle.admit() == 3  # the three held back, reported with this line
    assert [throttle.admit() for _ in range(3)] == [0, 0, None]


def test_an_interval_starts_with_the_first_line_after_a_quiet_spell() -> None:
    clock = TickClock(100.0)
    throttle = LogThrottle(10.0, clock=clock)
    assert throttle.admit() == 0
    clock.now += 25.0
    assert throttle.admit() == 0
    clock.now += 9.0  # 9 s after the line above, though 34 s after the first
    assert throttle.admit() is None


def test_now_may_be_given_instead_of_read_from_the_clock() -> None:
    throttle = LogThrottle(1.0, clock=lambda: pytest.fail("the clock was read"))
    assert throttle.admit(5.0) == 0
    assert throttle.admit(5.5) is None
    assert throttle.admit(6.0) == 1


def test_take_held_reports_what_was_held_back_once_and_leaves_the_interval_alone() -> None:
    clock = TickClock(100.0)
    throttle = LogThrottle(1.0, lines=1, clock=clock)
    throttle.admit()
    throttle.admit()
    throttle.admit()
    assert throttle.take_held() == 2
    assert throttle.take_held() == 0
    assert throttle.admit() is None  # still the same interval
    clock.now += 1.0
    assert throttle.admit() == 1  # only the line held back after take_held


def test_threads_together_get_exactly_the_limit() -> None:
    throttle = LogThrottle(3600.0, lines=50)
    admitted: list[int | None] = []
    lock = threading.Lock()

    def ask() -> None:
        for _ in range(100):
            answer = throttle.admit()
            with lock:
                admitted.append(answer)

    in_threads(ask, 8, 30.0)
    assert len(admitted) == 800
    assert sum(a is not None for a in admitted) == 50
    assert throttle.take_held() == 750


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("test.logthrottle")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_the_drop_log_still_logs_after_a_flush(lines: Lines) -> None:
    """A flush (at stop) used to end the windows for good: after it only ten more drop
    lines were ever logged, however long the Manager ran on."""
    clock = TickClock(100.0)
    drops = DropLog(logging.getLogger("test.logthrottle"), per_second=2, clock=clock)
    for node in range(3):
        drops.drop(node, "127.0.0.1:1", Drop(DropKind.MALFORMED, "bad"))
    drops.flush()
    assert lines.lines[-1] == "1 more dropped messages were not logged"
    for second in range(5):
        clock.now += 1.0
        drops.drop(10 + second, "127.0.0.1:1", Drop(DropKind.MALFORMED, "bad"))
    assert lines.lines[-1] == "dropped message from node 14 at 127.0.0.1:1: bad"
    assert len(lines.lines) == 3 + 5


def test_the_error_log_appends_what_it_held_back(lines: Lines) -> None:
    clock = TickClock(100.0)
    errors = ErrorLog(60.0, logging.getLogger("test.logthrottle"), clock)
    for n in range(4):
        errors.error(f"write {n} failed")
    clock.now += 60.0
    errors.error("write 4 failed")
    assert lines.lines == [
        "write 0 failed",
        "write 4 failed (3 more failed writes were not logged)",
    ]


def test_the_registry_log_says_how_many_similar_lines_it_held_back(lines: Lines) -> None:
    limited = RateLimitedLog(logging.getLogger("test.logthrottle"), per_second=2)
    for n in range(5):
        limited.log(logging.INFO, 10.0, "refused %d", n)
    limited.log(logging.INFO, 11.0, "refused %d", 5)
    assert lines.lines == [
        "refused 0",
        "refused 1",
        "3 similar lines were not logged (rate limit)",
        "refused 5",
    ]
