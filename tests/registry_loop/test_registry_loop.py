"""``RegistryLoop``'s upkeep thread against a fake registry: registration, heartbeats,
backoff through outages, hostnames, and the watch on our own record (SPEC 11, 17). Polls
and relayed input are in ``test_registry_loop_polls``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pytest
from looptools import WAIT, FakeRegistry, relay_warnings

from pilothandshake.pollschedule import backoff
from pilothandshake.registry_loop import RegistryLoop


def test_register_once_assigns_node_id_and_reports_it(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    assigned: list[int] = []
    loop = make_loop(on_node_id=assigned.append)
    assert loop.node_id == 0
    assert loop.register_once()
    assert loop.node_id == 5
    assert assigned == [5]
    assert loop.state()["reachable"] is True


def test_register_failure_leaves_node_id_zero_and_unreachable(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    registry.down = True
    loop = make_loop()
    assert not loop.register_once()
    assert loop.node_id == 0
    state = loop.state()
    assert state["reachable"] is False and "connection refused" in state["error"]


def test_public_node_sets_visibility_after_registering(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    make_loop(public=True).register_once()
    assert registry.count("set_visibility") == 1
    make_loop(public=False).register_once()
    assert registry.count("set_visibility") == 1


def test_loop_registers_when_start_happened_while_registry_down(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    registry.down = True
    loop = make_loop()
    assert not loop.register_once()
    loop.start()
    assert registry.wait_for(lambda: registry.count("register") >= 3)
    registry.down = False
    deadline = time.monotonic() + WAIT
    while loop.node_id == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.node_id == 5
    assert registry.wait_for(lambda: registry.count("poll") >= 1)


def test_failures_back_off_exponentially_up_to_the_maximum(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    registry.down = True
    loop = make_loop(poll_interval=0.01, max_backoff=0.08)
    loop.start()
    assert registry.wait_for(lambda: len(registry.calls) >= 8)
    loop.stop()
    times = [t for _, t in registry.calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] < gaps[3]  # 0.01, 0.02, 0.04, 0.08: growing
    assert max(gaps) < 0.5  # capped at max_backoff (plus scheduling noise)


def test_three_failed_heartbeats_lead_to_registering_again(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    loop = make_loop(poll_interval=0.01, max_backoff=0.02)
    assert loop.register_once()
    registry.down = True
    loop.start()
    assert registry.wait_for(lambda: registry.count("heartbeat") >= 3)
    assert registry.wait_for(lambda: registry.count("register") >= 2)
    names = [n for n, _ in registry.calls]
    first_reregister = names.index("register", 1)
    assert names[:first_reregister].count("heartbeat") >= 3
    registry.down = False
    assert registry.wait_for(lambda: registry.count("poll") >= names.count("poll") + 2)
    assert loop.state()["reachable"] is True


def test_heartbeat_is_sent_every_interval_while_healthy(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    loop = make_loop(poll_interval=0.01, heartbeat_interval=0.1)
    loop.register_once()
    loop.start()
    assert registry.wait_for(lambda: registry.count("heartbeat") >= 2)
    assert registry.count("register") == 1


def test_stop_wakes_a_sleeping_loop_promptly(
    registry: FakeRegistry, make_loop: Callable[..., RegistryLoop]
) -> None:
    loop = make_loop(poll_interval=30.0)
    loop.register_once()
    loop.start()
    assert registry.wait_for(lambda: registry.count("poll") >= 1)
    started = time.monotonic()
    loop.stop()
    assert time.monotonic() - started < 1.0
    loop.stop()  # idempotent


def test_hostname_is_asked_at_registration_and_a_refusal_is_an_error_in_state(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked: list[str] = []

    def register(
        listen_addr: str, public_key_b64: str, owner: str = "", hostname: str = ""
    ) -> dict[str, Any]:
        asked.append(hostname)
        answer: dict[str, Any] = {"type": "register_ok", "node_id": 5}
        if hostname != "taken":
            answer["hostname"] = hostname
        return answer

    registry.register = register  # type: ignore[method-assign]
    loop = make_loop(hostname="build-1")
    assert loop.register_once()
    assert asked == ["build-1"]
    assert loop.state()["hostname_error"] == ""
    caplog.set_level(logging.ERROR, logger="pilothandshake.registry_loop")
    refused = make_loop(hostname="taken")
    assert refused.register_once()  # registered all the same
    assert refused.node_id == 5
    assert "taken by another node" in refused.state()["hostname_error"]
    assert any("hostname 'taken'" in r.getMessage() for r in caplog.records)


def test_a_registry_not_up_yet_at_start_is_info_then_one_warning_per_outage(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A fleet started at once (or a README block pasted whole) starts daemons before the
    # registry listens: no WARNING during the start grace, one once the grace is over.
    caplog.set_level(logging.INFO, logger="pilothandshake.registry_loop")
    registry.down = True
    waiting = make_loop(start_grace=60.0)
    for _ in range(3):
        assert not waiting.register_once()
    assert relay_warnings(caplog) == []
    said = f"registry {registry.address} not reachable yet (register failed: connection refused)"
    assert [r.getMessage() for r in caplog.records].count(f"{said}; retrying") == 1
    late = make_loop(start_grace=0.0)
    for _ in range(3):
        assert not late.register_once()
    assert relay_warnings(caplog) == [
        f"registry {registry.address}: register failed: connection refused"
    ]
    registry.down = False
    assert late.register_once()
    registry.down = True
    assert not late.register_once()  # registered once: a new outage warns again, no grace
    assert len(relay_warnings(caplog)) == 2


def test_backoff_doubles_to_the_cap_with_jitter_and_never_overflows() -> None:
    low, high = (lambda: 0.0), (lambda: 0.999999)
    assert backoff(1, 2.0, 30.0, low) == 1.0  # half of the base at the least
    assert backoff(1, 2.0, 30.0, high) == pytest.approx(2.0)
    assert backoff(3, 2.0, 30.0, high) == pytest.approx(8.0)
    assert backoff(5, 2.0, 30.0, high) == pytest.approx(30.0)  # capped
    # An outage of any length: 2 ** failures overflowed a float after 1,024 failures.
    assert backoff(10**9, 2.0, 30.0, low) == 15.0
    spread = {round(backoff(6, 2.0, 30.0), 3) for _ in range(50)}
    assert len(spread) > 10 and all(15.0 <= d < 30.0 for d in spread)


def test_an_outage_longer_than_a_heartbeat_neither_spins_nor_ends_the_loop(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 20.1: failed heartbeats never moved the next-heartbeat time, so once it had
    # passed the loop waited 0 s: a thousand rounds (and WARNINGs) in a quarter second,
    # until 2 ** failures overflowed and the thread died.
    caplog.set_level(logging.WARNING, logger="pilothandshake.registry_loop")
    loop = make_loop(poll_interval=0.01, heartbeat_interval=0.05, max_backoff=0.1)
    assert loop.register_once()
    registry.down = True
    loop.start()
    time.sleep(1.0)
    calls = len(registry.calls)
    assert calls < 100, f"{calls} registry calls in 1 s of outage: the loop spins"
    assert len(relay_warnings(caplog)) <= 2  # the outage, and registering again
    registry.down = False
    polls = registry.count("poll")
    assert registry.wait_for(lambda: registry.count("poll") >= polls + 2)
    assert loop.state()["reachable"] is True
    assert loop.state()["loop"] == "running"


class Fatal(BaseException):
    """What no round guard catches (as KeyboardInterrupt or SystemExit would not be)."""


def test_a_loop_that_ends_anyway_is_an_error_and_shows_in_state(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def register(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise Fatal("out of everything")

    registry.register = register  # type: ignore[method-assign]
    loop = make_loop()
    caplog.set_level(logging.ERROR, logger="pilothandshake.registry_loop")
    previous = threading.excepthook
    threading.excepthook = lambda args: None  # the daemon logs it (tests/test_logsetup.py)
    try:
        loop.start()
        deadline = time.monotonic() + WAIT
        while loop.state()["loop"] == "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.stop()  # joins the thread: it has logged and called the hook
    finally:
        threading.excepthook = previous
    assert loop.state()["loop"] == "stopped: registry-loop ended by an unexpected exception"
    assert any("no longer heartbeats or polls" in r.getMessage() for r in caplog.records)


class Events:
    """Records what the loop publishes."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        with self.cond:
            self.seen.append((topic, payload))
            self.cond.notify_all()

    def wait_count(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.seen) >= count, WAIT)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pilothandshake.registry_loop" and r.levelno == logging.ERROR
    ]


