"""``RegistryLoop``'s polls against a fake registry: relayed requests and answers reaching the
Manager, malformed items, the per-poll bound, the idle and fast schedule, on-demand
refresh, held polls with a registry that pushes (SPEC 11)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

import pytest
from looptools import FakeRegistry, Target, relay_warnings

from pilothandshake.errors import RegistryError
from pilothandshake.identity import Identity, decode_signature, verify
from pilothandshake.pollschedule import ON_DEMAND_BOUND
from pilothandshake.registry_loop import MAX_RELAY_ITEMS_PER_POLL, RegistryLoop
from pilothandshake.store import OutgoingRequest


def test_polled_requests_and_responses_reach_the_manager(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    registry.requests = [
        {"from_node_id": 9, "justification": "sync", "timestamp": 1, "public_key": "KEY"},
        {"from_node_id": 10, "justification": "no key", "timestamp": 1},
    ]
    registry.responses = [
        {"from_node_id": 11, "accept": True, "timestamp": 1},
        {"from_node_id": 12, "accept": False, "timestamp": 1},
    ]
    loop = make_loop()
    loop.start()
    assert target.wait_count(4)
    assert target.seen == [
        ("approval", 11),
        ("rejection", 12),
        ("request", 9, "sync", "KEY"),
        ("request", 10, "no key", ""),
    ]


def test_malformed_relay_entries_are_dropped_and_the_rest_delivered(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    registry.requests = [
        "junk",
        {"from_node_id": True, "justification": "bool id"},
        {"from_node_id": 2**32, "justification": "too big"},
        {"from_node_id": 666, "justification": "manager raises"},
        {"from_node_id": 3, "justification": 5},
    ]
    registry.responses = [{"from_node_id": 4, "accept": "yes"}, {"from_node_id": 4, "accept": True}]
    loop = make_loop()
    loop.start()
    assert target.wait_count(2)
    assert target.seen == [("approval", 4), ("request", 3, "", "")]
    # The loop survived the bad entries and keeps polling.
    polls = registry.count("poll")
    assert registry.wait_for(lambda: registry.count("poll") > polls + 2)


def test_a_flood_of_malformed_items_is_one_warning_line_not_one_per_item(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pilothandshake.registry_loop")
    registry.requests = ["junk"] * 50_000 + [{"from_node_id": "x" * 10_000}]
    registry.responses = [{"from_node_id": 4, "accept": "yes"}] * 50_000
    loop = make_loop()
    loop.start()
    assert registry.wait_for(lambda: registry.count("poll") >= 3)
    loop.stop()
    (line,) = relay_warnings(caplog)
    assert "dropped 256 malformed items" in line
    assert "99745 past the limit of 256 per poll" in line
    assert len(line) < 400  # the example is quoted to about 100 characters


def test_at_most_the_bound_of_items_is_processed_per_poll(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    registry.requests = [{"from_node_id": n, "justification": ""} for n in range(1, 1001)]
    registry.responses = [{"from_node_id": 5000, "accept": True}]
    loop = make_loop()
    loop.start()
    assert registry.wait_for(lambda: registry.count("poll") >= 3)
    loop.stop()
    assert len(target.seen) == MAX_RELAY_ITEMS_PER_POLL
    assert target.seen[0] == ("approval", 5000)  # responses are not crowded out by requests


def test_an_idle_node_polls_once_per_idle_period_and_fast_while_a_request_waits(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    # Issue 18.1: every node polled every 2 s whether or not it expected anything.
    loop = make_loop(poll_interval=0.05, poll_idle=60.0)
    loop.start()
    assert registry.wait_for(lambda: registry.count("poll") >= 1)
    time.sleep(0.5)
    assert registry.count("poll") == 1  # idle: the next one is a minute away
    with target.cond:
        target.outgoing = [OutgoingRequest(9, datetime.now(timezone.utc))]
    polls = registry.count("poll")
    assert registry.wait_for(lambda: registry.count("poll") >= polls + 5)  # the fast window
    with target.cond:
        target.outgoing = []  # answered
    time.sleep(0.2)
    polls = registry.count("poll")
    time.sleep(0.5)
    assert registry.count("poll") == polls


def test_refresh_polls_once_for_an_operator_and_at_most_once_per_two_seconds(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    loop = make_loop(poll_interval=0.05, poll_idle=60.0)
    loop.start()
    assert registry.wait_for(lambda: registry.count("poll") >= 1)
    time.sleep(2.1)  # the start-up poll is older than the 2 s spacing
    registry.requests = [{"from_node_id": 9, "justification": "now"}]
    loop.refresh()
    # The poll ran, and what it brought reached the Manager, before refresh returned.
    assert registry.count("poll") == 2
    assert target.seen == [("request", 9, "now", "")]
    loop.refresh()  # the view is fresh: no poll
    assert registry.count("poll") == 2


class HoldingRegistry(FakeRegistry):
    """A registry that advertises wait_poll and holds a poll until something arrives, its
    wait ends, or it is closed (as pilot-registryd does); ``hold=False`` answers at once
    although it advertises the feature (a registry that does not really hold)."""

    def __init__(self, hold: bool = True) -> None:
        super().__init__()
        self.features = ["wait_poll"]
        self.hold = hold
        self.waits: list[float] = []
        self.closed = False
        self.refuse_holds = False

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def push(self, item: dict[str, Any]) -> None:
        with self.cond:
            self.requests.append(item)
            self.cond.notify_all()

    def poll_handshakes(self, node_id: int, wait: float = 0.0) -> dict[str, Any]:
        with self.cond:
            self.waits.append(wait)
            if wait and self.refuse_holds:
                raise RegistryError("request failed")  # pilot-registryd at max_held_polls
            if self.hold:
                self.cond.wait_for(lambda: bool(self.requests) or self.closed, wait)
            if self.closed:
                raise RegistryError("registry client is closed")
        return super().poll_handshakes(node_id, wait)


def test_with_push_one_poll_is_held_open_and_relayed_input_arrives_at_once(
    target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    # Issue 18.2: relay latency was the poll interval's, not the network's.
    registry = HoldingRegistry()
    loop = RegistryLoop(
        registry,
        Identity.generate(),
        target,
        listen_addr="127.0.0.1:4444",
        poll_interval=5.0,  # neither the fast nor the idle period matters with push
        poll_idle=60.0,
        heartbeat_interval=60.0,
    )
    loop.start()
    try:
        assert registry.wait_for(lambda: len(registry.waits) >= 1)
        assert registry.waits == [55.0] and loop.state()["relay"] == "push"
        for n in (1, 2, 3):
            registry.push({"from_node_id": 10 + n, "justification": "pushed"})
            assert target.wait_count(n)  # long before any poll period
        assert registry.wait_for(lambda: len(registry.waits) >= 4)
        assert registry.waits == [55.0] * 4  # one held poll per arrival, one open again
        asked = time.monotonic()
        loop.refresh()  # nothing to ask for: the held poll delivers at once
        assert time.monotonic() - asked < ON_DEMAND_BOUND  # it did not wait for the poll
        assert len(registry.waits) == 4
        began = time.monotonic()
    finally:
        loop.stop()
    assert time.monotonic() - began < 1.0  # stop ends the held poll, not its 55 s wait


def test_a_registry_that_advertises_push_but_answers_at_once_is_not_polled_in_a_spin(
    target: Target,
) -> None:
    registry = HoldingRegistry(hold=False)
    loop = RegistryLoop(
        registry,
        Identity.generate(),
        target,
        listen_addr="127.0.0.1:4444",
        poll_interval=0.2,
        poll_idle=60.0,
        heartbeat_interval=60.0,
    )
    loop.start()
    try:
        time.sleep(1.0)
    finally:
        loop.stop()
    assert 3 <= registry.count("poll") <= 7  # one per poll_interval, not thousands


def test_after_an_outage_relayed_requests_still_waiting_are_sent_once_more(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    # Issue 20.3: a relayed request acknowledged as relayed was lost when the registry
    # restarted before the peer polled (its inboxes lived in memory).
    identity = Identity.generate()
    loop = RegistryLoop(
        registry,
        identity,
        target,
        listen_addr="127.0.0.1:4444",
        poll_interval=0.02,
        poll_idle=0.02,
        heartbeat_interval=60.0,
    )
    loop.start()
    try:
        assert registry.wait_for(lambda: registry.count("poll") >= 1)
        now = datetime.now(timezone.utc)
        with target.cond:
            target.outgoing = [OutgoingRequest(9, now), OutgoingRequest(11, now)]
        loop.relayed(9, "nightly sync")
        loop.relayed(10, "answered meanwhile")  # no longer waiting: not sent again
        loop.relayed(11, "direct, then relayed")
        polls = registry.count("poll")
        registry.down = True
        assert registry.wait_for(lambda: registry.count("poll") >= polls + 2)
        assert not loop.state()["reachable"]
        registry.down = False
        assert registry.wait_for(lambda: len(registry.relayed) >= 2)
        time.sleep(0.3)  # more rounds: each request is sent again once, not every round
    finally:
        loop.stop()
    assert sorted(r[:3] for r in registry.relayed) == [
        (5, 9, "nightly sync"),
        (5, 11, "direct, then relayed"),
    ]
    signature = decode_signature(registry.relayed[0][3])
    assert signature is not None
    assert verify(identity.public_key, f"handshake:5:{registry.relayed[0][1]}".encode(), signature)


def test_a_relayed_rejection_carries_its_reason_to_the_manager(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    # SPEC 17: pilot-registryd passes respond_handshake's reason on; the production
    # registry drops it (then it is ""). A hostile registry's reason is cut short.
    registry.responses = [
        {"from_node_id": 11, "accept": False, "timestamp": 1, "reason": "not today"},
        {"from_node_id": 12, "accept": False, "timestamp": 1, "reason": 5},
        {"from_node_id": 13, "accept": False, "timestamp": 1, "reason": "x" * 100_000},
    ]
    make_loop().start()
    assert target.wait_count(3)
    assert target.seen[:2] == [("rejection", 11, "not today"), ("rejection", 12)]
    assert target.seen[2][2] == "x" * 4096


def test_an_answered_request_no_longer_holds_the_fast_window_open(
    registry: FakeRegistry, target: Target, make_loop: Callable[..., RegistryLoop]
) -> None:
    loop = make_loop(poll_interval=0.05, poll_idle=60.0)
    with target.cond:
        now = datetime.now(timezone.utc)
        target.outgoing = [OutgoingRequest(9, now, state="rejected", ended_at=now)]
    loop.start()
    assert registry.wait_for(lambda: registry.count("poll") >= 1)
    time.sleep(0.5)
    assert registry.count("poll") == 1  # the outgoing request ended: idle


def test_a_refused_held_poll_is_followed_by_a_plain_one(target: Target) -> None:
    # pilot-registryd refuses held polls beyond limits.max_held_polls: the inbox must
    # still be drained.
    registry = HoldingRegistry()
    registry.refuse_holds = True
    registry.push({"from_node_id": 21, "justification": "at the cap"})
    loop = RegistryLoop(
        registry,
        Identity.generate(),
        target,
        listen_addr="127.0.0.1:4444",
        poll_interval=0.05,
        poll_idle=60.0,
        heartbeat_interval=60.0,
    )
    loop.start()
    try:
        assert target.wait_count(1)
    finally:
        loop.stop()
    assert target.seen == [("request", 21, "at the cap", "")]
    assert registry.waits[:2] == [55.0, 0.0]
