"""The event bus: never-blocking publish, subscribers, webhook (SPEC section 14)."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import queue
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from pilothandshake import events
from pilothandshake.events import EventBus

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")


@pytest.fixture
def bus() -> Iterator[EventBus]:
    bus = EventBus(lambda: 7)
    yield bus
    bus.stop(timeout=2)


def test_publish_into_a_full_queue_drops_the_oldest_and_counts() -> None:
    bus = EventBus(lambda: 7, max_queue=3)
    subscription = bus.subscribe()
    try:
        for index in range(5):
            bus.publish("handshake.received", {"peer_node_id": index})
        assert bus.dropped == 2
        bus.start()
        received = [subscription.get(timeout=2) for _ in range(3)]
        assert [event["data"]["peer_node_id"] for event in received if event] == [2, 3, 4]
        assert subscription.get(timeout=0.05) is None
    finally:
        bus.stop(timeout=2)


def test_subscriber_receives_events_in_order_with_the_documented_shape(bus: EventBus) -> None:
    subscription = bus.subscribe()
    bus.start()
    for index in range(20):
        bus.publish("trust.changed", {"peer_node_id": index, "state": "granted"})
    events = [subscription.get(timeout=2) for _ in range(20)]
    assert [e["data"]["peer_node_id"] for e in events if e] == list(range(20))
    first = events[0]
    assert first is not None
    assert set(first) == {"event", "node_id", "timestamp", "data"}
    assert first["event"] == "trust.changed" and first["node_id"] == 7
    assert RFC3339.match(first["timestamp"])


def test_slow_subscriber_loses_its_oldest_events_without_slowing_others(bus: EventBus) -> None:
    slow = bus.subscribe(max_queue=2)
    fast = bus.subscribe()
    bus.start()
    for index in range(10):
        bus.publish("handshake.pending", {"peer_node_id": index})
    assert [fast.get(timeout=2) is not None for _ in range(10)] == [True] * 10
    remaining = [slow.get(timeout=0.5) for _ in range(2)]
    assert [e["data"]["peer_node_id"] for e in remaining if e] == [8, 9]
    assert slow.dropped == 8


def test_history_subscription_replays_recent_events_then_new_ones(bus: EventBus) -> None:
    bus.start()
    bus.publish("handshake.received", {"peer_node_id": 1})
    deadline = time.monotonic() + 2
    while not bus.recent() and time.monotonic() < deadline:
        time.sleep(0.01)
    subscription = bus.subscribe(history=True)
    bus.publish("handshake.received", {"peer_node_id": 2})
    got = [subscription.get(timeout=2) for _ in range(2)]
    assert [e["data"]["peer_node_id"] for e in got if e] == [1, 2]


def test_publish_reaches_the_history_itself_with_no_thread_in_between(bus: EventBus) -> None:
    before = set(threading.enumerate())
    bus.start()
    bus.publish("handshake.received", {"peer_node_id": 1})
    # Delivered when publish returns, with no dispatcher thread woken for an event nobody
    # follows (no subscriber, no webhook: no thread at all).
    assert [e["data"]["peer_node_id"] for e in bus.recent()] == [1]
    assert set(threading.enumerate()) - before == set()


def test_closed_subscription_returns_none_and_stops_receiving(bus: EventBus) -> None:
    subscription = bus.subscribe()
    bus.start()
    subscription.close()
    bus.publish("handshake.received", {"peer_node_id": 1})
    assert subscription.get(timeout=0.1) is None


def test_start_and_stop_are_idempotent_and_stop_closes_subscribers() -> None:
    bus = EventBus(lambda: 1)
    bus.stop()  # before start: nothing to do
    bus = EventBus(lambda: 1)
    subscription = bus.subscribe()
    bus.start()
    bus.start()
    bus.stop(timeout=2)
    bus.stop(timeout=2)
    started = time.monotonic()
    assert subscription.get(timeout=5) is None
    assert time.monotonic() - started < 1


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: queue.Queue[tuple[str, str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, queue.Queue[tuple[str, str, Any]]]]:
    received: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    handler = type("Handler", (_Recorder,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def test_webhook_receives_each_event_as_json_post(
    webhook_server: tuple[str, queue.Queue[tuple[str, str, Any]]],
) -> None:
    url, received = webhook_server
    bus = EventBus(lambda: 99, webhook=url)
    bus.start()
    try:
        bus.publish("handshake.auto_approved", {"peer_node_id": 5, "reason": "mutual"})
        path, content_type, body = received.get(timeout=5)
    finally:
        bus.stop(timeout=2)
    assert path == "/hook"
    assert content_type == "application/json"
    assert set(body) == {"event", "node_id", "timestamp", "data"}
    assert body["event"] == "handshake.auto_approved"
    assert body["node_id"] == 99
    assert body["data"] == {"peer_node_id": 5, "reason": "mutual"}
    assert RFC3339.match(body["timestamp"])


def test_hanging_webhook_never_blocks_publish_or_subscribers() -> None:
    # A listener that accepts but never answers: every POST would hang until its timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    bus = EventBus(lambda: 1, webhook=url, max_queue=5000)
    subscription = bus.subscribe()
    bus.start()
    try:
        started = time.monotonic()
        for index in range(2000):
            bus.publish("handshake.received", {"peer_node_id": index})
        assert time.monotonic() - started < 1.0
        last = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (last is None or last["data"]["peer_node_id"] < 1999):
            last = subscription.get(timeout=1) or last
        assert last is not None and last["data"]["peer_node_id"] == 1999
        assert bus.webhook_dropped > 0
    finally:
        started = time.monotonic()
        bus.stop(timeout=0.5)
        assert time.monotonic() - started < 2
        silent.close()


def test_failing_webhook_logs_one_rate_limited_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long interval, so a slow machine spreading the 3 POSTs over seconds still sees one.
    monkeypatch.setattr(events, "WEBHOOK_LOG_INTERVAL", 3600.0)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: every POST is refused at once
    url = f"http://127.0.0.1:{port}/"
    bus = EventBus(lambda: 1, webhook=url)
    with caplog.at_level(logging.WARNING, logger="pilothandshake.events"):
        bus.start()
        for index in range(3):
            bus.publish("handshake.received", {"peer_node_id": index})
        bus.stop(timeout=5)
    # Only this bus's URL: an earlier test's hanging POST may time out meanwhile.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and url in r.getMessage()]
    assert len(warnings) == 1


def test_event_time_is_taken_at_publish_and_formatted_as_utc_milliseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus = EventBus(lambda: 7)
    subscription = bus.subscribe()
    try:
        # Published (not dispatched) at 2025-11-26T01:00:00.001Z; dispatched after start.
        monkeypatch.setattr(events.time, "time", lambda: 1764118800.001)
        bus.publish("handshake.received", {"peer_node_id": 1})
        monkeypatch.undo()
        bus.start()
        event = subscription.get(timeout=2)
        assert event is not None and event["timestamp"] == "2025-11-26T01:00:00.001Z"
        assert bus.recent()[0]["timestamp"] == "2025-11-26T01:00:00.001Z"
    finally:
        bus.stop(timeout=2)
    assert events._rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert events._rfc3339(951782399.9994) == "2000-02-28T23:59:59.999Z"
    assert events._rfc3339(951868800.5) == "2000-03-01T00:00:00.500Z"


class _Drip(socketserver.BaseRequestHandler):
    """Reads the request, then answers one byte at a time, never finishing a line."""

    def handle(self) -> None:
        self.request.recv(65536)
        for _ in range(200):  # 20 s at most
            try:
                self.request.sendall(b"H")
            except OSError:
                return
            time.sleep(0.1)


class _Redirect(http.server.BaseHTTPRequestHandler):
    location = ""

    def do_POST(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(server: socketserver.BaseServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}/hook"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_slow_drip_webhook_is_abandoned_at_its_total_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "WEBHOOK_TIMEOUT", 0.5)
    drip = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Drip)
    drip.daemon_threads = True
    with serve(drip) as url:
        started = time.monotonic()
        with pytest.raises(events.WebhookError, match=r"no answer within 0\.5 s"):
            events.post_json(url, b"{}", 0.5)
        # A per-read timeout would wait for the drip's 20 s; the deadline is total.
        assert time.monotonic() - started < 5
        bus = EventBus(lambda: 1, webhook=url)
        bus.start()
        try:
            bus.publish("handshake.received", {"peer_node_id": 1})
            assert wait_for(lambda: bus.webhook_dropped == 1, timeout=5)
        finally:
            bus.stop(timeout=2)


def test_webhook_redirect_is_not_followed_and_counts_as_dropped(
    webhook_server: tuple[str, queue.Queue[tuple[str, str, Any]]],
) -> None:
    elsewhere, received = webhook_server
    handler = type("Handler", (_Redirect,), {"location": elsewhere})
    redirect = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    with serve(redirect) as url:
        bus = EventBus(lambda: 1, webhook=url)
        bus.start()
        try:
            bus.publish("handshake.received", {"peer_node_id": 1})
            assert wait_for(lambda: bus.webhook_dropped == 1)
        finally:
            bus.stop(timeout=2)
    assert received.empty()


def test_webhook_success_drops_nothing(
    webhook_server: tuple[str, queue.Queue[tuple[str, str, Any]]],
) -> None:
    url, received = webhook_server
    bus = EventBus(lambda: 1, webhook=url)
    bus.start()
    try:
        for index in range(3):
            bus.publish("handshake.received", {"peer_node_id": index})
        for _ in range(3):
            received.get(timeout=5)
    finally:
        bus.stop(timeout=2)
    assert bus.webhook_dropped == 0