@pytest.mark.parametrize("features", [[], ["wait_poll"]], ids=["production", "pilot-registryd"])
def test_the_node_watches_its_own_record_and_reasserts_it_where_that_is_honoured(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
    features: list[str],
) -> None:
    # Issue 15.1: an unsigned register of A's key renamed A and moved its address; A
    # never noticed.
    caplog.set_level(logging.INFO, logger="pilothandshake.registry_loop")
    registry.features = features
    events = Events()
    loop = make_loop(
        public=True, hostname="build-1", heartbeat_interval=0.2, publish=events.publish
    )
    assert loop.register_once()
    loop.start()
    assert registry.wait_for(lambda: registry.count("lookup") >= 2)
    assert events.seen == [] and errors(caplog) == []  # the record is as registered
    with registry.cond:
        registry.record.update(hostname="evil", real_addr="127.0.0.9:1")
    assert events.wait_count(1)
    topic, payload = events.seen[0]
    assert topic == "registry.binding_changed"
    assert payload == {
        "node_id": 5,
        "moved": {
            "hostname": {"expected": "build-1", "found": "evil"},
            "address": {"expected": "127.0.0.1:4444", "found": "127.0.0.9:1"},
        },
    }
    [error] = errors(caplog)
    assert "hostname 'build-1' -> 'evil', address '127.0.0.1:4444' -> '127.0.0.9:1'" in error
    if features:
        # The signed register told the registry the record again: the next check finds it.
        assert registry.wait_for(lambda: len(registry.registered) >= 2)
        assert registry.registered[-1] == {"listen_addr": "127.0.0.1:4444", "hostname": "build-1"}
        deadline = time.monotonic() + WAIT
        while "as registered again" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "holds node 5's record as registered again" in caplog.text
    else:
        # The production registry takes unsigned registers from anyone: re-registering
        # would start a tug of war (and an ID re-bound through `owner` would give this key
        # a new ID). The ERROR and the event tell the operator.
        lookups = registry.count("lookup")
        assert registry.wait_for(lambda: registry.count("lookup") >= lookups + 2)
        assert len(registry.registered) == 1
        assert len(errors(caplog)) == 1 and len(events.seen) == 1  # once, not every minute


def test_a_key_or_id_bound_elsewhere_is_named_and_a_failed_lookup_is_not_a_change(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = Events()
    loop = make_loop(heartbeat_interval=0.1, publish=events.publish)
    assert loop.register_once()
    key = registry.record["public_key"]
    registry.down = True  # lookups fail: no event, no ERROR
    loop.start()
    assert registry.wait_for(lambda: registry.count("lookup") >= 1)
    registry.down = False
    lookups = registry.count("lookup")
    assert registry.wait_for(lambda: registry.count("lookup") >= lookups + 1)
    with registry.cond:
        registry.record.update(public_key="QUJD", hostname="x" * 5000)
    assert events.wait_count(1)
    moved = events.seen[0][1]["moved"]
    assert moved["public_key"] == {"expected": key, "found": "QUJD"}
    assert moved["hostname"]["expected"] == ""
    assert len(moved["hostname"]["found"]) == 103  # cut short: the registry may be hostile
    assert "address" not in moved  # a private node's address is not shown by lookup
