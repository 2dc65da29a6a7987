"""Issues 10.3 and 18.4: a fleet of N pilot-handshaked processes and one pilot-registryd on
loopback.

Every node listens on an address of its own (127.0.0.<10+i>), all N are in one registry
network (SPEC 6 row 3: trust by shared network), and every node asks every other for trust
(full mesh: N x (N-1) requests through the control sockets, one thread per node). Figures
for each N: the time from the first request until every pair is trusted both ways, the
registry's CPU seconds and the registry requests per second in that time (counted by
the daemons' metrics), the registry's CPU per request, the daemons' total RSS, and the
fleet's idle CPU (all daemons plus the registry) over 30 s after convergence, as a
percentage of one core, with the registry requests per idle node per minute. Every log is
checked for ERROR lines. Targets (issue 18) for N = 100: full mesh <= 60 s; idle <= 5 % of
one core; no error; registry CPU per request <= 300 us.

With ``PILOT_GO_REGISTRY=/path/to/registry`` (the Go Pilot registry; its ``beacon`` is taken
from beside it, or from ``PILOT_GO_BEACON``) every N runs a second time against the Go
registry and a Go beacon, as a second series. That registry has no networks but the backbone:
it refuses ``create_network``, ``join_network`` and ``leave_network`` ("custom networks are
WIP") and its ``lookup`` answers ``networks: [0]``. So in that series every node trusts by
``trust.auto_approve`` (SPEC 6 row 5) instead of by shared network, and registers as public
(``registry.public``): the Go registry resolves a private node only for a trust pair or a
shared network, and without ``resolve`` every first request would go through the relay
inbox instead of port 444. It stores a node's address as the source address of the
registration with the port the node names; the daemons' registry connections come from
127.0.0.1, so there the nodes listen on 127.0.0.1, each on a port of its own (their port-444
traffic comes from 127.0.0.1 in both series). Its register limit (10 per source address per
minute, not configurable) is met by registering each key once from 127.0.0.(10+i) before the
daemon starts; the daemon's own registration (same key) is then exempt. Registry CPU and the
idle fleet include the Go registry (and the beacon, in the idle figure); its log lines are
slog text, checked for ``level=ERROR``.

    .venv/bin/python benchmarks/bench_fleet.py [--quick] [--sizes 10,25,50] [--idle S]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import _common as c
import yaml

from pilothandshake.identity import Identity

NETWORK = 7
TARGET_MESH_S = 60.0
TARGET_IDLE_PCT = 5.0
TARGET_CPU_PER_REQUEST_US = 300.0
PYTHON_SERIES = "pilot-registryd"
GO_SERIES = "Go registry (auto-approve)"
GO_TRUST = "auto_approve + public (the Go registry has no custom networks)"


@dataclass
class Registry:
    """The registry of one run: its processes (the registry first, then any beacon), its
    address and the logs to scan."""

    procs: list[subprocess.Popen[bytes]]
    address: str
    logs: list[str]
    go: bool = False

    def stop(self) -> None:
        """SIGTERM every process and wait (bounded); SIGKILL one that does not stop."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _go_binaries() -> tuple[str, str] | None:
    """The Go registry and beacon from ``PILOT_GO_REGISTRY`` (and ``PILOT_GO_BEACON``, else
    the ``beacon`` beside the registry); None when the variable is not set."""
    registry = os.environ.get("PILOT_GO_REGISTRY", "")
    if not registry:
        return None
    beacon = os.environ.get("PILOT_GO_BEACON", "") or os.path.join(
        os.path.dirname(registry), "beacon"
    )
    for path in (registry, beacon):
        if not os.access(path, os.X_OK):
            sys.exit(f"bench_fleet: {path} is not an executable (PILOT_GO_REGISTRY/_BEACON)")
    return registry, beacon


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _start_python_registry(root: str, keys: list[str]) -> Registry:
    config = os.path.join(root, "registry.yaml")
    with open(config, "w", encoding="utf-8") as out:
        # YAML, not JSON: a network ID must be an integer key ("3" is refused).
        yaml.safe_dump(
            {
                "networks": {NETWORK: keys},
                "limits": {
                    "register_per_minute": 10 * len(keys),
                    "max_connections": 4096,
                    "max_connections_per_source": 4096,
                    # Every node of this fleet is in 127.0.0.0/24: one source.
                    "mutations_per_minute_per_source": 1000 * len(keys),
                    "mutations_per_minute_per_node": 10 * len(keys),
                },
            },
            out,
        )
    registry, address = c.start_registry(root, config)
    return Registry([registry], address, [os.path.join(root, "registry.log")])


