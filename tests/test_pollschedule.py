"""PollSchedule (SPEC 18): when the relay is polled, driven by a fake clock; no threads."""

from __future__ import annotations

import pytest
from fakeruntime import TickClock

from pilothandshake.pollschedule import PollSchedule, backoff


@pytest.fixture
def clock() -> TickClock:
    return TickClock(1000.0)


def schedule(clock: TickClock, **options: float) -> PollSchedule:
    return PollSchedule(clock, fast=2.0, idle=60.0, jitter=lambda: 0.0, **options)


def poll(
    s: PollSchedule, clock: TickClock, ok: bool = True, items: int = 0, took: float = 0.0
) -> None:
    s.started()
    clock.now += took
    s.finished(ok, items)


def test_the_first_poll_is_at_once_then_one_per_idle_period(clock: TickClock) -> None:
    s = schedule(clock)
    assert s.next_poll() == clock.now
    poll(s, clock)
    assert s.next_poll() == clock.now + 60.0  # Go's keep-alive, not every 2 s
    clock.now += 59.9
    assert s.next_poll() > clock.now


def test_a_waiting_request_opens_a_fast_window_of_two_minutes(clock: TickClock) -> None:
    s = schedule(clock)
    poll(s, clock)
    clock.now += 10.0
    sent = clock.now
    assert s.next_poll([sent]) == sent - 8.0  # 2 s after the last poll: overdue, poll now
    polls = 0
    while clock.now - sent < 200.0 and polls < 1000:
        due = s.next_poll([sent])
        clock.now = max(clock.now, due)
        poll(s, clock)
        polls += 1
        if due - sent > 120.0:
            break
    # Every 2 s for 2 minutes, then back to the idle period although it still waits.
    assert 59 <= polls <= 62
    assert s.next_poll([sent]) == clock.now + 60.0


def test_the_fast_window_ends_early_when_the_request_is_answered(clock: TickClock) -> None:
    s = schedule(clock)
    poll(s, clock)
    sent = clock.now
    assert s.next_poll([sent]) == clock.now + 2.0
    poll(s, clock)
    assert s.next_poll([]) == clock.now + 60.0  # answered: no longer waiting


def test_on_demand_polls_at_once_but_at_most_once_per_two_seconds(clock: TickClock) -> None:
    s = schedule(clock)
    poll(s, clock)
    clock.now += 1.0
    assert not s.demand()  # a poll started 1 s ago: the view is fresh
    clock.now += 1.0
    assert s.demand()
    assert s.next_poll() == clock.now
    poll(s, clock)
    assert s.next_poll() == clock.now + 60.0  # the demand was served
    assert not s.demand()


def test_failures_back_off_doubling_to_the_cap_and_demand_waits_for_them(clock: TickClock) -> None:
    s = schedule(clock, cap=30.0)
    poll(s, clock)
    gaps = []
    for _ in range(7):
        clock.now = max(clock.now, s.next_poll())
        began = clock.now
        poll(s, clock, ok=False)
        gaps.append(s.next_poll() - began)
    assert gaps == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]  # half of 2, 4, ... 30 (jitter 0)
    assert not s.demand()  # the registry fails: an operator does not wait for it
    clock.now = s.next_poll()
    poll(s, clock)
    assert s.next_poll() == clock.now + 60.0


def test_with_push_the_next_held_poll_opens_at_once_but_an_early_empty_one_never_spins(
    clock: TickClock,
) -> None:
    s = schedule(clock)
    s.push = True
    poll(s, clock, took=55.0)  # held to the end of its wait
    assert s.next_poll() == clock.now
    poll(s, clock, items=1, took=0.3)  # answered early because something arrived
    assert s.next_poll() == clock.now
    began = clock.now
    poll(s, clock, took=0.01)  # empty and early: a registry that does not hold polls
    assert s.next_poll() == began + 2.0
    assert not s.demand()  # the held poll delivers at once: nothing to ask for
    assert s.next_poll([clock.now]) == began + 2.0  # nor a fast window


def test_backoff_never_overflows_and_is_jittered_between_half_and_all() -> None:
    assert backoff(10**9, 2.0, 30.0, lambda: 0.0) == 15.0
    assert backoff(1, 2.0, 30.0, lambda: 0.5) == 1.5
