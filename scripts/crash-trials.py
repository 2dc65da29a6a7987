#!/usr/bin/env python3
"""Crash-consistency trials (SPEC 10 durability; the registry's ``--store``).

Daemon: pilot-handshaked runs without a registry; signed handshake requests from generated
identities are sent straight to its port so that it holds many pending requests; threads
approve them through the control socket while a timer SIGKILLs the daemon at a random
moment (sometimes during start-up instead). After every kill: ``trust.json`` must parse and
hold every approval the control socket acknowledged; after every restart the daemon must
start, its state must be exactly ``trust.json`` (never a leftover temporary file), and no
temporary file may remain.

Registry: pilot-registryd runs with ``--store``; threads register fresh identities, report
trust pairs and relay handshake requests through ``registry.client.RegistryConnection``
while a timer SIGKILLs it. After every kill the store (snapshot and journal) must load and
hold every acknowledged node (with its key), pair and relayed request; after a restart an
acknowledged identity registering again gets its old node ID back.

    python scripts/crash-trials.py --trials 200            # both targets, summary at the end
    python scripts/crash-trials.py --trials 50 --target registry --seed 7

Exit status 0 when every trial passed. ``tests/integration/test_crash.py`` imports
``daemon_trials`` and ``registry_trials`` and runs a few trials in CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pilothandshake.client import ControlClient, ControlError  # noqa: E402
from pilothandshake.errors import HandshakeError, StoreError  # noqa: E402
from pilothandshake.identity import Identity, b64encode  # noqa: E402
from pilothandshake.messages import HANDSHAKE_REQUEST, HandshakeMsg, handshake_challenge  # noqa: E402
from pilothandshake.registry.challenges import report_trust_challenge  # noqa: E402
from pilothandshake.registry.client import RegistryConnection  # noqa: E402
from pilothandshake.registry.storage import read_state as read_registry_store  # noqa: E402
from pilothandshake.store import load_state  # noqa: E402

NODE_ID = 7  # the daemon's node ID (no registry)
START_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0
KILL_AT_START = 0.15  # share of trials that also kill a daemon while it starts
START_KILL_WINDOW = 0.4  # seconds after spawn within which such a kill lands
KILL_WINDOW = 0.25  # seconds after the changes start within which the kill lands
PENDING_TARGET = 96  # pending requests the daemon holds before approvals start
WORKERS = 4  # concurrent approvers / registry writers
SOURCES = 200  # 127.0.2.1, 127.0.3.1 ..: spreads requests over the per-source pending quota


@dataclass
class Report:
    """What a run of trials saw; ``problems`` empty means every check passed."""

    target: str
    trials: int = 0
    acknowledged: int = 0  # changes acknowledged before a kill (all checked after it)
    kills_at_start: int = 0
    interrupted: int = 0  # trials whose kill landed while changes were in flight
    temp_files_after_kill: int = 0  # litter a kill left (must never be read as state)
    restarts: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "PASS" if self.ok else f"FAIL ({len(self.problems)} problems)"
        return (
            f"{self.target}: {self.trials} trials, {self.acknowledged} acknowledged changes "
            f"all present after SIGKILL, {self.interrupted} kills amid changes, "
            f"{self.restarts} restarts, {self.kills_at_start} kills "
            f"during start-up, {self.temp_files_after_kill} temp files left by kills: "
            f"{verdict} in {self.seconds:.1f} s"
        )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PILOT_HANDSHAKE_SOCKET", None)
    return env


class _Child:
    """A child process with stdout/stderr in files; ``kill()`` is SIGKILL and reap."""

    def __init__(self, argv: list[str], directory: Path, name: str) -> None:
        self.out = directory / f"{name}.out"
        self.err = directory / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "ab") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err, env=_env(), cwd=directory)

    def wait_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str] | None:
        """The first match of ``pattern`` on stdout; None if the process exits first or
        ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.out.read_text(errors="replace"))
            if match:
                return match
            if self.popen.poll() is not None:
                return None
            time.sleep(0.01)
        return None

    def stderr_tail(self) -> str:
        return "\n".join(self.err.read_text(errors="replace").splitlines()[-5:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(EXIT_TIMEOUT)


@contextmanager
def _reaped(children: list[_Child]) -> Iterator[None]:
    """Whatever happens, no child outlives the trials."""
    try:
        yield
    finally:
        for child in children:
            if child.popen.poll() is None:
                child.popen.kill()
                child.popen.wait(EXIT_TIMEOUT)


def _kill_later(child: _Child, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, child.kill)
    timer.daemon = True
    timer.start()
    return timer


def _temp_files(directory: Path, pattern: str) -> list[str]:
    return sorted(glob.glob(str(directory / pattern)))


# -- the daemon ------------------------------------------------------------------------------


def _send_request(port: int, sender: int, source: str) -> None:
    """A signed handshake_request from a fresh identity, sent from ``source``."""
    identity = Identity.generate()
    msg = HandshakeMsg(
        type=HANDSHAKE_REQUEST,
        node_id=sender,
        public_key=identity.public_key_b64,
        justification=f"crash trial {sender}",
        timestamp=int(time.time()),
    )
    msg.signature_v2 = b64encode(identity.sign(msg.v2_challenge(NODE_ID)))
    with socket.socket() as sock:
        sock.settimeout(5.0)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(msg.to_json())
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass


def _pending(client: ControlClient) -> set[int]:
    response = client.request("pending")
    return {int(p["node_id"]) for p in response["data"]["pending"]}


def _trusted(client: ControlClient) -> set[int]:
    response = client.request("trust")
    return {int(r["node_id"]) for r in response["data"]["trusted"]}


class _DaemonRun:
    def __init__(self, root: Path, rng: random.Random, report: Report) -> None:
        self.dir = root / "node"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trust = self.dir / "trust.json"
        self.socket = str(self.dir / "control.sock")
        self.config = self.dir / "config.yaml"
        self.config.write_text(
            f"identity: {self.dir / 'identity.json'}\nnode_id: {NODE_ID}\n"
            'listen: "127.0.0.1:0"\nlog_level: warning\n'
        )
        self.rng = rng
        self.report = report
        self.acked: set[int] = set()
        self.children: list[_Child] = []
        self.next_sender = 1000

    def spawn(self) -> _Child:
        argv = [sys.executable, str(ROOT / "bin" / "pilot-handshaked"), "--config"]
        child = _Child([*argv, str(self.config)], self.dir, "daemon")
        self.children.append(child)
        return child

    def problem(self, text: str) -> None:
        self.report.problems.append(f"trial {self.report.trials}: {text}")

    def check_after_kill(self) -> set[int] | None:
        """trust.json parses and holds every acknowledged approval; its trusted set."""
        self.report.temp_files_after_kill += len(_temp_files(self.dir, ".trust.json.*.tmp"))
        if not self.trust.exists():
            if self.acked:
                self.problem("trust.json is missing after a kill")
            return set()
        try:
            state = load_state(str(self.trust))
        except StoreError as exc:
            self.problem(f"trust.json does not parse after a kill: {exc}")
            return None
        lost = self.acked - set(state.trusted)
        if lost:
            self.problem(f"acknowledged approvals missing from trust.json: {sorted(lost)}")
        return set(state.trusted)

    def start(self) -> tuple[_Child, int] | None:
        child = self.spawn()
        match = child.wait_line(r"listening on 127\.0\.0\.1:(\d+)")
        if match is None:
            self.problem(f"daemon did not restart after a kill:\n{child.stderr_tail()}")
            return None
        self.report.restarts += 1
        return child, int(match.group(1))

    def refill(self, client: ControlClient, port: int) -> set[int]:
        """Top the pending queue up to ``PENDING_TARGET``; the pending node IDs."""
        pending = _pending(client)
        wanted = PENDING_TARGET - len(pending)
        if wanted > 0:
            senders = list(range(self.next_sender, self.next_sender + wanted))
            self.next_sender += wanted
            with ThreadPoolExecutor(8) as pool:
                # One /24 each: the pending queue counts a source as its /24 (round 3).
                sources = [f"127.0.{2 + s % SOURCES}.1" for s in senders]
                list(pool.map(_send_request, [port] * wanted, senders, sources))
            deadline = time.monotonic() + 5.0
            while not set(senders) <= pending and time.monotonic() < deadline:
                time.sleep(0.02)
                pending = _pending(client)
        return pending

    def approve_until_killed(self, child: _Child, candidates: list[int]) -> None:
        lock = threading.Lock()
        killed = threading.Event()
        self.rng.shuffle(candidates)

        def approver() -> None:
            client = ControlClient(self.socket, timeout=5.0)
            while True:
                with lock:
                    if not candidates:
                        return
                    node = candidates.pop()
                try:
                    response = client.request("approve", node_id=node)
                except ControlError:
                    killed.set()  # this approval was never acknowledged
                    return
                if response["status"] == "ok" and response["data"]["status"] == "approved":
                    with lock:
                        self.acked.add(node)
                        self.report.acknowledged += 1
                else:
                    with lock:
                        self.problem(f"approve {node} answered {response}")

        threads = [threading.Thread(target=approver, daemon=True) for _ in range(WORKERS)]
        timer = _kill_later(child, self.rng.uniform(0.0, KILL_WINDOW))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(START_TIMEOUT)
        timer.join(START_TIMEOUT)
        child.kill()
        self.report.interrupted += killed.is_set()

    def trial(self) -> bool:
        if self.rng.random() < KILL_AT_START:
            # A kill while the daemon loads trust.json, takes its locks, binds.
            self.report.kills_at_start += 1
            child = self.spawn()
            time.sleep(self.rng.uniform(0.0, START_KILL_WINDOW))
            child.kill()
        on_disk = self.check_after_kill()
        started = self.start()
        if started is None or on_disk is None:
            return False
        child, port = started
        leftovers = _temp_files(self.dir, ".trust.json.*.tmp")
        if leftovers:
            self.problem(f"temporary files left after a restart: {leftovers}")
        client = ControlClient(self.socket, timeout=5.0)
        try:
            loaded = _trusted(client)
            if loaded != on_disk:
                self.problem(
                    f"restarted state differs from trust.json: loaded {len(loaded)}, "
                    f"file {len(on_disk)}, only in memory {sorted(loaded - on_disk)[:5]}"
                )
            candidates = sorted(self.refill(client, port))
        except (ControlError, OSError) as exc:
            self.problem(f"daemon failed before the kill: {exc}")
            child.kill()
            return False
        self.approve_until_killed(child, candidates)
        return True


def daemon_trials(trials: int, seed: int = 0, root: str = "") -> Report:
    """Run ``trials`` SIGKILL trials against pilot-handshaked in ``root`` (a fresh temporary
    directory when ""); stops at the first trial that cannot go on."""
    report = Report("pilot-handshaked trust.json")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ph-crash-") as scratch:
        run = _DaemonRun(Path(root or scratch), random.Random(seed), report)
        with _reaped(run.children):
            for _ in range(trials):
                report.trials += 1
                if not run.trial():
                    break
            run.check_after_kill()
    report.seconds = time.monotonic() - began
    return report


# -- the registry ---------------------------------------------------------------------------


class _RegistryRun:
    def __init__(self, root: Path, rng: random.Random, report: Report) -> None:
        self.dir = root / "registry"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = self.dir / "registry.json"
        self.rng = rng
        self.report = report
        self.nodes: dict[int, Identity] = {}  # acknowledged registrations
        self.pairs: set[tuple[int, int]] = set()  # acknowledged report_trust vouches
        self.relayed: set[tuple[int, int]] = set()  # acknowledged relayed requests (to, from)
        self.children: list[_Child] = []
        self.lock = threading.Lock()

    def problem(self, text: str) -> None:
        self.report.problems.append(f"trial {self.report.trials}: {text}")

    def spawn(self) -> _Child:
        argv = [sys.executable, str(ROOT / "bin" / "pilot-registryd"), "--listen"]
        argv += ["127.0.0.1:0", "--store", str(self.store), "--log-level", "warning"]
        # The writers register thousands of fresh keys from one address.
        config = self.dir / "registry.yaml"
        config.write_text(
            "limits:\n  register_per_minute: 1000000\n  mutations_per_minute_per_source: 1000000\n"
        )
        argv += ["--config", str(config)]
        child = _Child(argv, self.dir, "registry")
        self.children.append(child)
        return child

    def check_after_kill(self) -> bool:
        self.report.temp_files_after_kill += len(_temp_files(self.dir, ".registry.json.*.tmp"))
        if not self.store.exists():
            if self.nodes:
                self.problem("the store is missing after a kill")
            return not self.nodes
        try:
            stored = read_registry_store(str(self.store))
            nodes, trust, next_id = stored.nodes, stored.vouches, stored.next_id
        except StoreError as exc:
            self.problem(f"the store does not parse after a kill: {exc}")
            return False
        for node_id, identity in self.nodes.items():
            if node_id not in nodes or nodes[node_id].public_key != identity.public_key:
                self.problem(f"acknowledged node {node_id} is missing or has another key")
        lost = self.pairs - trust
        if lost:
            self.problem(f"acknowledged trust pairs missing from the store: {sorted(lost)}")
        kept = {(to, sender) for to, inbox in stored.requests.items() for sender in inbox}
        if self.relayed - kept:
            self.problem(f"acknowledged relayed requests missing: {sorted(self.relayed - kept)}")
        if self.nodes and next_id <= max(self.nodes):
            self.problem(f"next_id {next_id} would reuse an acknowledged node ID")
        return True

    def writer(self, address: str, stop: threading.Event, killed: threading.Event) -> None:
        client = RegistryConnection(address, timeout=5.0)
        try:
            while not stop.is_set():
                identity = Identity.generate()
                try:
                    answer = client.register("127.0.0.1:1", identity.public_key_b64)
                except HandshakeError:
                    killed.set()
                    return
                node_id = int(answer["node_id"])
                with self.lock:
                    self.nodes[node_id] = identity
                    self.report.acknowledged += 1
                    peer = self.rng.choice(sorted(self.nodes))
                if peer == node_id:
                    continue
                signature = b64encode(identity.sign(report_trust_challenge(node_id, peer)))
                request = {"node_id": node_id, "peer_id": peer, "signature": signature}
                try:
                    client.call({"type": "report_trust", **request})
                except HandshakeError:
                    killed.set()
                    return
                with self.lock:
                    self.pairs.add((node_id, peer))
                    self.report.acknowledged += 1
                # A relayed request to the node before: every target gets one request, so
                # no inbox fills up.
                signature = b64encode(identity.sign(handshake_challenge(node_id, node_id - 1)))
                request = {
                    "from_node_id": node_id,
                    "to_node_id": node_id - 1,
                    "signature": signature,
                }
                try:
                    client.call({"type": "request_handshake", "justification": "j", **request})
                except HandshakeError:
                    killed.set()
                    return
                with self.lock:
                    self.relayed.add((node_id - 1, node_id))
                    self.report.acknowledged += 1
        finally:
            client.close()

    def trial(self) -> bool:
        if self.rng.random() < KILL_AT_START:
            self.report.kills_at_start += 1
            child = self.spawn()
            time.sleep(self.rng.uniform(0.0, START_KILL_WINDOW))
            child.kill()
            if not self.check_after_kill():
                return False
        child = self.spawn()
        match = child.wait_line(r"listening on (127\.0\.0\.1:\d+)")
        if match is None:
            self.problem(f"registry did not restart after a kill:\n{child.stderr_tail()}")
            return False
        self.report.restarts += 1
        address = match.group(1)
        leftovers = _temp_files(self.dir, ".registry.json.*.tmp")
        if leftovers:
            self.problem(f"temporary files left after a restart: {leftovers}")
        if self.nodes:
            # An acknowledged identity registering again must keep its node ID.
            node_id = self.rng.choice(sorted(self.nodes))
            client = RegistryConnection(address, timeout=5.0)
            try:
                answer = client.register("127.0.0.1:1", self.nodes[node_id].public_key_b64)
                if answer.get("node_id") != node_id:
                    self.problem(f"node {node_id} got ID {answer.get('node_id')} after a restart")
            except HandshakeError as exc:
                self.problem(f"registry failed before the kill: {exc}")
            finally:
                client.close()
        stop, killed = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=self.writer, args=(address, stop, killed), daemon=True)
            for _ in range(WORKERS)
        ]
        timer = _kill_later(child, self.rng.uniform(0.0, KILL_WINDOW))
        for thread in threads:
            thread.start()
        timer.join(START_TIMEOUT)
        child.kill()
        stop.set()
        for thread in threads:
            thread.join(START_TIMEOUT)
        self.report.interrupted += killed.is_set()
        return self.check_after_kill()


def registry_trials(trials: int, seed: int = 0, root: str = "") -> Report:
    """Run ``trials`` SIGKILL trials against pilot-registryd --store (see the module doc)."""
    report = Report("pilot-registryd --store")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ph-crash-") as scratch:
        run = _RegistryRun(Path(root or scratch), random.Random(seed), report)
        with _reaped(run.children):
            for _ in range(trials):
                report.trials += 1
                if not run.trial():
                    break
    report.seconds = time.monotonic() - began
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per target")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--target", choices=["daemon", "registry", "both"], default="both")
    args = parser.parse_args(argv)
    reports = []
    if args.target in ("daemon", "both"):
        reports.append(daemon_trials(args.trials, args.seed))
    if args.target in ("registry", "both"):
        reports.append(registry_trials(args.trials, args.seed))
    print(f"seed {args.seed}")
    for report in reports:
        print(report.summary())
        for problem in report.problems[:20]:
            print(f"  {problem}")
    print(json.dumps({r.target: {"trials": r.trials, "ok": r.ok} for r in reports}))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
