"""The event stream (SPEC section 14): a bounded, never-blocking bus with subscribers and a
webhook.

``publish`` appends the event to the recent history (the last ``EVENT_HISTORY`` events, so
``pilot-handshakectl events`` can show what just happened) and to the bounded queue of each
consumer: every control-socket subscriber and the webhook worker has its own queue and thread.
No thread sits between the publisher and those queues, so an event nobody follows costs one
append and wakes no thread. Wherever a queue is full the oldest event is dropped and counted,
so a slow consumer never slows the Manager down. Events published before ``start()`` wait in
the bus's own bounded queue. The timestamp is taken at publish and formatted only for a
consumer that reads the event.

A webhook POST has one total deadline (``WEBHOOK_TIMEOUT``) from connect to the status line,
so a server that answers one byte at a time cannot hold the worker longer; only a 2xx answer
counts as delivered, and a redirect is not followed (it could send the event to another
host). Every event the webhook loses (queue full, or a failed POST) is counted in
``EventBus.webhook_dropped`` and reported in one WARNING per ``WEBHOOK_LOG_INTERVAL``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from .constants import (
    EVENT_HISTORY,
    EVENT_QUEUE,
    STOP_TIMEOUT,
    WEBHOOK_LOG_INTERVAL,
    WEBHOOK_QUEUE,
    WEBHOOK_TIMEOUT,
)
from .logthrottle import LogThrottle
from .metrics import Metrics

__all__ = [
    "APPROVED",
    "AUTO_APPROVED",
    "BINDING_CHANGED",
    "CONFLICT",
    "HOSTNAME_CHANGED",
    "NODE_ID_CHANGED",
    "PENDING_EVENT",
    "RECEIVED",
    "REJECTED_BY_PEER",
    "REJECTED_EVENT",
    "REVOKED",
    "REVOKED_BY_PEER",
    "TRUST_CHANGED",
    "EventBus",
    "Subscription",
]

log = logging.getLogger(__name__)

# Event topics (SPEC 14). The Manager's, all with payload ``peer_node_id`` and what the
# comment names:
RECEIVED = "handshake.received"  # justification, relayed
PENDING_EVENT = "handshake.pending"  # justification
APPROVED = "handshake.approved"  # by: operator | peer
REJECTED_EVENT = "handshake.rejected"  # reason
AUTO_APPROVED = "handshake.auto_approved"  # reason (a row's name); agent for trusted agents
TRUST_CHANGED = "trust.changed"  # state: granted | revoked; reason (decide.py's); agent
REVOKED = "trust.revoked"  # by us
REVOKED_BY_PEER = "trust.revoked_by_peer"  # reason
REJECTED_BY_PEER = "handshake.rejected_by_peer"  # reason, relayed: our request was rejected
CONFLICT = "trust.conflict"  # registry_key: a trust record's node ID bound to another key
# The daemon's own (SPEC 17), with the payload the comment names:
HOSTNAME_CHANGED = "hostname.changed"  # peer_node_id, hostname, public_key, new_node_id, ...
BINDING_CHANGED = "registry.binding_changed"  # node_id, moved: the registry changed our record
NODE_ID_CHANGED = "node.id_changed"  # old, new: the node ID kept in node.json changed

Event = dict[str, Any]

_MAX_STATUS_LINE = 8 * 1024  # bytes read looking for the status line of a webhook's answer


class WebhookError(Exception):
    """A webhook POST that did not get a 2xx answer in time."""


def post_json(url: str, body: bytes, timeout: float) -> int:
    """POST ``body`` as JSON to the http(s) ``url`` and return the status code, all within
    ``timeout`` seconds in total (connect, TLS, send, status line); redirects are returned,
    never followed. Raises ``WebhookError`` (a timeout or OS error included)."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WebhookError(f"no answer within {timeout:g} s")
        return left

    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if https else 80)
        sock = socket.create_connection((host, port), timeout=remaining())
    except (OSError, ValueError) as exc:
        raise WebhookError(f"cannot connect: {exc}") from exc
    try:
        if https:
            sock.settimeout(remaining())
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {parts.netloc.rpartition('@')[2]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        # Since Python 3.5 a socket timeout bounds the whole sendall, not each chunk.
        sock.settimeout(remaining())
        sock.sendall(head.encode("latin-1") + body)
        answer = b""
        while b"\r\n" not in answer and len(answer) < _MAX_STATUS_LINE:
            sock.settimeout(remaining())
            chunk = sock.recv(1024)
            if not chunk:
                break
            answer += chunk
    except socket.timeout:
        raise WebhookError(f"no answer within {timeout:g} s") from None
    except (OSError, UnicodeError) as exc:  # ssl errors are OSErrors
        raise WebhookError(str(exc) or type(exc).__name__) from exc
    finally:
        sock.close()
    fields = answer.split(b"\r\n", 1)[0].split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise WebhookError("no HTTP status line in the answer")
    return int(fields[1])


def _rfc3339(moment: float) -> str:
    """Format a ``time.time()`` value as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

    Milliseconds: events often come in bursts, and their order should show. ``publish``
    stores the bare float, so the Manager's threads (three events per accepted request) pay
    for one ``time.time()`` only; a consumer formats it (``_readable``), the seconds part
    once per second.
    """
    # Whole microseconds first, rounded as datetime.fromtimestamp does: 0.001 is 0.000999...
    seconds, micros = divmod(round(moment * 1_000_000), 1_000_000)
    return f"{_second(seconds)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _readable(event: Event) -> Event:
    """The event as consumers see it: a copy with its timestamp formatted (the stored one,
    shared by every consumer and the history, keeps the float)."""
    return {**event, "timestamp": _rfc3339(event["timestamp"])}


class _DropOldestQueue:
    """A bounded FIFO that drops its oldest item when full, counting the drops."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[Event] = collections.deque(maxlen=max(1, capacity))
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item: Event) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float | None) -> Event | None:
        """The oldest item, waiting up to ``timeout`` (None: until one comes or the queue is
        closed); None when nothing came."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Subscription:
    """One consumer of the event stream (a control-socket client), with its own bounded
    queue: when it falls behind, its oldest events are dropped and counted in ``dropped``."""

    def __init__(self, bus: EventBus, capacity: int) -> None:
        self._bus = bus
        self._queue = _DropOldestQueue(capacity)

    @property
    def dropped(self) -> int:
        """Events this subscriber lost because it fell behind."""
        return self._queue.dropped

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or once closed)."""
        event = self._queue.get(timeout)
        return None if event is None else _readable(event)

    def close(self) -> None:
        """Stop receiving events; a blocked ``get`` returns None."""
        self._queue.close()
        self._bus._unsubscribe(self)

    def _deliver(self, event: Event) -> None:
        self._queue.put(event)


class _Webhook:
    """POSTs events to one URL from its own thread; failures are counted and logged
    (rate-limited), never raised."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._queue = _DropOldestQueue(WEBHOOK_QUEUE)
        self._thread: threading.Thread | None = None
        self._warnings = LogThrottle(WEBHOOK_LOG_INTERVAL)
        self.failed = 0  # POSTs that did not get a 2xx answer
        self._dropped_logged = 0  # dropped events already reported in a WARNING

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-webhook", daemon=True)
        self._thread.start()

    def submit(self, event: Event) -> None:
        self._queue.put(event)

    def stop(self, timeout: float) -> None:
        self._queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def dropped(self) -> int:
        """Events lost: pushed out of the full queue, or whose POST failed."""
        return self._queue.dropped + self.failed

    def _run(self) -> None:
        while True:
            event = self._queue.get(None)
            if event is None:
                return
            self._post(event)

    def _post(self, event: Event) -> None:
        body = json.dumps(_readable(event)).encode("utf-8")
        try:
            status = post_json(self.url, body, WEBHOOK_TIMEOUT)
            if not 200 <= status < 300:
                redirect = " (redirects are not followed)" if 300 <= status < 400 else ""
                raise WebhookError(f"answered HTTP {status}{redirect}")
        except WebhookError as exc:
            self.failed += 1
            self._warn(str(exc))
            return
        if self.dropped > self._dropped_logged:
            self._warn("its queue was full")

    def _warn(self, reason: str) -> None:
        # At most one line per interval, so an unreachable webhook cannot flood the log.
        if self._warnings.admit() is None:
            return
        dropped = self.dropped
        log.warning(
            "webhook %s: %s; %d events dropped since the last report (%d in all)",
            self.url,
            reason,
            dropped - self._dropped_logged,
            dropped,
        )
        self._dropped_logged = dropped


