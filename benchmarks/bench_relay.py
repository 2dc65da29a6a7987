"""Issues 5.4 and 18.4: relay latency and what an idle node costs its registry, with both
registries (SPEC 18).

Each run starts one registry and ``--pairs`` pairs of private ``pilot-handshaked``
processes with the default schedule (``poll_interval`` 2 s, ``poll_idle`` 60 s, heartbeat
60 s): A (requester) and C (approver). Each maps the other to a dead ``peers:`` address, so
nothing goes directly (as behind NAT): every message goes through the registry's relay. The
pairs run at once, so their poll phases are independent samples. Times come from the event
streams (``events --follow``), which poll nothing on demand:

- request -> pending: from A's ``handshake C`` to ``handshake.pending`` at C;
- approve -> trusted: from the return of C's ``approve A`` (the approval is durable) to
  ``trust.changed`` at A;
- idle cost: registry requests (the daemons' own metrics) per idle node per minute, over
  ``--idle`` seconds after the handshakes (every node idle: nothing waits).

Series: ``pilot-registryd`` (push: one held poll per node), and the Go registry (the
production one: no push, Go's schedule) from ``PILOT_GO_REGISTRY`` or ``/work/gobin``,
when present. Targets (issue 18): with pilot-registryd p50 <= 0.1 s and p99 <= 0.5 s for
both; with the Go registry approve -> trusted <= 4 s and request -> pending <= one idle
period (60 s); <= 3 requests per idle node per minute.

    .venv/bin/python benchmarks/bench_relay.py [--quick] [--runs N] [--pairs K] [--idle S]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import _common as c
import yaml

from pilothandshake.client import ControlClient, EventStream
from pilothandshake.identity import Identity

IDLE_PERIOD = 60.0  # registry.poll_idle by default
DEAD = "127.0.0.1:1"  # nothing listens there: a direct send fails at once
PENDING_TIMEOUT = 200.0
PUSH = "pilot-registryd (push)"
GO = "Go registry (schedule)"
TARGET_PUSH_P50, TARGET_PUSH_P99 = 0.1, 0.5
TARGET_GO_APPROVE, TARGET_GO_PENDING = 4.0, 60.0
TARGET_IDLE_REQUESTS = 3.0


class Node:
    """One private daemon with its config (rewritten to add ``peers``) and control client."""

    def __init__(self, directory: str, registry: str, source: str = "") -> None:
        os.makedirs(directory, mode=0o700)
        self.directory = directory
        self.config: dict[str, Any] = {
            "identity": os.path.join(directory, "identity.json"),
            "listen": f"{c.LOOPBACK}:{c.free_port()}",
            "registry": {"address": registry},
            "log_level": "info",
        }
        if source:
            # The Go registry allows 10 registrations per source address a minute: register
            # the key once from an address of its own, as a node of a real fleet would; the
            # daemon's own register of the known key is then exempt.
            key = Identity.load_or_create(self.config["identity"]).public_key_b64
            c.register_from(registry, source, key, self.config["listen"])
        self.path = os.path.join(directory, "config.yaml")
        self._write()
        self.process = c.DaemonProcess(self.path, os.path.join(directory, "daemon.log"))
        line = self.process.start()
        node = line.split("node ", 1)[1].split()[0] if "node " in line else "0"
        if node == "0":
            self.process.stop()
            raise RuntimeError(f"daemon did not register: {line}")
        self.node_id = int(node)
        self.control = ControlClient(os.path.join(directory, "control.sock"))

    def _write(self) -> None:
        with open(self.path, "w", encoding="utf-8") as out:
            yaml.safe_dump(self.config, out)

    def unreachable(self, peer: int) -> None:
        """Map ``peer`` to a dead address and reload (SIGHUP): no direct path either way."""
        self.config["peers"] = {peer: DEAD}
        self._write()
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGHUP)

    def reloaded(self) -> bool:
        with open(self.process.log_path, encoding="utf-8", errors="replace") as log:
            return "config reloaded" in log.read()

    def call(self, command: str, **args: Any) -> dict[str, Any]:
        """One control request; raises ``RuntimeError`` on an error response."""
        response = self.control.request(command, **args)
        if response.get("status") != "ok":
            raise RuntimeError(f"{command} {args}: {response}")
        data: dict[str, Any] = response["data"]
        return data

    def registry_requests(self) -> float:
        """Registry requests this daemon made so far (its metrics)."""
        text = self.call("metrics")["text"]
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("pilot_handshake_registry_requests_total{")
        )

    def relay_mode(self) -> str:
        return str(self.call("status")["registry"].get("relay", "poll"))


class Watch:
    """Records when a ``topic`` event about ``peer`` arrives at a node (its event stream)."""

    def __init__(self, node: Node, topic: str, peer: int) -> None:
        self.at = 0.0
        self._stream = EventStream(node.control, history=False, follow=True)
        self._topic, self._peer = topic, peer
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                data = event.get("data") or {}
                if event.get("event") == self._topic and data.get("peer_node_id") == self._peer:
                    self.at = time.monotonic()
                    return

    def close(self) -> None:
        self._stream.close()


class Pair:
    """One handshake between a requester and an approver, timed from both event streams:
    the approver approves as soon as the request is pending (in the requester's fast
    window, as an operator at the console would)."""

    def __init__(self, a: Node, cc: Node) -> None:
        self.a, self.cc = a, cc
        self.pending = self.trusted = 0.0
        self.error = ""

    def run(self, offset: float) -> None:
        try:
            time.sleep(offset)
            arrived = Watch(self.cc, "handshake.pending", self.a.node_id)
            granted = Watch(self.a, "trust.changed", self.cc.node_id)
            sent = time.monotonic()
            answer = self.a.call("handshake", node_id=self.cc.node_id, justification="bench")
            if answer["status"] != "relayed":
                raise RuntimeError(f"not relayed: {answer}")
            if not c.wait_until(lambda: bool(arrived.at), PENDING_TIMEOUT, 0.01):
                raise RuntimeError("the relayed request never became pending")
            self.pending = arrived.at - sent
            self.cc.call("approve", node_id=self.a.node_id)
            approved = time.monotonic()  # the approval is durable: the answer is on its way
            if not c.wait_until(lambda: bool(granted.at), PENDING_TIMEOUT, 0.01):
                raise RuntimeError("the approval never reached the requester")
            self.trusted = granted.at - approved
            arrived.close()
            granted.close()
        except Exception as exc:
            self.error = f"{self.a.node_id} -> {self.cc.node_id}: {exc}"


def _go_registry() -> str:
    path = os.environ.get("PILOT_GO_REGISTRY", "") or "/work/gobin/registry"
    return path if os.access(path, os.X_OK) else ""


@contextlib.contextmanager
def registry(kind: str, root: str) -> Iterator[str]:
    """A registry of ``kind`` in ``root``; its address."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if kind == PUSH:
            # Every daemon here registers from 127.0.0.1: lift the per-source register
            # limit (10 a minute), as a fleet of machines would not meet it.
            config = os.path.join(root, "registry.yaml")
            with open(config, "w", encoding="utf-8") as out:
                yaml.safe_dump({"limits": {"register_per_minute": 10_000}}, out)
            proc, address = c.start_registry(root, config)
            procs.append(proc)
        else:
            go = _go_registry()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((c.LOOPBACK, 0))
                beacon = f"{c.LOOPBACK}:{probe.getsockname()[1]}"
            log = open(os.path.join(root, "go.log"), "w", encoding="utf-8")  # noqa: SIM115
            beacon_bin = os.path.join(os.path.dirname(go), "beacon")
            procs.append(subprocess.Popen([beacon_bin, "-addr", beacon], stderr=log))
            port = c.free_port()
            address = f"{c.LOOPBACK}:{port}"
            argv = [go, "-addr", address, "-beacon", beacon, "-log-level", "warn"]
            argv += ["-store", os.path.join(root, "go-registry.json")]
            procs.insert(0, subprocess.Popen(argv, stderr=log))
            log.close()
            if not c.wait_until(lambda: c.can_connect(port), 20.0, 0.05):
                raise RuntimeError("the Go registry did not start")
        yield address
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def one_run(kind: str, pairs: int, idle: float) -> dict[str, Any]:
    """One run of ``pairs`` handshakes through the relay of a ``kind`` registry."""
    with c.temp_dir() as root, registry(kind, root) as address:
        nodes: list[Node] = []
        try:
            for index in range(2 * pairs):
                source = f"127.0.0.{10 + index}" if kind == GO else ""
                name = f"{'ac'[index % 2]}{index // 2}"
                nodes.append(Node(os.path.join(root, name), address, source))
            couples = [(nodes[i], nodes[i + 1]) for i in range(0, len(nodes), 2)]
            for a, cc in couples:
                a.unreachable(cc.node_id)
                cc.unreachable(a.node_id)
            if not c.wait_until(lambda: all(n.reloaded() for n in nodes), 20.0, 0.05):
                raise RuntimeError("a daemon did not reload its peers")
            modes = sorted({n.relay_mode() for n in nodes})
            time.sleep(3.0)  # past the start-up polls: C is idle when the request comes
            results = [Pair(a, cc) for a, cc in couples]
            # Without push, when a request arrives in the peer's idle period decides its
            # wait: each pair's request goes at a random point of one idle period.
            phase = random.Random(444)
            offsets = [phase.uniform(0, IDLE_PERIOD) if kind == GO else 0.0 for _ in couples]
            threads = [
                threading.Thread(target=pair.run, args=(offset,), daemon=True)
                for pair, offset in zip(results, offsets)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(IDLE_PERIOD + 2 * PENDING_TIMEOUT)
            failed = [pair.error for pair in results if pair.error or not pair.trusted]
            if failed:
                raise RuntimeError(f"handshakes failed: {failed}")
            pending = [pair.pending for pair in results]
            trusted = [pair.trusted for pair in results]
            time.sleep(3.0)  # the answered requests' windows close
            before = sum(n.registry_requests() for n in nodes)
            time.sleep(idle)
            spent = sum(n.registry_requests() for n in nodes) - before
            per_minute = spent / len(nodes) / (idle / 60.0)
        finally:
            for node in nodes:
                node.process.stop()
    return {"modes": modes, "pending_s": pending, "trusted_s": trusted, "idle_rpm": per_minute}


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=0, help="pairs of daemons per run")
    parser.add_argument("--idle", type=float, default=0.0, help="idle seconds measured")


