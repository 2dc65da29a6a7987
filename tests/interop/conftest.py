"""The real Pilot Protocol programs (Go) beside pilot-handshaked, on 127.0.0.1.

``PILOT_GO_BIN`` names a folder holding the Go ``registry``, ``beacon``, ``daemon`` and
``pilotctl`` (built as tests/interop/README.md says). Without it every test here is skipped,
with that reason. The ``gofleet`` fixture starts the Go processes and pilot-handshaked nodes
(the integration tests' ``Node``) each in its own temporary directory, on free ports, and
always stops every one of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.conftest import START_TIMEOUT, STOP_TIMEOUT, Fleet, Proc, free_port

from pilothandshake.identity import Identity
from pilothandshake.registry.client import RegistryConnection

GO_BIN_ENV = "PILOT_GO_BIN"
GO_PROGRAMS = ("registry", "beacon", "daemon", "pilotctl")
# The Go daemon heartbeats, and polls its relay inbox only with the heartbeat: every
# keepalive interval (30 s by default). One second keeps the tests short.
GO_KEEPALIVE = "1s"


def go_bin_problem() -> str:
    """Why the Go programs cannot be used here; "" when ``PILOT_GO_BIN`` has all four."""
    folder = os.environ.get(GO_BIN_ENV, "")
    if not folder:
        return (
            f"{GO_BIN_ENV} is not set: it must name a folder holding the Go Pilot Protocol "
            f"{', '.join(GO_PROGRAMS)} binaries (see tests/interop/README.md)"
        )
    missing = [p for p in GO_PROGRAMS if not os.access(Path(folder, p), os.X_OK)]
    if missing:
        return f"{GO_BIN_ENV}={folder} has no executable {', '.join(missing)}"
    return ""


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test in this folder is skipped without the Go binaries (so CI stays green on a
    machine that has none). Skipped here, not in a fixture: pytest reports a fixture's skip
    at each test's line, one summary line per test; this one is a single line for all."""
    problem = go_bin_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session", autouse=True)
def go_bin() -> Path:
    """The folder of the Go binaries (``pytest_runtest_setup`` skips without it)."""
    return Path(os.environ[GO_BIN_ENV])


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GoProc(Proc):
    """A Go program: it logs (``log/slog`` text lines) to stderr."""

    def wait_log(self, marker: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``marker`` appears in the log; fail with the log if it exits first."""
        deadline = time.monotonic() + timeout
        while marker not in self.stderr:
            assert self.popen is not None
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.stderr}")
            if time.monotonic() >= deadline:
                pytest.fail(f"{self.name} did not log {marker!r} in {timeout} s:\n{self.stderr}")
            time.sleep(0.02)


class GoBeacon(GoProc):
    """The Go beacon (NAT discovery and relay, UDP) on a free loopback port."""

    def __init__(self, go_bin: Path, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_udp_port()}"
        super().__init__("beacon", [str(go_bin / "beacon"), "-addr", self.address], directory)

    def start(self) -> GoBeacon:
        self.spawn()
        self.wait_log("beacon listening")
        return self


class GoRegistry(GoProc):
    """The Go (production) registry on a free loopback port, persisting to its directory."""

    def __init__(self, go_bin: Path, directory: Path, beacon: GoBeacon) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        super().__init__(
            "go-registry",
            [
                str(go_bin / "registry"),
                "-addr",
                self.address,
                "-beacon",
                beacon.address,
                "-store",
                str(directory / "registry.json"),
                "-log-level",
                "debug",
            ],
            directory,
        )

    def start(self) -> GoRegistry:
        self.spawn()
        self.wait_log("registry listening")
        return self

    def client(self, identity: Identity | None = None) -> RegistryConnection:
        """A pilothandshake registry client of this registry, signing as ``identity``."""
        return RegistryConnection(self.address, identity.sign if identity else None, timeout=5.0)


class GoDaemon(GoProc):
    """The Go Pilot daemon: its identity.json (and trust.json beside it) and its IPC socket
    live in its directory; ``pilotctl`` talks to it through that socket."""

    def __init__(
        self,
        go_bin: Path,
        name: str,
        directory: Path,
        registry: GoRegistry,
        beacon: GoBeacon,
        extra: list[str],
    ) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.go_bin = go_bin
        self.registry = registry
        self.identity_path = directory / "identity.json"
        self.socket_path = directory / "pilot.sock"
        self.background: list[subprocess.Popen[str]] = []
        super().__init__(
            name,
            [
                str(go_bin / "daemon"),
                "-registry",
                registry.address,
                "-beacon",
                beacon.address,
                "-listen",
                "127.0.0.1:0",
                "-socket",
                str(self.socket_path),
                "-identity",
                str(self.identity_path),
                "-keepalive",
                GO_KEEPALIVE,
                *extra,
            ],
            directory,
        )

    def start(self) -> GoDaemon:
        self.spawn()
        self.wait_log("daemon running")
        return self

    @property
    def key(self) -> str:
        """The base64 public key from its identity.json."""
        return str(json.loads(self.identity_path.read_text())["public_key"])

    def pilotctl(self, *args: str) -> dict[str, Any]:
        """Run ``pilotctl --json ARGS`` against this daemon; the ``data`` of an ok answer
        (fails the test otherwise)."""
        result = self.pilotctl_run(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        answer = json.loads(result.stdout)
        assert answer["status"] == "ok", answer
        return dict(answer["data"])

    def pilotctl_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``pilotctl --json ARGS`` as run."""
        return subprocess.run(
            self._pilotctl_argv(args), capture_output=True, text=True, timeout=30, env=self._env()
        )

    def pilotctl_background(self, *args: str) -> subprocess.Popen[str]:
        """Start ``pilotctl --json ARGS`` without waiting for it (the fleet ends it)."""
        process = subprocess.Popen(
            self._pilotctl_argv(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(),
        )
        self.background.append(process)
        return process

    def _pilotctl_argv(self, args: tuple[str, ...]) -> list[str]:
        return [str(self.go_bin / "pilotctl"), "--json", *args]

    def _env(self) -> dict[str, str]:
        # HOME is this daemon's directory, so no user's ~/.pilot/config.json is read.
        return {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.directory),
            "PILOT_SOCKET": str(self.socket_path),
            "PILOT_REGISTRY": self.registry.address,
        }

    @property
    def node_id(self) -> int:
        return int(self.pilotctl("info")["node_id"])

    def trusted(self) -> dict[int, dict[str, Any]]:
        """Its trusted peers by node ID, as ``pilotctl trust`` shows them."""
        return {int(r["node_id"]): r for r in self.pilotctl("trust")["trusted"]}

    def pending(self) -> dict[int, dict[str, Any]]:
        """Its pending requests by node ID, as ``pilotctl pending`` shows them."""
        return {int(r["node_id"]): r for r in self.pilotctl("pending")["pending"]}


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class _TapHandler(socketserver.BaseRequestHandler):
    """One client connection: forwarded to the upstream registry, each frame recorded."""

    server: Wiretap

    def handle(self) -> None:
        with socket.create_connection(self.server.upstream, timeout=5.0) as upstream:
            upstream.settimeout(None)  # an idle registry connection is not an error
            back = threading.Thread(
                target=self.server.pump, args=(upstream, self.request, "response"), daemon=True
            )
            back.start()
            self.server.pump(self.request, upstream, "request")
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_RDWR)
            back.join(5.0)


