"""Outages: the registry killed or hung, a peer that never reads, a full or read-only disk.

Real processes on 127.0.0.1 (the ``fleet`` fixture). The disk tests mount a tiny tmpfs
under the node's directory and skip where mounting is not permitted; an in-process test
injects ENOSPC into the store's writes so the rule is checked everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeruntime import Peer

from pilothandshake.constants import SEND_GRACE
from pilothandshake.errors import StoreError
from pilothandshake.identity import Identity
from pilothandshake.manager import Manager
from pilothandshake.store import decode_state, load_state, trust_store
from pilothandshake.testing import MemoryRuntime
from pilothandshake.wire import reset_close

from .conftest import Fleet, Node, Registry, wait_until

HUNG_REGISTRY_TIMEOUT = 5.0  # REGISTRY_TIMEOUT: what one unanswered registry call costs


def started(*nodes: Node) -> list[int]:
    """Start nodes one after another, so that a fresh registry numbers them 1, 2, ..."""
    return [node.start().node_id for node in nodes]


def kill(proc: Registry | Node) -> None:
    assert proc.popen is not None
    proc.popen.kill()
    proc.popen.wait(10)


def restart(registry: Registry) -> None:
    """Start the registry again on the same port (and store)."""
    with open(registry.out_path, "wb"):
        pass  # a fresh "listening" line to wait for
    registry.start()


def reachable(node: Node) -> bool:
    return bool(node.status()["registry"]["reachable"])


def relay_handshake(sender: Node, receiver: Node) -> None:
    """A handshake that only the relay can carry (private nodes, no peers entries)."""
    sender_id, receiver_id = sender.node_id, receiver.node_id
    answer = sender.control("handshake", node_id=receiver_id, justification="relay")
    assert answer["status"] == "relayed"
    wait_until(lambda: sender_id in receiver.pending(), timeout=20, what="relayed request")
    receiver.control("approve", node_id=sender_id)
    wait_until(lambda: receiver_id in sender.trusted(), timeout=20, what="relayed approval")


# -- the registry killed and restarted ------------------------------------------------------


def test_registry_sigkilled_and_restarted_keeps_node_ids_and_the_relay_resumes(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    a, b = fleet.node("a", registry), fleet.node("b", registry)
    ids = started(a, b)
    kill(registry)
    wait_until(lambda: not reachable(a), what="A notices the registry is gone")
    restart(registry)
    wait_until(lambda: reachable(a) and reachable(b), timeout=35, what="both reconnect")
    assert [a.node_id, b.node_id] == ids
    relay_handshake(a, b)


def test_registry_that_lost_its_state_gets_the_node_registered_again(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry)
    [a_id] = started(a)
    kill(registry)
    (registry.directory / "registry.json").unlink()  # it comes back knowing nobody
    restart(registry)
    wait_until(lambda: "registering again" in a.stderr, timeout=35, what="A re-registers")
    wait_until(lambda: reachable(a), timeout=35, what="A registered again")
    assert a.node_id == a_id  # the first to register on an empty registry: the same ID
    c = fleet.node("c", registry)
    c.start()
    relay_handshake(c, a)


# -- a registry that accepts TCP but never answers --------------------------------------


def thread_count(node: Node) -> int:
    assert node.popen is not None
    return len(os.listdir(f"/proc/{node.popen.pid}/task"))


def send_request(
    node: Node, peer: Peer, to: int, source: str = "127.0.0.1", wait: bool = True
) -> None:
    """A signed handshake_request straight to ``node``'s port; with ``wait``, until the
    daemon closes (after its receipt, once the request is decided and written)."""
    with socket.socket() as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", node.port))
        sock.sendall(peer.data("handshake_request", to, justification="hung registry"))
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while wait and sock.recv(4096):
                pass


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_hung_registry_times_out_leaks_no_threads_and_pinned_direct_handshakes_complete(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    # Pinned allowlist entries on both sides: the SPEC 6 way to trust without the registry.
    a = fleet.node("a", registry, peers={2: "127.0.0.1:1"})
    # With push (SPEC 18) B's poll is held open for 55 s: its heartbeat is what notices a
    # registry that stopped answering, so it beats every second here.
    b = fleet.node("b", registry, registry_options={"heartbeat_interval": 1})
    a.config["trust"] = {"allowlist": [{"node_id": 2, "name": "b", "public_key": b.key}]}
    b.config["trust"] = {"allowlist": [{"node_id": 1, "name": "a", "public_key": a.key}]}
    a.config["peers"] = {2: b.address}
    b.config["peers"] = {1: a.address}
    a.write_config()
    b.write_config()
    assert started(a, b) == [1, 2]
    time.sleep(0.5)  # let start-up work (pool, first polls) settle before the baseline
    baseline = thread_count(b)

    # SIGSTOP: the kernel still completes TCP handshakes on the registry's port, and
    # nothing ever answers — the hung registry of the issue.
    registry.signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        # Both ask at once, so each holds an outgoing request when the other's arrives.
        # B may already trust A when it asks: A's request needs no registry at B (the
        # allowlist pins A's key), so B's receipt, and its trust, come at once.
        for sender, to in ((a, 2), (b, 1)):
            status = sender.control("handshake", node_id=to, justification="pinned")["status"]
            assert status in ("sent", "trusted")
        # Unknown senders: each costs the daemon a lookup that can only time out (so their
        # receipts come late: they do not wait for them).
        strangers = [Peer(100 + i) for i in range(12)]
        senders = [
            threading.Thread(target=send_request, args=(b, p, 2, f"127.0.{2 + i}.1", False))
            for i, p in enumerate(strangers)
        ]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(10)
        # Their handlers now wait on the registry: the count must rise, then fall back.
        peak = thread_count(b)
        assert peak > baseline, (peak, baseline)
        # The operator's socket answers at once while registry calls hang.
        asked = time.monotonic()
        assert b.status()["node_id"] == 2
        assert time.monotonic() - asked < 1.0
        wait_until(lambda: a.trusted() == {2} and b.trusted() == {1}, timeout=30)
        elapsed = time.monotonic() - began
        assert elapsed < 4 * HUNG_REGISTRY_TIMEOUT, f"handshake took {elapsed:.1f} s"
        wait_until(
            lambda: {p.node_id for p in strangers} <= b.pending(),
            timeout=30,
            what="unbound requests held pending after their lookups time out",
        )
        # B's own registry calls notice once one of them times out.
        wait_until(lambda: not reachable(b), timeout=4 * HUNG_REGISTRY_TIMEOUT)
        state = b.status()["registry"]
        assert "did not answer" in state["error"] or "cannot connect" in state["error"]
        # Every thread a hung call held ends once its timeout passes.
        wait_until(
            lambda: thread_count(b) <= baseline,
            timeout=4 * HUNG_REGISTRY_TIMEOUT,
            what=f"B's threads back to {baseline} (now {thread_count(b)})",
        )
    finally:
        registry.signal(signal.SIGCONT)
    wait_until(lambda: reachable(b), timeout=35, what="B reconnects when the registry wakes")
    assert thread_count(b) <= baseline + 1


# -- a peer that accepts TCP but never reads --------------------------------------------------


class FakePeer:
    """Accepts connections on 127.0.0.1; ``silent`` keeps them open unread, otherwise each
    is reset at once without being read (what a receiver at its connection cap does)."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            if self.silent:
                self.held.append(conn)
            else:
                reset_close(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.listener.close()


@contextlib.contextmanager
def fake_peer(silent: bool) -> Iterator[FakePeer]:
    peer = FakePeer(silent)
    try:
        yield peer
    finally:
        peer.close()


def test_peer_that_never_reads_costs_a_bounded_send_and_a_reset_falls_back_to_the_relay(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    a, b = fleet.node("a", registry), fleet.node("b", registry)
    assert started(a, b) == [1, 2]
    with fake_peer(silent=True) as silent, fake_peer(silent=False) as resetting:
        a.config["peers"] = {2: silent.address}
        a.write_config()
        a.signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in a.stderr, what="A reloads its peers")
        asked = time.monotonic()
        answer = a.ctl("--json", "handshake", "2", "never read")
        # SPEC 3: no end of stream within the 2 s grace is a failed send: relayed.
        assert json.loads(answer.stdout)["data"]["status"] == "relayed", answer
        assert time.monotonic() - asked < SEND_GRACE + 3.0
        assert silent.accepted == 1
        assert a.status()["node_id"] == 1  # nothing in A is stuck on the unread connection
        wait_until(lambda: b.pending() == {1}, timeout=20, what="the relayed request at B")

        a.config["peers"] = {2: resetting.address}
        a.write_config()
        a.signal(signal.SIGHUP)
        wait_until(lambda: a.stderr.count("config reloaded") == 2, what="second reload")
        answer = a.ctl("--json", "handshake", "2", "reset")
        assert json.loads(answer.stdout)["data"]["status"] == "relayed", answer
        assert resetting.accepted == 1
        wait_until(
            lambda: [p["justification"] for p in b.control("pending")["pending"]] == ["reset"],
            timeout=20,
            what="the second relayed request at B",
        )


# -- disk full, read-only identity directory ---------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``path``; skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write until the filesystem is full; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1000):  # 64 KiB of tmpfs: full long before this
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


def node_in(fleet: Fleet, directory: Path) -> Node:
    """A node (id 7, no registry) whose identity directory is ``directory``."""
    node = fleet.node("a", node_id=7, log_level="warning", identity=str(directory / "id.json"))
    node.socket_path = str(directory / "control.sock")
    return node


def approve_fails_and_changes_nothing(node: Node, directory: Path, os_error: str) -> None:
    before = (directory / "trust.json").read_bytes()
    result = node.ctl("--json", "approve", "5")
    assert (result.returncode, result.stdout) == (1, "")
    response = json.loads(result.stderr)  # pilotctl's envelope, on stderr
    assert response["code"] == "internal"
    assert str(directory / "trust.json") in response["message"]
    assert os_error in response["message"]
    # Memory never runs ahead of the disk: still pending, not trusted, file untouched.
    assert node.pending() == {5}
    assert node.trusted() == set()
    assert (directory / "trust.json").read_bytes() == before


def test_full_disk_fails_the_approval_clearly_and_changes_nothing(fleet: Fleet) -> None:
    with tiny_tmpfs(fleet.root / "full") as disk:
        node = node_in(fleet, disk).start()
        send_request(node, Peer(5), 7)
        wait_until(lambda: node.pending() == {5}, what="the request to be pending")
        filler = fill(disk)
        approve_fails_and_changes_nothing(node, disk, "No space left on device")
        filler.unlink()
        assert node.control("approve", node_id=5)["status"] == "approved"
        assert set(load_state(str(disk / "trust.json")).trusted) == {5}
        node.stop()


@pytest.mark.parametrize("with_state", [False, True], ids=["empty", "with-identity-and-trust"])
def test_daemon_on_a_read_only_identity_directory_refuses_to_start_with_one_line(
    fleet: Fleet, with_state: bool
) -> None:
    # A running daemon holds its lock files open for writing, so its filesystem cannot be
    # remounted read-only under it; the in-process test below covers EROFS mid-run.
    with tiny_tmpfs(fleet.root / "ro") as disk:
        node = node_in(fleet, disk)
        if with_state:
            Identity.load_or_create(str(disk / "id.json"))
            (disk / "trust.json").write_text('{"trusted": []}\n')
        remount(disk, "ro")
        node.spawn()
        assert node.popen is not None
        assert node.popen.wait(20) == 1
        lines = [x for x in node.stderr.splitlines() if x.startswith("pilot-handshaked:")]
        assert len(lines) == 1 and "Traceback" not in node.stderr, node.stderr
        assert str(disk) in lines[0] and "Read-only file system" in lines[0]


@pytest.mark.parametrize(
    ("function", "code"),
    [
        pytest.param("fsync", errno.ENOSPC, id="disk-full-at-fsync"),
        pytest.param("pwrite", errno.EROFS, id="read-only-at-journal-append"),
        pytest.param("replace", errno.EROFS, id="read-only-at-rename"),
        # trust.json.lock is held from open to close, so no write opens it: a read-only
        # directory shows at the checkpoint's temporary file instead.
        pytest.param("open", errno.EROFS, id="read-only-at-the-temporary-file"),
    ],
)
def test_failed_write_fails_the_api_call_and_leaves_memory_and_file_alone(
    monkeypatch: pytest.MonkeyPatch, function: str, code: int
) -> None:
    """Disk full or a read-only directory, injected into a Manager's store (the running
    daemon's filesystem cannot be remounted read-only under its open lock files)."""
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        manager = Manager(MemoryRuntime(7, root))
        try:
            manager.process_message(Peer(5).data("handshake_request", 7), ("127.0.0.1", 9))
            assert [p.node_id for p in manager.pending_requests()] == [5]
            trust = os.path.join(root, "trust.json")
            before = Path(trust).read_bytes()

            def failing(*args: Any, **kwargs: Any) -> Any:
                raise OSError(code, os.strerror(code))

            if function in ("replace", "open"):
                # Approvals append to the journal; force the checkpoint that renames.
                monkeypatch.setattr(trust_store, "JOURNAL_MIN_BYTES", 0)
                monkeypatch.setattr(trust_store, "JOURNAL_RATIO", 0.0)
            monkeypatch.setattr(os, function, failing)
            with pytest.raises(StoreError, match=os.strerror(code)) as failure:
                manager.approve_handshake(5)
            monkeypatch.undo()
            assert trust in str(failure.value)
            assert [p.node_id for p in manager.pending_requests()] == [5]
            assert not manager.is_trusted(5)
            assert load_state(trust) == decode_state(before)
            assert [n for n in os.listdir(root) if n.endswith(".tmp")] == []
            assert manager.approve_handshake(5)
            assert manager.is_trusted(5)
        finally:
            manager.close()
