"""Issue 10.2: how fast a legitimate handshake gets through while junk floods port 444.

One ``pilot-registryd`` and one ``pilot-handshaked`` (strict mode, registry configured, no
auto-approve: requests go pending) on loopback. One legitimate, registry-bound peer sends a
signed ``handshake_request`` every 100 ms from its own source address (127.0.0.2), each with
its own justification; its latency is the time from the start of the send to the moment the
daemon's event stream (control socket, ``events --follow``) shows that request received.

The same 10 s window is measured twice: quiet, then while 8 attacker processes (each one
thread, each its own source address 127.0.0.10..17) send junk as fast as they can: malformed
JSON, unsigned requests, wrongly signed ones, stale ones, and validly self-signed requests
from invented node IDs. Figures: the legitimate request's latency p50 / p99 / max and how
many never arrived, quiet and under the flood; the junk absorbed per second.
Targets: p99 <= 100 ms under the flood, none lost.

    .venv/bin/python benchmarks/bench_flood.py [--quick] [--runs N]
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import socket
import sys
import threading
import time
from typing import Any

import _common as c

from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import HANDSHAKE_REQUEST, HandshakeMsg
from pilothandshake.registry.client import RegistryConnection as RegistryClient

TARGET_P99_MS = 100.0
LEGIT_SOURCE = "127.0.0.2"
ATTACKER_SOURCES = [f"127.0.0.{10 + index}" for index in range(8)]
INTERVAL = 0.1


# The attackers: one process each, one thread, a source address of its own.


def _junk(kind: int, target: int, pool: list[Identity], rng: random.Random) -> bytes:
    now = int(time.time())
    node = rng.randrange(100_000, 4_000_000_000)
    identity = pool[rng.randrange(len(pool))]
    msg = HandshakeMsg(
        type=HANDSHAKE_REQUEST,
        node_id=node,
        public_key=identity.public_key_b64,
        justification=f"junk {rng.random()}",
        timestamp=now,
    )
    if kind == 0:
        return b'{"type": "handshake_request", "node_id": ' + str(node).encode() + b', "tim'
    if kind == 1:
        return msg.to_json()  # unsigned
    if kind == 2:
        other = pool[(pool.index(identity) + 1) % len(pool)]
        msg.signature_v2 = b64encode(other.sign(msg.v2_challenge(target)))  # wrong key
        return msg.to_json()
    if kind == 3:
        msg.timestamp = now - 3600  # stale, but validly signed
    msg.signature_v2 = b64encode(identity.sign(msg.v2_challenge(target)))
    return msg.to_json()


def _attacker(source: str, port: int, target: int, seconds: float, counts: Any, slot: int) -> None:
    rng = random.Random(slot)
    pool = c.identities(64)
    sent = 0
    deadline = time.monotonic() + seconds
    kind = 0
    while time.monotonic() < deadline:
        data = _junk(kind, target, pool, rng)
        kind = (kind + 1) % 5
        try:
            with socket.create_connection((c.LOOPBACK, port), 1.0, (source, 0)) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(0.5)
                with contextlib.suppress(OSError):
                    sock.recv(1)
            sent += 1
        except OSError:
            continue
    counts[slot] = sent


# The legitimate peer and the event stream.


class _Received:
    """Follows the daemon's event stream; remembers when each justification arrived."""

    def __init__(self, socket_path: str) -> None:
        self.seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(socket_path)
        self._sock.sendall(json.dumps({"command": "events", "follow": True}).encode() + b"\n")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError), self._sock.makefile("rb") as lines:
            for line in lines:
                event = json.loads(line).get("data", {})
                if event.get("event") == "handshake.received":
                    text = event.get("data", {}).get("justification", "")
                    with self._cond:
                        self.seen.setdefault(text, time.monotonic())
                        self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: text in self.seen, timeout)
            return self.seen.get(text)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _legit_round(
    identity: Identity, node: int, target: int, port: int, seconds: float, tag: str, events: Any
) -> tuple[list[float], int]:
    sent: list[tuple[str, float]] = []
    start = time.monotonic()
    for seq in range(int(seconds / INTERVAL)):
        due = start + seq * INTERVAL
        time.sleep(max(0.0, due - time.monotonic()))
        text = f"legit {tag} {seq}"
        data = c.signed_request(identity, node, target, text)
        began = time.monotonic()
        with contextlib.suppress(OSError):  # noqa: SIM117 (3.9 has no parenthesised with)
            with socket.create_connection((c.LOOPBACK, port), 2.0, (LEGIT_SOURCE, 0)) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
        sent.append((text, began))
    latencies, lost = [], 0
    for text, began in sent:
        arrived = events.wait_for(text, 5.0)
        if arrived is None:
            lost += 1
        else:
            latencies.append((arrived - began) * 1e3)
    return latencies, lost


