"""The two-node demo (scripts/demo.sh, or: python -m pilothandshake.demo).

Starts pilot-registryd and two pilot-handshaked on loopback, on free unprivileged ports, in
a temporary directory (mode 0700), then walks through a whole handshake with the real
pilot-handshakectl commands, printing each command and its output: A asks B for trust, B
lists and approves it, both list trust, A waits, A revokes, B sees it gone. The daemons'
logs must hold no WARNING or ERROR: the happy path is quiet. Every process is stopped at the
end, also on failure. Exit code 0 on success; 1 with a message saying which step failed.

The programs are the ones installed beside this Python (a venv's bin/, no need to activate
it), else a checkout's bin/.
"""

# The node configs are made here (``node_config``), not read from ``conf/``, so the demo also
# runs from an installed wheel; ``conf/demo-node-*.yaml`` hold the same settings for the
# README's walkthrough (``tests/test_packaging.py`` keeps the two in step).

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

CHECKOUT = Path(__file__).resolve().parents[1]
NODES = ("a", "b")
START_TIMEOUT = 15.0
STEP_TIMEOUT = 15.0
# The level field of the text log format (daemon and registry alike).
_LOUD = re.compile(r" (WARNING|ERROR|CRITICAL) ")


class DemoError(Exception):
    """A step of the demo did not do what it should; the message says which."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config(name: str, directory: Path, listen: str, registry: str) -> dict[str, Any]:
    """Demo node ``name``'s config: state in ``directory``, serving ``listen``."""
    return {
        "identity": str(directory / f"node-{name}" / "identity.json"),
        "hostname": f"node-{name}",
        "listen": listen,
        "registry": {
            "address": registry,
            "poll_interval": 0.5,
            "heartbeat_interval": 60,
            # Resolvable by anyone, so the other node can dial this one's port 444 directly.
            "public": True,
        },
        "trust": {"strict": True, "auto_approve": False},
        "log_level": "info",
        "log_format": "text",
    }


def _script_dirs() -> list[Path]:
    """Where pip put this package's scripts: beside ``sys.executable`` (a venv's bin/, used
    without activating it), then this Python's scripts directories."""
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    user = sysconfig.get_path("scripts", f"{os.name}_user")
    return [*dirs, Path(user)] if user else dirs


def _command(name: str) -> list[str]:
    """How to run one of the package's scripts: installed beside this Python, else from a
    checkout's bin/ (run with this Python)."""
    for directory in _script_dirs():
        installed = directory / name
        if installed.is_file() and os.access(installed, os.X_OK):
            return [str(installed)]
    script = CHECKOUT / "bin" / name
    if script.is_file():
        return [sys.executable, str(script)]
    looked = ", ".join(str(d) for d in dict.fromkeys(_script_dirs()))
    raise DemoError(
        f"cannot find {name}: it is in none of {looked} (where pip installs the scripts of "
        f"this Python's packages) nor in a checkout's bin/; install the package for this "
        f"Python: {sys.executable} -m pip install pilothandshake"
    )


