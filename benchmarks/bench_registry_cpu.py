"""Issue 18.3: pilot-registryd's CPU per request, in a fleet-like mix and per request type.

A pilot-registryd (durable store, flood limits lifted) serves N simulated nodes, each on a
persistent connection of its own, from a client process of its own. The fleet mix is what
daemons send over a day of handshakes (SPEC 11, 17, 18): per node and round a heartbeat, a
poll, a lookup of a peer, a resolve of a peer; every fifth round a relayed request to a
peer, the peer's poll and its accepting respond_handshake, and a report_trust. Reported:
registry process CPU time (user + system, /proc) divided by the requests it answered, for
the mix and for each request type alone (which shows what verify, the journal and the
transport cost), and for a lookup on a connection of its own (what a connection costs).
The Ed25519 verify alone is timed in this process for reference.

Target (issue 18.3): <= 300 us of CPU per request in the fleet mix.

    .venv/bin/python benchmarks/bench_registry_cpu.py [--quick] [--nodes N] [--rounds R]
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
from typing import Any, Callable

import _common as c

from pilothandshake.identity import Identity, b64encode, verify
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.challenges import (
    heartbeat_challenge,
    poll_challenge,
    register_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
)
from pilothandshake.registry.client import encode_frame, read_frame

TARGET_US = 300.0
WORKERS = 8  # client threads; each drives nodes // WORKERS nodes in turn


class SimNode:
    """One simulated daemon: an identity and its own connection to the registry."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.identity = Identity.generate()
        self.lock = threading.Lock()
        self.sock = socket.create_connection(target, timeout=30)
        key, stamp = self.identity.public_key_b64, int(time.time())
        answer = self.call(
            {
                "type": "register",
                "listen_addr": "127.0.0.1:444",
                "public_key": key,
                "timestamp": stamp,
                "signature": self.sig(register_challenge(key, stamp)),
            }
        )
        self.node_id: int = answer["node_id"]

    def sig(self, challenge: bytes) -> str:
        return b64encode(self.identity.sign(challenge))

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:  # another thread may be making this node's peer calls
            self.sock.sendall(encode_frame(request))
            answer = read_frame(self.sock, 1 << 20, 30.0, 30.0)
        assert answer is not None
        return answer

    # The requests of the mix, each a function of a peer.
    def heartbeat(self, peer: SimNode) -> dict[str, Any]:
        return self.call(
            {
                "type": "heartbeat",
                "node_id": self.node_id,
                "signature": self.sig(heartbeat_challenge(self.node_id)),
            }
        )

    def poll(self, peer: SimNode) -> dict[str, Any]:
        return self.call(
            {
                "type": "poll_handshakes",
                "node_id": self.node_id,
                "signature": self.sig(poll_challenge(self.node_id)),
            }
        )

    def lookup(self, peer: SimNode) -> dict[str, Any]:
        return self.call({"type": "lookup", "node_id": peer.node_id})

    def resolve(self, peer: SimNode) -> dict[str, Any]:
        return self.call(
            {
                "type": "resolve",
                "node_id": peer.node_id,
                "requester_id": self.node_id,
                "signature": self.sig(resolve_challenge(self.node_id, peer.node_id)),
            }
        )

    def report_trust(self, peer: SimNode) -> dict[str, Any]:
        return self.call(
            {
                "type": "report_trust",
                "node_id": self.node_id,
                "peer_id": peer.node_id,
                "signature": self.sig(report_trust_challenge(self.node_id, peer.node_id)),
            }
        )

    def request(self, peer: SimNode) -> dict[str, Any]:
        return self.call(
            {
                "type": "request_handshake",
                "from_node_id": self.node_id,
                "to_node_id": peer.node_id,
                "justification": "fleet",
                "signature": self.sig(handshake_challenge(self.node_id, peer.node_id)),
            }
        )

    def respond(self, peer: SimNode) -> dict[str, Any]:
        return self.call(
            {
                "type": "respond_handshake",
                "node_id": self.node_id,
                "peer_id": peer.node_id,
                "accept": True,
                "signature": self.sig(respond_challenge(self.node_id, peer.node_id)),
            }
        )


def relay_round(node: SimNode, peer: SimNode) -> int:
    """A relayed handshake: request, the peer's poll, its accept, a report; 4 requests."""
    node.request(peer)
    peer.poll(node)
    peer.respond(node)
    node.report_trust(peer)
    return 4


def fleet_round(node: SimNode, peer: SimNode, round_: int) -> int:
    """One round of the fleet mix for ``node``; returns how many requests it made."""
    node.heartbeat(peer)
    node.poll(peer)
    node.lookup(peer)
    node.resolve(peer)
    return 4 + (relay_round(node, peer) if round_ % 5 == 0 else 0)


