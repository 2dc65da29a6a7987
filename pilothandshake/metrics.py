"""Prometheus metrics (SPEC 13b), made with ``prometheus_client``.

Each ``Metrics`` has a ``CollectorRegistry`` of its own, so several daemons or Managers in one
process never share or collide. The daemon builds one and hands it to every part it
composes; a part built without one (an embedded ``Manager``, a test) makes its own, so each
hook is one unconditional call. ``pilot-handshakectl metrics`` prints ``render()``;
``metrics.listen`` serves the same text over HTTP (``MetricsServer``; ``/`` links to
``/metrics``).

Names: every metric of the daemon starts with ``pilot_handshake_``, but the process
collector's keep their standard ``process_*`` names, as dashboards expect them.
``pilot_handshake_build_info{version}`` is always 1. The ``_created`` series that
``prometheus_client`` adds to counters and histograms are left out unless asked for
(``Metrics(created=True)``, config ``metrics.created_series``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import MetricsHandler, generate_latest
from prometheus_client.metrics_core import Metric

from ._version import __version__
from .addresses import parse_address
from .connection_slots import SOURCE_CAP, TOTAL_CAP
from .constants import METRICS_DEADLINE, METRICS_MAX_CONNECTIONS
from .drops import DropKind
from .logthrottle import LogThrottle
from .override import override
from .wire import reset_close

__all__ = ["REFUSAL_CAPS", "Metrics", "MetricsServer"]

log = logging.getLogger(__name__)

PREFIX = "pilot_handshake"

REFUSAL_CAPS = (TOTAL_CAP, SOURCE_CAP)

_LOG_INTERVAL = 1.0  # at most one line a second for failed scrapes (the rest are counted)
_POLL = 0.25  # how often the accept loop looks for scrapes past their deadline

# Seconds: a registry round trip on a LAN up to its 5 s timeout; a store write is an fsync.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CHANGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _WithoutCreated:
    """A collector showing ``registry`` without its ``_created`` series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """``registry``'s metrics, each without its ``_created`` samples."""
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """Every metric of one daemon (or one embedded Manager), in ``self.registry``;
    ``self.exposed`` is what ``render()`` and ``/metrics`` show of it."""

    def __init__(self, *, process: bool = False, created: bool = False) -> None:
        """The metrics, all at zero; ``process`` adds the process collector (CPU, memory,
        file descriptors of this process: only the daemon, which owns its process);
        ``created`` keeps the ``_created`` series of counters and histograms."""
        self.registry = CollectorRegistry()
        r = self.registry
        if created:
            self.exposed = r
        else:
            self.exposed = CollectorRegistry(auto_describe=True)
            self.exposed.register(_WithoutCreated(r))
        self.messages = Counter(
            f"{PREFIX}_messages",
            "Handshake messages on port 444 by type and result: received; sent (delivered "
            "to the peer's port 444 directly); relayed (handed to the registry relay); "
            "failed (a request neither way, an answer not directly: its relay counts apart)",
            ["type", "result"],
            registry=r,
        )
        self.drops = Counter(f"{PREFIX}_drops", "Dropped input by reason", ["reason"], registry=r)
        self.events = Counter(
            f"{PREFIX}_events", "Events published by topic", ["topic"], registry=r
        )
        self.relayed = Counter(
            f"{PREFIX}_relayed_messages",
            "Handshake messages carried by the registry relay, by type and direction (in, out)",
            ["type", "direction"],
            registry=r,
        )
        self.registry_requests = Counter(
            f"{PREFIX}_registry_requests",
            "Registry requests by type and outcome (ok, error, unreachable)",
            ["type", "outcome"],
            registry=r,
        )
        self.registry_latency = Histogram(
            f"{PREFIX}_registry_request_seconds",
            "Registry request latency by type",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            f"{PREFIX}_refused_connections",
            "Port-444 connections refused by the cap that was reached",
            ["cap"],
            registry=r,
        )
        self.store_write = Histogram(
            f"{PREFIX}_store_write_seconds",
            "Time to make one group of trust-state changes durable",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_changes = Histogram(
            f"{PREFIX}_store_changes_per_write",
            "Trust-state changes made durable by one write",
            buckets=_CHANGES_BUCKETS,
            registry=r,
        )
        self.trusted = Gauge(f"{PREFIX}_trusted_peers", "Trusted peers", registry=r)
        self.pending = Gauge(f"{PREFIX}_pending_requests", "Pending requests", registry=r)
        self.outgoing = Gauge(
            f"{PREFIX}_outgoing_requests", "Our requests waiting for an answer", registry=r
        )
        self.active_connections = Gauge(
            f"{PREFIX}_active_connections", "Port-444 connections being served", registry=r
        )
        # Series that exist from the start, so a rate() sees the first increment.
        for kind in DropKind:
            self.drops.labels(kind.value)
        for cap in REFUSAL_CAPS:
            self.refused.labels(cap)
        Gauge(
            f"{PREFIX}_build_info",
            "Always 1; the version of pilothandshake",
            ["version"],
            registry=r,
        ).labels(__version__).set(1)
        if process:
            ProcessCollector(registry=r)  # the standard process_* names

    # Hooks: one call at each place where the thing happens.

    def message(self, kind: str, result: str) -> None:
        """Count one handshake message of type ``kind`` with ``result``."""
        self.messages.labels(kind, result).inc()

    def drop(self, kind: DropKind) -> None:
        """Count one dropped input of ``kind``: the label is the kind's value."""
        self.drops.labels(kind.value).inc()

    def event(self, topic: str) -> None:
        """Count one published event."""
        self.events.labels(topic).inc()

    def relay(self, kind: str, direction: str) -> None:
        """Count one message of type ``kind`` carried by the registry relay ("in", "out");
        one going out is also a message ``relayed``."""
        self.relayed.labels(kind, direction).inc()
        if direction == "out":
            self.messages.labels(kind, "relayed").inc()

    def registry_request(self, kind: str, outcome: str, seconds: float) -> None:
        """Count one registry request of type ``kind`` and record its latency."""
        self.registry_requests.labels(kind, outcome).inc()
        self.registry_latency.labels(kind).observe(seconds)

    def refusal(self, cap: str) -> None:
        """Count one connection refused because ``cap`` (in ``REFUSAL_CAPS``) was reached."""
        self.refused.labels(cap).inc()

    def store_commit(self, seconds: float, changes: int) -> None:
        """Record one durable write of ``changes`` trust-state changes."""
        self.store_write.observe(seconds)
        self.store_changes.observe(changes)

    def watch(
        self,
        *,
        trusted: Callable[[], float],
        pending: Callable[[], float],
        outgoing: Callable[[], float],
        active_connections: Callable[[], float],
        registry_up: Callable[[], float] | None,
    ) -> None:
        """Read the gauges from these functions at every scrape. Without a registry
        (``registry_up`` None) there is no registry gauge, rather than one reading 0."""
        self.trusted.set_function(trusted)
        self.pending.set_function(pending)
        self.outgoing.set_function(outgoing)
        self.active_connections.set_function(active_connections)
        if registry_up is not None:
            Gauge(
                f"{PREFIX}_registry_up",
                "1 when the registry answered the last request, else 0",
                registry=self.registry,
            ).set_function(registry_up)

    def render(self) -> str:
        """The Prometheus text format of every metric."""
        return generate_latest(self.exposed).decode("utf-8")


_INDEX = (
    b"<!DOCTYPE html>\n<html><head><title>pilot-handshaked</title></head>\n"
    b'<body><h1>pilot-handshaked</h1><p><a href="/metrics">/metrics</a></p></body></html>\n'
)


class _Handler(MetricsHandler):
    """``GET /metrics``; ``/`` is a page linking to it; any other path is 404."""

    # Per receive; the server's deadline bounds the whole request.
    timeout = METRICS_DEADLINE

    @override
    def do_GET(self) -> None:
        """Serve the metrics of the server's registry, or the index page."""
        path = urlsplit(self.path).path
        if path == "/":
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(_INDEX)))
            self.end_headers()
            self.wfile.write(_INDEX)
            return
        if path != "/metrics":
            self.send_error(404, "only / and /metrics are served here")
            return
        super().do_GET()


