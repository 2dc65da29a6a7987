"""Manager: the operator API and received accept/reject/revoke (SPEC 7), the revoke cooldown,
the outgoing TTL, lifecycle, persistence across restarts and failed writes."""

from __future__ import annotations

import errno
import logging
import os
import time
from datetime import datetime, timezone

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, seed_trust, settle, snapshot

from pilothandshake.errors import HandshakeError, NotTrustedError, SendError, StoreError
from pilothandshake.identity import decode_signature, verify
from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    handshake_challenge,
)
from pilothandshake.store import OutgoingRequest, PendingHandshake, TrustRecord, load_state

OWN = 1
REMOTE = ("127.0.0.1", 40000)
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def trust_file(nodes: Nodes, node_id: int = OWN) -> str:
    return os.path.join(nodes.root, f"n{node_id}", "trust.json")


# send_request


def test_send_request_dials_a_signed_request_and_persists_the_outgoing_entry(
    nodes: Nodes,
) -> None:
    manager, runtime = nodes.make()
    assert manager.send_request(7, "x" * 2000) == "sent"
    ((peer_id, msg),) = runtime.sent_messages()
    assert (peer_id, msg.type, msg.node_id, msg.signature) == (7, HANDSHAKE_REQUEST, OWN, "")
    assert msg.justification == "x" * 1024
    assert abs(msg.timestamp - time.time()) < 5
    signature = decode_signature(msg.signature_v2)
    assert signature is not None and verify(
        runtime.identity.public_key, msg.v2_challenge(7), signature
    )
    assert list(load_state(trust_file(nodes)).outgoing) == [7]


