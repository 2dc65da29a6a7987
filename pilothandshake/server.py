"""The TCP server on port 444: a ``ThreadingTCPServer`` with connection caps (SPEC 3, 15).

Each accepted connection runs the given handler (the Manager's ``handle_connection``) on its
own daemon thread; the handler reads the one message with its own deadline and size cap and
closes the socket. A connection beyond the global or the per-source cap is closed at once
with a reset, without reading it and without spawning a thread, so one slow or hostile host
cannot starve the others.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from typing import Any, Callable

from .constants import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE, STOP_TIMEOUT
from .messages import reset_close
from .metrics import Metrics

log = logging.getLogger(__name__)

_REFUSAL_LOG_INTERVAL = 1.0  # at most one refusal line a second; the rest are counted


class _ConnectionHandler(socketserver.BaseRequestHandler):
    """Hands one accepted connection to the server's handler."""

    server: HandshakeServer

    def handle(self) -> None:
        self.server.handler(self.request)


class HandshakeServer(socketserver.ThreadingTCPServer):
    """Serves port 444 with at most ``max_connections`` connections at once, and at most
    ``max_connections_per_source`` from one source address.

    Binding happens in the constructor (``OSError`` on a port in use or a privileged port).
    ``start()`` serves on a background thread; ``close()`` stops accepting and waits up to
    ``drain_timeout`` for the handlers still running. Refusals are counted into ``metrics``
    by the cap that was reached.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    # Handler threads are counted below, so close() can wait for them with a bound;
    # the stock block_on_close joins them without one.
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: Callable[[socket.socket], None],
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE,
        drain_timeout: float = STOP_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.handler = handler
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.drain_timeout = drain_timeout
        self._metrics = metrics if metrics is not None else Metrics()
        self._cond = threading.Condition()
        self._admitted: dict[socket.socket, str] = {}
        self._per_source: dict[str, int] = {}
        self._refused = 0
        self._refusal_logged_at = -_REFUSAL_LOG_INTERVAL
        self._thread: threading.Thread | None = None
        self._closed = False
        super().__init__(address, _ConnectionHandler)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        return str(self.server_address[0]), int(self.server_address[1])

    def active_connections(self) -> int:
        """How many connections are being served right now."""
        with self._cond:
            return len(self._admitted)

    def start(self) -> None:
        """Serve on a daemon thread. Idempotent."""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"handshake-server-{self.address[1]}",
                daemon=True,
            )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close the listening socket, and wait (bounded) for the handlers
        in flight. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self.shutdown()
            thread.join()
        self.server_close()
        if not self.wait_idle(self.drain_timeout):
            log.warning(
                "stopped with %d connection(s) still being handled", self.active_connections()
            )

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is being handled; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._admitted, timeout)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection if both caps allow it; otherwise reset it unread."""
        source = str(client_address[0])
        with self._cond:
            admitted = (
                len(self._admitted) < self.max_connections
                and self._per_source.get(source, 0) < self.max_connections_per_source
            )
            if admitted:
                self._admitted[request] = source
                self._per_source[source] = self._per_source.get(source, 0) + 1
            else:
                full = len(self._admitted) >= self.max_connections
                self._metrics.refusal("max_connections" if full else "max_connections_per_source")
                self._refused += 1
                now = time.monotonic()
                report = now - self._refusal_logged_at >= _REFUSAL_LOG_INTERVAL
                if report:
                    refused, self._refused = self._refused, 0
                    self._refusal_logged_at = now
                active, from_source = len(self._admitted), self._per_source.get(source, 0)
        if not admitted:
            reset_close(request)
            if report:
                log.warning(
                    "connection limit reached (%d active, %d from %s): refused %d connection(s)",
                    active,
                    from_source,
                    source,
                    refused,
                )
        return admitted

    def shutdown_request(self, request: Any) -> None:
        """Close the connection and release its slot (runs after every admitted handler)."""
        try:
            super().shutdown_request(request)
        finally:
            with self._cond:
                source = self._admitted.pop(request, None)
                if source is not None:
                    left = self._per_source[source] - 1
                    if left:
                        self._per_source[source] = left
                    else:
                        del self._per_source[source]
                    self._cond.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler failure as one line with its traceback, not on bare stderr."""
        log.exception("error while handling connection from %s", client_address[0])
