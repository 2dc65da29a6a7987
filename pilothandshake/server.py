"""The TCP server on port 444: a ``ThreadingTCPServer`` with connection caps (SPEC 3, 15).

Each accepted connection runs the given handler (the Manager's ``handle_connection``) on its
own daemon thread; the handler reads the one message with its own deadline and size cap and
closes the socket. A connection beyond the per-source cap is closed at once with a reset,
without reading it and without spawning a thread, so one slow or hostile host cannot starve
the others. At the global cap a newcomer takes the place of the connection open longest
without a whole message, if that one is older than ``EVICT_AFTER``: hosts trickling bytes
over many addresses cannot hold every slot (slowloris). Only when none qualifies is the
newcomer reset.

A connection counts as complete once the handler shuts down a direction of it:
``wire.read_message`` shuts down the read side as soon as it holds one whole message
(SPEC 3), so a connection whose message is being processed (its receipt not yet written) is
never evicted.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable

from .connection_slots import ConnectionSlots
from .constants import EVICT_AFTER, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE, STOP_TIMEOUT
from .logthrottle import LogThrottle
from .metrics import Metrics
from .override import override
from .wire import reset_close

log = logging.getLogger(__name__)

# At most one line a second for refusals (the rest are counted) and for failed accepts.
_LOG_INTERVAL = 1.0
_ACCEPT_RETRY = 0.05  # pause after a failed accept() before the next one


def serve_until_closed(server: socketserver.TCPServer, closed: Callable[[], bool]) -> None:
    """Accept connections on ``server`` until ``closed()``, blocking in accept() itself: an
    idle server wakes for nothing, and a busy one makes one system call per connection, not
    a poll() on a fresh selector before each accept() as ``handle_request`` does (the port
    444 lever of issue 10). The closer sets its flag, then calls ``wake_acceptor``. A failed
    accept (out of file descriptors, say) is logged at most once a second and retried after
    a short pause, so it cannot spin a core."""
    failures = LogThrottle(_LOG_INTERVAL)
    while not closed():
        try:
            request, address = server.get_request()
        except OSError as exc:
            if closed():
                return
            if failures.admit() is not None:
                log.warning("accept on %s failed: %s", server.server_address, exc)
            time.sleep(_ACCEPT_RETRY)
            continue
        if not server.verify_request(request, address):
            server.shutdown_request(request)
            continue
        try:
            server.process_request(request, address)
        except Exception:
            server.handle_error(request, address)
            server.shutdown_request(request)


def wake_acceptor(server: socketserver.TCPServer) -> None:
    """Wake a ``serve_until_closed`` loop blocked in accept: on Linux, shutting down a
    listening socket makes the blocked accept() fail (the loop then sees its flag); the
    socket accepts nothing more."""
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)


class _Connection(socket.socket):
    """An accepted connection that knows its peer, when it was opened and whether its
    message is whole, and that another thread can cut off safely."""

    def __init__(self, kind: tuple[int, int, int], fd: int, peer: Any) -> None:
        super().__init__(*kind, fd)
        self.peer = peer
        self.opened = time.monotonic()
        self.complete = False
        # Serialises close() with evict(): a shutdown() on a closed socket's number could
        # hit whichever connection was accepted next under the same descriptor.
        self._guard = threading.Lock()

    @override
    def getpeername(self) -> Any:
        """The peer's address as accept() returned it (no system call)."""
        return self.peer

    @override
    def shutdown(self, how: int) -> None:
        """Shut down a direction; any shutdown by the handler marks the message complete."""
        self.complete = True
        super().shutdown(how)

    @override
    def close(self) -> None:
        """Close (guarded against a concurrent ``evict``)."""
        with self._guard:
            super().close()

    def evict(self) -> None:
        """End the connection from another thread: the handler's pending read returns at
        once with what has arrived, and the handler closes it as usual."""
        with self._guard:
            if self.fileno() >= 0:
                with contextlib.suppress(OSError):
                    super().shutdown(socket.SHUT_RDWR)


class _ConnectionHandler(socketserver.BaseRequestHandler):
    """Hands one accepted connection to the server's handler."""

    server: HandshakeServer

    @override
    def handle(self) -> None:
        self.server.handler(self.request)


