"""RegistryLoop: registration, heartbeats, relay polling and backoff, against a fake registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Callable

import pytest

from pilothandshake.errors import RegistryError
from pilothandshake.identity import Identity, decode_signature, verify
from pilothandshake.pollschedule import ON_DEMAND_BOUND, backoff
from pilothandshake.relay import MAX_RELAY_ITEMS_PER_POLL, RegistryLoop
from pilothandshake.store import OutgoingRequest

WAIT = 5.0


class FakeRegistry:
    """Records every call; ``down`` makes every call fail; ``inbox`` is drained by polls."""

    address = "127.0.0.1:9"

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[str, float]] = []
        self.down = False
        self.next_id = 5
        self.requests: list[Any] = []
        self.responses: list[Any] = []
        self.features: list[str] = []
        self.registered: list[dict[str, Any]] = []  # what each register asked
        self.record: dict[str, Any] = {}  # lookup's answer for the node (set by register)
        self.relayed: list[tuple[int, int, str, str]] = []  # request_handshake calls

    def _call(self, name: str) -> None:
        with self.cond:
            self.calls.append((name, time.monotonic()))
            self.cond.notify_all()
            if self.down:
                raise RegistryError("connection refused")

    def count(self, name: str) -> int:
        with self.cond:
            return sum(1 for n, _ in self.calls if n == name)

    def wait_for(self, predicate: Callable[[], bool]) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, WAIT)

    def register(
        self, listen_addr: str, public_key_b64: str, owner: str = "", hostname: str = ""
    ) -> dict[str, Any]:
        self._call("register")
        with self.cond:
            self.registered.append({"listen_addr": listen_addr, "hostname": hostname})
            self.record = {"node_id": self.next_id, "public_key": public_key_b64, "public": True}
            self.record["real_addr"] = listen_addr
            if hostname:
                self.record["hostname"] = hostname
        answer: dict[str, Any] = {"type": "register_ok", "node_id": self.next_id}
        if hostname:
            answer["hostname"] = hostname
        if self.features:
            answer["features"] = self.features
        return answer

    def request_handshake(
        self, from_node_id: int, to_node_id: int, justification: str, signature_b64: str
    ) -> dict[str, Any]:
        self._call("request_handshake")
        with self.cond:
            self.relayed.append((from_node_id, to_node_id, justification, signature_b64))
        return {"type": "request_handshake_ok", "status": "relayed"}

    def lookup(self, node_id: int) -> dict[str, Any]:
        self._call("lookup")
        with self.cond:
            return {"type": "lookup_ok", **self.record}

    def heartbeat(self, node_id: int) -> dict[str, Any]:
        self._call("heartbeat")
        return {"type": "heartbeat_ok"}

    def set_visibility(self, node_id: int, public: bool) -> dict[str, Any]:
        self._call("set_visibility")
        return {"type": "set_visibility_ok"}

    def close(self) -> None:
        with self.cond:
            self.calls.append(("close", time.monotonic()))

    def poll_handshakes(self, node_id: int, wait: float = 0.0) -> dict[str, Any]:
        self._call("poll")
        with self.cond:
            requests, self.requests = self.requests, []
            responses, self.responses = self.responses, []
        return {"type": "poll_handshakes_ok", "requests": requests, "responses": responses}


class Target:
    """Records what the loop hands to the Manager."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[Any, ...]] = []
        self.outgoing: list[OutgoingRequest] = []

    def _add(self, item: tuple[Any, ...]) -> None:
        with self.cond:
            self.seen.append(item)
            self.cond.notify_all()

    def process_relayed_request(
        self, from_node_id: int, justification: str, public_key: str = ""
    ) -> None:
        if from_node_id == 666:
            raise RuntimeError("manager bug")
        self._add(("request", from_node_id, justification, public_key))

    def process_relayed_approval(self, from_node_id: int) -> None:
        self._add(("approval", from_node_id))

    def process_relayed_rejection(self, from_node_id: int, reason: str = "") -> None:
        self._add(("rejection", from_node_id, reason) if reason else ("rejection", from_node_id))

    def outgoing_requests(self) -> list[OutgoingRequest]:
        return list(self.outgoing)

    def wait_count(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.seen) >= count, WAIT)


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def target() -> Target:
    return Target()


@pytest.fixture
def make_loop(registry: FakeRegistry, target: Target) -> Iterator[Callable[..., RegistryLoop]]:
    loops: list[RegistryLoop] = []

    def make(**kwargs: Any) -> RegistryLoop:
        options: dict[str, Any] = {
            "listen_addr": "127.0.0.1:4444",
            "poll_interval": 0.02,
            "heartbeat_interval": 60.0,
        }
        options.update(kwargs)
        # The idle period as short as the fast one, unless a test is about the schedule.
        options.setdefault("poll_idle", options["poll_interval"])
        loop = RegistryLoop(registry, Identity.generate(), target, **options)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop()


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


def relay_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pilothandshake.relay" and r.levelno == logging.WARNING
    ]


def test_a_flood_of_malformed_items_is_one_warning_line_not_one_per_item(
    registry: FakeRegistry,
    make_loop: Callable[..., RegistryLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pilothandshake.relay")
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
    caplog.set_level(logging.ERROR, logger="pilothandshake.relay")
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
    caplog.set_level(logging.INFO, logger="pilothandshake.relay")
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
    caplog.set_level(logging.WARNING, logger="pilothandshake.relay")
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
    caplog.set_level(logging.ERROR, logger="pilothandshake.relay")
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
        if r.name == "pilothandshake.relay" and r.levelno == logging.ERROR
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
    caplog.set_level(logging.INFO, logger="pilothandshake.relay")
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
