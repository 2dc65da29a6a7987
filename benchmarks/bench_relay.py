"""Issue 5.4: relay latency.

The embedded registry (in this process) and three private ``pilot-handshaked`` processes per
run (not public, no static peers, so no one can dial them: every message goes through the
registry relay, polled every ``poll_interval``). Operator calls go through each daemon's
control socket, as ``pilot-handshakectl`` would.

- auto: A ``handshake B`` (B auto-approves) -> both trusted (A waits for B, B for A);
- manual: A ``handshake C`` (C does not auto-approve); once the request is pending on C, the
  clock starts at C ``approve A`` -> A (the requester) trusted. C answers both through the
  registry (``respond_handshake``) and with a direct accept, which can reach A once the
  registry's new trust pair lets C ``resolve`` A; the first to arrive wins.

Target: each <= 2 x poll_interval (default the SPEC's 2 s).

    .venv/bin/python benchmarks/bench_relay.py [--quick] [--runs N] [--poll-interval S]
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import _common as c

from pilothandshake.control import ControlClient
from pilothandshake.registry.server import RegistryServer

TARGET_POLLS = 2.0
WAIT_TIMEOUT = 30.0


class Node:
    """One daemon process and its control client."""

    def __init__(self, directory: str, registry: str, poll: float, auto: bool) -> None:
        os.makedirs(directory, mode=0o700)
        config = c.yaml_config(
            directory,
            0,
            0,
            registry={"address": registry, "poll_interval": poll, "heartbeat_interval": 60},
            trust={"auto_approve": auto},
        )
        self.process = c.DaemonProcess(config, os.path.join(directory, "daemon.log"))
        line = self.process.start()
        match = re.search(r"node (\d+) listening", line)
        if match is None or match.group(1) == "0":
            self.process.stop()
            raise RuntimeError(f"daemon did not register: {line}")
        self.node_id = int(match.group(1))
        self.control = ControlClient(os.path.join(directory, "control.sock"))

    def call(self, command: str, **args: Any) -> dict[str, Any]:
        """One control request; raises ``RuntimeError`` on an error response."""
        response = self.control.request(command, **args)
        if response.get("status") != "ok":
            raise RuntimeError(f"{command} {args}: {response}")
        data: dict[str, Any] = response["data"]
        return data


def _waiter(node: Node, peer: int, done: dict[str, float], key: str) -> threading.Thread:
    def wait() -> None:
        if node.call("wait", node_id=peer, timeout=WAIT_TIMEOUT)["trusted"]:
            done[key] = time.monotonic()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def nodes(directory: str, registry: str, poll: float) -> Iterator[tuple[Node, Node, Node]]:
    """A (requester), B (auto-approves), C (manual)."""
    started: list[Node] = []
    try:
        for name, auto in (("a", False), ("b", True), ("c", False)):
            started.append(Node(os.path.join(directory, name), registry, poll, auto))
        yield started[0], started[1], started[2]
    finally:
        for node in started:
            node.process.stop()


def one_run(poll: float, phase: random.Random) -> dict[str, Any]:
    """One auto and one manual handshake through the relay; returns their latencies. Each
    operator call waits a random part of a poll interval first, so that runs sample the
    phase of the daemons' poll timers instead of repeating one alignment."""
    with c.temp_dir() as directory, RegistryServer(c.LOOPBACK, 0) as registry:
        host, port = registry.address
        address = f"{host}:{port}"
        with nodes(directory, address, poll) as (a, b, cc):
            done: dict[str, float] = {}
            waiters = [_waiter(a, b.node_id, done, "a"), _waiter(b, a.node_id, done, "b")]
            time.sleep(0.05 + phase.uniform(0, poll))  # waits registered; random phase
            start = time.monotonic()
            status = a.call("handshake", node_id=b.node_id, justification="benchmark")["status"]
            for thread in waiters:
                thread.join(WAIT_TIMEOUT + 5)
            if set(done) != {"a", "b"}:
                raise RuntimeError(f"auto handshake did not complete: {done}")
            auto = max(done.values()) - start

            a.call("handshake", node_id=cc.node_id, justification="benchmark")
            if not c.wait_until(
                lambda: any(p["node_id"] == a.node_id for p in cc.call("pending")["pending"]),
                WAIT_TIMEOUT,
                interval=0.05,
            ):
                raise RuntimeError("request never became pending on C")
            done.clear()
            waiter = _waiter(a, cc.node_id, done, "a")
            time.sleep(0.05 + phase.uniform(0, poll))
            start = time.monotonic()
            cc.call("approve", node_id=a.node_id)
            waiter.join(WAIT_TIMEOUT + 5)
            if "a" not in done:
                raise RuntimeError("requester never trusted C after the approve")
            manual = done["a"] - start
    return {"auto_seconds": auto, "manual_seconds": manual, "send_status": status}


def main() -> int:
    """Run the benchmark; print figures and targets."""

    def extra(parser: Any) -> None:
        parser.add_argument("--poll-interval", type=float, default=0.0)

    args = c.parse_args(__doc__.splitlines()[0], extra, default_runs=5)
    poll = args.poll_interval or (0.5 if args.quick else 2.0)
    print(f"relay latency: poll_interval {poll} s, three private daemons + embedded registry")
    runs = []
    phase = random.Random(444)
    for run in range(args.runs):
        figures = one_run(poll, phase)
        runs.append(figures)
        print(
            f"  run {run + 1}: send_request -> both trusted {figures['auto_seconds']:.3f} s "
            f"(send status {figures['send_status']}); approve -> requester trusted "
            f"{figures['manual_seconds']:.3f} s"
        )
    summary = {
        "poll_interval": poll,
        "auto_seconds": c.median([r["auto_seconds"] for r in runs]),
        "manual_seconds": c.median([r["manual_seconds"] for r in runs]),
        "auto_max_seconds": max(r["auto_seconds"] for r in runs),
        "manual_max_seconds": max(r["manual_seconds"] for r in runs),
    }
    print(
        f"median: auto {summary['auto_seconds']:.3f} s, manual {summary['manual_seconds']:.3f} s "
        f"({summary['auto_seconds'] / poll:.2f} and {summary['manual_seconds'] / poll:.2f} polls)"
    )
    bound = TARGET_POLLS * poll
    met = {
        "auto": c.verdict("auto", summary["auto_seconds"], bound, at_most=True, unit=" s"),
        "manual": c.verdict("manual", summary["manual_seconds"], bound, at_most=True, unit=" s"),
    }
    c.save("relay", args, {"summary": summary, "met": met, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
