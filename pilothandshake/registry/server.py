"""``pilot-registryd``: the embedded registry's socket server and its command line.

The protocol lives in ``state.Registry.handle``; this module moves frames (SPEC 11) and
enforces the connection limits of the config's ``limits:``: at most ``max_connections``
connections at once and ``max_connections_per_source`` from one address (more are reset
unread, without a thread), and a connection silent for ``idle_timeout`` between requests
is closed.

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
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from .._version import __version__
from ..constants import (
    DEFAULT_REGISTRY_STORE,
    DROP_LOG_PER_SECOND,
    MAX_REGISTRY_FRAME_SERVER,
    REGISTRY_NODE_EXPIRY,
    REGISTRY_TIMEOUT,
)
from ..errors import ConfigError, HandshakeError, RegistryError
from ..messages import format_address, parse_address
from ..wire import reset_close
from .client import encode_frame, read_frame
from .config import Limits, ServerConfig, load_config
from .ratelimit import RateLimitedLog
from .state import Registry
from .storage import Store

__all__ = ["RegistryServer", "main"]

log = logging.getLogger(__name__)

# How often serve_forever checks for shutdown: bounds how long stop() takes.
_SHUTDOWN_POLL = 0.1


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
        idle = self.server.limits.idle_timeout
        while True:
            try:
                request = read_frame(sock, MAX_REGISTRY_FRAME_SERVER, idle, REGISTRY_TIMEOUT)
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
                sock.sendall(encode_frame(registry.handle(request, source)))
            except OSError as exc:
                log.debug("cannot answer %s: %s", source, exc)
                return


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        registry: Registry,
        limits: Limits,
        tls: ssl.SSLContext | None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.limits = limits
        self.tls = tls
        self._connections: set[socket.socket] = set()
        self._per_source: dict[str, int] = {}
        self._admitted: dict[Any, str] = {}
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log, DROP_LOG_PER_SECOND)
        super().__init__(address, _Handler)

    def note(self, message: str, *args: object) -> None:
        """An INFO line about a connection, rate-limited (a flood cannot fill the disk)."""
        self._log.log(logging.INFO, time.monotonic(), message, *args)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection if both caps allow it; otherwise reset it unread."""
        source = str(client_address[0])
        with self._lock:
            from_source = self._per_source.get(source, 0)
            admitted = (
                len(self._admitted) < self.limits.max_connections
                and from_source < self.limits.max_connections_per_source
            )
            if admitted:
                self._admitted[request] = source
                self._per_source[source] = from_source + 1
            active = len(self._admitted)
        if not admitted:
            reset_close(request)
            self._log.log(
                logging.WARNING,
                time.monotonic(),
                "connection limit reached (%d open, %d from %s): reset a connection",
                active,
                from_source,
                source,
            )
        return admitted

    def shutdown_request(self, request: Any) -> None:
        """Close the connection and release its slot (runs after every admitted handler)."""
        try:
            super().shutdown_request(request)
        finally:
            with self._lock:
                source = self._admitted.pop(request, None)
                if source is not None:
                    left = self._per_source[source] - 1
                    if left:
                        self._per_source[source] = left
                    else:
                        del self._per_source[source]

    def open_connections(self) -> int:
        """How many connections are admitted right now."""
        with self._lock:
            return len(self._admitted)

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

    def close_connections(self) -> None:
        """Shut down every open connection (their handler threads then end)."""
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


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
        """How many client connections are open right now."""
        return self._server.open_connections()

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
        """Stop serving, close the listening socket and every open connection. Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

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
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"pilot-registryd listening on {format_address(server.address)}", flush=True)
    log.info("store: %s", store_path or "none (--memory)")
    # A bounded wait keeps the main thread responsive to signals on every platform.
    while not stop.wait(1.0):
        pass
    server.stop()
    log.info("pilot-registryd stopped")
    return 0