def _stats(latencies: list[float], lost: int) -> dict[str, float]:
    if not latencies:
        return {
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "max_ms": float("nan"),
            "lost": lost,
        }
    return {
        "p50_ms": c.percentile(latencies, 0.5),
        "p99_ms": c.percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "lost": lost,
        "count": len(latencies),
    }


def one_run(seconds: float) -> dict[str, Any]:
    with c.temp_dir() as directory:
        registry, reg_addr = c.start_registry(directory)
        try:
            legit = Identity.generate()
            client = RegistryClient(reg_addr, legit.sign)
            legit_node = int(client.register(f"{LEGIT_SOURCE}:1", legit.public_key_b64)["node_id"])
            client.close()
            port = c.free_port()
            config = c.yaml_config(
                directory,
                0,
                port,
                registry={"address": reg_addr},
                trust={"auto_approve": False},
                max_connections_per_source=16,
                max_replay_per_source=1024,
                log_level="warning",
            )
            with c.DaemonProcess(config, os.path.join(directory, "daemon.log")) as daemon:
                line = daemon.start()
                target = int(line.split("node ", 1)[1].split()[0])
                events = _Received(os.path.join(directory, "control.sock"))
                try:
                    quiet = _legit_round(legit, legit_node, target, port, seconds, "quiet", events)
                    counts = multiprocessing.Array("l", len(ATTACKER_SOURCES))
                    attackers = [
                        multiprocessing.Process(
                            target=_attacker, args=(src, port, target, seconds, counts, slot)
                        )
                        for slot, src in enumerate(ATTACKER_SOURCES)
                    ]
                    for proc in attackers:
                        proc.start()
                    time.sleep(0.5)  # the flood is under way before the first measured send
                    flood = _legit_round(
                        legit, legit_node, target, port, seconds - 0.5, "flood", events
                    )
                    for proc in attackers:
                        proc.join(seconds + 10)
                    junk = sum(counts[:])
                    cpu = c.cpu_seconds(daemon.pid)
                finally:
                    events.close()
        finally:
            registry.terminate()
            registry.wait(15)
    return {
        "quiet": _stats(*quiet),
        "flood": _stats(*flood),
        "junk_per_s": junk / seconds,
        "daemon_cpu_s": cpu,
    }


def main() -> int:
    args = c.parse_args(__doc__.splitlines()[0], default_runs=3)
    seconds = 3.0 if args.quick else 10.0
    runs = [one_run(seconds) for _ in range(args.runs)]
    print(f"bench_flood: {args.runs} run(s) of {seconds:.0f} s, 8 attackers, 1 legitimate peer")
    for index, run in enumerate(runs, 1):
        q, f = run["quiet"], run["flood"]
        print(
            f"  run {index}: quiet p50 {q['p50_ms']:.1f} p99 {q['p99_ms']:.1f} max "
            f"{q['max_ms']:.1f} ms lost {q['lost']}; flood p50 {f['p50_ms']:.1f} p99 "
            f"{f['p99_ms']:.1f} max {f['max_ms']:.1f} ms lost {f['lost']}; junk "
            f"{run['junk_per_s']:.0f}/s"
        )
    summary = {
        key: c.median([run["flood"][key] for run in runs]) for key in ("p50_ms", "p99_ms", "max_ms")
    }
    summary["lost"] = sum(run["flood"]["lost"] for run in runs)
    summary["quiet_p99_ms"] = c.median([run["quiet"]["p99_ms"] for run in runs])
    summary["junk_per_s"] = c.median([run["junk_per_s"] for run in runs])
    print(
        f"  median: flood p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms, max "
        f"{summary['max_ms']:.1f} ms; quiet p99 {summary['quiet_p99_ms']:.1f} ms; junk "
        f"{summary['junk_per_s']:.0f}/s; lost {summary['lost']}"
    )
    ok = c.verdict("flood p99", summary["p99_ms"], TARGET_P99_MS, at_most=True, unit=" ms")
    ok = c.verdict("lost", summary["lost"], 0, at_most=True) and ok
    c.save("flood", args, {"runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