class MetricsServer(socketserver.ThreadingTCPServer):
    """``/metrics`` over HTTP on ``HOST:PORT`` (config ``metrics.listen``), each scrape on a
    daemon thread. Binds and starts serving in the constructor (``OSError`` when the address
    is taken); ``close()`` stops it.

    Bounds (SPEC 15): at most ``max_connections`` scrapes at once (a newcomer beyond is reset
    unread, so trickling clients cannot take the daemon's file descriptors), and each one is
    cut off ``deadline`` seconds after it was accepted, however it trickles. A failing
    scrape is one WARNING line, at most one a second (the rest are counted), never a
    traceback on stderr."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        *,
        max_connections: int = METRICS_MAX_CONNECTIONS,
        deadline: float = METRICS_DEADLINE,
    ) -> None:
        """Bind ``listen`` and serve ``metrics``."""
        host, port = parse_address(listen)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.max_connections = max_connections
        self.deadline = deadline
        handler = type("_RegistryHandler", (_Handler,), {"registry": metrics.exposed})
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}  # connection -> monotonic time accepted
        self._errors = LogThrottle(_LOG_INTERVAL)
        super().__init__((host, port), handler)
        self._thread = threading.Thread(
            target=self.serve_forever, args=(_POLL,), name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when 0 was asked for."""
        return str(self.server_address[0]), int(self.server_address[1])

    def open_connections(self) -> int:
        """How many scrapes are being served now."""
        with self._lock:
            return len(self._open)

    @override
    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a scrape under the cap; reset one beyond it."""
        with self._lock:
            admitted = len(self._open) < self.max_connections
            if admitted:
                self._open[request] = time.monotonic()
        if not admitted:
            reset_close(request)
        return admitted

    @override
    def service_actions(self) -> None:
        """Cut off the scrapes past their deadline (the accept loop calls this every poll):
        their handler's read or write then fails at once and the handler ends."""
        now = time.monotonic()
        with self._lock:
            # Under the lock: shutdown_request closes under it too, so a descriptor number
            # reused by a newer connection is never shut down by mistake.
            for conn, opened in self._open.items():
                if now - opened >= self.deadline:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)

    @override
    def shutdown_request(self, request: Any) -> None:
        """Close the scrape's connection and give back its place."""
        with self._lock:
            self._open.pop(request, None)
            super().shutdown_request(request)

    @override
    def handle_error(self, request: Any, client_address: Any) -> None:
        """One WARNING line (no traceback) per second at most, the rest counted."""
        error = sys.exc_info()[1]
        held = self._errors.admit()
        if held is None:
            return
        more = f" ({held} more since the last line)" if held else ""
        log.warning(
            "metrics request from %s failed: %s%s",
            client_address[0],
            f"{type(error).__name__}: {error}" if error is not None else "unknown error",
            more,
        )

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join()