def drive(nodes: list[SimNode], rounds: int, step: Callable[[SimNode, SimNode, int], int]) -> int:
    """Run ``step`` for every node ``rounds`` times over WORKERS threads; the request count."""
    total = [0]
    lock = threading.Lock()

    def worker(mine: list[SimNode], seed: int) -> None:
        rng = random.Random(seed)
        count = 0
        for round_ in range(rounds):
            for node in mine:
                peer = rng.choice(nodes)
                while peer is node:
                    peer = rng.choice(nodes)
                count += step(node, peer, round_)
        with lock:
            total[0] += count

    threads = [threading.Thread(target=worker, args=(nodes[i::WORKERS], i)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total[0]


def fresh_lookup(node: SimNode, peer: SimNode, round_: int) -> int:
    """A lookup on a connection of its own, as a daemon whose calls overlap makes one."""
    with socket.create_connection(node.sock.getpeername(), timeout=30) as sock:
        sock.sendall(encode_frame({"type": "lookup", "node_id": peer.node_id}))
        assert read_frame(sock, 1 << 20, 30.0, 30.0) is not None
    return 1


def single(kind: str) -> Callable[[SimNode, SimNode, int], int]:
    def step(node: SimNode, peer: SimNode, round_: int) -> int:
        getattr(node, kind)(peer)
        return 1

    return step


def client_main(address: str, nodes: int, rounds: int) -> None:
    """The client process: register, then run each load and print its request count after
    telling the parent (on stdin/stdout) when it starts and ends."""
    host, port = address.rsplit(":", 1)
    sims = [SimNode((host, int(port))) for _ in range(nodes)]
    loads: list[tuple[str, Callable[[SimNode, SimNode, int], int], int]] = [
        ("fleet mix", fleet_round, rounds),
        *[
            (kind, single(kind), max(1, rounds // 2))
            for kind in ("lookup", "heartbeat", "poll", "resolve", "report_trust")
        ],
        ("relayed handshake", lambda n, p, r: relay_round(n, p), max(1, rounds // 5)),
        ("lookup, new conn.", fresh_lookup, max(1, rounds // 2)),
    ]
    for name, step, count in loads:
        print(json.dumps({"start": name}), flush=True)
        sys.stdin.readline()  # the parent read the registry's CPU
        requests = drive(sims, count, step)
        print(json.dumps({"end": name, "requests": requests}), flush=True)
        sys.stdin.readline()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return

    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--nodes", type=int, default=200)
        parser.add_argument("--rounds", type=int, default=20)

    args = c.parse_args(__doc__.split("\n\n")[0], extra, default_runs=1)
    nodes, rounds = (50, 5) if args.quick else (args.nodes, args.rounds)
    identity = Identity.generate()
    signature = identity.sign(b"x")
    start = time.process_time()
    for _ in range(2000):
        verify(identity.public_key, b"x", signature)
    verify_us = (time.process_time() - start) / 2000 * 1e6
    print(
        f"pilot-registryd CPU per request, {nodes} nodes on their own connections; "
        f"Ed25519 verify alone {verify_us:.0f} us"
    )
    results: dict[str, Any] = {"nodes": nodes, "rounds": rounds, "verify_us": verify_us}
    with c.temp_dir() as directory:
        config = os.path.join(directory, "registry.yaml")
        limits = {
            "register_per_minute": 10**9,
            "mutations_per_minute_per_node": 10**9,
            "mutations_per_minute_per_source": 10**9,
            "max_connections": 4096,
            "max_connections_per_source": 4096,
        }
        with open(config, "w", encoding="utf-8") as out:
            json.dump({"limits": limits}, out)
        proc, address = c.start_registry(directory, config)
        client = subprocess.Popen(
            [sys.executable, __file__, "--client", address, str(nodes), str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=c.ROOT,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            while True:
                line = client.stdout.readline()
                if not line:
                    break
                name = json.loads(line)["start"]
                cpu0, wall0 = c.cpu_seconds(proc.pid), time.monotonic()
                client.stdin.write("\n")
                client.stdin.flush()
                done = json.loads(client.stdout.readline())
                cpu, wall = c.cpu_seconds(proc.pid) - cpu0, time.monotonic() - wall0
                per = cpu / done["requests"] * 1e6
                results[name] = {
                    "requests": done["requests"],
                    "cpu_s": cpu,
                    "us": per,
                    "per_s": done["requests"] / wall,
                }
                rate = done["requests"] / wall
                print(
                    f"  {name:>17}: {done['requests']:6d} requests, registry CPU "
                    f"{cpu:.2f} s = {per:.0f} us/request ({rate:.0f}/s)"
                )
                client.stdin.write("\n")
                client.stdin.flush()
            client.wait(60)
        finally:
            if client.poll() is None:
                client.kill()
            proc.terminate()
            proc.wait(30)
    c.verdict(
        "CPU per request, fleet mix",
        results["fleet mix"]["us"],
        TARGET_US,
        at_most=True,
        unit=" us",
    )
    c.save("registry_cpu", args, results)


if __name__ == "__main__":
    main()
