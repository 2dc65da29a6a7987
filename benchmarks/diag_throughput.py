"""Diagnosis for issue 5.1: where the daemon's port-444 throughput goes.

Runs a ``Daemon`` in this process (same config and same client processes as
bench_throughput.py) and instruments its trust store's group commit: number of writes,
changes per write (batch), time per write and the share of the run the writer was busy,
plus this process's user and system CPU per message. Instrumentation reads private
attributes of ``TrustStore``; it is a diagnostic, not a benchmark.

``--threads N`` sets the client threads per process (4 processes; default 4).
``--switch-interval S`` sets the GIL switch interval of this process (default 5 ms), to see
whether threads waiting for the GIL bound the rate. ``--count-wakeups`` counts the returns
of ``Condition.wait`` per message, by the function that waited (each is a thread hand-off:
group commit, queues, the pool, thread start). ``--what-if-no-write`` skips the file write
(NOT durable: an upper bound showing what the rest of the daemon costs when persistence is
free). Never quote it as a throughput figure.

    .venv/bin/python benchmarks/diag_throughput.py [--quick] [--threads N] [--what-if-no-write]
"""

from __future__ import annotations

import collections
import os
import queue
import sys
import threading
import time
from typing import Any

import _common as c
import bench_throughput as bt

from pilothandshake.config import load_config
from pilothandshake.daemon import Daemon


def count_wakeups() -> collections.Counter[str]:
    """From now on, count each return of ``threading.Condition.wait`` in this process by
    the function above threading/queue that waited; returns the live counter."""
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    original = threading.Condition.wait
    plumbing = {threading.__file__, queue.__file__}

    def wait(self: threading.Condition, timeout: float | None = None) -> bool:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename in plumbing:
            frame = frame.f_back
        code = frame.f_code
        where = getattr(code, "co_qualname", code.co_name)
        result = original(self, timeout)
        with lock:
            counts[where] += 1
        return result

    threading.Condition.wait = wait  # type: ignore[method-assign]
    return counts


def diagnose(total: int, no_write: bool, threads: int) -> dict[str, Any]:
    """One instrumented run; returns the figures."""
    with c.temp_dir() as directory:
        port = c.free_port()
        daemon = Daemon(load_config(c.yaml_config(directory, bt.DAEMON_NODE, port)))
        daemon.start()
        store = daemon.manager._store
        lead = store._lead
        writes: list[tuple[int, float]] = []

        def timed_lead(upto: int, *rest: Any) -> None:
            changes = upto - store._resolved
            start = time.perf_counter()
            lead(upto, *rest)
            writes.append((changes, time.perf_counter() - start))

        store._lead = timed_lead
        if no_write:
            store._file_lock = None
        try:
            before = os.times()
            figures = bt.drive(port, total, 4, threads, first_node=100)
            after = os.times()
        finally:
            daemon.stop()
    busy = sum(seconds for _, seconds in writes)
    return {
        "per_second": figures["per_second"],
        "writes": len(writes),
        "batch": sum(changes for changes, _ in writes) / len(writes),
        "write_ms": busy / len(writes) * 1e3,
        "writer_busy": busy / figures["seconds"],
        "user_us": (after.user - before.user) / total * 1e6,
        "system_us": (after.system - before.system) / total * 1e6,
    }


def main() -> int:
    """Print the diagnosis of one run."""

    def extra(parser: Any) -> None:
        parser.add_argument("--what-if-no-write", action="store_true")
        parser.add_argument("--count-wakeups", action="store_true")
        parser.add_argument("--threads", type=int, default=4, help="per client process (4)")
        parser.add_argument(
            "--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (s)"
        )

    args = c.parse_args(__doc__.splitlines()[0], extra, default_runs=1)
    c.quiet_logging()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    total = 600 if args.quick else 4000
    for run in range(args.runs):
        wakeups = count_wakeups() if args.count_wakeups else None
        f = diagnose(total, args.what_if_no_write, args.threads)
        label = " (WHAT-IF: writes skipped, not durable)" if args.what_if_no_write else ""
        label += f" ({4 * args.threads} clients)"
        label += f" (switch interval {sys.getswitchinterval() * 1e3:g} ms)"
        print(
            f"run {run + 1}{label}: {f['per_second']:.0f} msg/s; {f['writes']} writes, "
            f"{f['batch']:.1f} changes/write, {f['write_ms']:.2f} ms/write, writer busy "
            f"{f['writer_busy'] * 100:.0f}% of the run; CPU per message {f['user_us']:.0f} us "
            f"user + {f['system_us']:.0f} us system"
        )
        if wakeups is not None:
            print(f"  Condition wake-ups per message: {sum(wakeups.values()) / total:.2f}")
            for where, count in wakeups.most_common():
                print(f"    {count / total:6.2f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
