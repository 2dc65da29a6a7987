"""Issue 10.4: how fast ``pilot-handshakectl status`` answers against a running daemon.

Fleet scripts call the CLI thousands of times, so its start-up is the figure: the wall time
of one whole ``pilot-handshakectl --socket S status`` process, measured in the same run and
interleaved with a bare ``python -c pass`` (the interpreter's own floor) and
``python -c "import pilothandshake.cli"`` (imports alone), same interpreter. Medians of the
paired rounds. Target: CLI <= 30 ms wall median.

The children compile their bytecode once into a cache of their own (``PYTHONPYCACHEPREFIX``,
even where ``PYTHONDONTWRITEBYTECODE`` is set), as an installed package has it: otherwise
every run would compile the package's sources and that, not the CLI, would be measured.

    .venv/bin/python benchmarks/bench_cli.py [--quick] [--runs N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import _common as c

from pilothandshake.identity import Identity

CTL = os.path.join(c.ROOT, "bin", "pilot-handshakectl")
TARGET_SECONDS = 0.030


def wall_seconds(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one process run to completion (it must exit 0)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=c.ROOT, env=env)
    return time.perf_counter() - start


def main() -> int:
    """Run the benchmark; print figures and the target."""
    args = c.parse_args(__doc__.splitlines()[0], default_runs=30)
    commands = {
        "python_pass": [sys.executable, "-c", "pass"],
        "import_cli": [sys.executable, "-c", "import pilothandshake.cli"],
    }
    with c.temp_dir() as directory:
        Identity.load_or_create(os.path.join(directory, "identity.json"))
        config = c.yaml_config(directory, 1, c.free_port())
        with c.DaemonProcess(config, os.path.join(directory, "daemon.log")) as daemon:
            daemon.start()
            socket_path = os.path.join(directory, "control.sock")
            commands["ctl_status"] = [sys.executable, CTL, "--socket", socket_path, "status"]
            env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(directory, "pycache"))
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            for argv in commands.values():
                wall_seconds(argv, env)  # writes the bytecode, warms the page cache
            rounds: list[dict[str, float]] = []
            for _ in range(args.runs):
                rounds.append({name: wall_seconds(argv, env) for name, argv in commands.items()})
    summary: dict[str, Any] = {
        name: c.median([r[name] for r in rounds]) for name in ("python_pass", "import_cli")
    }
    summary["ctl_status"] = c.median([r["ctl_status"] for r in rounds])
    summary["ctl_over_python"] = summary["ctl_status"] / summary["python_pass"]
    print(f"pilot-handshakectl status, {args.runs} paired rounds (wall medians):")
    print(
        f"  python -c pass {summary['python_pass'] * 1000:.1f} ms, "
        f"import pilothandshake.cli {summary['import_cli'] * 1000:.1f} ms, "
        f"pilot-handshakectl status {summary['ctl_status'] * 1000:.1f} ms "
        f"({summary['ctl_over_python']:.2f}x python -c pass)"
    )
    met = c.verdict("cli status", summary["ctl_status"], TARGET_SECONDS, at_most=True, unit=" s")
    c.save("cli", args, {"summary": summary, "met": met, "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