def test_send_request_to_a_trusted_peer_or_ourselves_sends_nothing(
    nodes: Nodes, peer: Peer
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make()
    assert manager.send_request(7, "x") == "trusted"
    # Our own ID is a mistake (issue 11 item 7: IDs that move), not "already trusted".
    with pytest.raises(HandshakeError, match=f"node {OWN} is this node's own ID"):
        manager.send_request(OWN, "x")
    assert runtime.sent == [] and manager.pending_requests() == []


def test_send_request_falls_back_to_a_signed_relay(nodes: Nodes) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    runtime.dial_fails = True
    assert manager.send_request(7, "sync") == "relayed"
    ((sender, to, text, signature_b64),) = registry.calls_of("request_handshake")
    assert (sender, to, text) == (OWN, 7, "sync")
    signature = decode_signature(signature_b64)
    assert signature is not None
    assert verify(runtime.identity.public_key, handshake_challenge(OWN, 7), signature)
    assert list(load_state(trust_file(nodes)).outgoing) == [7]


def test_send_request_failing_both_ways_forgets_the_outgoing_entry(nodes: Nodes) -> None:
    registry = FakeRegistry()
    registry.fail.add("request_handshake")
    manager, runtime = nodes.make(registry=registry)
    runtime.dial_fails = True
    with pytest.raises(SendError) as failure:
        manager.send_request(7, "sync")
    assert "refused" in str(failure.value) and "request failed" in str(failure.value)
    assert "earlier relayed request" not in str(failure.value)
    assert snapshot(manager)[2] == {}
    assert load_state(trust_file(nodes)).outgoing == {}


def test_repeated_relayed_request_failure_mentions_the_waiting_one(nodes: Nodes) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    runtime.dial_fails = True
    assert manager.send_request(7, "sync") == "relayed"
    registry.fail.add("request_handshake")  # the registry refuses a second one while queued
    with pytest.raises(SendError, match="an earlier relayed request may still be waiting"):
        manager.send_request(7, "sync again")


def test_send_request_without_registry_fails_with_both_reasons(nodes: Nodes) -> None:
    manager, runtime = nodes.make()
    runtime.dial_fails = True
    with pytest.raises(SendError, match="no registry"):
        manager.send_request(7, "sync")


def test_send_request_before_the_node_id_is_known_fails_clearly(nodes: Nodes) -> None:
    manager, runtime = nodes.make(node_id=0)
    with pytest.raises(HandshakeError, match="no node ID"):
        manager.send_request(7, "sync")
    assert runtime.sent == []


# Accept / reject / revoke received


def test_accept_for_our_outgoing_request_grants_mutual_trust(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(registry=registry)
    manager.send_request(7, "sync")
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    settle(manager)
    (record,) = manager.trusted_peers()
    assert (record.node_id, record.public_key, record.mutual) == (7, peer.key, True)
    assert [(r.node_id, r.state) for r in manager.outgoing_requests()] == [(7, "accepted")]
    assert registry.calls_of("report_trust") == [(OWN, 7)]
    assert runtime.topics() == ["handshake.approved", "trust.changed"]
    assert runtime.events[0][1] == {"peer_node_id": 7, "by": "peer"}


def test_an_accept_from_a_peer_already_trusted_is_ignored_without_a_warning(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """The happy path logs no WARNING: the relayed copy of a direct accept, and a second
    accept (Go sends one each way), find the peer trusted and are ignored at DEBUG."""
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(registry=registry)
    manager.send_request(7, "sync")
    with caplog.at_level(logging.DEBUG, logger="pilothandshake"):
        manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
        manager.process_relayed_approval(7)
        manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN, reason="again"), REMOTE)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert caplog.text.count("accept from a node already trusted") == 2
    assert runtime.topics() == ["handshake.approved", "trust.changed"]
    assert [r.node_id for r in manager.trusted_peers()] == [7]


def test_strict_accept_with_registry_must_be_bound_or_pinned(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()  # no key for node 7: the accept is not bound
    manager, runtime = nodes.make(registry=registry)
    manager.send_request(7, "sync")
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    assert manager.trusted_peers() == []
    assert runtime.events == []


def test_relayed_approval_for_our_outgoing_request_grants_trust(nodes: Nodes) -> None:
    registry = FakeRegistry()
    registry.keys[7] = Peer(7).key
    manager, runtime = nodes.make(registry=registry)
    runtime.dial_fails = True
    manager.send_request(7, "sync")
    manager.process_relayed_approval(7)
    settle(manager)
    assert [(r.node_id, r.mutual, r.public_key) for r in manager.trusted_peers()] == [
        (7, True, registry.keys[7])  # backfilled: the relay carries no key
    ]


def test_relayed_approval_without_outgoing_request_is_ignored_in_strict_mode(
    nodes: Nodes,
) -> None:
    manager, runtime = nodes.make(registry=FakeRegistry())
    manager.process_relayed_approval(7)
    assert manager.trusted_peers() == []
    assert runtime.events == []


def test_reject_received_ends_the_outgoing_request_with_the_reason(
    nodes: Nodes, peer: Peer
) -> None:
    manager, runtime = nodes.make()
    manager.send_request(7, "sync")
    manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason="no"), REMOTE)
    (request,) = manager.outgoing_requests()
    assert (request.node_id, request.state, request.reason) == (7, "rejected", "no")
    stored = load_state(trust_file(nodes)).outgoing[7]  # persisted (to the second)
    assert (stored.state, stored.reason, stored.path) == ("rejected", "no", "direct")
    assert runtime.events == [
        ("handshake.rejected_by_peer", {"peer_node_id": 7, "reason": "no", "relayed": False})
    ]
    # A later accept is the peer's newer word (the rejection may have been a late copy
    # answering an earlier request of ours): we asked, it agrees.
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    assert [record.node_id for record in manager.trusted_peers()] == [7]
    assert [r.state for r in manager.outgoing_requests()] == ["accepted"]


def test_relayed_rejection_ends_the_outgoing_request(nodes: Nodes) -> None:
    manager, runtime = nodes.make(registry=FakeRegistry())
    manager.send_request(7, "sync")
    manager.process_relayed_rejection(7, "not today")
    (request,) = manager.outgoing_requests()
    assert (request.state, request.reason) == ("rejected", "not today")
    assert runtime.events[-1] == (
        "handshake.rejected_by_peer",
        {"peer_node_id": 7, "reason": "not today", "relayed": True},
    )


