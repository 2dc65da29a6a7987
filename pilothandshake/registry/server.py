"""``pilot-registryd``: the embedded registry's socket server and its command line.

The protocol lives in ``state.Registry.handle``; this module moves frames (SPEC 11) and
enforces the connection limits of the config's ``limits:``: at most ``max_connections``
connections at once and ``max_connections_per_source`` from one address (more are reset
unread, without a thread), and a connection silent for ``idle_timeout`` between requests
is closed. A connection whose poll is held (``wait``, SPEC 18) gives its slot back while
it waits: held polls have their own bound (one per node, ``limits.max_held_polls`` in
all, kept by ``state.Registry``), so a fleet's open polls never crowd out the caps meant
for floods. ``stop`` answers every held poll, then closes the connections and the store.

``pilot-registryd`` reloads its config (networks and every limit) on SIGHUP; a config
that does not load is an ERROR and the running one is kept. Command-line options
(``--listen``, ``--store``, ``--tls-*``) are read once, at start.

The command line is durable by default: without ``--store`` it keeps its state in
``~/.pilot-registry/registry.json`` (``DEFAULT_REGISTRY_STORE``), because node IDs handed
out by registration order must not move when the registry restarts (issue 11 item 7);
``--memory`` keeps nothing, for throwaway runs. The Python API (``RegistryServer``) keeps
state in memory unless given a ``store_path``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .._version import __version__
from ..addresses import format_address, parse_address
from ..connection_slots import ConnectionSlots
from ..constants import (
    DEFAULT_REGISTRY_STORE,
    DROP_LOG_PER_SECOND,
    MAX_REGISTRY_FRAME_SERVER,
    REGISTRY_NODE_EXPIRY,
    REGISTRY_TIMEOUT,
)
from ..errors import ConfigError, HandshakeError, RegistryError
from ..wire import reset_close
from .client import ConnectionBroken, decode_frame, encode_frame
from .config import RegistryLimits, ServerConfig, load_config
from .ratelimit import RateLimitedLog
from .state import Registry
from .storage import Store

__all__ = ["RegistryServer", "main"]

log = logging.getLogger(__name__)

# How often serve_forever checks for shutdown: bounds how long stop() takes.
_SHUTDOWN_POLL = 0.1
# How long stop() waits for handlers to finish the request they are in.
_STOP_WAIT = 2.0
_HEADER_SIZE = 4
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_RECV_SIZE = 65536
# Handler threads kept waiting for the next connection, and for how long (see _TCPServer).
_IDLE_THREADS = 64
_IDLE_THREAD_SECONDS = 60.0

_Job = tuple[Any, Any]  # an admitted connection: (socket, client address)


class _Handler(socketserver.BaseRequestHandler):
    """One connection: frames in, frames out, until the peer closes, idles or misbehaves."""

    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        source = str(self.client_address[0])
        try:
            if self.server.tls is not None:
                sock.settimeout(REGISTRY_TIMEOUT)
                sock = self.server.tls.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:
            self.server.note("TLS handshake with %s failed: %s", source, exc)
            return
        with self.server.tracked(sock):
            self._serve(sock, source)
        if sock is not self.request:
            sock.close()

    def _serve(self, sock: socket.socket, source: str) -> None:
        registry = self.server.registry
        frames = _Frames(sock)
        while True:
            try:
                request = frames.read(self.server.limits.idle_timeout)
            except RegistryError as exc:
                self.server.note("bad frame from %s: %s; closing", source, exc)
                with contextlib.suppress(OSError):
                    sock.sendall(encode_frame({"type": "error", "error": str(exc)}))
                return
            except OSError as exc:
                log.debug("connection from %s ended: %s", source, exc)
                return
            if request is None:
                return
            try:
                if request.get("type") == "poll_handshakes" and request.get("wait"):
                    with self.server.held(self.request):
                        response = registry.handle(request, source, self._open)
                else:
                    response = registry.handle(request, source)
                sock.sendall(encode_frame(response))
            except OSError as exc:
                log.debug("cannot answer %s: %s", source, exc)
                return

    def _open(self) -> bool:
        """Whether the peer still has this connection open: it has not closed or reset it.
        Never waits (a zero-timeout poll, then a peek that takes nothing; pipelined bytes
        count as open)."""
        sock: socket.socket = self.request
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return True
            return sock.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False


class _Frames:
    """The request frames of one connection (SPEC 11), read into a buffer so that a frame
    that arrives whole costs one ``recv``: on this server the transport, not the answer,
    is most of a request's CPU (BENCHMARKS.md, round 3). The socket keeps one timeout,
    ``min(idle, REGISTRY_TIMEOUT)``, for every wait (answers are sent with it too), so no
    request pays for changing it; longer waits are counted out of such waits."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._timeout = -1.0

    def read(self, idle: float) -> dict[str, Any] | None:
        """The next request; None when the peer closed between frames. Raises
        ``RegistryError`` for a frame over the limit or not a JSON object, ``OSError``
        (``socket.timeout``) after ``idle`` seconds without a frame or ``REGISTRY_TIMEOUT``
        seconds without the rest of one, ``ConnectionBroken`` for a close inside one."""
        wait = min(idle, REGISTRY_TIMEOUT)
        if wait != self._timeout:
            self._sock.settimeout(wait)
            self._timeout = wait
        buffer = self._buffer
        deadline = time.monotonic() + idle
        while len(buffer) < _HEADER_SIZE:
            if not self._fill(deadline):
                if buffer:
                    raise ConnectionBroken("connection closed in the middle of a frame")
                return None
        size = int.from_bytes(buffer[:_HEADER_SIZE], "big")
        if size > MAX_REGISTRY_FRAME_SERVER:
            raise RegistryError(
                f"frame of {size} bytes exceeds the limit of {MAX_REGISTRY_FRAME_SERVER}"
            )
        end = _HEADER_SIZE + size
        deadline = time.monotonic() + REGISTRY_TIMEOUT
        while len(buffer) < end:
            if not self._fill(deadline):
                raise ConnectionBroken("connection closed in the middle of a frame")
        body = bytes(buffer[_HEADER_SIZE:end])
        del buffer[:end]
        return decode_frame(body)

    def _fill(self, deadline: float) -> bool:
        """Append what the peer sent next; False at end of stream. Raises
        ``socket.timeout`` once ``deadline`` (monotonic) has passed, also when a trickle of
        bytes keeps arriving."""
        while True:
            try:
                chunk = self._sock.recv(_RECV_SIZE)
            except socket.timeout:
                chunk = None
            if chunk == b"":
                return False
            if chunk:
                self._buffer += chunk
            if time.monotonic() >= deadline:
                raise socket.timeout("timed out waiting for a frame")
            if chunk:
                return True


