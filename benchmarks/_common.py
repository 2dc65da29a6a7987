"""Shared helpers of the benchmarks: arguments, temp dirs, daemon processes, signed messages,
trust.json fixtures, statistics and the results file.

Everything runs on 127.0.0.1 with bounded loops; a benchmark prints its figures and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    # Run as `python benchmarks/bench_x.py` from a checkout without installing.
    sys.path.insert(0, ROOT)

from pilothandshake.identity import Identity, b64encode  # noqa: E402
from pilothandshake.messages import HANDSHAKE_REQUEST, HandshakeMsg  # noqa: E402
from pilothandshake.registry.client import encode_frame, read_frame  # noqa: E402
from pilothandshake.store import (  # noqa: E402
    PendingHandshake,
    TrustRecord,
    TrustState,
    encode_state,
)
from pilothandshake.testing import MemoryRuntime  # noqa: E402

BENCH_DIR = os.path.join(ROOT, "benchmarks")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
DAEMON = os.path.join(ROOT, "bin", "pilot-handshaked")
REGISTRYD = os.path.join(ROOT, "bin", "pilot-registryd")
LOOPBACK = "127.0.0.1"


# Arguments and reporting


def parse_args(
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    default_runs: int = 3,
) -> argparse.Namespace:
    """The common flags: ``--quick`` (a few seconds, one run), ``--runs`` (default
    ``default_runs``), ``--no-save``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run, seconds")
    parser.add_argument("--runs", type=int, default=0, help="repetitions (median reported)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.runs <= 0:
        args.runs = 1 if args.quick else default_runs
    return args


def machine() -> dict[str, Any]:
    """Cores, Python and OS of this machine, for BENCHMARKS.md."""
    import nacl

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if "model name" in line), "")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "fsync_ms": fsync_ms(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "pynacl": getattr(nacl, "__version__", "?"),
    }


def fsync_ms(count: int = 50) -> float:
    """Median time of a 1 KB write + fsync in a temp dir (what "durable" costs here)."""
    times = []
    with temp_dir() as directory:
        fd = os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(count):
                start = time.perf_counter()
                os.write(fd, b"x" * 1024)
                os.fsync(fd)
                times.append((time.perf_counter() - start) * 1e3)
        finally:
            os.close(fd)
    return median(times)


