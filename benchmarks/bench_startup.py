"""Issue 5.6: startup with 10,000 trusted peers on disk.

Time from spawning ``pilot-handshaked`` (identity and a trust.json of 10,000 trusted peers
already on disk, no registry) to the first successful TCP connect on its listen address,
probed every millisecond. Beside it, for scale: a bare ``python -c pass`` and
``python -c "import pilothandshake.daemon"`` (interpreter and imports alone), and the same
daemon on an empty trust.json. Target: <= 1 s.

    .venv/bin/python benchmarks/bench_startup.py [--quick] [--runs N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import _common as c

from pilothandshake.identity import Identity

TRUSTED = 10_000
TARGET_SECONDS = 1.0


def until_accepting(directory: str) -> float:
    """Seconds from spawn to the first accepted connect."""
    port = c.free_port()
    config = c.yaml_config(directory, 1, port)
    daemon = c.DaemonProcess(config, os.path.join(directory, "daemon.log"))
    start = time.monotonic()
    daemon.started_at = start
    daemon.proc = subprocess.Popen(
        [sys.executable, c.DAEMON, "--config", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=c.ROOT,
    )
    try:
        if not c.wait_until(lambda: c.can_connect(port), 20.0, interval=0.001):
            raise RuntimeError("daemon never accepted within 20 s")
        return time.monotonic() - start
    finally:
        daemon.stop()


def command_seconds(code: str) -> float:
    """Wall time of ``python -c code``."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=c.ROOT)
    return time.monotonic() - start


def one_run(trusted: int) -> dict[str, Any]:
    """Cold-start figures for one run."""
    figures: dict[str, Any] = {
        "python_seconds": command_seconds("pass"),
        "import_seconds": command_seconds("import pilothandshake.daemon"),
    }
    for name, count in (("empty_seconds", 0), ("loaded_seconds", trusted)):
        with c.temp_dir() as directory:
            Identity.load_or_create(os.path.join(directory, "identity.json"))
            keys = c.random_keys(count)
            c.write_trust_file(directory, {1000 + i: key for i, key in enumerate(keys)})
            figures[name] = until_accepting(directory)
    return figures


def main() -> int:
    """Run the benchmark; print figures and targets."""
    args = c.parse_args(__doc__.splitlines()[0], default_runs=5)
    trusted = TRUSTED
    print(f"startup: spawn -> accepting, {trusted} trusted peers on disk")
    runs = []
    for run in range(args.runs):
        figures = one_run(trusted)
        runs.append(figures)
        print(
            f"  run {run + 1}: loaded {figures['loaded_seconds']:.3f} s, empty "
            f"{figures['empty_seconds']:.3f} s, python -c pass {figures['python_seconds']:.3f} "
            f"s, import pilothandshake.daemon {figures['import_seconds']:.3f} s"
        )
    keys = ("loaded_seconds", "empty_seconds", "python_seconds", "import_seconds")
    summary = {key: c.median([r[key] for r in runs]) for key in keys}
    print(
        f"median: {summary['loaded_seconds']:.3f} s with {trusted} trusted, "
        f"{summary['empty_seconds']:.3f} s empty"
    )
    met = c.verdict("startup", summary["loaded_seconds"], TARGET_SECONDS, at_most=True, unit=" s")
    c.save("startup", args, {"summary": summary, "met": met, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
