"""Manager under threads: wait_for_trust, concurrent changes ending with memory equal to
trust.json, no lock held across Runtime calls, the port-444 handler on a real socket, and
two Managers wired to each other (the README embedding)."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import random
import socket
import threading
import time
from datetime import datetime, timezone

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, seed_trust, settle

from pilothandshake.errors import HandshakeError
from pilothandshake.identity import verify
from pilothandshake.manager import Manager
from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    receipt_challenge,
)
from pilothandshake.store import PendingHandshake, TrustRecord, load_state
from pilothandshake.testing import MemoryRuntime

OWN = 1
REMOTE = ("127.0.0.1", 40000)
WAIT = 10.0
T0 = datetime(2026, 11, 25, tzinfo=timezone.utc)


def start_thread(target: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


# wait_for_trust


def test_wait_for_trust_wakes_when_another_thread_grants(nodes: Nodes) -> None:
    manager, _ = nodes.make()
    peer = Peer(7)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    result: list[bool] = []
    waiter = start_thread(lambda: result.append(manager.wait_for_trust(7, WAIT)))
    time.sleep(0.02)  # let it block; it must not return early
    assert result == []
    started = time.monotonic()
    manager.approve_handshake(7)
    waiter.join(WAIT)
    assert result == [True]
    assert time.monotonic() - started < 2


def test_wait_for_trust_times_out(nodes: Nodes) -> None:
    manager, _ = nodes.make()
    started = time.monotonic()
    assert manager.wait_for_trust(7, 0.05) is False
    assert 0.04 <= time.monotonic() - started < 2
    assert manager.waiting() == 0


def test_wait_for_trust_of_ourselves_or_a_trusted_peer_returns_at_once(nodes: Nodes) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, "", T0),))
    manager, _ = nodes.make()
    assert manager.wait_for_trust(OWN, 0)
    assert manager.wait_for_trust(7, None)


def test_wait_for_trust_without_timeout_waits_until_granted(nodes: Nodes) -> None:
    manager, _ = nodes.make(auto_approve=True)
    result: list[bool] = []
    waiter = start_thread(lambda: result.append(manager.wait_for_trust(7, None)))
    time.sleep(0.02)
    assert result == [] and waiter.is_alive()
    manager.process_message(Peer(7).data(HANDSHAKE_REQUEST, OWN), REMOTE)
    waiter.join(WAIT)
    assert result == [True]


@pytest.mark.parametrize("same_node", [False, True])
def test_two_hundred_waiters_all_wake(nodes: Nodes, same_node: bool) -> None:
    manager, _ = nodes.make(strict=False, auto_approve=True)
    ids = [7] * 200 if same_node else list(range(100, 300))
    results: list[bool] = []
    lock = threading.Lock()

    def wait(node: int) -> None:
        outcome = manager.wait_for_trust(node, WAIT)
        with lock:
            results.append(outcome)

    threads = [start_thread(wait, node) for node in ids]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if manager.waiting() == 200:
            break
        time.sleep(0.005)
    for node in sorted(set(ids)):
        manager.process_relayed_request(node, "go")
    for thread in threads:
        thread.join(WAIT)
    assert results == [True] * 200
    assert manager.waiting() == 0


def test_a_grant_wakes_only_the_waiters_of_the_granted_node(nodes: Nodes) -> None:
    manager, _ = nodes.make(strict=False, auto_approve=True)
    result: list[bool] = []
    waiter = start_thread(lambda: result.append(manager.wait_for_trust(7, WAIT)))
    deadline = time.monotonic() + WAIT
    while manager.waiting() == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    condition = manager._state._waiters[7].condition  # to count its notifications
    notified: list[int] = []
    notify_all = condition.notify_all

    def counting_notify_all() -> None:
        notified.append(1)
        notify_all()

    condition.notify_all = counting_notify_all  # type: ignore[method-assign]
    for node in range(100, 150):
        manager.process_relayed_request(node, "someone else")
    assert notified == [] and result == []
    manager.process_relayed_request(7, "the awaited node")
    waiter.join(WAIT)
    assert notified == [1]
    assert result == [True]


# Concurrency


def test_concurrent_changes_end_with_memory_equal_to_trust_json(nodes: Nodes) -> None:
    manager, runtime = nodes.make(strict=False, max_pending_per_source=1000)
    peers = [Peer(n) for n in range(10, 40)]
    errors: list[BaseException] = []
    stop_at = time.monotonic() + 1.0

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                if time.monotonic() > stop_at:
                    return
                peer = rng.choice(peers)
                action = rng.randrange(5)
                if action == 0:
                    data = peer.data(HANDSHAKE_REQUEST, OWN, justification=str(rng.random()))
                    manager.process_message(data, ("127.0.0.1", seed))
                elif action == 1:
                    manager.approve_handshake(peer.node_id)
                elif action == 2:
                    manager.reject_handshake(peer.node_id, "no")
                elif action == 3:
                    with contextlib.suppress(HandshakeError):
                        manager.revoke_trust(peer.node_id)
                else:
                    manager.process_relayed_request(peer.node_id, "relayed", peer.key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [start_thread(worker, seed) for seed in range(8)]
    for thread in threads:
        thread.join(WAIT)
    assert errors == []
    assert not any(t.is_alive() for t in threads)
    settle(manager)
    disk = load_state(os.path.join(nodes.root, "n1", "trust.json"))
    visible = manager._store.visible
    assert disk.trusted.keys() == visible.trusted.keys()
    assert disk.pending.keys() == visible.pending.keys()
    assert disk.outgoing.keys() == visible.outgoing.keys()
    for node, record in visible.trusted.items():
        assert (disk.trusted[node].public_key, disk.trusted[node].mutual) == (
            record.public_key,
            record.mutual,
        )
    assert manager._store.working.trusted.keys() == visible.trusted.keys()
    assert runtime.events  # something happened


def test_no_lock_is_held_across_runtime_or_registry_calls(nodes: Nodes) -> None:
    registry = FakeRegistry()
    peer = Peer(7)
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(registry=registry, auto_approve=True)
    answered: list[bool] = []

    def probe_from_another_thread(*_: object) -> None:
        # The Manager's lock is not re-entrant across threads: this would deadlock (and time
        # out) if a Runtime or registry call were made holding it.
        probe = start_thread(lambda: answered.append(manager.is_trusted(7) in (True, False)))
        probe.join(2.0)
        assert not probe.is_alive(), "Runtime called with the Manager's lock held"

    runtime.on_dial = probe_from_another_thread
    original_lookup = registry.lookup

    def lookup(node_id: int) -> dict[str, object]:
        probe_from_another_thread()
        return original_lookup(node_id)

    registry.lookup = lookup  # type: ignore[method-assign]
    original_publish = runtime.publish_event

    def publish(topic: str, payload: dict[str, object]) -> None:
        probe_from_another_thread()
        original_publish(topic, payload)

    runtime.publish_event = publish  # type: ignore[method-assign]
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    settle(manager)
    manager.revoke_trust(7)
    manager.send_request(8, "x")
    settle(manager)
    assert len(answered) >= 6 and all(answered)


# The port-444 handler on a socket


def exchange(manager: Manager, data: bytes) -> bytes:
    """Serve ``data`` on one connection; everything the handler answered until it closed."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        manager.handle_connection(ours)
        theirs.settimeout(WAIT)
        answer = b""
        while chunk := theirs.recv(4096):  # ends: the handler closed its end
            answer += chunk
    return answer


