"""Issue 15.2: lookups on pilot-registryd while an attacker floods it with mutations.

A pilot-registryd (durable store) starts with 10,000 nodes and 40,000 vouches (written as
its store before it starts). One attacker identity then runs on 16 connections, in a
process of its own, cycling the requests that used to force a full rewrite of the store
each: the same hostname again (no-op), a visibility toggle, report_trust / revoke_trust of
one peer, an unsigned re-register of a victim's key (no-op) and a signed re-register of its
own (no-op). Meanwhile one client looks up random nodes on one connection and times each
answer. Reported: lookup p50 / p90 when idle, under the flood with the default limits (the
attacker is mostly refused by the mutation limits), and under the flood with the mutation
limits lifted (every toggle is a journal line: what the store itself costs); the attacker's
requests per second and how many were refused; the journal's size at the end.

Round 2 measured, for the same flood: p50 2.3 s, p90 8.4 s (idle 0.1 ms). Target: p50
under 50 ms.

    .venv/bin/python benchmarks/bench_registry_flood.py [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import _common as c

from pilothandshake.identity import Identity, b64encode
from pilothandshake.registry.challenges import (
    register_challenge,
    report_trust_challenge,
    revoke_trust_challenge,
    set_hostname_challenge,
    set_visibility_challenge,
)
from pilothandshake.registry.client import encode_frame, read_frame

NODES = 10_000
VOUCHES = 40_000
CONNECTIONS = 16
TARGET_P50_MS = 50.0


def write_store(directory: str, nodes: int, vouches: int, seed: int = 1) -> list[str]:
    """A store of ``nodes`` nodes and ``vouches`` random vouches; returns the node keys."""
    rng = random.Random(seed)
    keys = [b64encode(os.urandom(32)) for _ in range(nodes)]
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < vouches:
        a, b = rng.randint(1, nodes), rng.randint(1, nodes)
        if a != b:
            pairs.add((a, b))
    store = {
        "version": 3,
        "journal_seq": 0,
        "next_id": nodes + 1,
        "nodes": [
            {
                "node_id": i + 1,
                "public_key": key,
                "real_addr": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:444",
                "public": False,
                "hostname": f"node-{i + 1}",
            }
            for i, key in enumerate(keys)
        ],
        "vouches": sorted([a, b] for a, b in pairs),
    }
    with open(os.path.join(directory, "registry.json"), "w", encoding="ascii") as out:
        json.dump(store, out)
    return keys


def exchange(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(encode_frame(request))
    answer = read_frame(sock, 1 << 20, 30.0, 30.0)
    if answer is None:
        raise ConnectionError("registry closed the connection")
    return answer


def measure_lookups(address: tuple[str, int], seconds: float, nodes: int) -> list[float]:
    """Lookup latencies (ms) of random nodes on one connection for ``seconds``."""
    rng = random.Random(7)
    times = []
    with socket.create_connection(address, timeout=30) as sock:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            answer = exchange(sock, {"type": "lookup", "node_id": rng.randint(1, nodes)})
            times.append((time.perf_counter() - start) * 1e3)
            assert answer["type"] == "lookup_ok", answer
            time.sleep(0.005)  # a client's pace, not a second flood
    return times


# -- the attacker (a process of its own, so that its CPU is not the measuring client's) ---


def attack(address: str, victim_key: str, seconds: float) -> None:
    """Run the flood for ``seconds``; print one JSON line of counts."""
    host, port = address.rsplit(":", 1)
    target = (host, int(port))
    me = Identity.generate()
    key = me.public_key_b64

    def sig(challenge: bytes) -> str:
        return b64encode(me.sign(challenge))

    def register() -> dict[str, Any]:
        stamp = int(time.time())
        return {
            "type": "register",
            "listen_addr": "127.0.0.1:9",
            "public_key": key,
            "hostname": "attacker",
            "timestamp": stamp,
            "signature": sig(register_challenge(key, stamp)),
        }

    with socket.create_connection(target, timeout=30) as sock:
        node_id = exchange(sock, register())["node_id"]
    peer = 1
    cycle = [
        lambda: {
            "type": "set_hostname",
            "node_id": node_id,
            "hostname": "attacker",
            "signature": sig(set_hostname_challenge(node_id)),
        },
        lambda: {
            "type": "set_visibility",
            "node_id": node_id,
            "public": True,
            "signature": sig(set_visibility_challenge(node_id)),
        },
        lambda: {
            "type": "set_visibility",
            "node_id": node_id,
            "public": False,
            "signature": sig(set_visibility_challenge(node_id)),
        },
        lambda: {
            "type": "report_trust",
            "node_id": node_id,
            "peer_id": peer,
            "signature": sig(report_trust_challenge(node_id, peer)),
        },
        lambda: {
            "type": "revoke_trust",
            "node_id": node_id,
            "peer_id": peer,
            "signature": sig(revoke_trust_challenge(node_id, peer)),
        },
        lambda: {
            "type": "register",
            "listen_addr": "127.0.0.1:9",
            "public_key": victim_key,
            "hostname": "stolen",
        },
        register,
    ]
    counts = {"sent": 0, "refused": 0}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(offset: int) -> None:
        sent = refused = 0
        with socket.create_connection(target, timeout=30) as sock:
            i = offset
            while time.monotonic() < end:
                answer = exchange(sock, cycle[i % len(cycle)]())
                sent += 1
                refused += answer["type"] == "error"
                i += 1
        with lock:
            counts["sent"] += sent
            counts["refused"] += refused

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(counts), flush=True)


# -- one scenario -------------------------------------------------------------------------


def scenario(seconds: float, nodes: int, vouches: int, lifted: bool) -> dict[str, Any]:
    """Idle lookups, then lookups under the flood, against a fresh registry."""
    with c.temp_dir() as directory:
        keys = write_store(directory, nodes, vouches)
        config = os.path.join(directory, "registry.yaml")
        limits = {"register_per_minute": 1000}
        if lifted:
            limits |= {
                "mutations_per_minute_per_node": 10**9,
                "mutations_per_minute_per_source": 10**9,
            }
        with open(config, "w", encoding="utf-8") as out:
            json.dump({"limits": limits}, out)
        proc, address = c.start_registry(directory, config)
        try:
            host, port = address.rsplit(":", 1)
            target = (host, int(port))
            idle = measure_lookups(target, min(seconds, 3.0), nodes)
            cpu_before = c.cpu_seconds(proc.pid)
            attacker = subprocess.Popen(
                [sys.executable, __file__, "--attack", address, keys[0], str(seconds)],
                stdout=subprocess.PIPE,
                cwd=c.ROOT,
            )
            time.sleep(0.5)  # the flood is running
            flooded = measure_lookups(target, seconds - 1.0, nodes)
            out, _ = attacker.communicate(timeout=seconds + 60)
            counts = json.loads(out.decode().strip().splitlines()[-1])
            cpu = c.cpu_seconds(proc.pid) - cpu_before
            journal = os.path.join(directory, "registry.json.journal")
            snapshot = os.path.join(directory, "registry.json")
            sizes = (os.path.getsize(journal), os.path.getsize(snapshot))
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "mutation_limits": "lifted" if lifted else "default",
        "idle_p50_ms": c.percentile(idle, 0.5),
        "idle_p90_ms": c.percentile(idle, 0.9),
        "flood_p50_ms": c.percentile(flooded, 0.5),
        "flood_p90_ms": c.percentile(flooded, 0.9),
        "flood_p99_ms": c.percentile(flooded, 0.99),
        "lookups": len(flooded),
        "attacker_requests_per_s": counts["sent"] / seconds,
        "attacker_refused_share": counts["refused"] / max(1, counts["sent"]),
        "registry_cpu_s": cpu,
        "journal_bytes_at_end": sizes[0],
        "snapshot_bytes_at_end": sizes[1],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--attack":
        attack(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seconds", type=float, default=20.0, help="flood duration")

    args = c.parse_args(__doc__.split("\n\n")[0], extra, default_runs=1)
    seconds = 6.0 if args.quick else args.seconds
    nodes, vouches = (2000, 8000) if args.quick else (NODES, VOUCHES)
    print(
        f"pilot-registryd, {nodes} nodes / {vouches} vouches, attacker on {CONNECTIONS} "
        f"connections for {seconds:g} s"
    )
    results = []
    for lifted in (False, True):
        result = scenario(seconds, nodes, vouches, lifted)
        results.append(result)
        print(
            f"  mutation limits {result['mutation_limits']:>7}: lookup idle p50 "
            f"{result['idle_p50_ms']:.2f} ms p90 {result['idle_p90_ms']:.2f} ms; under flood "
            f"p50 {result['flood_p50_ms']:.2f} ms p90 {result['flood_p90_ms']:.2f} ms p99 "
            f"{result['flood_p99_ms']:.2f} ms ({result['lookups']} lookups); attacker "
            f"{result['attacker_requests_per_s']:.0f} req/s, "
            f"{100 * result['attacker_refused_share']:.0f}% refused; registry CPU "
            f"{result['registry_cpu_s']:.1f} s; journal {result['journal_bytes_at_end']} B, "
            f"snapshot {result['snapshot_bytes_at_end']} B"
        )
    for result in results:
        c.verdict(
            f"lookup p50 under flood ({result['mutation_limits']} limits)",
            result["flood_p50_ms"],
            TARGET_P50_MS,
            at_most=True,
            unit=" ms",
        )
    c.save("registry_flood", args, {"nodes": nodes, "vouches": vouches, "runs": results})


if __name__ == "__main__":
    main()
