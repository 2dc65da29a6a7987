"""The outbox (issue 20 item 2): answers that neither path delivered are kept on disk and
retried with backoff until one path delivers them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, settle

from pilothandshake.constants import MAX_BACKOFF
from pilothandshake.errors import RegistryError, SendError
from pilothandshake.manager import Manager
from pilothandshake.manager.outbox import (
    ACCEPT,
    MAX_OUTBOX,
    OUTBOX_FILE,
    OUTBOX_FIRST_RETRY,
    REJECT,
    REVOKE,
    WITHDRAW,
    Outbox,
)
from pilothandshake.messages import HANDSHAKE_ACCEPT, HANDSHAKE_REQUEST
from pilothandshake.testing import FakeClock, MemoryRuntime

OWN = 1
REMOTE = ("127.0.0.1", 40000)
WEEK = 7 * 24 * 3600.0


class Deliveries:
    """A deliver function that fails while ``failing`` and records every call."""

    def __init__(self) -> None:
        self.failing = True
        self.calls: list[tuple[int, str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, peer: int, kind: str, reason: str) -> bool:
        with self.lock:
            self.calls.append((peer, kind, reason))
            if self.failing == "raise":
                raise RegistryError("registry down")
            return not self.failing


def kept(path: Path) -> list[dict[str, object]]:
    return list(json.loads(path.read_text())["answers"]) if path.exists() else []


def make(tmp_path: Path, deliveries: Deliveries, clock: FakeClock, ttl: float = WEEK) -> Outbox:
    return Outbox(str(tmp_path / OUTBOX_FILE), deliveries, lambda: ttl, clock)


def test_an_answer_delivered_at_once_never_touches_the_disk(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    outbox = make(tmp_path, deliveries, clock)
    outbox.expect(7, ACCEPT)
    assert outbox.count() == 1
    outbox.delivered(7, (ACCEPT,))
    assert outbox.count() == 0
    assert not (tmp_path / OUTBOX_FILE).exists()


def test_a_failed_answer_is_kept_on_disk_and_retried_when_due(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    outbox = make(tmp_path, deliveries, clock)
    outbox.expect(7, REJECT, "not today")
    outbox.failed(7)
    (row,) = kept(tmp_path / OUTBOX_FILE)
    assert (row["node_id"], row["kind"], row["reason"]) == (7, REJECT, "not today")
    # Not yet due: the first attempt may still be under way.
    assert outbox.retry_due() == OUTBOX_FIRST_RETRY
    assert deliveries.calls == []
    clock.advance(OUTBOX_FIRST_RETRY)
    wait = outbox.retry_due()
    assert deliveries.calls == [(7, REJECT, "not today")]
    assert wait is not None and 0 < wait <= OUTBOX_FIRST_RETRY
    deliveries.failing = False
    clock.advance(wait)
    assert outbox.retry_due() is None
    assert outbox.count() == 0 and kept(tmp_path / OUTBOX_FILE) == []


def test_backoff_grows_to_the_cap_and_never_overflows(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    deliveries.failing = "raise"  # type: ignore[assignment]
    outbox = make(tmp_path, deliveries, clock)
    outbox.expect(7, ACCEPT)
    clock.advance(OUTBOX_FIRST_RETRY)
    waits = []
    for _ in range(2000):  # a long outage: thousands of failures in a row
        wait = outbox.retry_due()
        assert wait is not None
        waits.append(wait)
        clock.advance(wait)
    assert len(deliveries.calls) == 2000
    assert max(waits) <= MAX_BACKOFF
    assert min(waits[-100:]) >= MAX_BACKOFF / 2  # jitter: between half and the whole cap
    assert len(set(waits[-100:])) > 50  # and really jittered, so a fleet does not retry in step
    assert outbox.count() == 1


def test_a_newer_answer_replaces_the_older_and_only_its_delivery_ends_it(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    outbox = make(tmp_path, deliveries, clock)
    outbox.expect(7, ACCEPT)
    outbox.failed(7)
    outbox.expect(7, REVOKE)
    assert kept(tmp_path / OUTBOX_FILE) == []  # the accept must not come back after a crash
    outbox.delivered(7, (ACCEPT,))  # a late delivery of the superseded accept
    assert outbox.count() == 1
    outbox.delivered(7, (REVOKE,))
    assert outbox.count() == 0


def test_undelivered_answers_survive_a_restart_and_are_retried_at_once(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    outbox = make(tmp_path, deliveries, clock)
    outbox.expect(7, ACCEPT)
    outbox.expect(8, REJECT, "no")
    outbox.failed(7)
    outbox.failed(8)
    deliveries.failing = False
    again = make(tmp_path, deliveries, clock)
    assert again.count() == 2
    assert again.retry_due() is None
    assert sorted(deliveries.calls) == [(7, ACCEPT, ""), (8, REJECT, "no")]
    assert kept(tmp_path / OUTBOX_FILE) == []


def test_a_damaged_outbox_is_moved_aside_and_the_node_starts(tmp_path: Path) -> None:
    (tmp_path / OUTBOX_FILE).write_text('{"answers": [{"node_id": "7"}]}')
    outbox = make(tmp_path, Deliveries(), FakeClock())
    assert outbox.count() == 0
    assert (tmp_path / f"{OUTBOX_FILE}.damaged").exists()
    assert not (tmp_path / OUTBOX_FILE).exists()


def test_answers_expire_with_outgoing_ttl_and_the_outbox_is_bounded(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    outbox = make(tmp_path, deliveries, clock, ttl=3600.0)
    outbox.expect(7, ACCEPT)
    outbox.failed(7)
    clock.advance(3601.0)
    assert outbox.retry_due() is None
    assert outbox.count() == 0 and kept(tmp_path / OUTBOX_FILE) == []
    for peer in range(10, 10 + MAX_OUTBOX + 5):
        outbox.expect(peer, ACCEPT)
    assert outbox.count() == MAX_OUTBOX


def test_the_retry_thread_delivers_and_stops(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    (tmp_path / OUTBOX_FILE).write_text(
        json.dumps(
            {
                "answers": [
                    {"node_id": 7, "kind": ACCEPT, "reason": "", "created": "2099-01-01T00:00:00Z"}
                ]
            }
        )
    )
    deliveries.failing = False
    outbox = make(tmp_path, deliveries, clock)
    outbox.start()
    try:
        deadline = threading.Event()
        for _ in range(100):
            if outbox.count() == 0:
                break
            deadline.wait(0.05)
        assert outbox.count() == 0
    finally:
        outbox.stop(5.0)


# Through the Manager


def test_an_approval_nobody_could_deliver_is_kept_and_sent_after_a_restart(
    nodes: Nodes, peer: Peer
) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    manager.start()
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    runtime.dial_fails = True
    registry.fail.add("respond_handshake")
    assert manager.approve_handshake(7)
    settle(manager)
    assert manager.undelivered_answers() == 1
    path = os.path.join(nodes.root, "n1", OUTBOX_FILE)
    assert [row["node_id"] for row in kept(Path(path))] == [7]
    manager.stop()
    manager.close()
    # The registry is back; the restarted node delivers the approval without being asked.
    registry.fail.clear()
    again, again_runtime = nodes.make(registry=registry)
    again_runtime.dial_fails = True  # only the registry can carry it
    before = len(registry.calls_of("respond_handshake"))
    again.start()
    assert registry.wait_for_call("respond_handshake", before + 1)
    assert registry.calls_of("respond_handshake")[-1][:3] == (OWN, 7, True)
    for _ in range(100):
        if again.undelivered_answers() == 0:
            break
        threading.Event().wait(0.05)
    assert again.undelivered_answers() == 0
    assert kept(Path(path)) == []


def test_a_node_without_its_id_yet_keeps_its_answer_instead_of_signing_as_node_0(
    nodes: Nodes, peer: Peer
) -> None:
    """Restarted while the registry is down, a node does not know its ID: an approval then
    is kept for later, never sent as "node 0" (which its receiver can only drop)."""
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    runtime.own_id = 0
    assert manager.approve_handshake(7)
    settle(manager)
    assert runtime.sent == [] and registry.calls_of("respond_handshake") == []
    assert manager.undelivered_answers() == 1
    manager.close()
    again, again_runtime = nodes.make(registry=registry)  # the ID is known again
    again.start()
    for _ in range(100):
        if again.undelivered_answers() == 0:
            break
        threading.Event().wait(0.05)
    again.stop()
    again.close()
    (sent,) = [json.loads(data) for _, _, data in again_runtime.sent]
    assert (sent["type"], sent["node_id"]) == (HANDSHAKE_ACCEPT, OWN)


def test_an_answer_delivered_by_either_path_is_not_kept(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    runtime.dial_fails = True  # the direct accept fails, the registry relays it
    assert manager.approve_handshake(7)
    settle(manager)
    assert manager.undelivered_answers() == 0
    # The two paths run in parallel: the failed dial may have written the answer down
    # before the relay delivered it; either way nothing is kept.
    assert kept(Path(nodes.root, "n1", OUTBOX_FILE)) == []


def test_a_kept_no_is_cancelled_by_fresh_intent_and_a_kept_yes_is_not(tmp_path: Path) -> None:
    clock, deliveries = FakeClock(), Deliveries()
    outbox = make(tmp_path, deliveries, clock)
    for kind in (REJECT, REVOKE, WITHDRAW):
        outbox.expect(7, kind)
        outbox.failed(7)
        outbox.cancel(7)
        assert outbox.count() == 0 and kept(tmp_path / OUTBOX_FILE) == []
    outbox.expect(7, ACCEPT)
    outbox.cancel(7)
    assert outbox.count() == 1


def kept_no(nodes: Nodes, peer: Peer, kind: str) -> tuple[Manager, MemoryRuntime, FakeRegistry]:
    """A Manager whose "no" of ``kind`` (revoke or reject) to ``peer`` neither path took."""
    registry = FakeRegistry()
    registry.keys[7] = peer.key  # its messages are registry-bound
    manager, runtime = nodes.make(registry=registry)
    manager.start()
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    runtime.dial_fails = True
    if kind == REVOKE:
        assert manager.approve_handshake(7)
        settle(manager)
        registry.fail.add("revoke_trust")
        manager.revoke_trust(7)
    else:
        assert manager.send_request(7, "ours") == "relayed"  # asked before rejecting
        registry.fail.add("respond_handshake")
        assert manager.reject_handshake(7, "not like this")
    settle(manager)
    assert manager.undelivered_answers() == 1
    runtime.dial_fails = False
    registry.fail.clear()
    return manager, runtime, registry


def test_a_request_that_went_nowhere_keeps_the_kept_revoke(nodes: Nodes, peer: Peer) -> None:
    # Found by the fault-injection runs: asked again while unreachable, a node dropped its
    # kept revoke, and the peer went on trusting it for good.
    manager, runtime, registry = kept_no(nodes, peer, REVOKE)
    runtime.dial_fails = True
    registry.fail.add("request_handshake")
    with pytest.raises(SendError):
        manager.send_request(7, "again")
    assert manager.undelivered_answers() == 1
    assert [row["kind"] for row in kept(Path(nodes.root, "n1", OUTBOX_FILE))] == [REVOKE]


def test_a_kept_revoke_never_arrives_after_we_asked_the_peer_again(
    nodes: Nodes, peer: Peer
) -> None:
    # Found by the fault-injection runs: the kept revoke was delivered after the node had
    # asked the same peer again and been accepted, and the peer stopped trusting it.
    manager, _, _ = kept_no(nodes, peer, REVOKE)
    assert manager.send_request(7, "again") == "sent"
    assert manager.undelivered_answers() == 0
    assert kept(Path(nodes.root, "n1", OUTBOX_FILE)) == []


def test_a_kept_reject_is_dropped_when_the_peer_accepts_our_own_request(
    nodes: Nodes, peer: Peer
) -> None:
    # We had asked the peer, then rejected its request: its accept of ours makes trust,
    # and our kept rejection must not reach it afterwards.
    manager, _, _ = kept_no(nodes, peer, REJECT)
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    assert manager.is_trusted(7)
    assert manager.undelivered_answers() == 0
    assert kept(Path(nodes.root, "n1", OUTBOX_FILE)) == []


def test_a_kept_revoke_is_dropped_when_the_peer_asks_again(nodes: Nodes, peer: Peer) -> None:
    # Found by the fault-injection runs: the peer, which no longer trusted us, asked again;
    # our kept revoke arrived after its new request and removed it there, so the peer
    # dropped our approval of that request ("accept without an outgoing request").
    manager, _, _ = kept_no(nodes, peer, REVOKE)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="again"), REMOTE)
    assert 7 in {p.node_id for p in manager.pending_requests()}
    assert manager.undelivered_answers() == 0
    assert kept(Path(nodes.root, "n1", OUTBOX_FILE)) == []


def test_a_kept_rejection_stays_when_the_request_comes_again(nodes: Nodes, peer: Peer) -> None:
    # The request may be a copy of the one rejected, sent again after a registry outage
    # (issue 20 item 3): the requester must still hear the rejection.
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(registry=registry)
    manager.start()
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    runtime.dial_fails = True
    registry.fail.add("respond_handshake")
    assert manager.reject_handshake(7, "no")
    settle(manager)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="again"), REMOTE)
    assert 7 in {p.node_id for p in manager.pending_requests()}
    assert [row["kind"] for row in kept(Path(nodes.root, "n1", OUTBOX_FILE))] == [REJECT]


def test_a_kept_withdrawal_stays_when_the_peer_asks(nodes: Nodes, peer: Peer) -> None:
    # Our old request may still be pending there: only the withdrawal removes it.
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(registry=registry)
    manager.start()
    runtime.dial_fails = True
    assert manager.send_request(7, "ours") == "relayed"
    registry.fail.add("respond_handshake")
    assert manager.revoke_trust(7) == "withdrawn"
    settle(manager)
    assert manager.undelivered_answers() == 1
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="x"), REMOTE)
    assert manager.undelivered_answers() == 1
    assert [row["kind"] for row in kept(Path(nodes.root, "n1", OUTBOX_FILE))] == [WITHDRAW]