class _TCPServer(socketserver.ThreadingTCPServer):
    """The listening socket, its connection caps, and the threads that serve connections.

    A thread whose connection closed waits (up to ``_IDLE_THREAD_SECONDS``, at most
    ``_IDLE_THREADS`` of them) for the next connection instead of ending: starting a thread
    costs about 130 us of CPU here, more than answering a request, and daemons open short
    connections when their calls overlap (BENCHMARKS.md, round 3).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        registry: Registry,
        limits: RegistryLimits,
        tls: ssl.SSLContext | None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.limits = limits
        self.tls = tls
        self._connections: set[socket.socket] = set()
        self._slots: ConnectionSlots[Any] = ConnectionSlots(
            limits.max_connections, limits.max_connections_per_source
        )
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log, DROP_LOG_PER_SECOND)
        self._idle_threads: list[queue.SimpleQueue[_Job | None]] = []
        self._closing = False
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the admitted connection in an idle thread, or in a new one."""
        job = (request, client_address)
        with self._lock:
            idle = self._idle_threads.pop() if self._idle_threads else None
        if idle is not None:
            idle.put(job)
        else:
            threading.Thread(target=self._work, args=(job,), daemon=True).start()

    def _work(self, job: _Job | None) -> None:
        """Serve ``job``, then wait for another while this thread may stay idle."""
        jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        while job is not None:
            self.process_request_thread(*job)
            with self._lock:
                if self._closing or len(self._idle_threads) >= _IDLE_THREADS:
                    return
                self._idle_threads.append(jobs)
            try:
                job = jobs.get(timeout=_IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    if jobs in self._idle_threads:
                        self._idle_threads.remove(jobs)
                        return
                job = jobs.get()  # handed a connection just as the wait ended

    def end_idle_threads(self) -> None:
        """Let every idle thread end, and keep none from now on."""
        with self._lock:
            self._closing = True
            idle, self._idle_threads = self._idle_threads, []
        for jobs in idle:
            jobs.put(None)

    def note(self, message: str, *args: object) -> None:
        """An INFO line about a connection, rate-limited (a flood cannot fill the disk)."""
        self._log.log(logging.INFO, time.monotonic(), message, *args)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection if both caps allow it; otherwise reset it unread."""
        source = str(client_address[0])
        answer = self._slots.take(request, source)
        if not answer.admitted:
            reset_close(request)
            self._log.log(
                logging.WARNING,
                time.monotonic(),
                "connection limit reached (%d open, %d from %s): reset a connection",
                answer.active,
                answer.from_source,
                source,
            )
        return answer.admitted

    def reconfigure(self, limits: RegistryLimits) -> None:
        """Apply the ``limits`` of a reloaded config to the connections from now on."""
        self.limits = limits
        self._slots.total = limits.max_connections
        self._slots.per_source = limits.max_connections_per_source

    def shutdown_request(self, request: Any) -> None:
        """Close the connection and release its slot (runs after every admitted handler)."""
        try:
            super().shutdown_request(request)
        finally:
            self._slots.release(request)

    def held(self, request: Any) -> contextlib.AbstractContextManager[None]:
        """While a poll of ``request``'s connection is held, its slot is free for others;
        it takes one again afterwards (above the cap if need be: held polls are bounded
        on their own)."""
        return self._slots.set_aside(request)

    def open_connections(self) -> int:
        """How many connections are admitted right now."""
        return len(self._slots)

    @contextlib.contextmanager
    def tracked(self, sock: socket.socket) -> Iterator[None]:
        """Register an open connection so ``close_connections`` can end it."""
        with self._lock:
            self._connections.add(sock)
        try:
            yield
        finally:
            with self._lock:
                self._connections.discard(sock)

    def close_connections(self, timeout: float) -> None:
        """Shut down every open connection and wait up to ``timeout`` seconds for their
        handlers to finish (so none is mid-request when the store closes)."""
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._connections:
                    return
            time.sleep(0.01)


class RegistryServer:
    """The embedded registry on ``(host, port)`` (port 0 picks a free one; see ``.address``).

    ``store_path`` persists nodes and vouches ("": memory only); ``config`` holds the
    networks and the limits (``config.load_config`` reads it from YAML); ``expiry`` is how
    long a node stays online without a heartbeat; ``certfile``/``keyfile`` serve TLS.
    Raises ``StoreError`` for an unreadable store, ``ConfigError`` for unusable TLS files,
    ``OSError`` when it cannot bind. ``registry`` is its state (``state.Registry``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        store_path: str = "",
        config: ServerConfig | None = None,
        expiry: float = REGISTRY_NODE_EXPIRY,
        certfile: str = "",
        keyfile: str = "",
    ) -> None:
        config = config or ServerConfig()
        self.registry = Registry(
            Store(store_path) if store_path else None,
            config.networks,
            limits=config.limits,
            expiry=expiry,
        )
        tls = None
        if certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                tls.load_cert_chain(certfile, keyfile or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{certfile}: cannot load TLS certificate: {exc}") from None
        self._server = _TCPServer((host, port), self.registry, config.limits, tls)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def open_connections(self) -> int:
        """How many client connections hold a slot right now (held polls do not)."""
        return self._server.open_connections()

    def reconfigure(self, config: ServerConfig) -> None:
        """Use ``config``'s networks and limits from now on (what SIGHUP does)."""
        self._server.reconfigure(config.limits)
        self.registry.reconfigure(config.networks, config.limits)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_SHUTDOWN_POLL,),
            name="pilot-registryd",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: close the listening socket, answer every held poll, close every
        connection, then the store (its snapshot then alone current). Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server.end_idle_threads()
        self.registry.end_polls()
        self._server.close_connections(_STOP_WAIT)
        self.registry.close()

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilot-registryd",
        description="Run a Pilot registry (its wire protocol) for a fleet on one machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
state:
  Without --store, nodes, their IDs, hostnames and trust vouches are kept in
    {DEFAULT_REGISTRY_STORE}
  (its directory is created, mode 0700), so node IDs survive a restart.
  --memory keeps nothing on disk: every restart hands out IDs afresh.

signals:
  SIGTERM, SIGINT  stop (held polls are answered, the store is compacted)
  SIGHUP           reload --config (networks, limits); a bad one is logged and not used

exit codes:
  0  stopped by SIGTERM or SIGINT
  1  bad config, unusable store, or cannot listen
  2  usage error""",
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to serve")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--store",
        default=DEFAULT_REGISTRY_STORE,
        metavar="PATH",
        help="keep the registry's state in this file (default: see 'state' below)",
    )
    where.add_argument(
        "--memory",
        action="store_true",
        help="keep nothing on disk (tests, throwaway runs)",
    )
    parser.add_argument(
        "--config", default="", metavar="PATH", help="YAML with networks: and limits:"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--tls-cert", default="", metavar="PATH", help="serve TLS (PEM)")
    parser.add_argument("--tls-key", default="", metavar="PATH", help="key of --tls-cert")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    return parser


def _store_path(args: argparse.Namespace) -> str:
    """The store file to use ("" for --memory); creates the default's directory."""
    if args.memory:
        return ""
    path = os.path.expanduser(str(args.store))
    directory = os.path.dirname(os.path.abspath(path))
    if args.store == DEFAULT_REGISTRY_STORE:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``pilot-registryd``: run the embedded registry until SIGTERM/SIGINT; the exit code."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    # Signals are taken with sigwait, by this thread only, and blocked everywhere else
    # (threads inherit the mask, so block before any starts): no handler runs at a random
    # point of this thread, where setting an Event this thread is waiting on can deadlock.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        return _run(args, host, port)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _run(args: argparse.Namespace, host: str, port: int) -> int:
    """Start the registry, then serve until SIGTERM/SIGINT, reloading on SIGHUP."""
    try:
        config = load_config(args.config) if args.config else ServerConfig()
        store_path = _store_path(args)
        server = RegistryServer(
            host,
            port,
            store_path=store_path,
            config=config,
            certfile=args.tls_cert,
            keyfile=args.tls_key,
        )
    except HandshakeError as exc:
        print(f"pilot-registryd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"pilot-registryd: cannot listen on {args.listen}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    server.start()
    print(f"pilot-registryd listening on {format_address(server.address)}", flush=True)
    log.info("store: %s", store_path or "none (--memory)")
    while signal.sigwait(_SIGNALS) == signal.SIGHUP:
        _reload(server, args.config)
    server.stop()
    log.info("pilot-registryd stopped")
    return 0


def _reload(server: RegistryServer, path: str) -> None:
    """SIGHUP: load the config again and use it; keep the running one if it fails."""
    if not path:
        log.warning("SIGHUP: started without --config, nothing to reload")
        return
    try:
        config = load_config(path)
    except HandshakeError as exc:
        log.error("SIGHUP: %s; keeping the running config", exc)
        return
    server.reconfigure(config)
    log.info(
        "SIGHUP: reloaded %s (%d networks; limits %s)",
        path,
        len(config.networks),
        ", ".join(f"{k}={v:g}" for k, v in vars(config.limits).items()),
    )