class Wiretap(socketserver.ThreadingTCPServer):
    """A loopback TCP proxy in front of a registry that records every frame both ways, so
    a test sees exactly what pilot-handshaked sent and what the Go registry answered."""

    daemon_threads = True
    allow_reuse_address = True
    MAX_FRAMES = 10_000  # bounds the record, whatever the test's duration

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _TapHandler)
        self.address = f"127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, name="wiretap", daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        """Forward frames byte for byte from ``source`` to ``sink`` until either side
        closes, recording each one's JSON object."""
        try:
            while True:
                header = _recv_exact(source, 4)
                body = _recv_exact(source, int.from_bytes(header, "big"))
                with self._lock:
                    if len(self.frames) < self.MAX_FRAMES:
                        self.frames.append((direction, json.loads(body)))
                sink.sendall(header + body)
        except (OSError, EOFError):
            return

    def responses(self, kind: str) -> list[dict[str, Any]]:
        """The registry's answers recorded so far whose type is ``kind``."""
        with self._lock:
            return [f for d, f in self.frames if d == "response" and f.get("type") == kind]

    def requests(self, kind: str) -> list[dict[str, Any]]:
        """The requests recorded so far whose type is ``kind``."""
        with self._lock:
            return [f for d, f in self.frames if d == "request" and f.get("type") == kind]

    def close(self) -> None:
        """Stop accepting; connections in flight end when their peers close."""
        self.shutdown()
        self.server_close()


@pytest.fixture
def wiretap_of() -> Iterator[Any]:
    """``wiretap_of(address)`` starts a Wiretap in front of that registry; all are closed
    at the end."""
    taps: list[Wiretap] = []

    def start(address: str) -> Wiretap:
        taps.append(Wiretap(address))
        return taps[-1]

    yield start
    for tap in taps:
        tap.close()


class GoFleet(Fleet):
    """A ``Fleet`` that also starts the Go beacon, registry and daemons."""

    def __init__(self, root: Path, go_bin: Path) -> None:
        super().__init__(root)
        self.go_bin = go_bin
        self.beacon: GoBeacon | None = None

    def go_registry(self) -> GoRegistry:
        """Start a beacon (once) and a Go registry that knows it."""
        if self.beacon is None:
            self.beacon = GoBeacon(self.go_bin, self.root / "beacon")
            self.procs.append(self.beacon)
            self.beacon.start()
        registry = GoRegistry(self.go_bin, self.root / f"go-registry{len(self.procs)}", self.beacon)
        self.procs.append(registry)
        return registry.start()

    def go_daemon(self, name: str, registry: GoRegistry, *extra: str) -> GoDaemon:
        """A Go daemon (not started), private unless ``extra`` says ``-public``."""
        assert self.beacon is not None, "start the Go registry first"
        daemon = GoDaemon(self.go_bin, name, self.root / name, registry, self.beacon, list(extra))
        self.procs.append(daemon)
        return daemon

    def close(self) -> None:
        """Stop the nodes first, then the registry and beacon: a Go daemon deregisters when
        it stops and waits out its registry reconnects when the registry is gone."""
        nodes = [p for p in self.procs if not isinstance(p, (GoRegistry, GoBeacon))]
        for proc in nodes:
            if isinstance(proc, GoDaemon):
                for process in proc.background:
                    process.kill()
                    process.communicate(timeout=STOP_TIMEOUT)
            proc.signal(signal.SIGTERM)
        for proc in nodes:
            with contextlib.suppress(Exception):
                proc.stop()
        super().close()


@pytest.fixture
def gofleet(go_bin: Path) -> Iterator[GoFleet]:
    """A GoFleet under a short temporary directory (AF_UNIX paths are limited to about 107
    bytes); every process it started is stopped at the end, whatever happened."""
    with tempfile.TemporaryDirectory(prefix="ph-go-") as root:
        fleet = GoFleet(Path(root), go_bin)
        try:
            yield fleet
        finally:
            fleet.close()
