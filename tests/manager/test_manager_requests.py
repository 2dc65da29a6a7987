"""Manager: the request decision of SPEC 6, row by row, for direct and relayed requests, and
the bounds of the pending queue."""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timezone

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, seed_trust, settle, snapshot

from pilothandshake.constants import MAX_PENDING
from pilothandshake.identity import decode_signature, verify
from pilothandshake.manager import Manager
from pilothandshake.messages import HANDSHAKE_ACCEPT, HANDSHAKE_REQUEST
from pilothandshake.registry.challenges import respond_challenge
from pilothandshake.runtime import AllowlistEntry
from pilothandshake.store import OutgoingRequest, PendingHandshake, TrustRecord, load_state
from pilothandshake.testing import FakeClock, MemoryRuntime

OWN = 1
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def registry(peer: Peer) -> FakeRegistry:
    fake = FakeRegistry()
    fake.keys[peer.node_id] = peer.key
    return fake


def send_direct(manager: Manager, peer: Peer, justification: str = "need data") -> None:
    manager.process_message(
        peer.data(HANDSHAKE_REQUEST, OWN, justification=justification), ("127.0.0.1", 40000)
    )


def send_relayed(manager: Manager, peer: Peer, justification: str = "need data") -> None:
    manager.process_relayed_request(peer.node_id, justification, peer.key)


def auto_reason(runtime: MemoryRuntime) -> str | None:
    for topic, payload in runtime.events:
        if topic == "handshake.auto_approved":
            return str(payload["reason"])
    return None


def assert_accept_replied(manager: Manager, runtime: MemoryRuntime, relayed: bool) -> None:
    """A direct request is answered by a dialled accept, a relayed one via the registry."""
    settle(manager)
    registry = runtime.registry_client
    responds = registry.calls_of("respond_handshake") if registry is not None else []
    if relayed:
        assert [(n, p, a) for n, p, a, _ in responds] == [(OWN, 7, True)]
        signature = decode_signature(responds[0][3])
        assert signature is not None
        assert verify(runtime.identity.public_key, respond_challenge(OWN, 7), signature)
        assert runtime.sent == []
    else:
        sent = runtime.sent_messages()
        assert [(p, m.type) for p, m in sent] == [(7, HANDSHAKE_ACCEPT)]
        assert responds == []


def assert_granted(manager: Manager, runtime: MemoryRuntime, reason: str) -> TrustRecord:
    settle(manager)
    assert auto_reason(runtime) == reason
    assert runtime.topics() == [
        "handshake.received",
        "handshake.auto_approved",
        "trust.changed",
    ]
    payload = runtime.events[-1][1]
    assert (payload["peer_node_id"], payload["state"]) == (7, "granted")
    # Go's reason; test_decide holds which rows add "_relayed".
    assert payload["reason"] in (reason, f"{reason}_relayed")
    registry = runtime.registry_client
    if registry is not None:
        assert registry.calls_of("report_trust") == [(OWN, 7)]
    (record,) = manager.trusted_peers()
    assert record.node_id == 7
    assert record.reason == payload["reason"]  # kept beside the record
    assert manager.pending_count() == 0
    return record


@pytest.mark.parametrize("relayed", [False, True])
def test_row1_already_trusted_replies_accept_and_changes_nothing(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed: bool
) -> None:
    record = TrustRecord(7, peer.key, T0, mutual=True, network=0)
    seed_trust(f"{nodes.root}/n1", trusted=(record,))
    manager, runtime = nodes.make(registry=registry)
    (send_relayed if relayed else send_direct)(manager, peer)
    assert_accept_replied(manager, runtime, relayed)
    assert manager.trusted_peers() == [record]
    assert runtime.topics() == ["handshake.received"]
    assert registry.calls_of("report_trust") == []


