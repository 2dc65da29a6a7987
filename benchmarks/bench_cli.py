"""Issue 10.4: how fast ``pilot-handshakectl status`` answers against a running daemon.

Fleet scripts call the CLI thousands of times, so its start-up is the figure: the wall time
of one whole ``pilot-handshakectl --socket S status`` process, measured in the same run and
interleaved with a bare ``python -c pass`` (the interpreter's own floor) and
``python -c "import pilothandshake.cli"`` (imports alone), same interpreter. Medians of the
paired rounds. Target: CLI <= 30 ms wall median.

The children run the package as the README installs it (``pip install .``): the checkout is
installed, not editable, into a throwaway virtualenv whose dependencies come from the running
environment. A development venv's editable install (``pip install -e``) loads an import hook
at every interpreter start (about 15 ms here, ``python -c pass`` included), which users do
not pay; ``--editable`` measures the running interpreter instead. The children compile their
bytecode once into a cache of their own (``PYTHONPYCACHEPREFIX``, even where
``PYTHONDONTWRITEBYTECODE`` is set), as an installed package has it: otherwise every run
would compile the package's sources and that, not the CLI, would be measured.

    .venv/bin/python benchmarks/bench_cli.py [--quick] [--runs N] [--editable]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
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


def installed(directory: str) -> tuple[str, str]:
    """Install the checkout as the README does into a virtualenv under ``directory``;
    returns its (python, pilot-handshakectl). The dependencies are the running
    environment's, reached through a .pth file (only site directories read .pth files, so
    an editable install's hook there stays unloaded)."""
    venv = os.path.join(directory, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(site, "_dependencies.pth"), "w", encoding="utf-8") as pth:
        pth.write(sysconfig.get_paths()["purelib"] + "\n")
    # --target, not --prefix: with --prefix pip uninstalls the running environment's copy.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, "."],
        check=True,
        cwd=c.ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return python, os.path.join(site, "bin", "pilot-handshakectl")


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--editable", action="store_true", help="run the checkout with this interpreter"
    )


def main() -> int:
    """Run the benchmark; print figures and the target."""
    args = c.parse_args(__doc__.splitlines()[0], _extra, default_runs=30)
    with c.temp_dir() as directory:
        python, ctl = (sys.executable, CTL) if args.editable else installed(directory)
        commands = {
            "python_pass": [python, "-c", "pass"],
            "import_cli": [python, "-c", "import pilothandshake.cli"],
        }
        Identity.load_or_create(os.path.join(directory, "identity.json"))
        config = c.yaml_config(directory, 1, c.free_port())
        with c.DaemonProcess(config, os.path.join(directory, "daemon.log")) as daemon:
            daemon.start()
            socket_path = os.path.join(directory, "control.sock")
            commands["ctl_status"] = [python, ctl, "--socket", socket_path, "status"]
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
    summary["install"] = "editable (this interpreter)" if args.editable else "pip install ."
    print(
        f"pilot-handshakectl status, {args.runs} paired rounds (wall medians), "
        f"{summary['install']}:"
    )
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
