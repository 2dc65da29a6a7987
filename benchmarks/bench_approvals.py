"""Issue 5.3 and 5.7: durable approvals at scale.

Eight threads approve pending requests; every approval is on disk (temp file, fsync, rename,
directory fsync) before its call returns. Each round opens a fresh trust.json holding N
trusted peers and 256 pending requests (the pending bound of SPEC 15) and approves all 256,
so the file keeps N + 256 records throughout. Two paths:

- ``store``: ``TrustStore`` directly (two ``change`` calls, the trust record and the pending
  request removed, under the lock, then ``commit``) — the persistence layer alone;
- ``manager``: ``Manager.approve_handshake`` over a small in-process Runtime.

N is 10, 100, 1,000 and 10,000; the rate against N is drawn to benchmarks/approvals.png.
Targets: >= 300/s at 10,000 peers, and the 10,000-peer rate >= half the 10-peer rate.

    .venv/bin/python benchmarks/bench_approvals.py [--quick] [--runs N]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import _common as c

from pilothandshake import store as tables
from pilothandshake.manager import Manager
from pilothandshake.store import Change, TrustRecord, TrustStore, load_state

THREADS = 8
PENDING = 256
TARGET_RATE = 300.0
TARGET_KEEP = 0.5
PEER_COUNTS = (10, 100, 1000, 10_000)


def _split(nodes: list[int]) -> list[list[int]]:
    return [nodes[i::THREADS] for i in range(THREADS)]


def _timed(work: Callable[[int], None], nodes: list[int]) -> float:
    """Run ``work(node)`` for every node on THREADS threads; returns the elapsed seconds."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS + 1)

    def worker(share: list[int]) -> None:
        barrier.wait(30)
        try:
            for node in share:
                work(node)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(share,)) for share in _split(nodes)]
    for thread in threads:
        thread.start()
    barrier.wait(30)
    start = time.perf_counter()
    for thread in threads:
        thread.join(300)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def _fixture(directory: str, peers: int, keys: list[str]) -> tuple[str, list[int]]:
    trusted = {1000 + i: keys[i] for i in range(peers)}
    pending_nodes = list(range(100_000, 100_000 + PENDING))
    pending = {node: keys[-1 - i] for i, node in enumerate(pending_nodes)}
    return c.write_trust_file(directory, trusted, pending), pending_nodes


def round_store(peers: int, keys: list[str]) -> float:
    """One round through TrustStore; returns approvals per second."""
    with c.temp_dir() as directory:
        path, nodes = _fixture(directory, peers, keys)
        lock = threading.RLock()
        store = TrustStore(path, lock, lambda changes: None)
        now = datetime.now(timezone.utc)

        def approve(node: int) -> None:
            with lock:
                request = store.working.pending[node]
                store.change(
                    Change(tables.TRUSTED, node, TrustRecord(node, request.public_key, now))
                )
                seq = store.change(Change(tables.PENDING, node, None))
            store.commit(seq)

        try:
            elapsed = _timed(approve, nodes)
        finally:
            store.close()
        _check(path, peers)
    return len(nodes) / elapsed


def round_manager(peers: int, keys: list[str]) -> float:
    """One round through Manager.approve_handshake; returns approvals per second."""
    with c.temp_dir() as directory:
        path, nodes = _fixture(directory, peers, keys)
        manager = Manager(c.bench_runtime(directory))
        manager.start()

        def approve(node: int) -> None:
            if not manager.approve_handshake(node):
                raise RuntimeError(f"nothing pending for {node}")

        try:
            elapsed = _timed(approve, nodes)
        finally:
            manager.stop()
        _check(path, peers)
    return len(nodes) / elapsed


def _check(path: str, peers: int) -> None:
    state = load_state(path)
    if len(state.trusted) != peers + PENDING or state.pending:
        raise RuntimeError(f"{path}: {len(state.trusted)} trusted, {len(state.pending)} pending")


def measure(path: str, peers: int, keys: list[str], rounds: int) -> float:
    """Approvals per second over ``rounds`` rounds of PENDING approvals."""
    one = round_store if path == "store" else round_manager
    rates = [one(peers, keys) for _ in range(rounds)]
    return len(rates) / sum(1 / rate for rate in rates)


def draw(summary: dict[str, dict[str, float]], out: str) -> bool:
    """The rate against the number of trusted peers, both paths; False without matplotlib."""
    plt = c.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for path, label in (("store", "TrustStore.commit"), ("manager", "Manager.approve_handshake")):
        counts = sorted(int(n) for n in summary[path])
        ax.plot(counts, [summary[path][str(n)] for n in counts], marker="o", label=label)
    ax.axhline(TARGET_RATE, color="grey", linestyle="--", linewidth=1, label="target at 10,000")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("trusted peers already on disk")
    ax.set_ylabel("durable approvals / s (8 threads)")
    ax.set_title("Durable approvals vs trust.json size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    c.save_figure(fig, out)
    return True


def main() -> int:
    """Run the benchmark; print figures and targets."""
    args = c.parse_args(__doc__.splitlines()[0])
    c.quiet_logging()
    counts = (10, 10_000) if args.quick else PEER_COUNTS
    rounds = 1 if args.quick else 4
    keys = c.random_keys(max(counts) + PENDING)
    print(f"durable approvals: {THREADS} threads, rounds of {PENDING} approvals x {rounds}")
    runs: list[dict[str, dict[str, float]]] = []
    for run in range(args.runs):
        figures: dict[str, dict[str, float]] = {"store": {}, "manager": {}}
        for peers in counts:
            for path in ("store", "manager"):
                figures[path][str(peers)] = measure(path, peers, keys, rounds)
        runs.append(figures)
        print(
            f"  run {run + 1}: "
            + "; ".join(
                f"{path} " + ", ".join(f"{n}: {rate:.0f}/s" for n, rate in figures[path].items())
                for path in figures
            )
        )
    summary = {
        path: {str(n): c.median([r[path][str(n)] for r in runs]) for n in counts}
        for path in ("store", "manager")
    }
    for path in ("store", "manager"):
        print(
            f"median {path}: "
            + ", ".join(f"{n} peers {summary[path][str(n)]:.0f}/s" for n in counts)
        )
    met = {}
    for path in ("store", "manager"):
        at_10k = summary[path]["10000"]
        keep = at_10k / summary[path]["10"]
        met[path] = c.verdict(
            f"{path} rate at 10,000", at_10k, TARGET_RATE, at_most=False, unit="/s"
        )
        met[path + "_keep"] = c.verdict(f"{path} 10,000 / 10", keep, TARGET_KEEP, at_most=False)
    if not args.no_save:
        draw(
            summary,
            os.path.join(c.BENCH_DIR, "approvals.png" if not args.quick else "approvals-quick.png"),
        )
    c.save("approvals", args, {"summary": summary, "met": met, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