@pytest.mark.parametrize("relayed", [False, True])
def test_row2_outgoing_request_makes_trust_mutual(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed: bool
) -> None:
    manager, runtime = nodes.make(registry=registry)
    assert manager.send_request(7, "sync") == "sent"
    runtime.sent.clear()
    (send_relayed if relayed else send_direct)(manager, peer)
    record = assert_granted(manager, runtime, "mutual")
    assert (record.public_key, record.mutual, record.network) == (peer.key, True, 0)
    assert_accept_replied(manager, runtime, relayed)
    (request,) = manager.outgoing_requests()  # done with, and kept to tell the caller
    assert (request.node_id, request.state) == (7, "accepted")


@pytest.mark.parametrize("relayed", [False, True])
def test_row3_shared_network_trusts_with_the_first_shared_id_in_our_order(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed: bool
) -> None:
    registry.networks[OWN] = [9, 5, 3]
    registry.networks[7] = [3, 5]
    manager, runtime = nodes.make(registry=registry)
    (send_relayed if relayed else send_direct)(manager, peer)
    record = assert_granted(manager, runtime, "same_network")
    assert (record.mutual, record.network) == (False, 5)
    assert_accept_replied(manager, runtime, relayed)


def test_row3_backbone_network_zero_is_not_shared(
    nodes: Nodes, peer: Peer, registry: FakeRegistry
) -> None:
    manager, _runtime = nodes.make(registry=registry)  # both only in network 0
    send_direct(manager, peer)
    assert manager.trusted_peers() == []
    assert [p.node_id for p in manager.pending_requests()] == [7]


@pytest.mark.parametrize("relayed", [False, True])
def test_row4_allowlisted_agent_vouched_by_registry_is_trusted(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed: bool
) -> None:
    manager, runtime = nodes.make(registry=registry)
    runtime.allowlist[7] = AllowlistEntry(7, "build-agent")
    (send_relayed if relayed else send_direct)(manager, peer)
    record = assert_granted(manager, runtime, "trusted_agent")
    assert (record.public_key, record.mutual, record.network) == (peer.key, False, 0)
    assert runtime.events[1][1]["agent"] == "build-agent"
    assert_accept_replied(manager, runtime, relayed)


def test_row4_pinned_allowlist_key_needs_no_registry(nodes: Nodes, peer: Peer) -> None:
    manager, runtime = nodes.make()
    runtime.allowlist[7] = AllowlistEntry(7, "deployer", peer.key)
    send_direct(manager, peer)
    assert_granted(manager, runtime, "trusted_agent")
    assert_accept_replied(manager, runtime, relayed=False)


def test_row4_a_pinned_allowlist_key_is_not_looked_up_so_a_hung_registry_cannot_delay_it(
    nodes: Nodes, peer: Peer
) -> None:
    """Round 3: the receipt waits for the decision (SPEC 3), and the sender waits 2 s; a
    registry that hangs for its 5 s must not hold back a message the operator's pin already
    decides. The pin binds the key as the registry's lookup would (SPEC 6 row 4)."""
    registry = FakeRegistry()
    registry.lookup_errors.add(7)
    manager, runtime = nodes.make(registry=registry)
    runtime.allowlist[7] = AllowlistEntry(7, "deployer", peer.key)
    manager.send_request(7, "hello")
    send_direct(manager, peer)
    assert registry.calls_of("lookup") == []
    record = assert_granted(manager, runtime, "mutual")  # bound by the pin: row 2 applies
    assert record.public_key == peer.key


def test_row4_unpinned_agent_without_registry_goes_pending(nodes: Nodes, peer: Peer) -> None:
    manager, runtime = nodes.make()
    runtime.allowlist[7] = AllowlistEntry(7, "build-agent")
    send_direct(manager, peer)
    assert manager.trusted_peers() == []
    assert runtime.topics() == ["handshake.received", "handshake.pending"]