def test_revoke_signed_with_the_pinned_key_removes_trust(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make(registry=registry)
    registry.lookup_errors.add(7)  # pinned is enough: no registry needed
    manager.process_message(peer.data(HANDSHAKE_REVOKE, OWN, reason="bye"), REMOTE)
    settle(manager)
    assert snapshot(manager) == ([], [], {})
    assert load_state(trust_file(nodes)).trusted == {}
    assert runtime.removed == [7]
    assert registry.calls_of("revoke_trust") == [(OWN, 7)]
    assert runtime.events == [
        ("trust.revoked_by_peer", {"peer_node_id": 7, "reason": "bye"}),
        ("trust.changed", {"peer_node_id": 7, "state": "revoked", "reason": "by_peer"}),
    ]


def test_strict_revoke_from_an_unpinned_unbound_sender_is_ignored(nodes: Nodes) -> None:
    stranger = Peer(9)
    seed_trust(f"{nodes.root}/n1", outgoing=(OutgoingRequest(9, datetime.now(timezone.utc)),))
    manager, runtime = nodes.make()
    manager.process_message(stranger.data(HANDSHAKE_REVOKE, OWN), REMOTE)
    assert list(snapshot(manager)[2]) == [9]
    assert runtime.removed == []


# Operator decisions


def test_approve_trusts_the_pending_request_and_answers_both_ways(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.lookup_errors.add(7)
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="j"), REMOTE)
    assert manager.approve_handshake(7) is True
    settle(manager)
    (record,) = manager.trusted_peers()
    assert (record.node_id, record.public_key, record.mutual, record.network) == (
        7,
        peer.key,
        False,
        0,
    )
    assert manager.pending_count() == 0
    assert registry.calls_of("report_trust") == [(OWN, 7)]
    assert [c[:3] for c in registry.calls_of("respond_handshake")] == [(OWN, 7, True)]
    assert [(p, m.type) for p, m in runtime.sent_messages()] == [(7, HANDSHAKE_ACCEPT)]
    assert runtime.topics()[-2:] == ["handshake.approved", "trust.changed"]
    assert manager.approve_handshake(7) is False