class EventBus:
    """The daemon's event stream. ``node_id`` gives this node's ID at publish time; events
    published before ``start()`` wait in a queue of ``max_queue`` (also each subscriber's
    default queue size) and reach the history, subscribers and webhook at ``start()``."""

    def __init__(
        self,
        node_id: Callable[[], int],
        webhook: str = "",
        max_queue: int = EVENT_QUEUE,
        metrics: Metrics | None = None,
    ) -> None:
        """Build a stopped bus; ``webhook`` "" means no webhook. Each published event is
        counted into ``metrics`` (its own when not given)."""
        self._node_id = node_id
        self._metrics = metrics if metrics is not None else Metrics()
        self._max_queue = max_queue
        self._queue = _DropOldestQueue(max_queue)
        self._webhook = _Webhook(webhook) if webhook else None
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._history: collections.deque[Event] = collections.deque(maxlen=EVENT_HISTORY)
        self._started = False
        self._stopped = False

    @property
    def dropped(self) -> int:
        """Events dropped because the queue of events published before ``start()`` was
        full."""
        return self._queue.dropped

    @property
    def webhook_dropped(self) -> int:
        """Events the webhook did not take: its queue was full, or the POST failed."""
        return self._webhook.dropped if self._webhook is not None else 0

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Hand an event to the history and every consumer's queue; never blocks (a full
        queue drops its oldest event). Before ``start()`` it waits in the bus's queue; after
        ``stop()`` it is discarded."""
        self._metrics.event(topic)
        event = {
            "event": topic,
            "node_id": self._node_id(),
            "timestamp": time.time(),  # formatted for whoever reads it: _readable
            "data": dict(payload),
        }
        with self._lock:
            if self._started:
                self._fan_out(event)
            else:
                self._queue.put(event)  # closed once stopped: then a no-op

    def _fan_out(self, event: Event) -> None:
        """Deliver ``event``; call holding ``_lock``, so every consumer sees one order."""
        self._history.append(event)
        for subscription in self._subscribers:
            subscription._deliver(event)
        if self._webhook is not None:
            self._webhook.submit(event)

    def subscribe(self, history: bool = False, max_queue: int | None = None) -> Subscription:
        """A new subscriber receiving every event dispatched from now on; with ``history``
        it first receives the recent events (up to ``EVENT_HISTORY``), with no gap and no
        duplicate between the two."""
        subscription = Subscription(self, max_queue or self._max_queue)
        with self._lock:
            if history:
                for event in self._history:
                    subscription._deliver(event)
            self._subscribers.append(subscription)
        return subscription

    def recent(self) -> list[Event]:
        """The last published events (since ``start()``), oldest first."""
        with self._lock:
            history = list(self._history)
        return [_readable(event) for event in history]

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(subscription)

    def start(self) -> None:
        """Start delivering: the events queued so far first (idempotent; a stopped bus
        stays stopped)."""
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
            if self._webhook is not None:
                self._webhook.start()
            while True:
                event = self._queue.get(0)
                if event is None:
                    break
                self._fan_out(event)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Let the webhook deliver what it holds (bounded by ``timeout``), then stop it;
        close the subscribers. Idempotent; later events are discarded."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._started = False
            subscribers = list(self._subscribers)
        self._queue.close()
        if self._webhook is not None:
            self._webhook.stop(timeout)
        for subscription in subscribers:
            subscription.close()