def save(name: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Write ``results`` to benchmarks/results/<name>.json (skipped with ``--no-save``)."""
    if args.no_save:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    doc = {
        "benchmark": name,
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "runs": args.runs,
        "machine": machine(),
        "results": results,
    }
    suffix = "-quick" if args.quick else ""
    with open(os.path.join(RESULTS_DIR, f"{name}{suffix}.json"), "w", encoding="utf-8") as out:
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing to files (the Agg backend), or None (said on stdout)
    when matplotlib is not installed: a benchmark's picture is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no picture; pip install matplotlib)")
        return None
    return plt


def verdict(name: str, value: float, target: float, *, at_most: bool, unit: str = "") -> bool:
    """Print one target line and return whether it is met."""
    met = value <= target if at_most else value >= target
    sign = "<=" if at_most else ">="
    outcome = "MET" if met else "MISSED"
    print(f"  target {name}: {value:.4g}{unit} {sign} {target:.4g}{unit}: {outcome}")
    return met


# Statistics


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` (0..1) percentile by linear interpolation; ``values`` need not be sorted."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


# Temp dirs, ports, processes


@contextlib.contextmanager
def temp_dir(prefix: str = "pilot-bench-") -> Iterator[str]:
    """A temporary directory (mode 0700) removed afterwards."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.002) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds pass; returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def can_connect(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:``port`` succeeds (the connection is closed again)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def yaml_config(directory: str, node_id: int, port: int, **extra: Any) -> str:
    """Write a daemon config (SPEC 12) into ``directory`` and return its path.

    Without a registry unless ``registry`` is given; per-source limits raised because every
    benchmark client shares 127.0.0.1; logging at ERROR so drops of a flood cost no I/O.
    """
    config: dict[str, Any] = {
        "identity": os.path.join(directory, "identity.json"),
        "listen": f"{LOOPBACK}:{port}",
        "trust": {"auto_approve": True},
        "max_connections": 256,
        "max_connections_per_source": 256,
        "max_replay_per_source": 8192,
        "log_level": "error",
    }
    if node_id:
        config["node_id"] = node_id
    config.update(extra)
    path = os.path.join(directory, "config.yaml")
    with open(path, "w", encoding="utf-8") as out:
        # JSON is YAML: no need to import PyYAML here.
        json.dump(config, out, indent=2)
    return path


def start_registry(directory: str, config: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """``bin/pilot-registryd`` on a free loopback port, its store and log in ``directory``
    (and ``--config config`` when given); returns the process and its address once it
    accepts. Raises ``RuntimeError`` when it does not start."""
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    argv = [sys.executable, REGISTRYD, "--listen", address]
    argv += ["--store", os.path.join(directory, "registry.json")]
    argv += ["--config", config] if config else []
    with open(os.path.join(directory, "registry.log"), "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    if not wait_until(lambda: can_connect(port), 20.0, 0.05):
        proc.kill()
        proc.wait(5)
        raise RuntimeError("pilot-registryd did not start")
    return proc, address


class DaemonProcess:
    """``bin/pilot-handshaked --config PATH`` in a process of its own; ``start()`` returns once
    it prints its start line (it then accepts on its listen address)."""

    def __init__(self, config_path: str, log_path: str) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.started_at = 0.0

    def start(self, timeout: float = 20.0) -> str:
        """Start and wait for the start line; returns it. Raises ``RuntimeError`` on failure."""
        self.started_at = time.monotonic()
        log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(
            [sys.executable, DAEMON, "--config", self.config_path],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
        )
        log.close()
        assert self.proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not lines or not lines[0]:
            self.stop()
            with open(self.log_path, encoding="utf-8") as err:
                raise RuntimeError(f"daemon did not start: {err.read()[-2000:]}")
        return lines[0].strip()

    @property
    def pid(self) -> int:
        """The daemon's process ID."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait (bounded), SIGKILL if it does not stop; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Signed messages and trust.json fixtures


def signed_request(
    identity: Identity, node_id: int, recipient: int, justification: str = "benchmark"
) -> bytes:
    """A strict-mode ``handshake_request`` (key and ``signature_v2``) from ``node_id``."""
    msg = HandshakeMsg(
        type=HANDSHAKE_REQUEST,
        node_id=node_id,
        public_key=identity.public_key_b64,
        justification=justification,
        timestamp=int(time.time()),
    )
    msg.signature_v2 = b64encode(identity.sign(msg.v2_challenge(recipient)))
    return msg.to_json()


def identities(count: int) -> list[Identity]:
    """``count`` fresh in-memory identities."""
    return [Identity.generate() for _ in range(count)]


def random_keys(count: int) -> list[str]:
    """``count`` valid base64 Ed25519 public keys of fresh identities."""
    return [Identity.generate().public_key_b64 for _ in range(count)]


def write_trust_file(
    directory: str, trusted: dict[int, str], pending: dict[int, str] | None = None
) -> str:
    """Write trust.json in ``directory`` with these trusted (and pending) peers, each given as
    node ID -> base64 public key. Returns the path."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    state = TrustState()
    for node, key in trusted.items():
        state.trusted[node] = TrustRecord(node, key, now, mutual=False)
    for node, key in (pending or {}).items():
        state.pending[node] = PendingHandshake(node, key, "benchmark", now, bound=False)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, "trust.json")
    with open(path, "wb") as out:
        out.write(encode_state(state))
    os.chmod(path, 0o600)
    return path


# An in-process Manager host: no network, no registry.


def bench_runtime(directory: str, auto_approve: bool = False) -> MemoryRuntime:
    """A Runtime for an in-process ``Manager`` on node 1: persistence in ``directory``, no
    registry, no peer can be dialled (as in a daemon for a peer with no known address)."""
    runtime = MemoryRuntime(1, directory, auto_approve=auto_approve)
    runtime.dialable = False
    runtime.dial_fails = True
    return runtime


def quiet_logging() -> None:
    """Only errors: drop and best-effort-send lines would otherwise cost the run I/O."""
    import logging

    logging.basicConfig(level=logging.ERROR)


def save_figure(fig: Any, out: str) -> None:
    """Write a matplotlib figure to ``out`` (PNG), close it, and say where it went."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(f"  picture: {os.path.relpath(out, ROOT)}")


def register_from(registry: str, host: str, key: str, listen: str) -> None:
    """Register ``key`` at the Go registry over a connection from ``host``: the Go registry
    allows 10 registrations per source address per minute, and a node of a real fleet
    registers from an address of its own."""
    reg_host, reg_port = registry.rsplit(":", 1)
    with socket.create_connection(
        (reg_host, int(reg_port)), timeout=10.0, source_address=(host, 0)
    ) as sock:
        sock.sendall(encode_frame({"type": "register", "listen_addr": listen, "public_key": key}))
        answer = read_frame(sock, 1 << 20, 10.0, 10.0)
    if answer is None or answer.get("type") != "register_ok":
        raise RuntimeError(f"the Go registry refused to register {host}: {answer}")
