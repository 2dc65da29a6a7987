"""The embedded registry's rules, driven through ``Registry.handle`` with plain dicts and a
fake clock: resolve gating by vouches, bounded inboxes, log lines that carry no raw client
strings. Hostnames and a node's own record are in ``test_registry_records``, the limits in
``test_registry_limits``."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import pytest
from fakeruntime import TickClock
from registrytools import ROOMY, Peer, refused

from pilothandshake.identity import Identity
from pilothandshake.registry.challenges import (
    set_visibility_challenge,
)
from pilothandshake.registry.config import parse_networks
from pilothandshake.registry.state import Registry
from pilothandshake.registry.storage import Store

HOUR = 3600.0


# -- resolve: only the target's vouch opens its address (issue 11 items 2, 10c) -------------


def test_attackers_report_trust_lets_only_the_victim_resolve_the_attacker(
    registry: Registry,
) -> None:
    victim, attacker = Peer(registry, 4001), Peer(registry, 4002)
    assert attacker.report_trust(victim.node_id)["type"] == "report_trust_ok"
    assert refused(attacker.resolve(victim.node_id), "may not resolve private node")
    assert victim.resolve(attacker.node_id)["real_addr"] == attacker.addr


def test_unrequested_accept_does_not_let_the_responder_resolve(registry: Registry) -> None:
    victim, attacker = Peer(registry, 4001), Peer(registry, 4002)
    assert attacker.respond(victim.node_id, True)["type"] == "respond_handshake_ok"
    assert refused(attacker.resolve(victim.node_id), "may not resolve")
    # Even together with its own report_trust and a relayed request of its own.
    attacker.report_trust(victim.node_id)
    attacker.request(victim.node_id)
    assert refused(attacker.resolve(victim.node_id), "may not resolve")


def test_each_way_a_target_vouches_lets_the_requester_resolve_it(registry: Registry) -> None:
    # Reported trust.
    a, b = Peer(registry, 4001), Peer(registry, 4002)
    b.report_trust(a.node_id)
    assert a.resolve(b.node_id)["real_addr"] == b.addr
    # Accepted a relayed request: the requester may then resolve the acceptor.
    c, d = Peer(registry, 4003), Peer(registry, 4004)
    c.request(d.node_id)
    d.poll()
    d.respond(c.node_id, True)
    assert c.resolve(d.node_id)["real_addr"] == d.addr
    # Sent a relayed request: its target may dial it back.
    e, f = Peer(registry, 4005), Peer(registry, 4006)
    e.request(f.node_id)
    assert f.resolve(e.node_id)["real_addr"] == e.addr
    assert refused(e.resolve(f.node_id), "may not resolve")
    # A rejection vouches for nothing.
    g, h = Peer(registry, 4007), Peer(registry, 4008)
    h.respond(g.node_id, False)
    assert refused(g.resolve(h.node_id), "may not resolve")


def test_shared_network_or_public_opens_resolve_without_a_vouch(clock: TickClock) -> None:
    registry = Registry(
        networks=parse_networks({5: [1, 2]}, "test"),
        limits=ROOMY,
        clock=clock,
        wall=clock,
    )
    a, b, c = Peer(registry, 4001), Peer(registry, 4002), Peer(registry, 4003)
    assert a.resolve(b.node_id)["real_addr"] == b.addr
    assert refused(c.resolve(a.node_id), "may not resolve")
    a.ask(
        {
            "type": "set_visibility",
            "node_id": a.node_id,
            "public": True,
            "signature": a.sig(set_visibility_challenge(a.node_id)),
        }
    )
    assert c.resolve(a.node_id)["real_addr"] == a.addr


def test_revoke_by_either_side_removes_the_pair_both_ways(registry: Registry) -> None:
    a, b = Peer(registry, 4001), Peer(registry, 4002)
    a.report_trust(b.node_id)
    b.report_trust(a.node_id)
    assert a.revoke_trust(b.node_id)["type"] == "revoke_trust_ok"
    assert refused(a.resolve(b.node_id), "may not resolve")
    assert refused(b.resolve(a.node_id), "may not resolve")
    assert refused(b.revoke_trust(a.node_id), "no trust pair 2-1 to revoke")


def test_vouches_survive_a_restart_with_their_direction(tmp_path: Path, clock: TickClock) -> None:
    path = str(tmp_path / "registry.json")
    registry = Registry(Store(path), limits=ROOMY, clock=clock, wall=clock)
    a, b = Peer(registry, 4001), Peer(registry, 4002)
    a.report_trust(b.node_id)
    registry.close()
    restarted = Registry(Store(path), limits=ROOMY, clock=clock, wall=clock)
    a.registry = b.registry = restarted
    assert b.resolve(a.node_id)["real_addr"] == a.addr
    assert refused(a.resolve(b.node_id), "may not resolve")


def test_version_1_store_pairs_are_read_as_vouched_both_ways(tmp_path: Path) -> None:
    keys = [Identity.generate() for _ in range(2)]
    path = tmp_path / "registry.json"
    nodes = ",".join(
        f'{{"node_id":{i + 1},"public_key":"{k.public_key_b64}","real_addr":"127.0.0.1:{i}",'
        '"public":false}'
        for i, k in enumerate(keys)
    )
    path.write_text(f'{{"version":1,"next_id":3,"nodes":[{nodes}],"trust":[[1,2]]}}')
    state = Store(str(path)).load()
    assert state.vouches == {(1, 2), (2, 1)}
    assert state.next_id == 3


# -- relay inboxes: 1 KiB, 24 h, one per sender, 100 per node -----------------------------


def test_justification_is_cut_to_1_kib_on_a_utf8_boundary(registry: Registry) -> None:
    a, b = Peer(registry), Peer(registry)
    assert a.request(b.node_id, "é" * 2000)["type"] == "request_handshake_ok"
    [entry] = b.poll()["requests"]
    assert entry["justification"] == "é" * 512
    assert len(entry["justification"].encode()) == 1024


def test_inbox_entries_expire_after_24_hours(registry: Registry, clock: TickClock) -> None:
    a, b = Peer(registry), Peer(registry)
    a.request(b.node_id)
    b.respond(a.node_id, False)
    clock.now += 24 * HOUR - 1
    for peer in (a, b):  # heartbeats keep both online
        assert peer.heartbeat()["type"] == "heartbeat_ok"
    # Still there just before; a second request from a still waits.
    assert refused(a.request(b.node_id), "already waits")
    clock.now += 2
    for peer in (a, b):
        assert peer.heartbeat()["type"] == "heartbeat_ok"
    assert (b.poll()["requests"], a.poll()["responses"]) == ([], [])
    assert registry.inbox_entries() == 0


def test_responses_keep_one_per_sender(registry: Registry) -> None:
    a, b = Peer(registry), Peer(registry)
    b.respond(a.node_id, False)
    b.respond(a.node_id, True)
    [response] = a.poll()["responses"]
    assert response["accept"] is True


def test_2000_relayed_requests_of_60_kb_stay_small(clock: TickClock) -> None:
    """Issue 11 item 2: 2,000 relayed requests of 60 KB grew the registry by 115 MiB."""
    registry = Registry(limits=ROOMY, clock=clock, wall=clock)
    targets = [Peer(registry) for _ in range(20)]
    senders = [Peer(registry) for _ in range(100)]
    text = "x" * 60_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for target in targets:
            for sender in senders:
                assert sender.request(target.node_id, text)["type"] == "request_handshake_ok"
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert registry.inbox_entries() == 2000
    # 2,000 entries of at most 1 KiB of text and a few small fields each.
    assert grown < 8 * 1024 * 1024, f"grew {grown} bytes"


def test_store_does_not_grow_with_relayed_traffic(tmp_path: Path, clock: TickClock) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY, clock=clock, wall=clock)
    a, b = Peer(registry), Peer(registry)
    a.request(b.node_id, "y" * 60_000)
    size = path.stat().st_size
    for _ in range(50):
        b.poll()
        assert a.request(b.node_id, "y" * 60_000)["type"] == "request_handshake_ok"
    assert path.stat().st_size == size < 4096


# -- errors and log lines ---------------------------------------------------------------


def test_errors_say_why_in_the_production_shape(registry: Registry) -> None:
    peer = Peer(registry)
    assert peer.ask({"type": "lookup", "node_id": 99}) == {
        "type": "error",
        "error": "node 99 is not online",
    }
    assert peer.request(99) == {"type": "error", "error": "node 99 is not online"}


def test_a_type_holding_a_newline_cannot_forge_a_log_line(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "x\n2030-01-01 00:00:00 WARNING pilothandshake.manager: trusted node 7"
    long_value = "z" * 10_000
    with caplog.at_level(logging.DEBUG, logger="pilothandshake.registry"):
        answer = registry.handle({"type": forged}, "127.0.0.1")
        registry.handle({"type": "lookup", "node_id": long_value}, "127.0.0.1")
        registry.handle(
            {
                "type": "register",
                "listen_addr": "evil\nhost:1",
                "public_key": Identity.generate().public_key_b64,
            },
            "127.0.0.1",
        )
    assert answer["type"] == "error"
    assert "\n" not in answer["error"]
    assert caplog.records
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message
        assert len(message) < 400
