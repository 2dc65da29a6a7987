"""``pilot-registryd``: the embedded registry's socket server and its command line.

The protocol lives in ``state.Registry`` (``stage`` and ``finish``); this module moves
frames (SPEC 11) and enforces the connection limits of the config's ``limits:``: at most
``max_connections`` connections at once and ``max_connections_per_source`` from one
address (more are reset unread), and a connection silent for ``idle_timeout`` between
requests is closed. One thread reads and answers every connection (``_Loop``, on epoll:
Linux), a second makes changes durable before they are answered (group commit); held
polls and TLS handshakes take threads of their own. A connection whose poll is held
(``wait``, SPEC 18) gives its slot back while it waits: held polls have their own bound
(one per node, ``limits.max_held_polls`` in all, kept by ``state.Registry``), so a
fleet's open polls never crowd out the caps meant for floods. ``stop`` answers every held
poll, then closes the connections and the store.

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
from collections.abc import Callable, Sequence
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
from .client import decode_frame, encode_frame
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

_Job = tuple[Callable[..., None], tuple[Any, ...]]  # a function and its arguments


class _Connection:
    """One client connection as the I/O loop sees it."""

    __slots__ = (
        "buffer",
        "busy",
        "closed",
        "events",
        "fd",
        "out",
        "raw",
        "since",
        "sock",
        "source",
    )

    def __init__(self, sock: socket.socket, raw: socket.socket, source: str) -> None:
        self.sock = sock  # frames move on it (raw, or its TLS wrapper)
        self.raw = raw  # as accepted: the key of its connection slot
        self.fd = sock.fileno()
        self.source = source
        self.buffer = bytearray()  # bytes read and not yet taken as a request
        self.out = b""  # the part of an answer the kernel has not taken yet
        self.since = time.monotonic()  # idle since, or the frame in the buffer began
        self.busy = False  # a request of it is answered elsewhere (commit, held poll)
        self.events = 0  # what it is registered for in the loop's epoll
        self.closed = False


class _Loop:
    """Every connection's reading and answering, in one thread (``registry-io``), on epoll.

    The transport, not the answer, was most of a request's CPU with a thread per connection
    (BENCHMARKS.md, round 3): a fleet keeps hundreds of connections open, and every
    request woke a thread of its own, which then competed for the GIL. Here one thread
    reads what is ready, answers a request that changed nothing at once (lookup, resolve,
    heartbeat), and hands one that did to the commit thread (``registry-commit``), which
    writes every staged journal line with one fsync (group commit) and only then lets its
    answers go. A held poll (``wait``) runs in a thread of the server's (its slot given
    back, ``_TCPServer.held``). While a request of a connection is answered elsewhere the
    loop reads nothing more from it, so answers keep the order of requests. Only this
    thread touches the epoll set and the connection table; other threads hand
    connections back through ``_post``.

    A frame must arrive whole within ``REGISTRY_TIMEOUT`` of its first byte and an answer
    be taken by the peer within as long; a connection with nothing for ``idle_timeout``
    seconds is closed (checked once a second).
    """

    def __init__(self, server: _TCPServer) -> None:
        self._server = server
        self._epoll = select.epoll()
        self._connections: dict[int, _Connection] = {}
        self._lock = threading.Lock()  # _posted, _woken, _stopping
        self._posted: list[tuple[_Connection, bytes | None]] = []
        self._woken = False
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._commits: list[tuple[_Connection, dict[str, Any], int]] = []
        self._commit_wake = threading.Condition()
        self._commit_closing = False
        self._thread = threading.Thread(target=self._run, name="registry-io", daemon=True)
        self._committer = threading.Thread(
            target=self._commit_loop, name="registry-commit", daemon=True
        )
        self._thread.start()
        self._committer.start()

    def add(self, sock: socket.socket, raw: socket.socket, source: str) -> None:
        """Serve a new connection (any thread)."""
        sock.setblocking(False)
        self._post(_Connection(sock, raw, source), None)

    def _post(self, connection: _Connection, answer: bytes | None) -> None:
        """Hand ``connection`` to the loop (from any other thread), with the answer to send
        first (None: a new connection)."""
        with self._lock:
            self._posted.append((connection, answer))
            woken, self._woken = self._woken, True
        if not woken:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_write, b"x")

    def stop(self, timeout: float) -> None:
        """Read no more requests; answer those in hand (commits, held polls: end the polls
        first) for up to ``timeout`` seconds; then close every connection. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")
        with self._commit_wake:
            self._commit_closing = True
            self._commit_wake.notify()
        self._committer.join(timeout)
        self._thread.join(timeout + 1.0)
        self._epoll.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- the loop thread --

    def _run(self) -> None:
        deadline = 0.0
        sweep = time.monotonic() + 1.0
        while True:
            events = self._epoll.poll(1.0)
            now = time.monotonic()
            for fd, mask in events:
                connection = self._connections.get(fd)
                if connection is None:  # the wake-up pipe
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                elif mask & select.EPOLLOUT:
                    self._guarded(self._flush, connection, now)
                else:
                    self._guarded(self._read, connection, now)
            with self._lock:
                posted, self._posted, self._woken = self._posted, [], False
                stopping = self._stopping
            for connection, answer in posted:
                self._guarded(self._resume, connection, now, answer)
            if stopping:
                deadline = deadline or now + _STOP_WAIT
                busy = any(c.busy for c in self._connections.values())
                if not busy or now >= deadline:
                    for connection in list(self._connections.values()):
                        self._close(connection)
                    return
            elif now >= sweep:
                sweep = now + 1.0
                self._sweep(now)

    def _guarded(
        self,
        step: Callable[[_Connection, float, bytes | None], None],
        connection: _Connection,
        now: float,
        answer: bytes | None = None,
    ) -> None:
        """Run one step for a connection; a fault ends that connection, never the loop."""
        try:
            step(connection, now, answer)
        except Exception:
            log.exception("internal error serving %s; closing its connection", connection.source)
            with contextlib.suppress(Exception):
                self._close(connection)

    def _resume(self, connection: _Connection, now: float, answer: bytes | None) -> None:
        """Take back a connection (new, or with the answer of a request served elsewhere)."""
        if answer is None:
            self._connections[connection.fd] = connection
        connection.busy = False
        connection.since = now
        if answer is not None:
            self._send(connection, answer, now)
        self._serve(connection, now)

    def _read(self, connection: _Connection, now: float, _: bytes | None = None) -> None:
        if self._stopping:
            return
        sock = connection.sock
        try:
            chunk = sock.recv(_RECV_SIZE)
            if isinstance(sock, ssl.SSLSocket):
                while chunk and sock.pending():  # decrypted bytes epoll cannot see
                    chunk += sock.recv(_RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            log.debug("connection from %s ended: %s", connection.source, exc)
            self._close(connection)
            return
        if not chunk:
            if connection.buffer:
                log.debug("%s closed the connection in a frame", connection.source)
            self._close(connection)
            return
        if not connection.buffer:
            connection.since = now  # a frame begins
        connection.buffer += chunk
        self._serve(connection, now)

    def _serve(self, connection: _Connection, now: float) -> None:
        """Answer the whole frames in the buffer, one at a time, while nothing of the
        connection is answered elsewhere; then set what the loop waits for."""
        buffer = connection.buffer
        while not (connection.closed or connection.busy or connection.out):
            if len(buffer) < _HEADER_SIZE:
                break
            size = int.from_bytes(buffer[:_HEADER_SIZE], "big")
            if size > MAX_REGISTRY_FRAME_SERVER:
                self._bad_frame(
                    connection,
                    f"frame of {size} bytes exceeds the limit of {MAX_REGISTRY_FRAME_SERVER}",
                )
                return
            end = _HEADER_SIZE + size
            if len(buffer) < end:
                break
            body = bytes(buffer[_HEADER_SIZE:end])
            del buffer[:end]
            connection.since = now
            try:
                request = decode_frame(body)
            except RegistryError as exc:
                self._bad_frame(connection, str(exc))
                return
            self._dispatch(connection, request, now)
        if not connection.closed:
            self._arm(connection)

    def _dispatch(self, connection: _Connection, request: dict[str, Any], now: float) -> None:
        if request.get("type") == "poll_handshakes" and request.get("wait"):
            connection.busy = True
            slot = contextlib.ExitStack()  # given back now, taken again after the poll
            slot.enter_context(self._server.held(connection.raw))
            self._server.spawn(self._hold, connection, request, slot)
            return
        response, seq = self._server.registry.stage(request, connection.source)
        if seq:
            connection.busy = True
            with self._commit_wake:
                self._commits.append((connection, response, seq))
                self._commit_wake.notify()
        else:
            self._send(connection, encode_frame(response), now)

    def _send(self, connection: _Connection, data: bytes, now: float) -> None:
        """Send what the kernel takes now; the rest waits for the socket to be writable."""
        try:
            sent = connection.sock.send(data)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            sent = 0
        except OSError as exc:
            log.debug("cannot answer %s: %s", connection.source, exc)
            self._close(connection)
            return
        connection.out = data[sent:]
        connection.since = now

    def _flush(self, connection: _Connection, now: float, _: bytes | None = None) -> None:
        self._send(connection, connection.out, now)
        self._serve(connection, now)

    def _arm(self, connection: _Connection) -> None:
        """Wait for what the connection needs next: room for its answer or its next
        request; nothing while a request of it is answered elsewhere (it is then out of
        the epoll set: a reset would be reported to the loop all that time)."""
        if connection.busy:
            events = 0
        elif connection.out:
            events = select.EPOLLOUT
        else:
            events = select.EPOLLIN
        if events == connection.events:
            return
        fd = connection.fd
        if not events:
            self._epoll.unregister(fd)
        elif connection.events:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        connection.events = events

    def _bad_frame(self, connection: _Connection, problem: str) -> None:
        self._server.note("bad frame from %s: %s; closing", connection.source, problem)
        with contextlib.suppress(OSError):
            connection.sock.send(encode_frame({"type": "error", "error": problem}))
        self._close(connection)

    def _sweep(self, now: float) -> None:
        """Close connections idle too long, and those stuck in a frame or an answer."""
        idle = self._server.limits.idle_timeout
        for connection in list(self._connections.values()):
            if connection.busy:
                continue
            limit = REGISTRY_TIMEOUT if connection.buffer or connection.out else idle
            if now - connection.since > limit:
                log.debug("closing the connection from %s: timed out", connection.source)
                self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        self._connections.pop(connection.fd, None)
        if connection.events:
            connection.events = 0
            with contextlib.suppress(OSError):
                self._epoll.unregister(connection.fd)
        if connection.sock is not connection.raw:
            connection.sock.close()
        self._server.shutdown_request(connection.raw)

    # -- other threads --

    def _commit_loop(self) -> None:
        """Make staged lines durable (one write and fsync for all staged so far) and hand
        their answers to the loop; until ``stop``, after answering what is in hand."""
        registry = self._server.registry
        while True:
            with self._commit_wake:
                while not (self._commits or self._commit_closing):
                    self._commit_wake.wait()
                batch, self._commits = self._commits, []
            if not batch:
                return
            for connection, response, seq in batch:
                self._post(connection, encode_frame(registry.finish(response, seq)))

    def _hold(
        self, connection: _Connection, request: dict[str, Any], slot: contextlib.ExitStack
    ) -> None:
        """A held poll, in a thread of its own; ``slot`` (the connection's, given back
        while the poll is held) is taken again when it is answered."""
        with slot:
            response = self._server.registry.handle(
                request, connection.source, lambda: _open(connection.sock)
            )
        self._post(connection, encode_frame(response))


def _open(sock: socket.socket) -> bool:
    """Whether the peer still has ``sock`` open: it has not closed (or half-closed) or reset
    it. Never waits, reads nothing (pipelined bytes count as open; TLS alike)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


class _TCPServer(socketserver.TCPServer):
    """The listening socket, its connection caps, and the threads of held polls (and of
    TLS handshakes): connections are served by ``_Loop``.

    A thread whose job is done waits (up to ``_IDLE_THREAD_SECONDS``, at most
    ``_IDLE_THREADS`` of them) for the next job instead of ending: starting a thread costs
    about 130 us of CPU here, more than answering a request (BENCHMARKS.md, round 3).
    """

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
        self._slots: ConnectionSlots[Any] = ConnectionSlots(
            limits.max_connections, limits.max_connections_per_source
        )
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log, DROP_LOG_PER_SECOND)
        self._idle_threads: list[queue.SimpleQueue[_Job | None]] = []
        self._closing = False
        super().__init__(address, socketserver.BaseRequestHandler)
        self.loop = _Loop(self)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the admitted connection in the loop (after its TLS handshake, in a thread)."""
        source = str(client_address[0])
        if self.tls is None:
            self.loop.add(request, request, source)
        else:
            self.spawn(self._tls_accept, request, source)

    def _tls_accept(self, request: socket.socket, source: str) -> None:
        try:
            request.settimeout(REGISTRY_TIMEOUT)
            assert self.tls is not None
            sock = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            self.note("TLS handshake with %s failed: %s", source, exc)
            self.shutdown_request(request)
            return
        self.loop.add(sock, request, source)

    def spawn(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function(*args)`` in an idle thread, or in a new one."""
        job = (function, args)
        with self._lock:
            idle = self._idle_threads.pop() if self._idle_threads else None
        if idle is not None:
            idle.put(job)
        else:
            threading.Thread(target=self._work, args=(job,), daemon=True).start()

    def _work(self, job: _Job | None) -> None:
        """Run ``job``, then wait for another while this thread may stay idle."""
        jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        while job is not None:
            function, args = job
            try:
                function(*args)
            except Exception:
                log.exception("internal error in a connection's thread")
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
                job = jobs.get()  # handed a job just as the wait ended

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
        self.registry.end_polls()
        self._server.loop.stop(_STOP_WAIT)
        self._server.end_idle_threads()
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
