"""Issue 10.3: a fleet of N pilot-handshaked processes and one pilot-registryd on loopback.

Every node listens on an address of its own (127.0.0.<10+i>), all N are in one registry
network (SPEC 6 row 3: trust by shared network), and every node asks every other for trust
(full mesh: N x (N-1) requests through the control sockets, one thread per node). Figures
for each N: the time from the first request until every pair is trusted both ways, the
registry's CPU seconds and the registry requests per second in that time (counted by
the daemons' metrics), the daemons' total RSS, and the fleet's idle CPU (all
daemons plus the registry) over 30 s after convergence, as a percentage of one core. Every
log is checked for ERROR lines. Targets for N = 50: full mesh <= 60 s, idle <= 5 % of one
core, no error.

    .venv/bin/python benchmarks/bench_fleet.py [--quick] [--sizes 10,25,50] [--idle S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import _common as c
import yaml

from pilothandshake.identity import Identity

NETWORK = 7
TARGET_MESH_S = 60.0
TARGET_IDLE_PCT = 5.0


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


def _registry_requests(sockets: list[str]) -> float:
    """Registry requests made so far by all the daemons (their metrics, control ``metrics``)."""
    total = 0.0
    for path in sockets:
        for line in _control(path, "metrics")["data"]["text"].splitlines():
            if line.startswith("pilot_handshake_registry_requests_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _errors(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as log:
        return [line.rstrip() for line in log if " ERROR " in line or '"ERROR"' in line]


def one_fleet(size: int, idle_seconds: float) -> dict[str, Any]:
    with c.temp_dir("pilot-fleet-") as root:
        keys = []
        for index in range(size):
            directory = os.path.join(root, f"node-{index}")
            os.makedirs(directory, mode=0o700)
            identity = Identity.load_or_create(os.path.join(directory, "identity.json"))
            keys.append(identity.public_key_b64)
        reg_config = os.path.join(root, "registry.yaml")
        with open(reg_config, "w", encoding="utf-8") as out:
            # YAML, not JSON: a network ID must be an integer key ("3" is refused).
            yaml.safe_dump(
                {
                    "networks": {NETWORK: keys},
                    "limits": {
                        "register_per_minute": 10 * size,
                        "max_connections": 4096,
                        "max_connections_per_source": 4096,
                    },
                },
                out,
            )
        logs = [os.path.join(root, "registry.log")]
        registry, reg_addr = c.start_registry(root, reg_config)
        daemons: list[c.DaemonProcess] = []
        try:
            sockets, node_ids = [], []
            for index in range(size):
                directory = os.path.join(root, f"node-{index}")
                host = f"127.0.0.{10 + index}"
                config = c.yaml_config(
                    directory,
                    0,
                    0,
                    listen=f"{host}:{_free_port(host)}",
                    registry={"address": reg_addr},
                    trust={"auto_approve": False},
                    log_level="warning",
                )
                logs.append(os.path.join(directory, "daemon.log"))
                daemon = c.DaemonProcess(config, logs[-1])
                daemons.append(daemon)
                line = daemon.start()
                node_ids.append(int(line.split("node ", 1)[1].split()[0]))
                sockets.append(os.path.join(directory, "control.sock"))
            requests0 = _registry_requests(sockets)
            started = time.monotonic()
            reg_cpu0 = c.cpu_seconds(registry.pid)
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

            def converged() -> bool:
                return all(
                    _control(path, "status")["data"]["trusted"] >= size - 1 for path in sockets
                )

            done = c.wait_until(converged, 300.0, 0.25)
            mesh_s = time.monotonic() - started
            for thread in threads:
                thread.join(60)
            reg_cpu = c.cpu_seconds(registry.pid) - reg_cpu0
            requests = _registry_requests(sockets) - requests0
            rss_mib = sum(c.rss_kib(daemon.pid) for daemon in daemons) / 1024
            pids = [registry.pid, *(daemon.pid for daemon in daemons)]
            time.sleep(2.0)  # let the last background reports settle before idling
            before = sum(c.cpu_seconds(pid) for pid in pids)
            time.sleep(idle_seconds)
            idle_pct = (sum(c.cpu_seconds(pid) for pid in pids) - before) / idle_seconds * 100
        finally:
            for daemon in daemons:
                daemon.stop()
            registry.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                registry.wait(15)
        errors = [line for path in logs for line in _errors(path)]
    return {
        "size": size,
        "converged": done,
        "mesh_s": mesh_s,
        "registry_cpu_s": reg_cpu,
        "registry_requests": requests,
        "registry_requests_per_s": requests / mesh_s,
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
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([5] if args.quick else [10, 25, 50])
    idle = args.idle or (5.0 if args.quick else 30.0)
    print(f"bench_fleet: sizes {sizes}, idle {idle:.0f} s")
    results = []
    for size in sizes:
        result = one_fleet(size, idle)
        results.append(result)
        print(
            f"  N={size}: full mesh {result['mesh_s']:.1f} s (converged {result['converged']}), "
            f"registry CPU {result['registry_cpu_s']:.2f} s, "
            f"{result['registry_requests']:.0f} registry requests "
            f"({result['registry_requests_per_s']:.0f}/s), daemons RSS "
            f"{result['daemon_rss_mib']:.0f} MiB, idle fleet {result['idle_cpu_pct']:.2f} % "
            f"of a core, errors {result['error_count']}, failed requests "
            f"{len(result['request_failures'])}"
        )
        for line in result["errors"][:3]:
            print(f"    error: {line}")
    last = results[-1]
    if last["size"] >= 50:
        c.verdict("full mesh at N=50", last["mesh_s"], TARGET_MESH_S, at_most=True, unit=" s")
        c.verdict("idle fleet", last["idle_cpu_pct"], TARGET_IDLE_PCT, at_most=True, unit=" %")
        c.verdict("errors", last["error_count"], 0, at_most=True)
    c.save("fleet", args, {"results": results})
    if not args.quick and len(results) > 1:
        _plot(results)
    return 0


def _plot(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(sizes, [r["mesh_s"] for r in results], marker="o")
    left.set_xlabel("nodes")
    left.set_ylabel("time to full mesh (s)")
    right.plot(sizes, [r["idle_cpu_pct"] for r in results], marker="o")
    right.set_xlabel("nodes")
    right.set_ylabel("idle fleet CPU (% of one core)")
    c.save_figure(fig, os.path.join(c.BENCH_DIR, "fleet.png"))


if __name__ == "__main__":
    sys.exit(main())