def _start_go_registry(root: str, binaries: tuple[str, str]) -> Registry:
    registry_bin, beacon_bin = binaries
    beacon_log = os.path.join(root, "beacon.log")
    registry_log = os.path.join(root, "registry.log")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((c.LOOPBACK, 0))
        beacon_addr = f"{c.LOOPBACK}:{probe.getsockname()[1]}"
    started = Registry([], "", [registry_log, beacon_log], go=True)
    try:
        beacon = _spawn([beacon_bin, "-addr", beacon_addr], beacon_log)
        started.procs.append(beacon)

        def beacon_up() -> bool:
            with open(beacon_log, encoding="utf-8", errors="replace") as log:
                return "beacon listening" in log.read()

        if not c.wait_until(beacon_up, 20.0, 0.05):
            raise RuntimeError(f"the Go beacon did not start (see {beacon_log})")
        port = c.free_port()
        started.address = f"{c.LOOPBACK}:{port}"
        argv = [registry_bin, "-addr", started.address, "-beacon", beacon_addr]
        argv += ["-store", os.path.join(root, "go-registry.json"), "-log-level", "info"]
        started.procs.insert(0, _spawn(argv, registry_log))
        if not c.wait_until(lambda: c.can_connect(port), 20.0, 0.05):
            raise RuntimeError(f"the Go registry did not start (see {registry_log})")
    except BaseException:
        started.stop()
        raise
    return started