@pytest.mark.parametrize("relayed", [False, True])
def test_row4_allowlist_pin_differing_from_the_senders_key_is_dropped(
    nodes: Nodes,
    peer: Peer,
    registry: FakeRegistry,
    relayed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager, runtime = nodes.make(registry=registry)
    runtime.allowlist[7] = AllowlistEntry(7, "deployer", Peer(99).key)
    (send_relayed if relayed else send_direct)(manager, peer)
    assert manager.trusted_peers() == [] and manager.pending_requests() == []
    assert "differs from the allowlist's pinned key" in caplog.text


def test_row4_malicious_registry_cannot_get_round_the_allowlist_pin(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 10b: a relayed request from 42 carrying the attacker's key while the
    registry's lookup returns the agent's key was trusted with the attacker's key; the real
    agent was then dropped. Every key the request brings must equal the pin."""
    agent, attacker = Peer(42), Peer(42)
    registry = FakeRegistry()
    registry.keys[42] = agent.key  # the lookup says what the pin says
    clock = FakeClock()
    manager, runtime = nodes.make(registry=registry, clock=clock)
    runtime.allowlist[42] = AllowlistEntry(42, "agent", agent.key)
    manager.process_relayed_request(42, "attacker", attacker.key)
    assert manager.trusted_peers() == [] and manager.pending_requests() == []
    # ... and a registry answering the attacker's key does no better with the agent's.
    registry.keys[42] = attacker.key
    clock.advance(30.0)  # the cached answer expires
    manager.process_relayed_request(42, "attacker", agent.key)
    assert manager.trusted_peers() == [] and manager.pending_requests() == []
    # The real agent still gets in, under the pinned key.
    registry.keys[42] = agent.key
    clock.advance(30.0)  # the cached answer expires
    manager.process_relayed_request(42, "agent", agent.key)
    assert [(r.node_id, r.public_key) for r in manager.trusted_peers()] == [(42, agent.key)]
    assert auto_reason(runtime) == "trusted_agent"


@pytest.mark.parametrize("relayed", [False, True])
def test_row5_auto_approve_trusts_without_mutual(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed: bool
) -> None:
    manager, runtime = nodes.make(registry=registry, auto_approve=True)
    (send_relayed if relayed else send_direct)(manager, peer)
    record = assert_granted(manager, runtime, "auto_approve")
    assert (record.public_key, record.mutual, record.network) == (peer.key, False, 0)
    assert_accept_replied(manager, runtime, relayed)


def test_row5_without_registry_trusts_on_first_use(nodes: Nodes, peer: Peer) -> None:
    manager, runtime = nodes.make(auto_approve=True)
    send_direct(manager, peer)
    assert_granted(manager, runtime, "auto_approve")
    assert_accept_replied(manager, runtime, relayed=False)


def test_strict_with_registry_unbound_request_goes_pending_despite_auto_approve(
    nodes: Nodes, peer: Peer
) -> None:
    registry = FakeRegistry()  # does not know node 7's key: the request is not bound
    registry.networks[OWN] = [3]
    registry.networks[7] = [3]
    manager, _runtime = nodes.make(registry=registry, auto_approve=True)
    manager.send_request(7, "sync")  # even an outgoing request does not vouch for it
    send_direct(manager, peer)
    settle(manager)
    assert manager.trusted_peers() == []
    (pending,) = manager.pending_requests()
    assert (pending.node_id, pending.public_key, pending.bound) == (7, peer.key, False)
    assert registry.calls_of("report_trust") == []


def test_strict_with_registry_lookup_error_counts_as_unbound(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.lookup_errors.add(7)
    manager, _ = nodes.make(registry=registry, auto_approve=True)
    send_direct(manager, peer)
    assert manager.trusted_peers() == []
    assert [(p.node_id, p.bound) for p in manager.pending_requests()] == [(7, False)]


@pytest.mark.parametrize("relayed", [False, True])
def test_row6_pending_request_records_key_text_and_binding(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed: bool
) -> None:
    manager, runtime = nodes.make(registry=registry)
    (send_relayed if relayed else send_direct)(manager, peer, "é" * 700)
    settle(manager)
    (pending,) = manager.pending_requests()
    assert pending.public_key == peer.key
    assert pending.bound is True  # registry-bound direct, or relayed
    assert pending.justification == "é" * 512  # 1 KiB on a UTF-8 boundary
    assert runtime.topics() == ["handshake.received", "handshake.pending"]
    assert runtime.events[1][1] == {"peer_node_id": 7, "justification": "é" * 512}
    assert runtime.sent == []
    assert registry.calls_of("respond_handshake") == []


def test_row6_a_new_request_replaces_the_earlier_one(nodes: Nodes, peer: Peer) -> None:
    manager, _ = nodes.make()
    send_direct(manager, peer, "first")
    send_direct(manager, peer, "second")
    assert [(p.node_id, p.justification) for p in manager.pending_requests()] == [(7, "second")]


def test_relayed_request_without_key_keeps_the_pending_key(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()  # knows no key for node 7
    manager, _ = nodes.make(registry=registry)
    send_relayed(manager, peer, "with key")
    manager.process_relayed_request(7, "without key")
    (pending,) = manager.pending_requests()
    assert (pending.public_key, pending.justification, pending.bound) == (
        peer.key,
        "without key",
        True,
    )


def test_relayed_request_without_any_key_is_backfilled_once_trusted(nodes: Nodes) -> None:
    registry = FakeRegistry()
    manager, _ = nodes.make(registry=registry, auto_approve=True)
    key = Peer(7).key
    registry.lookup_answers[7] = ["", key]  # unknown at request time, known for the backfill
    manager.process_relayed_request(7, "no key")
    settle(manager)
    (record,) = manager.trusted_peers()
    assert record.public_key == key


def test_direct_accept_reply_falls_back_to_the_relay_when_the_dial_fails(
    nodes: Nodes, peer: Peer, registry: FakeRegistry
) -> None:
    manager, runtime = nodes.make(registry=registry, auto_approve=True)
    runtime.dial_fails = True
    send_direct(manager, peer)
    settle(manager)
    assert [m.type for _, m in runtime.sent_messages()] == [HANDSHAKE_ACCEPT]
    assert [c[:3] for c in registry.calls_of("respond_handshake")] == [(OWN, 7, True)]


class _Unreachable(MemoryRuntime):
    """A runtime that says it cannot dial any peer, and records what it signs."""

    def __init__(self, directory: str, registry: FakeRegistry | None) -> None:
        super().__init__(OWN, directory, auto_approve=True, registry=registry)
        self.signed: list[bytes] = []
        self.dialable = False

    def sign(self, msg: bytes) -> bytes | None:
        self.signed.append(msg)
        return super().sign(msg)


@pytest.mark.parametrize("with_registry", [True, False])
def test_accept_reply_is_not_built_for_a_peer_the_runtime_cannot_dial(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, with_registry: bool
) -> None:
    runtime = _Unreachable(nodes.root, registry if with_registry else None)
    manager = Manager(runtime)
    nodes.managers.append(manager)
    send_direct(manager, peer)
    settle(manager)
    assert manager.is_trusted(7)
    assert runtime.sent == []  # no dial, and no accept signed for one
    if with_registry:
        assert [c[:3] for c in registry.calls_of("respond_handshake")] == [(OWN, 7, True)]
        assert runtime.signed == [respond_challenge(OWN, 7)]
    else:
        assert runtime.signed == []
        assert manager._pool._threads == []  # nothing to do: nothing handed to the pool


def test_relayed_request_with_an_invalid_key_is_dropped(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make(registry=FakeRegistry(), auto_approve=True)
    with caplog.at_level(logging.WARNING):
        manager.process_relayed_request(7, "x", "not-a-key")
    assert snapshot(manager) == ([], [], {})
    assert runtime.events == []
    assert len(caplog.records) == 1


def test_relayed_request_from_a_denied_node_is_dropped(nodes: Nodes, peer: Peer) -> None:
    manager, runtime = nodes.make(registry=FakeRegistry(), auto_approve=True)
    runtime.deny.add(7)
    send_relayed(manager, peer)
    assert snapshot(manager) == ([], [], {})
    assert runtime.events == []


def test_strict_relayed_request_with_a_key_differing_from_the_pin_is_dropped(
    nodes: Nodes, peer: Peer
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make(registry=FakeRegistry())
    manager.process_relayed_request(7, "impostor", Peer(7).key)
    settle(manager)
    assert manager.trusted_peers() == [TrustRecord(7, peer.key, T0)]
    assert runtime.events == []


# Pending bounds (SPEC 6 and 15)


def test_unbound_direct_requests_are_limited_per_source_address(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make(max_pending_per_source=2)
    peers = [Peer(n) for n in (10, 11, 12)]
    for p in peers:
        manager.process_message(p.data(HANDSHAKE_REQUEST, OWN), ("127.0.0.1", 5000))
    assert [p.node_id for p in manager.pending_requests()] == [10, 11]
    assert any("source address" in r.getMessage() for r in caplog.records)
    # A replacement from a node already pending is not a new entry.
    again = peers[0].data(HANDSHAKE_REQUEST, OWN, justification="again")
    manager.process_message(again, ("127.0.0.1", 1))
    # Another /24 has its own quota.
    other = peers[2].data(HANDSHAKE_REQUEST, OWN, justification="other")
    manager.process_message(other, ("127.0.1.2", 5000))
    assert [(p.node_id, p.justification) for p in manager.pending_requests()] == [
        (10, "again"),
        (11, ""),
        (12, "other"),
    ]
    assert runtime.topics().count("handshake.pending") == 4


def test_full_queue_drops_unbound_and_lets_bound_evict_the_oldest_unbound(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    # One unbound request from each of 255 /24s: no source holds more than its share.
    pending = tuple(
        PendingHandshake(
            100 + i,
            "",
            "",
            T0.replace(minute=i % 60, second=i // 60),
            False,
            f"10.{i // 200}.{i % 200}.1",
        )
        for i in range(MAX_PENDING - 1)
    )
    bound = PendingHandshake(99, "", "", datetime(2020, 1, 1, tzinfo=timezone.utc), True, "relay")
    seed_trust(f"{nodes.root}/n1", pending=(*pending, bound))
    manager, runtime = nodes.make(registry=FakeRegistry())
    assert manager.pending_count() == MAX_PENDING
    newcomer = Peer(5000)
    with caplog.at_level(logging.WARNING):
        manager.process_message(newcomer.data(HANDSHAKE_REQUEST, OWN), ("127.0.0.1", 9))
    assert "pending queue full" in caplog.records[-1].getMessage()
    assert 5000 not in {p.node_id for p in manager.pending_requests()}
    # A relayed request is vouched for: it evicts the oldest unbound one (node 100), and
    # never the older bound one (node 99).
    manager.process_relayed_request(6000, "relayed")
    nodes_pending = {p.node_id for p in manager.pending_requests()}
    assert len(nodes_pending) == MAX_PENDING
    assert 6000 in nodes_pending and 99 in nodes_pending and 100 not in nodes_pending
    assert runtime.topics() == ["handshake.received", "handshake.pending"]


def test_full_queue_of_relayed_requests_drops_another_relayed_one(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    pending = tuple(
        PendingHandshake(100 + i, "", "", T0, True, "relay") for i in range(MAX_PENDING)
    )
    seed_trust(f"{nodes.root}/n1", pending=pending)
    manager, runtime = nodes.make(registry=FakeRegistry())
    with caplog.at_level(logging.WARNING):
        manager.process_relayed_request(6000, "relayed")
    assert manager.pending_count() == MAX_PENDING
    assert 6000 not in {p.node_id for p in manager.pending_requests()}
    assert runtime.events == []
    assert len(caplog.records) == 1


def test_bound_flag_survives_a_restart(nodes: Nodes, peer: Peer, registry: FakeRegistry) -> None:
    manager, _ = nodes.make(registry=registry)
    send_direct(manager, peer)
    manager.close()
    again, _ = nodes.make(registry=registry)
    assert [(p.node_id, p.public_key, p.bound) for p in again.pending_requests()] == [
        (7, peer.key, True)
    ]


def test_relayed_signature_base64_of_respond_is_standard(
    nodes: Nodes, peer: Peer, registry: FakeRegistry
) -> None:
    manager, _ = nodes.make(registry=registry)
    send_relayed(manager, peer)
    assert manager.approve_handshake(7)
    settle(manager)
    ((_, _, accept, signature),) = registry.calls_of("respond_handshake")
    assert accept is True
    assert base64.b64encode(base64.b64decode(signature)).decode() == signature


def test_outgoing_entry_is_kept_across_restart_and_makes_the_later_request_mutual(
    nodes: Nodes, peer: Peer
) -> None:
    seed_trust(f"{nodes.root}/n1", outgoing=(OutgoingRequest(7, datetime.now(timezone.utc)),))
    manager, runtime = nodes.make()
    send_direct(manager, peer)
    record = assert_granted(manager, runtime, "mutual")
    assert record.mutual is True


# Issue 11 item 5: the same request by both paths (a slow peer gets the direct one late)


@pytest.mark.parametrize("direct_first", [True, False])
@pytest.mark.parametrize("auto_approve", [False, True])
def test_a_duplicate_by_the_other_path_changes_nothing_and_announces_nothing(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, direct_first: bool, auto_approve: bool
) -> None:
    manager, runtime = nodes.make(registry=registry, auto_approve=auto_approve)
    first, second = (send_direct, send_relayed) if direct_first else (send_relayed, send_direct)
    first(manager, peer, "nightly sync")
    settle(manager)
    state = snapshot(manager)
    on_disk = load_state(f"{nodes.root}/n1/trust.json")
    events, sent = list(runtime.events), list(runtime.sent)
    responds = registry.calls_of("respond_handshake")
    second(manager, peer, "nightly sync")
    settle(manager)
    assert snapshot(manager) == state
    assert load_state(f"{nodes.root}/n1/trust.json") == on_disk
    assert runtime.events == events and runtime.sent == sent
    assert registry.calls_of("respond_handshake") == responds
    # Another text is another request.
    second(manager, peer, "and something else")
    assert runtime.topics().count("handshake.received") == 2


# Issue 15 item 6: an impostor's direct request shadowed the real relayed one.


@pytest.mark.parametrize("relayed_key", [True, False])
def test_an_impostors_request_with_the_real_text_is_replaced_by_the_real_relayed_one(
    nodes: Nodes, peer: Peer, registry: FakeRegistry, relayed_key: bool
) -> None:
    """While the node's lookup fails, an impostor sends a direct request under its ID with
    the text the real node will use: it is pending, weakly pinned. The real request then
    arrives relayed: not a duplicate (another key), and it replaces the weak entry. A
    relayed copy without a key keeps the impostor's key, but never makes it bound."""
    manager, runtime = nodes.make(registry=registry)
    impostor = Peer(peer.node_id)
    registry.lookup_errors.add(peer.node_id)
    send_direct(manager, impostor, "nightly sync")
    assert [(p.public_key, p.bound) for p in manager.pending_requests()] == [(impostor.key, False)]
    manager.process_relayed_request(peer.node_id, "nightly sync", peer.key if relayed_key else "")
    (pending,) = manager.pending_requests()
    if relayed_key:
        assert (pending.public_key, pending.bound) == (peer.key, True)
        assert runtime.topics().count("handshake.received") == 2
        # The real key now pins: the impostor cannot take the entry back.
        send_direct(manager, impostor, "nightly sync again")
        assert manager.pending_requests()[0].public_key == peer.key
    else:
        assert (pending.public_key, pending.bound) == (impostor.key, False)
