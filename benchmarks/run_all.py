"""Run every benchmark in turn (each in its own process) and print their figures.

    .venv/bin/python benchmarks/run_all.py [--quick]

Each benchmark writes benchmarks/results/<name>[-quick].json and the three pictures
(approvals.png, wake_latency.png, fleet.png); the exit code is non-zero only if a benchmark
failed to run, not when a target is missed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

BENCHMARKS = (
    "bench_throughput.py",
    "bench_wait.py",
    "bench_approvals.py",
    "bench_relay.py",
    "bench_memory.py",
    "bench_startup.py",
    "bench_flood.py",
    "bench_fleet.py",
    "bench_cli.py",
    "bench_registry_flood.py",
    "bench_registry_cpu.py",
)


def main() -> int:
    """Run them all with the given flags; returns the number of benchmarks that failed."""
    here = os.path.dirname(os.path.abspath(__file__))
    failed = 0
    for name in BENCHMARKS:
        start = time.monotonic()
        code = subprocess.call([sys.executable, os.path.join(here, name), *sys.argv[1:]])
        print(f"[{name}: exit {code}, {time.monotonic() - start:.1f} s]\n", flush=True)
        failed += code != 0
    return failed


if __name__ == "__main__":
    sys.exit(main())