def _control(path: str, command: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """One request on a daemon's control socket; the decoded response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        with sock.makefile("rb") as lines:
            answer: dict[str, Any] = json.loads(lines.readline())
            return answer


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _registry_requests(sockets: list[str]) -> dict[str, float]:
    """Registry requests made so far by all the daemons, by type (their metrics, control
    ``metrics``), whatever the outcome; with the seconds the daemons waited for them in all
    under ``"seconds"``."""
    counts: dict[str, float] = {}
    for path in sockets:
        for line in _control(path, "metrics")["data"]["text"].splitlines():
            if line.startswith("pilot_handshake_registry_requests_total{"):
                kind = line.split('type="', 1)[1].split('"', 1)[0]
                counts[kind] = counts.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
            elif (
                line.startswith("pilot_handshake_registry_request_seconds_sum{")
                and 'type="poll_handshakes"' not in line  # a held poll waits by design
            ):
                counts["seconds"] = counts.get("seconds", 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _machine_busy() -> float:
    """CPU seconds all cores have been busy since boot, every process's (Linux /proc/stat:
    everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {kind: count - before.get(kind, 0.0) for kind, count in after.items()}


def _errors(path: str) -> list[str]:
    """ERROR lines of a log: ours (text or JSON) and the Go programs' (slog text)."""
    with open(path, encoding="utf-8", errors="replace") as log:
        return [
            line.rstrip()
            for line in log
            if " ERROR " in line or '"ERROR"' in line or "level=ERROR" in line
        ]


def one_fleet(size: int, idle_seconds: float, go: tuple[str, str] | None) -> dict[str, Any]:
    """One run of ``size`` nodes against pilot-registryd, or against the Go registry and
    beacon ``go`` (registry, beacon paths); its figures."""
    with c.temp_dir("pilot-fleet-") as root:
        keys = []
        for index in range(size):
            directory = os.path.join(root, f"node-{index}")
            os.makedirs(directory, mode=0o700)
            identity = Identity.load_or_create(os.path.join(directory, "identity.json"))
            keys.append(identity.public_key_b64)
        registry = _start_go_registry(root, go) if go else _start_python_registry(root, keys)
        logs = list(registry.logs)
        daemons: list[c.DaemonProcess] = []
        try:
            sockets, node_ids = [], []
            for index in range(size):
                directory = os.path.join(root, f"node-{index}")
                host = f"127.0.0.{10 + index}"
                # The Go registry stores a node's address as the source address of its
                # registration with the port it names, and the daemon registers from
                # 127.0.0.1: there each node listens on 127.0.0.1 (a port of its own).
                listen_host = c.LOOPBACK if registry.go else host
                listen = f"{listen_host}:{_free_port(listen_host)}"
                if registry.go:
                    c.register_from(registry.address, host, keys[index], listen)
                config = c.yaml_config(
                    directory,
                    0,
                    0,
                    listen=listen,
                    registry={"address": registry.address, "public": registry.go},
                    trust={"auto_approve": registry.go},
                    log_level="warning",
                )
                logs.append(os.path.join(directory, "daemon.log"))
                daemon = c.DaemonProcess(config, logs[-1])
                daemons.append(daemon)
                line = daemon.start()
                node_ids.append(int(line.split("node ", 1)[1].split()[0]))
                sockets.append(os.path.join(directory, "control.sock"))
            reg_pid = registry.procs[0].pid
            requests0 = _registry_requests(sockets)
            started = time.monotonic()
            reg_cpu0 = c.cpu_seconds(reg_pid)
            daemons_cpu0 = sum(c.cpu_seconds(daemon.pid) for daemon in daemons)
            driver_cpu0, machine_cpu0 = c.cpu_seconds(os.getpid()), _machine_busy()
            failures: list[str] = []

            def ask_all(index: int) -> None:
                for other, peer in enumerate(node_ids):
                    if other == index:
                        continue
                    answer = _control(
                        sockets[index], "handshake", node_id=peer, justification="mesh"
                    )
                    if answer.get("status") != "ok":
                        failures.append(f"{node_ids[index]} -> {peer}: {answer}")

            threads = [threading.Thread(target=ask_all, args=(i,)) for i in range(size)]
            for thread in threads:
                thread.start()

            # (seconds since the first request, trusted pairs so far), one every ~5 s: how
            # a slow mesh progresses (steady, or stalled).
            progress: list[tuple[float, int]] = []

            def converged() -> bool:
                trusted = [_control(path, "status")["data"]["trusted"] for path in sockets]
                elapsed = time.monotonic() - started
                if not progress or elapsed - progress[-1][0] >= 5.0:
                    progress.append((round(elapsed, 1), sum(trusted)))
                return all(count >= size - 1 for count in trusted)

            done = c.wait_until(converged, 300.0, 0.25)
            mesh_s = time.monotonic() - started
            load = os.getloadavg()[0]
            reg_cpu = c.cpu_seconds(reg_pid) - reg_cpu0
            daemons_cpu = sum(c.cpu_seconds(daemon.pid) for daemon in daemons) - daemons_cpu0
            driver_cpu = c.cpu_seconds(os.getpid()) - driver_cpu0
            machine_cpu = _machine_busy() - machine_cpu0
            for thread in threads:
                thread.join(60)
            by_kind = _minus(_registry_requests(sockets), requests0)
            waited = by_kind.pop("seconds", 0.0)
            requests = sum(by_kind.values())
            polls = by_kind.get("poll_handshakes", 0.0)
            rss_mib = sum(c.rss_kib(daemon.pid) for daemon in daemons) / 1024
            pids = [*(p.pid for p in registry.procs), *(daemon.pid for daemon in daemons)]
            time.sleep(2.0)  # let the last background reports settle before idling
            before = sum(c.cpu_seconds(pid) for pid in pids)
            idle_requests0 = _registry_requests(sockets)
            time.sleep(idle_seconds)
            idle_pct = (sum(c.cpu_seconds(pid) for pid in pids) - before) / idle_seconds * 100
            idle_by_kind = _minus(_registry_requests(sockets), idle_requests0)
            idle_by_kind.pop("seconds", None)
            idle_requests = sum(idle_by_kind.values())
            idle_rpm = idle_requests / size / (idle_seconds / 60)
        finally:
            for daemon in daemons:
                daemon.stop()
            registry.stop()
        errors = [line for path in logs for line in _errors(path)]
    return {
        "size": size,
        "registry": GO_SERIES if go else PYTHON_SERIES,
        "converged": done,
        "mesh_s": mesh_s,
        "registry_cpu_s": reg_cpu,
        "daemons_cpu_s": daemons_cpu,
        # This benchmark's own process (a thread per node asking, the status polls), and
        # every core's busy time on the machine (other jobs included) during the mesh.
        "driver_cpu_s": driver_cpu,
        "machine_busy_cpu_s": machine_cpu,
        "machine_cores": os.cpu_count() or 1,
        "load_average_at_mesh": load,
        "progress": progress,
        "registry_requests": requests,
        "registry_requests_per_s": requests / mesh_s,
        "registry_requests_by_type": by_kind,
        # Mean time a daemon waited for an answer (held polls left out): queueing at the
        # registry shows here.
        "registry_latency_ms": waited / (requests - polls) * 1e3 if requests > polls else 0.0,
        "registry_cpu_us_per_request": reg_cpu / requests * 1e6 if requests else 0.0,
        "idle_requests_per_node_minute": idle_rpm,
        "daemon_rss_mib": rss_mib,
        "idle_cpu_pct": idle_pct,
        "request_failures": failures[:5],
        "errors": errors[:10],
        "error_count": len(errors),
    }


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="", help="fleet sizes, comma-separated")
    parser.add_argument("--idle", type=float, default=0.0, help="idle seconds measured")


