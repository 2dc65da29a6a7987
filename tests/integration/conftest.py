"""Real processes on 127.0.0.1: pilot-registryd and pilot-handshaked started from bin/ with
the running interpreter, each in its own temporary directory, on free ports. The ``fleet``
fixture always stops (and if need be kills) every process it started."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pilothandshake.client import ControlClient
from pilothandshake.identity import Identity

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
BIND_ATTEMPTS = 3  # a port taken between free_port() and the bind: try another
POLL = 0.2  # registry poll_interval used by every node in these tests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_env() -> dict[str, str]:
    """The environment for child processes: this checkout importable first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PILOT_HANDSHAKE_SOCKET", None)
    return env


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


class Proc:
    """One child process whose stdout and stderr go to files in its directory."""

    def __init__(self, name: str, argv: list[str], directory: Path) -> None:
        self.name = name
        self.argv = argv
        self.directory = directory
        self.out_path = directory / f"{name}.out"
        self.err_path = directory / f"{name}.err"
        self.popen: subprocess.Popen[bytes] | None = None
        self.terminated = False

    def spawn(self) -> None:
        """Start the process (appending to its output files)."""
        self.terminated = False
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=err, env=process_env(), cwd=self.directory
            )

    def spawn_listening(self) -> None:
        """Start a child that listens on a port free_port() chose. free_port() closed its
        probe before the child binds, so another process on this machine may take the
        port first; the child then exits at once, and starts again on another port."""
        for _ in range(BIND_ATTEMPTS):
            self.spawn()
            if not self.lost_its_port():
                return
            self.move_to(free_port())

    def move_to(self, port: int) -> None:
        """Listen on ``port`` from the next spawn on (its listen port was taken)."""
        raise NotImplementedError

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def wait_output(self, marker: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``marker`` appears on stdout; fail with the output if it exits first."""
        deadline = time.monotonic() + timeout
        while marker not in self.stdout:
            assert self.popen is not None
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.stderr}")
            if time.monotonic() >= deadline:
                pytest.fail(f"{self.name} did not print {marker!r} in {timeout} s:\n{self.stderr}")
            time.sleep(0.02)

    def lost_its_port(self, timeout: float = START_TIMEOUT) -> bool:
        """Whether the child exited because its listen port was taken (it says so in its
        first lines, before it prints its start line)."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            if self.stdout:
                return False
            time.sleep(0.02)
        return self.popen.poll() is not None and "already in use" in self.stderr

    def signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signum)
            self.terminated = self.terminated or signum == signal.SIGTERM

    def stop(self) -> int | None:
        """SIGTERM (once: a second one during interpreter shutdown kills the process), then
        SIGKILL after STOP_TIMEOUT; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            if not self.terminated:
                self.signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        return self.popen.returncode


class Registry(Proc):
    """A pilot-registryd on a free port; with ``memory`` it keeps nothing (``--memory``),
    else its store is ``registry.json`` in its directory."""

    def __init__(
        self, directory: Path, networks: dict[int, list[Any]] | None = None, memory: bool = False
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        config = directory / "registry.yaml"
        # Fleets in tests register many keys from 127.0.0.1; the limit itself is tested in
        # tests/registry/.
        limits = {
            "register_per_minute": 100_000,
            "mutations_per_minute_per_node": 100_000,
            "mutations_per_minute_per_source": 1_000_000,
        }
        config.write_text(yaml.safe_dump({"networks": networks or {}, "limits": limits}))
        super().__init__(
            "registry",
            [
                sys.executable,
                str(BIN / "pilot-registryd"),
                "--listen",
                self.address,
                *(["--memory"] if memory else ["--store", str(directory / "registry.json")]),
                "--config",
                str(config),
            ],
            directory,
        )

    def start(self) -> Registry:
        self.spawn_listening()
        self.wait_output("listening")
        return self

    def move_to(self, port: int) -> None:
        old, self.port = self.address, port
        self.address = f"127.0.0.1:{port}"
        self.argv[self.argv.index(old)] = self.address

    def restart(self) -> Registry:
        """Stop (cleanly) and start again on the same address."""
        assert self.stop() == 0, self.stderr
        self.out_path.write_bytes(b"")  # a fresh "listening" line to wait for
        return self.start()


class Node(Proc):
    """A pilot-handshaked with its own identity directory and config file."""

    def __init__(self, name: str, directory: Path, config: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = {
            "identity": str(directory / "identity.json"),
            "listen": f"127.0.0.1:{self.port}",
            "log_level": "debug",
            **config,
        }
        self.config_path = directory / "config.yaml"
        self.write_config()
        self.identity = Identity.load_or_create(str(directory / "identity.json"))
        self.socket_path = str(directory / "control.sock")
        super().__init__(
            name,
            [sys.executable, str(BIN / "pilot-handshaked"), "--config", str(self.config_path)],
            directory,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def key(self) -> str:
        return self.identity.public_key_b64

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self) -> Node:
        """Start and wait for the start line (the node ID is known then, if it registered)."""
        self.spawn_listening()
        self.wait_output("pilot-handshaked: node")
        return self

    def move_to(self, port: int) -> None:
        self.port = port
        self.config["listen"] = f"127.0.0.1:{port}"
        self.write_config()

    def restart(self) -> Node:
        assert self.stop() == 0, self.stderr
        with open(self.out_path, "wb"):
            pass  # a fresh start line to wait for
        return self.start()

    @property
    def node_id(self) -> int:
        return int(self.status()["node_id"])

    def control(self, command: str, **args: Any) -> dict[str, Any]:
        """One control request; fails the test on an error response."""
        response = ControlClient(self.socket_path).request(command, **args)
        assert response["status"] == "ok", response
        return dict(response["data"])

    def status(self) -> dict[str, Any]:
        return self.control("status")

    def trusted(self) -> set[int]:
        return {int(r["node_id"]) for r in self.control("trust")["trusted"]}

    def pending(self) -> set[int]:
        return {int(r["node_id"]) for r in self.control("pending")["pending"]}

    def ctl(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run pilot-handshakectl against this node."""
        return subprocess.run(
            [sys.executable, str(BIN / "pilot-handshakectl"), "--socket", self.socket_path, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=process_env(),
        )

    def events(self) -> list[dict[str, Any]]:
        """The recent events (what ``pilot-handshakectl events`` prints)."""
        return [r["data"] for r in ControlClient(self.socket_path).stream("events")]

    def topics(self) -> list[str]:
        return [str(e["event"]) for e in self.events()]

    def serving(self) -> int:
        """Port-444 connections being served now (the metrics gauge): a message is decided
        after the daemon read it, before it writes the receipt and closes (SPEC 3)."""
        text = self.control("metrics")["text"]
        match = re.search(r"^pilot_handshake_active_connections (\S+)$", text, re.M)
        assert match, text
        return int(float(match.group(1)))

    def settle(self) -> None:
        """Wait until every message read so far is decided (no connection being served)."""
        wait_until(lambda: self.serving() == 0, timeout=30.0, what="the daemon idle")


class Fleet:
    """Starts registries and nodes under one temporary directory; ``close()`` stops all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []

    def registry(
        self, networks: dict[int, list[Any]] | None = None, memory: bool = False
    ) -> Registry:
        reg = Registry(self.root / f"registry{len(self.procs)}", networks, memory)
        self.procs.append(reg)
        return reg

    def node(self, name: str, registry: Registry | None = None, **config: Any) -> Node:
        """A node (not started). With ``registry``, it registers there with a fast poll,
        idle or not; ``public`` (default False) goes to the registry section."""
        if registry is not None:
            config["registry"] = {
                "address": registry.address,
                "poll_interval": POLL,
                # Polled as often when idle too, unless a test is about the schedule
                # (SPEC 18): most tests here are about what the relay carries, not when.
                "poll_idle": POLL,
                "public": config.pop("public", False),
                **config.pop("registry_options", {}),
            }
        node = Node(name, self.root / name, config)
        self.procs.append(node)
        return node

    def direct_pair(
        self, a_config: dict[str, Any] | None = None, b_config: dict[str, Any] | None = None
    ) -> tuple[Node, Node]:
        """Nodes 7 (A) and 9 (B) without a registry, each in the other's ``peers``; started."""
        a = self.node("a", node_id=7, **(a_config or {}))
        b = self.node("b", node_id=9, **(b_config or {}))
        a.config["peers"] = {9: b.address}
        b.config["peers"] = {7: a.address}
        a.write_config()
        b.write_config()
        return a.start(), b.start()

    def close(self) -> None:
        """Stop every process: all are signalled first, so they stop in parallel."""
        for proc in self.procs:
            proc.signal(signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stop()
        # pytest shows captured output only for failing tests: the logs explain the failure.
        for proc in self.procs:
            tail = "\n".join(proc.stderr.splitlines()[-60:])
            code = proc.popen.returncode if proc.popen else None
            print(f"----- {proc.name} ({proc.directory}) exit {code} -----\n{tail}")


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """A fleet under a short temporary directory (AF_UNIX socket paths are limited to about
    107 bytes, too short for pytest's tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        f = Fleet(Path(root))
        try:
            yield f
        finally:
            f.close()
