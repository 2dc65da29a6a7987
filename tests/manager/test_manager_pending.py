"""Manager: the pending queue under free registry identities (issue 11 item 1) — per-source
quotas, protected senders (allowlisted, network-sharing, formerly trusted), fairness between
sources with the relay as one source, expiry, and the trust history that survives restarts."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, seed_trust
from managertools import REMOTE

from pilothandshake.constants import MAX_PENDING
from pilothandshake.manager import Manager
from pilothandshake.messages import HANDSHAKE_REQUEST
from pilothandshake.runtime import AllowlistEntry
from pilothandshake.store import PendingHandshake, TrustRecord, load_state
from pilothandshake.testing import MemoryRuntime

OWN = 1
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


class Fleet:
    """Free registry identities: each registers its own key, then asks for trust."""

    def __init__(self, registry: FakeRegistry, first: int, count: int) -> None:
        self.peers = [Peer(first + i) for i in range(count)]
        for peer in self.peers:
            registry.keys[peer.node_id] = peer.key

    def relay(self, manager: Manager) -> None:
        for peer in self.peers:
            manager.process_relayed_request(peer.node_id, "let me in", peer.key)

    def direct(self, manager: Manager, remote: tuple[str, int]) -> None:
        for peer in self.peers:
            manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), remote)


def pending_ids(manager: Manager) -> set[int]:
    return {p.node_id for p in manager.pending_requests()}


def memory_manager(registry: FakeRegistry) -> tuple[Manager, MemoryRuntime]:
    runtime = MemoryRuntime(OWN, registry=registry)
    return Manager(runtime), runtime


def test_300_relayed_free_identities_leave_room_for_protected_peers() -> None:
    """Each relayed request is a source of its own (round 3): free identities through the
    relay fill the queue but cannot push out protected peers, and no stranger, direct or
    relayed, bound or not, can push them out either (registering is free)."""
    registry = FakeRegistry()
    manager, runtime = memory_manager(registry)
    try:
        former, agent, stranger = Peer(7), Peer(8), Peer(9)
        registry.keys[former.node_id] = former.key
        registry.keys[stranger.node_id] = stranger.key
        # Node 7 was trusted once; node 8 is allowlisted (no pin) but its request is not
        # registry-bound (the registry knows no key for it), so row 4 leaves it pending.
        manager.process_relayed_request(7, "first time", former.key)
        assert manager.approve_handshake(7)
        manager.revoke_trust(7)
        runtime.allowlist[8] = AllowlistEntry(8, "agent")

        first = Fleet(registry, 1000, 300)
        first.relay(manager)
        assert manager.pending_count() == MAX_PENDING

        manager.process_relayed_request(7, "back again", former.key)
        manager.process_message(agent.data(HANDSHAKE_REQUEST, OWN), ("127.0.0.8", 4000))
        manager.process_message(stranger.data(HANDSHAKE_REQUEST, OWN), ("127.0.9.9", 4000))
        assert {7, 8} <= pending_ids(manager) and 9 not in pending_ids(manager)
        assert manager.pending_count() == MAX_PENDING
        held = pending_ids(manager)

        # 300 more free identities, relayed and direct, push none of them out.
        Fleet(registry, 2000, 300).relay(manager)
        Fleet(registry, 3000, 100).direct(manager, ("127.0.66.66", 5000))
        assert pending_ids(manager) == held
    finally:
        manager.close()


def test_unbound_requests_never_evict_relayed_ones() -> None:
    """Issue 15 item 4: 264 unbound requests with throwaway keys from 127.0.x.y evicted 3 of
    4 real relayed requests (the relay was one source, over its share)."""
    registry = FakeRegistry()
    manager, _ = memory_manager(registry)
    try:
        real = Fleet(registry, 10, 4)
        real.relay(manager)
        throwaway = [Peer(1000 + i) for i in range(264)]  # no registry key: unbound
        for index, peer in enumerate(throwaway):
            source = (f"127.{index // 250}.{index % 250}.1", 4000)
            manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), source)
        assert manager.pending_count() == MAX_PENDING
        assert {10, 11, 12, 13} <= pending_ids(manager)
    finally:
        manager.close()


def test_a_direct_source_is_its_ipv4_24_or_ipv6_64(nodes: Nodes) -> None:
    """Round 3 (SPEC 15): one host rarely owns a single address; the per-source quota of the
    pending queue counts the /24 (IPv4) or /64 (IPv6). The replay set stays per address."""
    manager, _ = nodes.make(max_pending_per_source=2)
    sources = ["127.0.5.1", "127.0.5.2", "127.0.5.3", "127.0.6.1"]
    for node, source in enumerate(sources, start=20):
        manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), (source, 4000))
    assert sorted(pending_ids(manager)) == [20, 21, 23]
    v6 = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2:8::1", "2001:db8:1:3::1"]
    for node, source in enumerate(v6, start=30):
        manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), (source, 4000))
    assert sorted(pending_ids(manager)) == [20, 21, 23, 30, 31, 33]


def test_bound_direct_requests_are_limited_to_64_per_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = FakeRegistry()
    manager, runtime = memory_manager(registry)
    try:
        Fleet(registry, 1000, 100).direct(manager, ("127.0.0.66", 5000))
        assert manager.pending_count() == 64
        assert "too many pending requests from this source address" in caplog.text
        # Another /24 has its own quota.
        Fleet(registry, 2000, 10).direct(manager, ("127.0.1.67", 5000))
        assert manager.pending_count() == 74
        assert runtime.topics().count("handshake.pending") == 74
    finally:
        manager.close()


def test_a_stranger_evicts_only_from_a_source_holding_more_than_its_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    registry = FakeRegistry()
    manager, _ = memory_manager(registry)
    try:
        floods = [Fleet(registry, 1000 + 64 * i, 64) for i in range(4)]
        for index, flood in enumerate(floods):
            flood.direct(manager, (f"127.0.{index}.66", 5000))
        assert manager.pending_count() == MAX_PENDING
        oldest = floods[0].peers[0].node_id
        # A registry-bound stranger from its own /24: 127.0.0.0/24 holds 64 > 0 + 1.
        newcomer = Peer(9)
        registry.keys[9] = newcomer.key
        manager.process_message(newcomer.data(HANDSHAKE_REQUEST, OWN), ("127.0.9.9", 4000))
        assert 9 in pending_ids(manager) and oldest not in pending_ids(manager)
        assert f"evicted the request of node {oldest} (source '127.0.0.66')" in caplog.text
        # A relayed stranger is a source of its own: it takes from the largest source too.
        late = Peer(5000)
        registry.keys[5000] = late.key
        manager.process_relayed_request(5000, "late", late.key)
        assert 5000 in pending_ids(manager)
        # An unbound stranger may evict only unbound entries: there are none.
        caplog.clear()
        manager.process_message(Peer(6000).data(HANDSHAKE_REQUEST, OWN), ("127.0.10.1", 4000))
        assert 6000 not in pending_ids(manager)
        assert "pending queue full" in caplog.text
    finally:
        manager.close()


def test_protected_requests_are_never_evicted_for_strangers(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    # A queue full of requests from allowlisted nodes.
    seed_trust(
        f"{nodes.root}/n1",
        pending=tuple(
            PendingHandshake(100 + i, "", "", T0, False, "127.0.0.2") for i in range(MAX_PENDING)
        ),
    )
    registry = FakeRegistry()
    runtime = MemoryRuntime(OWN, f"{nodes.root}/n1", registry=registry)
    runtime.allowlist.update({n: AllowlistEntry(n, f"a{n}") for n in range(100, 400)})
    manager = Manager(runtime)
    nodes.managers.append(manager)
    stranger = Peer(9)
    registry.keys[9] = stranger.key
    with caplog.at_level(logging.WARNING):
        manager.process_message(stranger.data(HANDSHAKE_REQUEST, OWN), ("127.0.0.9", 4000))
        manager.process_relayed_request(9, "relayed", stranger.key)
    assert pending_ids(manager) == set(range(100, 100 + MAX_PENDING))
    assert caplog.text.count("pending queue full of protected requests") == 2


def test_pending_requests_expire_after_the_pending_ttl(nodes: Nodes) -> None:
    now = datetime.now(timezone.utc)
    seed_trust(
        f"{nodes.root}/n1",
        pending=(
            PendingHandshake(7, "", "old", now - timedelta(days=8), False, "127.0.0.7"),
            PendingHandshake(8, "", "new", now - timedelta(days=6), True, "relay"),
        ),
    )
    manager, runtime = nodes.make()
    manager.reap()
    assert pending_ids(manager) == {8}
    runtime.pending_ttl = 3600.0
    manager.reap()
    assert manager.pending_count() == 0
    assert runtime.events == []


def test_trust_history_and_sources_survive_a_restart(nodes: Nodes) -> None:
    registry = FakeRegistry()
    former = Peer(7)
    registry.keys[7] = former.key
    manager, _ = nodes.make(registry=registry)
    manager.process_message(former.data(HANDSHAKE_REQUEST, OWN), ("127.0.0.7", 4000))
    assert manager.approve_handshake(7)
    manager.revoke_trust(7)
    manager.process_relayed_request(7, "again", former.key)
    manager.close()
    state = load_state(f"{nodes.root}/n1/trust.json")
    assert [(f.node_id, f.public_key) for f in state.history.values()] == [(7, former.key)]
    assert [(p.node_id, p.source) for p in state.pending.values()] == [(7, "relay")]
    again, _ = nodes.make(registry=registry)
    assert again._state._protected == {7}  # not observable without filling the queue
    # Trusted again: the record speaks for it, the history entry goes.
    assert again.approve_handshake(7)
    assert load_state(f"{nodes.root}/n1/trust.json").history == {}


def test_trust_history_is_protected_only_for_the_key_we_trusted(nodes: Nodes) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, Peer(7).key, T0),))
    manager, _ = nodes.make()
    manager.revoke_trust(7)
    impostor = Peer(7)
    manager.process_message(impostor.data(HANDSHAKE_REQUEST, OWN), ("127.0.0.7", 4000))
    assert pending_ids(manager) == {7}
    assert manager._state._protected == set()  # not observable without filling the queue


def test_trust_history_is_bounded(nodes: Nodes) -> None:
    seed_trust(
        f"{nodes.root}/n1",
        trusted=tuple(TrustRecord(n, Peer(n).key, T0) for n in range(10, 15)),
    )
    manager, _ = nodes.make(max_trust_history=3)
    for node in range(10, 15):
        manager.revoke_trust(node)
    assert sorted(load_state(f"{nodes.root}/n1/trust.json").history) == [12, 13, 14]


# SPEC 6 / 15: the per-source pending quota


def test_spec15_pending_quota_per_source_counts_unbound_requests_only(nodes: Nodes) -> None:
    registry = FakeRegistry()  # knows only node 30's key: the others are unbound
    vouched = Peer(30)
    registry.keys[30] = vouched.key
    manager, _ = nodes.make(registry=registry, max_pending_per_source=2)
    for node in (20, 21, 22):
        manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert [p.node_id for p in manager.pending_requests()] == [20, 21]
    # The quota keeps one host from filling the queue with invented identities; a request
    # the registry vouches for is not one of those.
    manager.process_message(vouched.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert [(p.node_id, p.bound) for p in manager.pending_requests()] == [
        (20, False),
        (21, False),
        (30, True),
    ]


def test_spec15_pending_quota_per_source_is_per_address_not_per_port(nodes: Nodes) -> None:
    manager, _ = nodes.make(max_pending_per_source=2)
    for port, node in zip((40001, 40002, 40003), (20, 21, 22)):
        manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), ("127.0.0.1", port))
    assert [p.node_id for p in manager.pending_requests()] == [20, 21]
    manager.process_message(Peer(22).data(HANDSHAKE_REQUEST, OWN), ("127.0.1.2", 40003))
    assert [p.node_id for p in manager.pending_requests()] == [20, 21, 22]