def main() -> int:
    """Run both series; print the figures and the targets."""
    args = c.parse_args(__doc__.splitlines()[0], _extra, default_runs=2)
    pairs = args.pairs or (2 if args.quick else 8)
    idle = args.idle or (20.0 if args.quick else 180.0)
    kinds = [PUSH, *([GO] if _go_registry() else [])]
    print(f"bench_relay: {pairs} pairs x {args.runs} runs per registry, idle {idle:.0f} s")
    print(f"  load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    results: dict[str, Any] = {}
    for kind in kinds:
        runs = [one_run(kind, pairs, idle) for _ in range(args.runs)]
        pending = [t for r in runs for t in r["pending_s"]]
        trusted = [t for r in runs for t in r["trusted_s"]]
        summary = {
            "relay": sorted({m for r in runs for m in r["modes"]}),
            "pending_p50_s": c.percentile(pending, 0.5),
            "pending_p99_s": c.percentile(pending, 0.99),
            "trusted_p50_s": c.percentile(trusted, 0.5),
            "trusted_p99_s": c.percentile(trusted, 0.99),
            "idle_requests_per_node_minute": c.median([r["idle_rpm"] for r in runs]),
            "samples": len(pending),
        }
        results[kind] = {"summary": summary, "runs": runs}
        print(
            f"  {kind} (relay: {', '.join(summary['relay'])}): request -> pending p50 "
            f"{summary['pending_p50_s']:.3f} s, p99 {summary['pending_p99_s']:.3f} s; "
            f"approve -> trusted p50 {summary['trusted_p50_s']:.3f} s, p99 "
            f"{summary['trusted_p99_s']:.3f} s ({summary['samples']} samples); idle: "
            f"{summary['idle_requests_per_node_minute']:.2f} registry requests per node per "
            "minute"
        )
        if kind == PUSH:
            for name in ("pending", "trusted"):
                c.verdict(f"{name} p50", summary[f"{name}_p50_s"], TARGET_PUSH_P50, at_most=True)
                c.verdict(f"{name} p99", summary[f"{name}_p99_s"], TARGET_PUSH_P99, at_most=True)
        else:
            c.verdict(
                "approve -> trusted p99", summary["trusted_p99_s"], TARGET_GO_APPROVE, at_most=True
            )
            c.verdict(
                "request -> pending p99", summary["pending_p99_s"], TARGET_GO_PENDING, at_most=True
            )
        c.verdict(
            "idle requests per node per minute",
            summary["idle_requests_per_node_minute"],
            TARGET_IDLE_REQUESTS,
            at_most=True,
        )
    print(f"  load average at the end: {os.getloadavg()[0]:.2f}")
    c.save("relay", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