def receipt_of(answer: bytes) -> bytes:
    (line,) = answer.splitlines()
    return base64.b64decode(json.loads(line)["receipt"])


def test_handle_connection_reads_processes_writes_the_receipt_and_closes(nodes: Nodes) -> None:
    """Issue 15 item 1 (SPEC 3): the receipt is our signature of what we took, written once
    it is durable, then the end of stream."""
    manager, runtime = nodes.make()
    data = Peer(7).data(HANDSHAKE_REQUEST, OWN, justification="over a socket")
    signature = receipt_of(exchange(manager, data))
    assert verify(runtime.identity.public_key, receipt_challenge(OWN, 7, data), signature)
    assert [p.justification for p in manager.pending_requests()] == ["over a socket"]
    assert load_state(f"{nodes.root}/n1/trust.json").pending[7].justification == "over a socket"


def test_a_dropped_message_gets_no_receipt(nodes: Nodes) -> None:
    manager, _ = nodes.make()
    peer = Peer(7)
    stale = peer.data(HANDSHAKE_REQUEST, OWN, timestamp=int(time.time()) - 3600)
    assert exchange(manager, stale) == b""
    data = peer.data(HANDSHAKE_REQUEST, OWN)
    assert exchange(manager, data) != b""
    assert exchange(manager, data) == b""  # replayed: dropped


