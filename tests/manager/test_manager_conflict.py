"""Manager: trust records whose node ID the registry now binds to another key (issue 11
item 7: an embedded registry restarted without a store handed the IDs out again)."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from datetime import datetime, timezone

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, seed_trust, settle

from pilothandshake.errors import HandshakeError
from pilothandshake.manager import Manager
from pilothandshake.messages import HANDSHAKE_REQUEST, HANDSHAKE_REVOKE
from pilothandshake.store import TrustRecord
from pilothandshake.testing import FakeClock, MemoryRuntime

OWN = 1
REMOTE = ("127.0.0.1", 40000)
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def moved(nodes: Nodes) -> tuple[Peer, Peer, FakeRegistry]:
    """Node 7 was trusted with the old machine's key; the registry now gives 7 to another."""
    old, new = Peer(7), Peer(7)
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, old.key, T0, mutual=True),))
    registry = FakeRegistry()
    registry.keys[7] = new.key
    return old, new, registry


def conflict_events(runtime: MemoryRuntime) -> list[dict[str, object]]:
    return [payload for topic, payload in runtime.events if topic == "trust.conflict"]


def test_start_finds_a_record_the_registry_now_binds_to_another_key(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    _old, new, registry = moved
    manager, runtime = nodes.make(registry=registry)
    assert manager.is_trusted(7)  # until the background check has run
    with caplog.at_level(logging.ERROR):
        manager.start()
        settle(manager)
    assert manager.conflicting_peers() == [7]
    assert not manager.is_trusted(7)
    assert manager.wait_for_trust(7, 0.05) is False
    assert manager.send_request(7, "who are you now?") == "sent"
    assert conflict_events(runtime) == [{"peer_node_id": 7, "registry_key": new.key}]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "node 7 conflicts with the registry" in line
    # The re-ask of SPEC 5 confirmed it: one cached lookup, one fresh.
    assert registry.calls_of("lookup") == [(7,), (7,)]


def test_a_registry_that_answers_back_the_old_key_on_re_ask_is_no_conflict(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    old, new, registry = moved
    registry.lookup_answers[7] = [new.key, old.key]  # a stale answer, then the truth
    manager, runtime = nodes.make(registry=registry)
    manager.start()
    settle(manager)
    assert manager.conflicting_peers() == [] and manager.is_trusted(7)
    assert conflict_events(runtime) == []


def test_the_new_key_waits_as_key_changed_and_only_a_named_fingerprint_approves_it(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    """Issue 15 item 5 (SPEC 17), with a lying registry: it re-binds node 7 to a new key (the
    production registry does on an ``owner`` re-register). The new key's registry-bound
    request finds the conflict; it waits as KEY CHANGED, pins nothing, is never trusted
    automatically, and ``approve 7`` refuses it unless the operator names its fingerprint."""
    old, new, registry = moved
    registry.networks[OWN] = [3]
    registry.networks[7] = [3]  # a shared network would trust it automatically otherwise
    manager, runtime = nodes.make(registry=registry, auto_approve=True)
    waiter_result: list[bool] = []
    waiter = threading.Thread(target=lambda: waiter_result.append(manager.wait_for_trust(7, 10)))
    manager.process_message(new.data(HANDSHAKE_REQUEST, OWN, justification="hi"), REMOTE)
    assert manager.conflicting_peers() == [7]
    assert [(p.node_id, p.public_key) for p in manager.pending_requests()] == [(7, new.key)]
    assert "handshake.auto_approved" not in runtime.topics()
    # A second request changes nothing about the conflict and announces it no second time.
    manager.process_message(new.data(HANDSHAKE_REQUEST, OWN, justification="again"), REMOTE)
    assert len(conflict_events(runtime)) == 1
    with pytest.raises(HandshakeError, match=r"KEY CHANGED: the pending request of node 7"):
        manager.approve_handshake(7)
    assert manager.trusted_peers()[0].public_key == old.key  # nothing approved
    fingerprint = hashlib.sha256(base64.b64decode(new.key)).hexdigest()
    with pytest.raises(HandshakeError, match="does not name the key"):
        manager.approve_handshake(7, new_key=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(HandshakeError, match="expected the key's fingerprint"):
        manager.approve_handshake(7, new_key=fingerprint[:15])
    waiter.start()
    assert manager.approve_handshake(7, new_key=fingerprint[:16])
    waiter.join(10)
    assert waiter_result == [True]
    assert manager.conflicting_peers() == []
    assert [(r.node_id, r.public_key) for r in manager.trusted_peers()] == [(7, new.key)]


@pytest.mark.parametrize("form", ["full hex", "base64"])
def test_new_key_takes_the_full_fingerprint_or_the_base64_key(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry], form: str
) -> None:
    _old, new, registry = moved
    manager, _ = nodes.make(registry=registry)
    manager.process_relayed_request(7, "hi", new.key)
    fingerprint = hashlib.sha256(base64.b64decode(new.key)).hexdigest()
    assert manager.approve_handshake(7, new_key=fingerprint if form == "full hex" else new.key)
    assert [r.public_key for r in manager.trusted_peers()] == [new.key]


def test_the_real_peer_still_gets_through_and_its_request_replaces_the_new_keys(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    """Round 2: the attacker's key became the pinned pending request, dropping the real
    peer's messages, and re-approving "node 7" trusted the attacker."""
    old, new, registry = moved
    manager, _ = nodes.make(registry=registry)
    manager.process_message(new.data(HANDSHAKE_REQUEST, OWN, justification="me"), REMOTE)
    manager.process_message(old.data(HANDSHAKE_REQUEST, OWN, justification="real"), REMOTE)
    assert [(p.public_key, p.justification) for p in manager.pending_requests()] == [
        (old.key, "real")
    ]
    assert manager.approve_handshake(7)  # not KEY CHANGED: the key we trusted
    assert [r.public_key for r in manager.trusted_peers()] == [old.key]


def test_a_record_in_conflict_is_approved_again_with_its_own_key(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    old, _new, registry = moved
    manager, _ = nodes.make(registry=registry)
    manager.start()
    settle(manager)
    assert manager.conflicting_peers() == [7] and manager.pending_requests() == []
    assert manager.approve_handshake(7)
    assert manager.conflicting_peers() == [] and manager.is_trusted(7)
    assert [r.public_key for r in manager.trusted_peers()] == [old.key]


def test_revoking_a_record_in_conflict_removes_it(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    _old, _new, registry = moved
    manager, _ = nodes.make(registry=registry)
    manager.start()
    settle(manager)
    assert manager.conflicting_peers() == [7]
    assert manager.revoke_trust(7) == "revoked"
    assert manager.conflicting_peers() == [] and manager.trusted_peers() == []


def test_the_old_key_still_authenticates_once_the_registry_binds_another(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    """Round 3 (SPEC 5 step 3): the old machine's message carries the record's key; the
    registry contradicts it, re-asked: the record is in conflict, but its own key still
    authenticates its peer, whose request waits for the operator (not KEY CHANGED)."""
    old, _new, registry = moved
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(old.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert manager.conflicting_peers() == [7]
    assert not manager.is_trusted(7)
    assert [p.public_key for p in manager.pending_requests()] == [old.key]
    assert runtime.topics()[0] == "trust.conflict"
    # A revoke signed by the record's key is the real peer's: applied.
    manager.process_message(old.data(HANDSHAKE_REVOKE, OWN, reason="bye"), REMOTE)
    assert manager.trusted_peers() == [] and manager.pending_requests() == []


def test_without_a_confirmed_re_ask_the_record_still_pins(
    nodes: Nodes, moved: tuple[Peer, Peer, FakeRegistry]
) -> None:
    """The re-ask answers the old key (no conflict); within 5 s the next differing answer
    cannot be re-asked, so the record still pins; 5 s later the re-ask confirms it."""
    old, new, registry = moved
    registry.lookup_answers[7] = [new.key, old.key]
    clock = FakeClock()
    manager, _ = nodes.make(registry=registry, clock=clock)
    manager.process_message(new.data(HANDSHAKE_REQUEST, OWN, justification="a"), REMOTE)
    clock.advance(4.9)  # the old key is cached; the re-ask was 4.9 s ago
    manager.process_message(new.data(HANDSHAKE_REQUEST, OWN, justification="b"), REMOTE)
    assert manager.conflicting_peers() == [] and manager.is_trusted(7)
    assert manager.pending_requests() == []
    assert registry.calls_of("lookup") == [(7,), (7,)]
    clock.advance(0.2)
    manager.process_message(new.data(HANDSHAKE_REQUEST, OWN, justification="c"), REMOTE)
    assert manager.conflicting_peers() == [7]


def test_a_conflict_is_found_without_a_store_too() -> None:
    registry = FakeRegistry()
    registry.keys[7] = Peer(7).key
    clock = FakeClock()
    manager = Manager(MemoryRuntime(OWN, registry=registry), clock=clock)
    try:
        manager.process_relayed_request(7, "hello", registry.keys[7])
        assert manager.approve_handshake(7)
        registry.keys[7] = Peer(7).key
        clock.advance(30.0)  # the cached answer expires
        manager.process_relayed_request(7, "moved", registry.keys[7])
        assert manager.conflicting_peers() == [7]
        assert [p.node_id for p in manager.pending_requests()] == [7]
    finally:
        manager.close()
