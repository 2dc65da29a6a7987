"""Fault injection against a fleet on 127.0.0.1 (issue 20.4): an operator's bad day, seeded.

A fleet of pilot-handshaked daemons (some private: no ``public`` at the registry and no
``peers`` entry anywhere, so only the relay reaches them) and one durable pilot-registryd
(``--store``) take random operations through their control sockets (``Client``, and
``pilot-handshakectl`` for some): handshake requests, approvals, rejections and untrusts.
Meanwhile a fault thread SIGKILLs and restarts daemons, SIGSTOPs and SIGCONTs them, SIGHUPs
them, and kills and restarts the registry. Every acknowledged change (an approve or untrust
the daemon answered) is recorded; at the end, after the faults stop:

- no acknowledged change is lost: the node that approved still trusts the peer, the node
  that untrusted does not (until a later operation on the pair supersedes it), checked
  before each later operation on the pair, once the faults stop, and again after a final
  SIGKILL and restart of every daemon;
- every pair whose last operation was an acknowledged approval trusts both ways within
  ``convergence_timeout``, and every daemon sees the registry again (the time is reported);
- no log holds an ERROR or a traceback (no fault explains one: each is an event a fleet
  takes in stride, logged as a WARNING at most);
- no daemon or registry is dead.

The seed fixes every random choice (operations, faults, durations); the interleaving with
the processes' own timing is not reproducible. ``scripts/chaos.py`` runs it for minutes;
``tests/integration/test_chaos.py`` runs a short one in the suite.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from pilothandshake import Client
from pilothandshake.errors import HandshakeError, NotTrustedError, SendError

from .conftest import Fleet, Node, Proc, Registry

OP_TIMEOUT = 5.0  # one control call; a daemon stopped meanwhile makes it time out
CTL_SHARE = 0.15  # operations run through pilot-handshakectl instead of Client
DELIVERY_PATIENCE = 30.0  # a request not pending by then is counted undelivered, and retried
UNTRUST_CHANCE = 0.1  # of a step on a trusting pair: many pairs stay approved to the end
MAX_FAULTS_AT_ONCE = 3

# (weight, kind): the kinds of fault, and how often each is chosen.
FAULT_KINDS = [(3, "kill_daemon"), (3, "stop_daemon"), (2, "hup_daemon"), (2, "kill_registry")]
DURATIONS = {  # seconds a fault lasts (uniform in the range)
    "kill_daemon": (0.2, 3.0),
    "stop_daemon": (1.0, 8.0),  # beyond the 2 s a sender waits for end of stream
    "hup_daemon": (0.0, 0.0),
    "kill_registry": (1.0, 10.0),  # several heartbeats at heartbeat_interval 2
}


@dataclass
class Options:
    """What a run does. ``fault_interval``: mean seconds between faults."""

    seed: int = 1
    seconds: float = 60.0
    nodes: int = 8
    private: int = 3
    heartbeat_interval: float = 2.0
    fault_interval: float = 2.0
    convergence_timeout: float = 90.0


@dataclass
class Ack:
    """An acknowledged change: ``actor`` approved or untrusted ``peer`` (node names)."""

    kind: str  # "approve" | "untrust"
    actor: str
    peer: str
    at: float  # time.time() of the answer

    def __str__(self) -> str:
        return f"{self.actor} {self.kind} {self.peer}"


@dataclass
class Pair:
    """The driver's view of two nodes: what to do next and what it expects."""

    a: str
    b: str
    phase: str = "idle"  # idle | asked | trusting (one side trusts the other, at least)
    requester: str = ""
    target: str = ""
    asked_at: float = 0.0
    last: Ack | None = None  # the last acknowledged change, if nothing superseded it


@dataclass
class Fault:
    """One fault going on: its kind and the process it hit."""

    kind: str
    target: str