def test_a_message_whose_write_fails_gets_no_receipt(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 item 7: out of descriptors (or disk), a request got its end of stream and
    was lost. Without a receipt the sender relays it instead."""
    manager, _ = nodes.make()

    def no_room(fd: int) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "fsync", no_room)
    with caplog.at_level(logging.ERROR):
        assert exchange(manager, Peer(7).data(HANDSHAKE_REQUEST, OWN)) == b""
    assert manager.pending_requests() == []
    assert any("could not persist the message" in r.getMessage() for r in caplog.records)


def test_a_request_already_in_effect_gets_a_receipt(nodes: Nodes) -> None:
    """Nothing to write (the sender is trusted already, or the request came by the relay
    first): taken, so receipted."""
    registry = FakeRegistry()
    peer = Peer(7)
    registry.keys[7] = peer.key
    manager, _ = nodes.make(registry=registry)
    manager.process_relayed_request(7, "same text", peer.key)
    data = peer.data(HANDSHAKE_REQUEST, OWN, justification="same text")
    assert receipt_of(exchange(manager, data))


def test_handle_connection_drops_garbage_without_raising(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    ours, theirs = socket.socketpair()
    with theirs, caplog.at_level(logging.WARNING):
        theirs.sendall(b"[1, 2, 3]")
        theirs.shutdown(socket.SHUT_WR)
        manager.handle_connection(ours)
    assert manager.pending_count() == 0 and runtime.events == []
    assert len(caplog.records) == 1 and "not a JSON object" in caplog.records[0].getMessage()


def test_handle_connection_on_tcp_loopback_names_the_remote_address(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    manager, _ = nodes.make()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, address = server.accept()
        with client, caplog.at_level(logging.WARNING):
            client.sendall(b"{}")
            client.shutdown(socket.SHUT_WR)
            manager.handle_connection(conn)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"127.0.0.1:{address[1]}" in line and "type" in line


# Two Managers wired together (README embedding)


def test_two_managers_complete_a_request_and_approval(nodes: Nodes) -> None:
    alice, alice_rt = nodes.make(1)
    bob, bob_rt = nodes.make(2)
    wired = {1: alice, 2: bob}
    alice_rt.deliver = lambda peer, data: wired[peer].process_message(data, ("127.0.0.1", 1001))
    bob_rt.deliver = lambda peer, data: wired[peer].process_message(data, ("127.0.0.1", 1002))
    for manager in (alice, bob):
        manager.start()

    assert alice.send_request(2, "nightly sync") == "sent"
    (request,) = bob.pending_requests()
    assert (request.node_id, request.justification) == (1, "nightly sync")
    assert request.public_key == alice_rt.identity.public_key_b64

    trusted: list[bool] = []
    waiter = start_thread(lambda: trusted.append(alice.wait_for_trust(2, WAIT)))
    assert bob.approve_handshake(1)
    waiter.join(WAIT)
    assert trusted == [True]
    assert bob.is_trusted(1) and alice.is_trusted(2)
    (record,) = alice.trusted_peers()
    assert (record.mutual, record.public_key) == (True, bob_rt.identity.public_key_b64)
    assert [t for t, _ in bob_rt.events][-2:] == ["handshake.approved", "trust.changed"]

    # Alice revokes: Bob hears it, signed with the key he pinned.
    alice.revoke_trust(2)
    assert not bob.is_trusted(1)
    assert ("trust.revoked_by_peer", {"peer_node_id": 1, "reason": ""}) in bob_rt.events
    assert bob_rt.removed == [1]


def test_manager_satisfies_the_runtime_protocol_through_a_custom_runtime() -> None:
    runtime = MemoryRuntime(5)
    manager = Manager(runtime)
    manager.start()
    try:
        assert runtime.handler is not None
        ours, theirs = socket.socketpair()
        with theirs:
            theirs.sendall(Peer(6).data(HANDSHAKE_ACCEPT, 5))
            theirs.shutdown(socket.SHUT_WR)
            runtime.handler(ours)
        assert manager.trusted_peers() == []  # no outgoing request: ignored
        assert manager.is_trusted(5)
    finally:
        manager.stop()
    assert runtime.listener is not None and runtime.listener.closed
    ours, theirs = socket.socketpair()
    theirs.close()
    manager.handle_connection(ours)  # after stop: still never raises


def test_close_of_a_never_started_manager_stops_its_background_workers(nodes: Nodes) -> None:
    # With a registry: report_trust and the relayed reply are real background work.
    manager, _ = nodes.make(registry=FakeRegistry(), auto_approve=True, strict=False)
    manager.process_relayed_request(7, "starts background work")
    workers = manager._pool._threads
    assert workers
    manager.close()
    assert all(not thread.is_alive() for thread in workers)


# A rejection ends the wait (SPEC 7, issue 16)


def _asked_and_rejected(nodes: Nodes, peer: Peer, reason: str = "not today") -> Manager:
    manager, _ = nodes.make()
    manager.send_request(7, "sync")
    manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason=reason), REMOTE)
    return manager


def test_a_rejection_wakes_every_waiter_of_that_peer_at_once(nodes: Nodes, peer: Peer) -> None:
    manager, _ = nodes.make()
    manager.send_request(7, "sync")
    results: list[bool] = []
    lock = threading.Lock()

    def wait() -> None:
        outcome = manager.wait_for_trust(7, WAIT)
        with lock:
            results.append(outcome)

    waiters = [start_thread(wait) for _ in range(3)]
    deadline = time.monotonic() + WAIT
    while manager.waiting() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.waiting() == 3
    started = time.monotonic()
    manager.process_relayed_rejection(7, "not today")
    for waiter in waiters:
        waiter.join(WAIT)
    assert results == [False, False, False]
    assert time.monotonic() - started < 3  # woken, not timed out (WAIT is 10 s)
    (request,) = manager.outgoing_requests()
    assert (request.state, request.reason) == ("rejected", "not today")


def test_wait_returns_at_once_when_our_latest_request_is_already_rejected(
    nodes: Nodes, peer: Peer
) -> None:
    manager = _asked_and_rejected(nodes, peer)
    started = time.monotonic()
    assert manager.wait_for_trust(7, WAIT) is False
    assert manager.wait_for_trust(7, None) is False  # even without a limit
    assert time.monotonic() - started < 3
    # A fresh request is waited for again.
    manager.send_request(7, "please, tomorrow")
    assert manager.wait_for_trust(7, 0.05) is False
    assert [r.state for r in manager.outgoing_requests()] == ["waiting"]


def test_a_rejection_by_both_paths_is_one_rejection(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    manager.send_request(7, "sync")
    with caplog.at_level(logging.INFO, logger="pilothandshake"):
        manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason="not today"), REMOTE)
        manager.process_relayed_rejection(7, "not today")
        manager.process_relayed_rejection(7)
    assert runtime.topics() == ["handshake.rejected_by_peer"]
    assert caplog.text.count("rejected our request") == 1
    (request,) = manager.outgoing_requests()
    assert request.reason == "not today"  # the first word stands


def test_a_reject_from_a_node_we_never_asked_is_debug_only(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    with caplog.at_level(logging.DEBUG, logger="pilothandshake"):
        manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason="no"), REMOTE)
    assert runtime.events == [] and manager.outgoing_requests() == []
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert "we have not asked it" in caplog.text


def test_revoke_of_a_node_we_only_asked_leaves_the_request_withdrawn(
    nodes: Nodes, peer: Peer
) -> None:
    manager, _ = nodes.make()
    manager.send_request(7, "sync")
    assert manager.revoke_trust(7) == "withdrawn"
    (request,) = manager.outgoing_requests()
    assert request.state == "withdrawn"
    # Withdrawn is not rejected: a waiter is not told the peer said no.
    assert manager.wait_for_trust(7, 0.05) is False


# stop() keeps its bound (SPEC 7, issue 16 item 5)


class _HungRegistry(FakeRegistry):
    """Every registry call blocks until ``release`` is set: a registry that never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def _record(self, method: str, *args: object) -> None:
        super()._record(method, *args)
        self.release.wait(60)


def test_stop_returns_within_stop_timeout_however_many_registry_calls_hang(
    nodes: Nodes,
) -> None:
    registry = _HungRegistry()
    peers = [Peer(n) for n in range(10, 14)]
    askers = [Peer(n) for n in range(20, 26)]
    seed_trust(
        f"{nodes.root}/n1",
        trusted=tuple(TrustRecord(p.node_id, p.key, T0) for p in peers),
        pending=tuple(PendingHandshake(p.node_id, p.key, "hi", T0, True) for p in askers),
    )
    manager, _ = nodes.make(registry=registry)
    try:
        manager.start()  # checks every record at the registry: the first lookup hangs
        for asker in askers:  # grants: report_trust and respond_handshake hang too
            assert manager.approve_handshake(asker.node_id)
        assert registry.wait_for_call("report_trust", 1)
        before = load_state(f"{nodes.root}/n1/trust.json")
        started = time.monotonic()
        manager.stop()
        elapsed = time.monotonic() - started
        assert elapsed < 12, f"stop() took {elapsed:.1f} s with a hung registry"
        # trust.json is whole and holds every change the calls were told was made.
        assert load_state(f"{nodes.root}/n1/trust.json") == before
        assert sorted(before.trusted) == [10, 11, 12, 13, *range(20, 26)]
    finally:
        registry.release.set()