def main() -> int:
    args = c.parse_args(__doc__.splitlines()[0], _extra, default_runs=1)
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([5] if args.quick else [10, 50, 100])
    idle = args.idle or (5.0 if args.quick else 30.0)
    go = _go_binaries()
    print(f"bench_fleet: sizes {sizes}, idle {idle:.0f} s")
    print(f"  load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if go:
        print(f"  second series: the Go registry {go[0]} (beacon {go[1]}), trust by {GO_TRUST}")
    series: dict[str, list[dict[str, Any]]] = {PYTHON_SERIES: []}
    if go:
        series[GO_SERIES] = []
    for size in sizes:
        # Both series of one N back to back, so a change in the machine's load hits both.
        for label, results in series.items():
            result = one_fleet(size, idle, go if label == GO_SERIES else None)
            results.append(result)
            _print(result)
    print(f"  load average at the end: {os.getloadavg()[0]:.2f}")
    for label, results in series.items():
        last = results[-1]
        if last["size"] >= 50:
            name = f"N={last['size']} ({label})"
            mesh, idle_pct = last["mesh_s"], last["idle_cpu_pct"]
            c.verdict(f"full mesh {name}", mesh, TARGET_MESH_S, at_most=True, unit=" s")
            c.verdict(f"idle fleet {name}", idle_pct, TARGET_IDLE_PCT, at_most=True, unit=" %")
            c.verdict(f"errors {name}", last["error_count"], 0, at_most=True)
            per_request = last["registry_cpu_us_per_request"]
            c.verdict(
                f"registry CPU per request {name}",
                per_request,
                TARGET_CPU_PER_REQUEST_US,
                at_most=True,
                unit=" us",
            )
    saved: dict[str, Any] = {"results": series[PYTHON_SERIES]}
    if go:
        saved.update(go_results=series[GO_SERIES], go_registry=go[0], go_trust=GO_TRUST)
    c.save("fleet", args, saved)
    if not (args.quick or args.no_save) and len(sizes) > 1:
        _plot(series)
    return 0


def _print(result: dict[str, Any]) -> None:
    print(
        f"  N={result['size']} {result['registry']}: full mesh {result['mesh_s']:.1f} s "
        f"(converged {result['converged']}), registry CPU {result['registry_cpu_s']:.2f} s, "
        f"{result['registry_requests']:.0f} registry requests "
        f"({result['registry_requests_per_s']:.0f}/s, "
        f"{result['registry_cpu_us_per_request']:.0f} us of registry CPU each), daemons CPU "
        f"{result['daemons_cpu_s']:.1f} s, this driver {result['driver_cpu_s']:.1f} s, the "
        f"machine busy {result['machine_busy_cpu_s']:.1f} of "
        f"{result['machine_cores'] * result['mesh_s']:.1f} core-seconds, load average "
        f"{result['load_average_at_mesh']:.1f}, "
        f"daemons RSS "
        f"{result['daemon_rss_mib']:.0f} MiB, idle fleet {result['idle_cpu_pct']:.2f} % "
        f"of a core ({result['idle_requests_per_node_minute']:.1f} registry requests per node "
        f"per minute), errors {result['error_count']}, failed requests "
        f"{len(result['request_failures'])}"
    )
    mix = ", ".join(f"{k} {v:.0f}" for k, v in sorted(result["registry_requests_by_type"].items()))
    print(
        f"    registry requests by type: {mix}; mean wait for an answer "
        f"{result['registry_latency_ms']:.1f} ms"
    )
    trace = " ".join(f"{t:.0f}s:{pairs}" for t, pairs in result["progress"])
    print(f"    trusted pairs over time: {trace}")
    for line in result["errors"][:3]:
        print(f"    error: {line}")


def _plot(series: dict[str, list[dict[str, Any]]]) -> bool:
    """Mesh time and idle CPU against N, each series; False without matplotlib (the
    results are saved before, so a missing plotting library loses nothing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no picture; pip install matplotlib)")
        return False

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, results in series.items():
        sizes = [r["size"] for r in results]
        left.plot(sizes, [r["mesh_s"] for r in results], marker="o", label=label)
        right.plot(sizes, [r["idle_cpu_pct"] for r in results], marker="o", label=label)
    left.set_xlabel("nodes")
    left.set_ylabel("time to full mesh (s)")
    right.set_xlabel("nodes")
    right.set_ylabel("idle fleet CPU (% of one core)")
    if len(series) > 1:
        left.legend()
        right.legend()
    c.save_figure(fig, os.path.join(c.BENCH_DIR, "fleet.png"))
    return True


if __name__ == "__main__":
    sys.exit(main())