@dataclass
class Report:
    """What a run did and found; ``ok`` when nothing was lost, late, logged as an error or dead."""

    seed: int
    seconds: float
    nodes: int
    private: int
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    acks: Counter[str] = field(default_factory=Counter)
    checked: int = 0  # checks of acknowledged changes during the run
    standing: int = 0  # acknowledged changes still standing at the end (checked twice)
    lost: list[str] = field(default_factory=list)
    lost_after_kill: list[str] = field(default_factory=list)
    approved_pairs: int = 0
    not_converged: list[str] = field(default_factory=list)
    untrusted_pairs: int = 0
    one_sided: list[str] = field(default_factory=list)
    convergence: float | None = None
    errors: list[str] = field(default_factory=list)  # ERROR lines and tracebacks
    dead: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)  # operations and faults, timed

    def note(self, what: str) -> None:
        """One line of the timeline (``timeline.log`` in the fleet's directory)."""
        self.timeline.append(f"{datetime.now():%H:%M:%S.%f} {what}")

    @property
    def ok(self) -> bool:
        return (
            not (self.lost or self.lost_after_kill or self.not_converged or self.errors)
            and not self.dead
        )

    def lines(self) -> list[str]:
        """The summary a person reads."""

        def counts(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        convergence = (
            f"{self.convergence:.1f} s"
            if self.convergence is not None
            else f"not reached: {'; '.join(self.not_converged[:10])}"
        )
        return [
            f"chaos: seed {self.seed}, {self.seconds:g} s of faults, {self.nodes} daemons "
            f"({self.private} private), one durable registry",
            f"operations: {sum(self.operations.values())} ({counts(self.operations)})",
            f"faults: {sum(self.faults.values())} ({counts(self.faults)})",
            f"acknowledged changes: {sum(self.acks.values())} ({counts(self.acks)}); "
            f"{self.checked} checks during the run (before operations on the pair), and "
            f"{self.standing} standing at the end, checked after the faults and after a "
            "final SIGKILL and restart of every daemon",
            f"lost: {len(self.lost)} during the run or after the faults, "
            f"{len(self.lost_after_kill)} after the final SIGKILL"
            + "".join(f"\n  {x}" for x in self.lost + self.lost_after_kill),
            f"convergence ({self.approved_pairs} approved pairs both ways, every daemon "
            f"seeing the registry): {convergence}",
            f"untrusted pairs still trusted by the other node after convergence: "
            f"{len(self.one_sided)} of {self.untrusted_pairs} (reported, not a failure)"
            + "".join(f"\n  {x}" for x in self.one_sided[:10]),
            f"ERROR lines and tracebacks in the logs: {len(self.errors)}"
            + "".join(f"\n  {x}" for x in self.errors[:20]),
            f"dead: {', '.join(self.dead) or 'none'}",
            "chaos: OK" if self.ok else "chaos: FAILED",
        ]


# -- the fleet -------------------------------------------------------------------------


def build(fleet: Fleet, options: Options) -> tuple[Registry, dict[str, Node]]:
    """A durable registry and ``options.nodes`` daemons, started; the last
    ``options.private`` ones are private. Every node has a ``peers`` entry for each public
    node (a fresh registry numbers the nodes 1, 2, ... in start order) and none for a
    private one."""
    registry = fleet.registry().start()
    nodes: dict[str, Node] = {}
    for i in range(1, options.nodes + 1):
        public = i <= options.nodes - options.private
        node = fleet.node(
            f"n{i}",
            registry,
            public=public,
            log_level="info",
            registry_options={"heartbeat_interval": options.heartbeat_interval},
        )
        nodes[node.name] = node
    public_peers = {
        i: node.address
        for i, node in enumerate(nodes.values(), 1)
        if node.config["registry"]["public"]
    }
    for i, node in enumerate(nodes.values(), 1):
        node.config["peers"] = {k: v for k, v in public_peers.items() if k != i}
        node.write_config()
    for i, node in enumerate(nodes.values(), 1):
        node.start()
        assert node.node_id == i, f"{node.name} registered as {node.node_id}, not {i}"
    return registry, nodes


def node_id(name: str) -> int:
    return int(name[1:])


# -- faults ----------------------------------------------------------------------------


class Faults:
    """A thread that injects faults until ``stop()``, which ends every fault going on
    (continues stopped daemons, restarts killed ones and the registry)."""

    def __init__(
        self, registry: Registry, nodes: dict[str, Node], options: Options, report: Report
    ) -> None:
        self.registry = registry
        self.nodes = nodes
        self.options = options
        self.report = report
        self.random = random.Random(f"faults {options.seed}")
        self.lock = threading.Lock()
        self.down: set[str] = set()  # processes killed or stopped now (names)
        self._ongoing: list[tuple[float, Fault]] = []  # (when it ends, fault)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for _, fault in self._ongoing:
            self._end(fault)
        self._ongoing.clear()

    def is_down(self, name: str) -> bool:
        with self.lock:
            return name in self.down

    def _proc(self, name: str) -> Proc:
        return self.registry if name == "registry" else self.nodes[name]

    def _run(self) -> None:
        try:
            self._inject()
        except BaseException as exc:  # reported, not lost with the thread
            self.report.dead.append(f"the fault thread failed: {exc!r}")

    def _inject(self) -> None:
        next_fault = time.monotonic() + self.random.uniform(0.5, 1.5) * self.options.fault_interval
        while not self._stop.is_set():
            now = time.monotonic()
            for due, fault in [x for x in self._ongoing if x[0] <= now]:
                self._ongoing.remove((due, fault))
                self._end(fault)
            if now >= next_fault:
                if len(self._ongoing) < MAX_FAULTS_AT_ONCE:
                    self._begin()
                interval = self.options.fault_interval
                next_fault = now + self.random.uniform(0.5, 1.5) * interval
            wake = min([next_fault, *(due for due, _ in self._ongoing)])
            self._stop.wait(max(0.0, wake - time.monotonic()))

    def _begin(self) -> None:
        weights, kinds = zip(*FAULT_KINDS)
        kind = self.random.choices(kinds, weights)[0]
        busy = {fault.target for _, fault in self._ongoing}
        nodes = sorted(self.nodes)
        target = "registry" if kind == "kill_registry" else self.random.choice(nodes)
        low, high = DURATIONS[kind]
        duration = self.random.uniform(low, high)
        if target in busy:
            return  # one fault at a time per process; the draw is spent all the same
        fault = Fault(kind, target)
        self.report.faults[kind] += 1
        self.report.note(f"fault {kind} {target} for {duration:.1f} s")
        proc = self._proc(target)
        assert proc.popen is not None
        if kind == "hup_daemon":
            proc.popen.send_signal(signal.SIGHUP)
            return
        with self.lock:
            self.down.add(target)
        if kind == "stop_daemon":
            proc.popen.send_signal(signal.SIGSTOP)
        else:
            proc.popen.kill()
            proc.popen.wait(10)
        self._ongoing.append((time.monotonic() + duration, fault))

    def _end(self, fault: Fault) -> None:
        self.report.note(f"fault {fault.kind} {fault.target} ends")
        proc = self._proc(fault.target)
        assert proc.popen is not None
        try:
            if fault.kind == "stop_daemon":
                proc.popen.send_signal(signal.SIGCONT)
            else:
                with open(proc.out_path, "wb"):
                    pass  # a fresh start line to wait for
                proc.start()  # type: ignore[attr-defined]
        except BaseException as exc:  # pytest.fail from the fixtures is a BaseException
            self.report.dead.append(f"{fault.target} did not come back after {fault.kind}: {exc}")
        with self.lock:
            self.down.discard(fault.target)


# -- operations ------------------------------------------------------------------------


class Uncertain(Exception):
    """The daemon did not answer (stopped or killed meanwhile): the call may or may not
    have taken effect."""


class Driver:
    """Random operations on random pairs, one at a time, never on a daemon that is down."""

    def __init__(self, nodes: dict[str, Node], faults: Faults, options: Options, report: Report):
        self.nodes = nodes
        self.faults = faults
        self.report = report
        self.random = random.Random(f"operations {options.seed}")
        names = sorted(nodes, key=node_id)
        self.pairs = [Pair(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step(self.random.choice(self.pairs))
            time.sleep(self.random.uniform(0.01, 0.1))

    def step(self, pair: Pair) -> None:
        self._verify(pair)
        if pair.phase == "idle":
            requester, target = self.random.sample([pair.a, pair.b], 2)
            if self.faults.is_down(requester):
                return
            self._request(pair, requester, target)
        elif pair.phase == "asked":
            if self.faults.is_down(pair.target):
                return
            if self.random.random() < 0.8:
                self._approve(pair)
            else:
                self._reject(pair)
        elif self.random.random() < UNTRUST_CHANCE:
            actor, peer = self.random.sample([pair.a, pair.b], 2)
            if not self.faults.is_down(actor):
                self._untrust(pair, actor, peer)

    def _verify(self, pair: Pair) -> None:
        """Before an operation supersedes the pair's last acknowledged change, check that
        the node that made it still shows it (it may have been killed and restarted since)."""
        ack = pair.last
        if ack is None or self.faults.is_down(ack.actor):
            return
        trusted = self._trusts(ack.actor, ack.peer)
        if trusted is None:
            return  # went down meanwhile: checked later
        self.report.checked += 1
        if trusted != (ack.kind == "approve"):
            self.report.lost.append(f"{describe(ack)}, seen {datetime.now():%H:%M:%S.%f}")

    def _trusts(self, actor: str, peer: str) -> bool | None:
        """Whether ``actor`` trusts ``peer`` now; None when it does not answer."""
        try:
            with Client(self.nodes[actor].socket_path, timeout=OP_TIMEOUT) as client:
                return client.is_trusted(node_id(peer))
        except (OSError, HandshakeError):
            return None

    def _request(self, pair: Pair, requester: str, target: str) -> None:
        try:
            status = self._call(requester, "handshake", target, justification="chaos")
        except SendError:
            self.report.operations["request refused (no path)"] += 1
            return
        except Uncertain:
            self._uncertain(pair, "request")
            return
        self.report.operations[f"request {status}"] += 1
        pair.last = None  # fresh intent: what was expected of the pair no longer holds
        if status == "trusted":  # already: what is left to do is untrust
            pair.phase = "trusting"
        else:
            pair.phase, pair.requester, pair.target = "asked", requester, target
            pair.asked_at = time.monotonic()

    def _approve(self, pair: Pair) -> None:
        try:
            done = self._call(pair.target, "approve", pair.requester)
        except Uncertain:
            self._uncertain(pair, "approve")
            return
        if done:
            self._acked(pair, "approve", pair.target, pair.requester)
            pair.phase = "trusting"
        else:
            self._not_pending(pair, "approve")

    def _reject(self, pair: Pair) -> None:
        try:
            done = self._call(pair.target, "reject", pair.requester)
        except Uncertain:
            self._uncertain(pair, "reject")
            return
        if done:
            self.report.operations["reject"] += 1
            pair.phase = "idle"
        else:
            self._not_pending(pair, "reject")

    def _untrust(self, pair: Pair, actor: str, peer: str) -> None:
        try:
            self._call(actor, "untrust", peer)
        except NotTrustedError:
            pass  # applied all the same (SPEC 7): the peer was not trusted yet
        except Uncertain:
            self._uncertain(pair, "untrust")
            return
        self._acked(pair, "untrust", actor, peer)
        pair.phase = "idle"

    def _not_pending(self, pair: Pair, what: str) -> None:
        self.report.operations[f"{what} (not pending yet)"] += 1
        if self._trusts(pair.target, pair.requester):  # it answered by itself (SPEC 6 rows 1-2)
            pair.phase = "trusting"
        elif time.monotonic() - pair.asked_at > DELIVERY_PATIENCE:
            self.report.operations[f"request undelivered after {DELIVERY_PATIENCE:g} s"] += 1
            pair.phase = "idle"

    def _acked(self, pair: Pair, kind: str, actor: str, peer: str) -> None:
        self.report.operations[kind] += 1
        self.report.acks[kind] += 1
        pair.last = Ack(kind, actor, peer, time.time())

    def _uncertain(self, pair: Pair, what: str) -> None:
        self.report.operations[f"{what} unanswered (daemon went down)"] += 1
        pair.phase, pair.last = "idle", None

    def _call(self, actor: str, command: str, peer: str, **args: str) -> Any:
        """Run one operation at ``actor`` about ``peer``; returns what Client returns."""
        self.report.note(f"{actor} {command} {peer}")
        try:
            result = self._call_once(actor, command, peer, **args)
        except Exception as exc:
            self.report.note(f"{actor} {command} {peer}: {type(exc).__name__}: {exc}")
            raise
        self.report.note(f"{actor} {command} {peer}: {result!r}")
        return result

    def _call_once(self, actor: str, command: str, peer: str, **args: str) -> Any:
        node, peer_id = self.nodes[actor], node_id(peer)
        if self.random.random() < CTL_SHARE:
            self.report.operations["(through pilot-handshakectl)"] += 1
            return self._ctl(node, command, peer_id, **args)
        try:
            with Client(node.socket_path, timeout=OP_TIMEOUT) as client:
                if command == "handshake":
                    return client.send_request(peer_id, args["justification"])
                if command == "approve":
                    return client.approve_handshake(peer_id)
                if command == "reject":
                    return client.reject_handshake(peer_id, "chaos")
                return client.revoke_trust(peer_id)
        except (SendError, NotTrustedError):
            raise
        except (OSError, HandshakeError) as exc:
            raise Uncertain(str(exc)) from exc

    def _ctl(self, node: Node, command: str, peer_id: int, **args: str) -> Any:
        """The same through ``pilot-handshakectl --json``, which prints the daemon's answer."""
        try:
            done = node.ctl("--json", command, str(peer_id), *args.values(), timeout=OP_TIMEOUT + 5)
        except subprocess.TimeoutExpired as exc:
            raise Uncertain("pilot-handshakectl timed out") from exc
        try:
            response = json.loads(done.stdout)
        except ValueError:  # no answer printed: the daemon could not be reached
            raise Uncertain(done.stderr.strip()) from None
        if response["status"] == "ok":
            return response["data"]["status"] if command == "handshake" else True
        code, message = response.get("code"), str(response.get("message"))
        if code == "not_found" and command in ("approve", "reject"):
            return False
        if code == "not_trusted":
            raise NotTrustedError(message)
        if code == "send_failed":
            raise SendError(message)
        raise Uncertain(f"{code}: {message}")


# -- checks ----------------------------------------------------------------------------


def lost_changes(driver: Driver) -> list[str]:
    """The acknowledged changes (not superseded) that the nodes no longer show."""
    trusted = {name: node.trusted() for name, node in driver.nodes.items()}
    lost = []
    for pair in driver.pairs:
        ack = pair.last
        if ack is None:
            continue
        holds = node_id(ack.peer) in trusted[ack.actor]
        if holds != (ack.kind == "approve"):
            lost.append(describe(ack))
    return lost


def describe(ack: Ack) -> str:
    return f"{ack} (acknowledged {datetime.fromtimestamp(ack.at):%H:%M:%S.%f})"


def unconverged(driver: Driver) -> list[str]:
    """Approved pairs that do not trust both ways yet, and daemons not seeing the registry."""
    missing = []
    for pair in approved(driver):
        for x, y in ((pair.a, pair.b), (pair.b, pair.a)):
            if node_id(y) not in driver.nodes[x].trusted():
                missing.append(f"{x} does not trust {y} (approved: {pair.last})")
    for name, node in driver.nodes.items():
        if not node.status()["registry"]["reachable"]:
            missing.append(f"{name} does not see the registry")
    return missing


def approved(driver: Driver) -> list[Pair]:
    return [p for p in driver.pairs if p.last is not None and p.last.kind == "approve"]


def one_sided(driver: Driver) -> list[str]:
    """Pairs whose last change was an acknowledged untrust, where the other node still
    trusts the one that untrusted (its revoke never arrived). Reported, not asserted: SPEC
    7 sends a revoke best effort."""
    return [
        f"{p.last.peer} still trusts {p.last.actor} ({p.last})"
        for p in driver.pairs
        if p.last is not None
        and p.last.kind == "untrust"
        and node_id(p.last.actor) in driver.nodes[p.last.peer].trusted()
    ]


# The daemon's text log ("2026-12-06T20:27:16.098+00:00 ERROR ...") and the registry's
# ("2026-12-06 20:30:49,869 ERROR ...").
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[T ]\S+ ([A-Z]+) ")


def check_logs(procs: list[Proc], report: Report) -> None:
    """Collect every ERROR line and traceback. None is explained by a fault: a daemon
    SIGKILLed, stopped or reloaded, or a registry gone for seconds, is an event the fleet
    takes in stride (WARNING at most); an ERROR says something else went wrong."""
    for proc in procs:
        levels = [
            (m.group(1) if m else "", text)
            for text in proc.stderr.splitlines()
            for m in [LOG_LINE.match(text)]
        ]
        if not any(level for level, _ in levels):  # a log format this check cannot read
            report.errors.append(f"{proc.name}: no line in a known log format")
        for level, text in levels:
            if level in ("ERROR", "CRITICAL") or text.startswith("Traceback"):
                report.errors.append(f"{proc.name}: {text[:300]}")


def alive(registry: Registry, nodes: dict[str, Node], report: Report) -> None:
    for proc in [registry, *nodes.values()]:
        if proc.popen is None or proc.popen.poll() is not None:
            report.dead.append(f"{proc.name} exited")
    for name, node in nodes.items():
        try:
            node.status()
        except BaseException as exc:  # a failed control call fails through pytest
            report.dead.append(f"{name} does not answer status: {exc}")


def wait_for(condition: Callable[[], list[str]], timeout: float) -> tuple[float | None, list[str]]:
    """Poll ``condition`` (what is still missing) until it is empty: (seconds, []) or
    (None, what is still missing at the timeout)."""
    start = time.monotonic()
    while True:
        missing = condition()
        if not missing:
            return time.monotonic() - start, []
        if time.monotonic() - start > timeout:
            return None, missing
        time.sleep(0.5)


# -- a run -----------------------------------------------------------------------------


def run(fleet: Fleet, options: Options, say: Callable[[str], None] = print) -> Report:
    """Build the fleet, inject faults and operations for ``options.seconds``, check."""
    report = Report(options.seed, options.seconds, options.nodes, options.private)
    registry, nodes = build(fleet, options)
    say(f"chaos: fleet up in {fleet.root}; {options.seconds:g} s of operations and faults")
    faults = Faults(registry, nodes, options, report)
    driver = Driver(nodes, faults, options, report)
    faults.start()
    try:
        driver.run(options.seconds)
    finally:
        faults.stop()
    say("chaos: faults stopped; waiting for the fleet to converge")
    alive(registry, nodes, report)
    if report.dead:
        return report
    report.lost += lost_changes(driver)
    report.approved_pairs = len(approved(driver))
    report.convergence, report.not_converged = wait_for(
        lambda: unconverged(driver), options.convergence_timeout
    )
    report.untrusted_pairs = sum(1 for p in driver.pairs if p.last and p.last.kind == "untrust")
    report.one_sided = one_sided(driver)
    say("chaos: final SIGKILL and restart of every daemon")
    for node in nodes.values():
        assert node.popen is not None
        node.popen.kill()
        node.popen.wait(10)
    for node in nodes.values():
        with open(node.out_path, "wb"):
            pass
        node.start()
    report.lost_after_kill = lost_changes(driver)
    (fleet.root / "timeline.log").write_text("".join(f"{line}\n" for line in report.timeline))
    report.standing = sum(1 for p in driver.pairs if p.last is not None)
    alive(registry, nodes, report)
    check_logs([registry, *nodes.values()], report)
    return report