def test_approve_without_relay_fallback_when_the_dial_fails(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    runtime.dial_fails = True
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert manager.approve_handshake(7)
    settle(manager)
    assert len(registry.calls_of("respond_handshake")) == 1  # only the approval itself


def test_approve_of_a_keyless_request_backfills_the_key(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    seed_trust(f"{nodes.root}/n1", pending=(PendingHandshake(7, "", "", T0),))
    manager, _ = nodes.make(registry=registry)
    assert manager.pending_requests()[0].public_key == ""
    manager.approve_handshake(7)
    settle(manager)
    assert manager.trusted_peers()[0].public_key == peer.key
    assert load_state(trust_file(nodes)).trusted[7].public_key == peer.key


def test_reject_drops_the_pending_request_and_tells_the_peer(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    manager.process_relayed_request(7, "j", peer.key)
    assert manager.reject_handshake(7, "not today") is True
    settle(manager)
    assert snapshot(manager) == ([], [], {})
    assert [c[:3] for c in registry.calls_of("respond_handshake")] == [(OWN, 7, False)]
    ((_, msg),) = runtime.sent_messages()
    assert (msg.type, msg.reason) == (HANDSHAKE_REJECT, "not today")
    assert runtime.events[-1] == ("handshake.rejected", {"peer_node_id": 7, "reason": "not today"})
    assert manager.reject_handshake(7) is False


def test_revoke_trust_tells_the_peer_before_removing_the_tunnel(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make(registry=registry)
    order: list[str] = []
    runtime.on_dial = lambda node: order.append(f"dial {node} removed={runtime.removed}")
    manager.revoke_trust(7)
    assert order == ["dial 7 removed=[]"]
    assert runtime.removed == [7]
    assert runtime.sent_messages()[0][1].type == HANDSHAKE_REVOKE
    settle(manager)
    assert registry.calls_of("revoke_trust") == [(OWN, 7)]
    assert runtime.topics() == ["trust.revoked", "trust.changed"]
    assert load_state(trust_file(nodes)).trusted == {}


def test_revoke_of_an_untrusted_peer_still_clears_it_and_raises(nodes: Nodes) -> None:
    seed_trust(f"{nodes.root}/n1", pending=(PendingHandshake(7, "", "", T0),))
    manager, runtime = nodes.make()
    with pytest.raises(NotTrustedError):
        manager.revoke_trust(7)
    assert snapshot(manager) == ([], [], {})
    assert runtime.sent == [] and runtime.events == []


@pytest.mark.parametrize("with_registry", [False, True])
def test_revoke_of_a_node_we_only_asked_withdraws_the_request_at_the_peer(
    nodes: Nodes, with_registry: bool
) -> None:
    """Issue 11 item 10e: ``untrust B`` while our request waits at B dropped only our side;
    B's operator then approved and B trusted a node that no longer asked. Now the request
    is withdrawn: cancelled here, and B drops it on our signed revoke."""
    registry = FakeRegistry() if with_registry else None
    alice, alice_rt = nodes.make(1, registry=registry)
    bob, bob_rt = nodes.make(2, registry=registry)
    if registry is not None:
        registry.keys[1] = alice_rt.identity.public_key_b64
        registry.keys[2] = bob_rt.identity.public_key_b64
    wired = {1: alice, 2: bob}
    alice_rt.deliver = lambda peer, data: wired[peer].process_message(data, ("127.0.0.1", 1001))
    bob_rt.deliver = lambda peer, data: wired[peer].process_message(data, ("127.0.0.1", 1002))
    assert alice.send_request(2, "sync") == "sent"
    assert [p.node_id for p in bob.pending_requests()] == [1]

    assert alice.revoke_trust(2) == "withdrawn"
    assert snapshot(alice)[:2] == ([], [])
    assert [(r.node_id, r.state) for r in alice.outgoing_requests()] == [(2, "withdrawn")]
    assert bob.pending_requests() == []
    assert bob.approve_handshake(1) is False
    assert not bob.is_trusted(1) and not alice.is_trusted(2)
    # Nothing left to withdraw: the second call says so.
    with pytest.raises(NotTrustedError):
        alice.revoke_trust(2)


def test_a_revoke_signed_by_a_pending_requester_cannot_drop_a_keyless_trust_record(
    nodes: Nodes, peer: Peer
) -> None:
    """The key of a node's own pending request pins only that request."""
    seed_trust(
        f"{nodes.root}/n1",
        trusted=(TrustRecord(7, "", T0),),
        pending=(PendingHandshake(7, peer.key, "", T0),),
    )
    manager, _ = nodes.make()
    manager.process_message(peer.data(HANDSHAKE_REVOKE, OWN), REMOTE)
    assert [r.node_id for r in manager.trusted_peers()] == [7]


def test_revoking_ourselves_is_refused(nodes: Nodes) -> None:
    manager, _ = nodes.make()
    with pytest.raises(HandshakeError, match="itself"):
        manager.revoke_trust(OWN)
    assert manager.is_trusted(OWN)


def test_revoke_cooldown_ignores_a_stale_accept_until_a_new_request(
    nodes: Nodes, peer: Peer
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, _runtime = nodes.make(strict=False)  # the cooldown matters in legacy mode
    manager.revoke_trust(7)
    manager.process_relayed_approval(7)
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    assert manager.trusted_peers() == []
    manager.send_request(7, "again")  # fresh intent clears the cooldown
    manager.process_relayed_approval(7)
    assert [r.node_id for r in manager.trusted_peers()] == [7]


# Lifecycle, TTL reaper


def test_start_binds_444_and_stop_is_idempotent(nodes: Nodes) -> None:
    manager, runtime = nodes.make()
    manager.stop()  # before start: nothing
    manager.start()
    assert runtime.handler == manager.handle_connection
    assert runtime.listener is not None and not runtime.listener.closed
    manager.stop()
    manager.stop()
    assert runtime.listener.closed
    with pytest.raises(StoreError):  # trust.json is released
        manager.send_request(7, "after stop")


def test_outgoing_requests_expire_after_the_ttl(nodes: Nodes, peer: Peer) -> None:
    manager, runtime = nodes.make(reap_interval=0.02)
    runtime.outgoing_ttl = 0.05
    manager.start()
    manager.send_request(7, "sync")
    deadline = time.monotonic() + 5
    while snapshot(manager)[2] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert snapshot(manager)[2] == {}
    assert load_state(trust_file(nodes)).outgoing == {}
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    assert manager.trusted_peers() == []


def test_keyless_trust_records_are_backfilled_at_start(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, "", T0), TrustRecord(8, "bad", T0)))
    manager, _ = nodes.make(registry=registry)
    manager.start()
    settle(manager)
    assert [(r.node_id, r.public_key) for r in manager.trusted_peers()] == [
        (7, peer.key),
        (8, "bad"),  # the registry has no key for it either
    ]


# Persistence


def test_restart_over_the_same_directory_keeps_everything(nodes: Nodes) -> None:
    registry = FakeRegistry()
    trusted, bound, unbound = Peer(7), Peer(8), Peer(9)
    registry.keys[8] = bound.key
    registry.lookup_errors.add(9)
    manager, _ = nodes.make(registry=registry)
    manager.start()
    manager.process_relayed_request(7, "t", trusted.key)
    manager.approve_handshake(7)
    manager.process_message(bound.data(HANDSHAKE_REQUEST, OWN, justification="b"), REMOTE)
    manager.process_message(unbound.data(HANDSHAKE_REQUEST, OWN, justification="u"), REMOTE)
    manager.send_request(11, "out")
    before = snapshot(manager)
    manager.stop()
    again, _ = nodes.make(registry=registry)
    after = snapshot(again)
    assert [r.node_id for r in after[0]] == [7]
    assert [(p.node_id, p.bound) for p in after[1]] == [(8, True), (9, False)]
    assert list(after[2]) == [11]
    assert [(r.node_id, r.public_key, r.mutual) for r in after[0]] == [
        (r.node_id, r.public_key, r.mutual) for r in before[0]
    ]
    assert [(p.public_key, p.justification) for p in after[1]] == [
        (p.public_key, p.justification) for p in before[1]
    ]


def test_a_second_manager_on_the_same_directory_is_refused(nodes: Nodes) -> None:
    nodes.make()
    with pytest.raises(StoreError, match="in use"):
        nodes.make()


def test_unparsable_trust_json_is_refused_not_replaced(nodes: Nodes) -> None:
    os.makedirs(f"{nodes.root}/n1")
    with open(trust_file(nodes), "w") as out:
        out.write("{broken")
    with pytest.raises(StoreError, match=r"trust\.json"):
        nodes.make()
    with open(trust_file(nodes)) as source:
        assert source.read() == "{broken"


def test_failed_write_raises_and_announces_nothing(
    nodes: Nodes, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = FakeRegistry()
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    events = list(runtime.events)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError, match=r"trust\.json"):
        manager.approve_handshake(7)
    monkeypatch.undo()
    settle(manager)
    assert runtime.events == events
    assert runtime.sent == []
    assert registry.calls_of("report_trust") == registry.calls_of("respond_handshake") == []
    disk = load_state(trust_file(nodes))
    trusted, pending, _outgoing = snapshot(manager)
    assert trusted == [] and [p.node_id for p in pending] == [7]
    assert list(disk.pending) == [7] and disk.trusted == {}
    assert not manager.is_trusted(7)
    # The next change works again.
    assert manager.approve_handshake(7)
    assert manager.is_trusted(7)


def test_failed_write_in_the_handler_is_logged_at_error(
    nodes: Nodes, peer: Peer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    monkeypatch.undo()
    assert manager.pending_count() == 0
    assert runtime.events == []
    assert any(r.levelname == "ERROR" and "trust.json" in r.getMessage() for r in caplog.records)


def test_memory_only_manager_keeps_no_file(tmp_path: object, peer: Peer) -> None:
    from pilothandshake.manager import Manager
    from pilothandshake.testing import MemoryRuntime

    runtime = MemoryRuntime(OWN)
    manager = Manager(runtime)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert manager.approve_handshake(7)
    assert manager.is_trusted(7)
    assert os.listdir(str(tmp_path)) == []
    manager.close()


def test_revoke_from_a_node_we_know_nothing_of_changes_and_announces_nothing(
    nodes: Nodes,
) -> None:
    manager, runtime = nodes.make(strict=False)
    stranger = Peer(9)
    manager.process_message(stranger.data(HANDSHAKE_REVOKE, OWN), REMOTE)
    assert runtime.events == [] and runtime.removed == []


def test_a_rejection_tells_its_reason_both_ways(nodes: Nodes, peer: Peer) -> None:
    """Issue 16: the relayed answer carries the reason too (the registry may pass it on)."""
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert manager.reject_handshake(7, "not today")
    settle(manager)
    [(own, to, accept, _signature, reason)] = registry.calls_of("respond_handshake")
    assert (own, to, accept, reason) == (OWN, 7, False, "not today")
    assert [m.reason for _, m in runtime.sent_messages()] == ["not today"]


# SPEC 7 / 15: texts are cut to 1 KiB


def test_spec15_reject_reason_is_truncated_to_1_kib_on_a_utf8_boundary(
    nodes: Nodes, peer: Peer
) -> None:
    manager, runtime = nodes.make()
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    reason = "\u00e9" * 1000  # 2000 bytes of two-byte characters
    assert manager.reject_handshake(7, reason)
    settle(manager)
    (payload,) = [p for t, p in runtime.events if t == "handshake.rejected"]
    assert payload["reason"] == "\u00e9" * 512
    sent = [m for _, m in runtime.sent_messages() if m.type == HANDSHAKE_REJECT]
    assert [m.reason for m in sent] == ["\u00e9" * 512]