class _Process:
    """A background process whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".out")
        with open(log_path, "wb") as err, open(self.out_path, "wb") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err)

    def wait_for(self, marker: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while marker not in self.out_path.read_text(errors="replace"):
            if self.popen.poll() is not None:
                raise DemoError(f"{self.name} exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name} did not start in {START_TIMEOUT:g} s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


class Demo:
    """The demo's processes and steps, under one temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[_Process] = []
        self.ctl = _command("pilot-handshakectl")

    def start(self) -> tuple[Path, Path]:
        """Start the registry (its state in a temporary store), then A, then B; returns
        their config paths."""
        registry = f"127.0.0.1:{_free_port()}"
        store = str(self.workdir / "registry.json")
        self._spawn("registry", "pilot-registryd", ["--listen", registry, "--store", store])
        paths = []
        for name in NODES:
            config = node_config(name, self.workdir, f"127.0.0.1:{_free_port()}", registry)
            path = self.workdir / f"node-{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            self._spawn(f"node {name.upper()}", "pilot-handshaked", ["--config", str(path)])
            paths.append(path)
        return paths[0], paths[1]

    def _spawn(self, name: str, program: str, args: list[str]) -> None:
        log_path = self.workdir / (name.replace(" ", "-").lower() + ".log")
        print(f"$ {' '.join(shlex.quote(a) for a in [program, *args])} &   # {name}")
        process = _Process(name, [*_command(program), *args], log_path)
        self.processes.append(process)
        # Both programs print one "... listening on ADDRESS" line once they serve.
        process.wait_for(" listening on ")

    def stop(self) -> None:
        """Stop every process started (in reverse order); never raises. Idempotent."""
        for process in reversed(self.processes):
            try:
                process.stop()
            except OSError as exc:
                print(f"# could not stop {process.name}: {exc}", file=sys.stderr)

    def check_quiet(self) -> None:
        """Fail if any process logged a WARNING or worse: nothing went wrong, so nothing
        should say so (call after ``stop``, which may log too)."""
        noisy = [
            f"{process.name}: {line}"
            for process in self.processes
            for line in process.log_path.read_text(errors="replace").splitlines()
            if _LOUD.search(line)
        ]
        if noisy:
            raise DemoError("the happy path logged warnings:\n" + "\n".join(noisy))

    def run(self, config: Path, *args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``pilot-handshakectl --config CONFIG ARGS``; print it and its output."""
        argv = [*self.ctl, "--config", str(config), *args]
        if show:
            shown = ["pilot-handshakectl", "--config", str(config), *args]
            print(f"\n$ {' '.join(shlex.quote(a) for a in shown)}")
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"{' '.join(args)} did not finish in {STEP_TIMEOUT:g} s") from exc
        if show:
            print((result.stdout + result.stderr).rstrip())
        return result

    def expect(self, config: Path, *args: str) -> str:
        """Run a command that must succeed; returns its output."""
        result = self.run(config, *args)
        if result.returncode != 0:
            raise DemoError(f"`{' '.join(args)}` failed: {result.stderr.strip()}")
        return result.stdout

    def query(self, config: Path, *args: str) -> Any:
        """A silent ``--json`` query; returns ``data``."""
        result = self.run(config, "--json", *args, show=False)
        if result.returncode != 0:
            raise DemoError(f"`{' '.join(args)}` failed: {result.stderr.strip()}")
        return json.loads(result.stdout.splitlines()[-1])["data"]

    def wait_until(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not check():
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting until {what}")
            time.sleep(0.1)

    def trusted(self, config: Path) -> set[int]:
        return {int(r["node_id"]) for r in self.query(config, "trust")["trusted"]}

    def pending(self, config: Path) -> set[int]:
        return {int(r["node_id"]) for r in self.query(config, "pending")["pending"]}

    def walk_through(self, a: Path, b: Path) -> None:
        """The handshake, step by step."""
        self.expect(a, "status")
        self.expect(b, "status")
        node_a = int(self.query(a, "status")["node_id"])
        node_b = int(self.query(b, "status")["node_id"])
        print(f"\n# node A is {node_a}, node B is {node_b}; A asks B for trust")
        self.expect(a, "handshake", str(node_b), "demo: nightly sync")
        self.wait_until("B has A's request pending", lambda: node_a in self.pending(b))
        self.expect(b, "pending")
        self.expect(b, "approve", str(node_a))
        self.expect(a, "wait", str(node_b), "--timeout", "10")
        self.expect(a, "trust")
        self.expect(b, "trust")
        if self.trusted(a) != {node_b} or self.trusted(b) != {node_a}:
            raise DemoError("after the approval the two nodes do not trust each other")
        print("\n# A revokes its trust in B; B hears of it")
        self.expect(a, "untrust", str(node_b))
        self.wait_until("B no longer trusts A", lambda: not self.trusted(b))
        self.expect(b, "trust")
        self.expect(b, "events")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 1 with a message on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m pilothandshake.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 the demo ran, 1 a step failed (the message says which).",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pilot-demo-"))  # mode 0700
    demo: Demo | None = None
    started = time.monotonic()
    try:
        demo = Demo(workdir)
        a, b = demo.start()
        demo.walk_through(a, b)
        demo.stop()
        demo.check_quiet()
    except (DemoError, OSError) as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        if demo is not None:
            for process in demo.processes:
                print(f"--- {process.name} log ---\n{process.log_tail()}", file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            demo.stop()
        if args.keep:
            print(f"# files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo OK in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