class HandshakeServer(socketserver.ThreadingTCPServer):
    """Serves port 444 with at most ``max_connections`` connections at once, and at most
    ``max_connections_per_source`` from one source address. At the global cap a newcomer
    evicts the connection open longest (more than ``evict_after`` seconds) without a whole
    message; only when there is none is the newcomer reset.

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
        evict_after: float = EVICT_AFTER,
        drain_timeout: float = STOP_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.handler = handler
        self.evict_after = evict_after
        self.drain_timeout = drain_timeout
        self._metrics = metrics if metrics is not None else Metrics()
        self._slots: ConnectionSlots[_Connection] = ConnectionSlots(
            max_connections, max_connections_per_source
        )
        # Refusals and evictions since the last line about them (one accepting thread).
        self._refused = 0
        self._evicted = 0
        self._refusals = LogThrottle(_LOG_INTERVAL)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        super().__init__(address, _ConnectionHandler)
        # (family, type, proto) of accepted sockets as plain ints: the socket properties
        # convert to enums on every read, which the one accepting thread pays per connection.
        self._kind = (int(self.socket.family), int(self.socket.type), self.socket.proto)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        return str(self.server_address[0]), int(self.server_address[1])

    def active_connections(self) -> int:
        """How many connections are being served right now."""
        return len(self._slots)

    def start(self) -> None:
        """Serve on a daemon thread. Idempotent."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=serve_until_closed,
                args=(self, lambda: self._closed),
                name=f"handshake-server-{self.address[1]}",
                daemon=True,
            )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close the listening socket, and wait (bounded) for the handlers
        in flight. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            wake_acceptor(self)
            thread.join()
        self.server_close()
        if not self.wait_idle(self.drain_timeout):
            log.warning(
                "stopped with %d connection(s) still being handled", self.active_connections()
            )

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is being handled; False if ``timeout`` passed first."""
        return self._slots.wait_empty(timeout)

    @override
    def get_request(self) -> tuple[_Connection, Any]:
        """Accept the next connection, wrapped so the caps can see its age and progress.

        ``socket._accept()`` is what ``socket.accept()`` calls: taking the descriptor from it
        builds one socket object per connection instead of two (each costs a system call)."""
        fd, address = self.socket._accept()  # type: ignore[attr-defined]
        return _Connection(self._kind, fd, address), address

    @override
    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a new thread of its own, started with ``_thread``:
        ``threading.Thread.start`` blocks the accepting thread until the new one has
        signalled that it runs, a hand-off on every connection (issue 10). Nothing here needs
        a ``Thread`` object: ``close`` waits for the handlers through the slots they hold, and
        like ``daemon_threads`` these threads do not keep the process alive."""
        _thread.start_new_thread(self.process_request_thread, (request, client_address))

    @override
    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection if the caps allow it, evicting a slow one at the global cap
        if need be; otherwise reset it unread."""
        source = str(client_address[0])
        answer = self._slots.take(request, source, self._slowest)
        if answer.evicted is not None:
            answer.evicted.evict()
            self._evicted += 1
        if not answer.admitted:
            reset_close(request)
            self._metrics.refusal(answer.refused)
            self._refused += 1
        if (
            answer.evicted is not None or not answer.admitted
        ) and self._refusals.admit() is not None:
            log.warning(
                "connection limit reached (%d active, %d from %s): refused %d connection(s), "
                "evicted %d open over %g s without a whole message",
                answer.active,
                answer.from_source,
                source,
                self._refused,
                self._evicted,
                self.evict_after,
            )
            self._refused = self._evicted = 0
        return answer.admitted

    def _slowest(self, admitted: Iterable[_Connection]) -> _Connection | None:
        """The connection open longest without a whole message, if older than
        ``evict_after``."""
        now = time.monotonic()
        for conn in admitted:
            if not conn.complete:
                # Admission order is age order: the first unfinished one is the oldest.
                return conn if now - conn.opened > self.evict_after else None
        return None

    @override
    def shutdown_request(self, request: Any) -> None:
        """Close the connection and release its slot (runs after every admitted handler).
        Only a close: ``TCPServer``'s shutdown(SHUT_WR) first would be a second system call
        for a write side that ``read_message`` has already shut down (or that a reset
        ended)."""
        try:
            self.close_request(request)
        finally:
            self._slots.release(request)

    @override
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler failure as one line with its traceback, not on bare stderr."""
        log.exception("error while handling connection from %s", client_address[0])
