"""The embedded registry's rules, driven through ``Registry.handle`` with plain dicts and a
fake clock: resolve gating by vouches, register rate limits, bounded inboxes, hostnames,
log lines that carry no raw client strings."""

from __future__ import annotations

import logging
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from fakeruntime import TickClock
from registrypeer import ROOMY, RegistryPeer

from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import (
    register_challenge,
    set_hostname_challenge,
    set_visibility_challenge,
)
from pilothandshake.registry.config import Limits, parse_networks
from pilothandshake.registry.state import Registry
from pilothandshake.registry.storage import Store

HOUR = 3600.0


@pytest.fixture
def clock() -> TickClock:
    return TickClock()


@pytest.fixture
def registry(clock: TickClock) -> Registry:
    return Registry(limits=ROOMY, clock=clock, wall=clock)


def refused(answer: dict[str, Any], why: str = "") -> bool:
    return answer["type"] == "error" and why in answer["error"]


# -- resolve: only the target's vouch opens its address (issue 11 items 2, 10c) -------------


def test_attackers_report_trust_lets_only_the_victim_resolve_the_attacker(
    registry: Registry,
) -> None:
    victim, attacker = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    assert attacker.report_trust(victim.node_id)["type"] == "report_trust_ok"
    assert refused(attacker.resolve(victim.node_id), "may not resolve private node")
    assert victim.resolve(attacker.node_id)["real_addr"] == attacker.addr


def test_unrequested_accept_does_not_let_the_responder_resolve(registry: Registry) -> None:
    victim, attacker = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    assert attacker.respond(victim.node_id, True)["type"] == "respond_handshake_ok"
    assert refused(attacker.resolve(victim.node_id), "may not resolve")
    # Even together with its own report_trust and a relayed request of its own.
    attacker.report_trust(victim.node_id)
    attacker.request(victim.node_id)
    assert refused(attacker.resolve(victim.node_id), "may not resolve")


def test_each_way_a_target_vouches_lets_the_requester_resolve_it(registry: Registry) -> None:
    # Reported trust.
    a, b = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    b.report_trust(a.node_id)
    assert a.resolve(b.node_id)["real_addr"] == b.addr
    # Accepted a relayed request: the requester may then resolve the acceptor.
    c, d = RegistryPeer(registry, 4003), RegistryPeer(registry, 4004)
    c.request(d.node_id)
    d.poll()
    d.respond(c.node_id, True)
    assert c.resolve(d.node_id)["real_addr"] == d.addr
    # Sent a relayed request: its target may dial it back.
    e, f = RegistryPeer(registry, 4005), RegistryPeer(registry, 4006)
    e.request(f.node_id)
    assert f.resolve(e.node_id)["real_addr"] == e.addr
    assert refused(e.resolve(f.node_id), "may not resolve")
    # A rejection vouches for nothing.
    g, h = RegistryPeer(registry, 4007), RegistryPeer(registry, 4008)
    h.respond(g.node_id, False)
    assert refused(g.resolve(h.node_id), "may not resolve")


def test_shared_network_or_public_opens_resolve_without_a_vouch(clock: TickClock) -> None:
    registry = Registry(
        networks=parse_networks({5: [1, 2]}, "test"),
        limits=ROOMY,
        clock=clock,
        wall=clock,
    )
    a, b, c = (
        RegistryPeer(registry, 4001),
        RegistryPeer(registry, 4002),
        RegistryPeer(registry, 4003),
    )
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
    a, b = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    a.report_trust(b.node_id)
    b.report_trust(a.node_id)
    assert a.revoke_trust(b.node_id)["type"] == "revoke_trust_ok"
    assert refused(a.resolve(b.node_id), "may not resolve")
    assert refused(b.resolve(a.node_id), "may not resolve")
    assert refused(b.revoke_trust(a.node_id), "no trust pair 2-1 to revoke")


def test_vouches_survive_a_restart_with_their_direction(tmp_path: Path, clock: TickClock) -> None:
    path = str(tmp_path / "registry.json")
    registry = Registry(Store(path), limits=ROOMY, clock=clock, wall=clock)
    a, b = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
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


# -- register: 10 new keys per source address per minute --------------------------------


def test_register_is_rate_limited_per_source_and_known_keys_are_exempt(
    clock: TickClock, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(clock=clock)  # the default limits: 10 a minute
    peers = [RegistryPeer(registry, source="10.0.0.1") for _ in range(10)]
    fresh = Identity.generate()
    request = {"type": "register", "listen_addr": "10.0.0.1:1", "public_key": fresh.public_key_b64}
    with caplog.at_level(logging.INFO, logger="pilothandshake.registry"):
        for _ in range(50):
            answer = registry.handle(request, "10.0.0.1")
            assert answer == {"type": "error", "error": "request failed"}
    # The refusals were logged, but not 50 times.
    lines = [r for r in caplog.records if "register rate limit" in r.getMessage()]
    assert 1 <= len(lines) <= 10
    # A node already registered comes back whenever it likes, signed (SPEC 17); unsigned,
    # it pays like a new key, so nobody can re-register someone else's key for free.
    assert peers[0].register(source="10.0.0.1")["node_id"] == peers[0].node_id
    unsigned = {
        "type": "register",
        "listen_addr": "10.0.0.1:2",
        "public_key": peers[0].identity.public_key_b64,
    }
    assert registry.handle(unsigned, "10.0.0.1") == {"type": "error", "error": "request failed"}
    # Another source has its own bucket; this one refills at 10 a minute.
    assert registry.handle(request | {"listen_addr": "10.0.0.2:1"}, "10.0.0.2")["node_id"] == 11
    other = Identity.generate().public_key_b64
    request2 = {"type": "register", "listen_addr": "10.0.0.1:1", "public_key": other}
    assert registry.handle(request2, "10.0.0.1")["type"] == "error"
    clock.now += 6.1
    assert registry.handle(request2, "10.0.0.1")["type"] == "register_ok"


# -- relay inboxes: 1 KiB, 24 h, one per sender, 100 per node -----------------------------


def test_justification_is_cut_to_1_kib_on_a_utf8_boundary(registry: Registry) -> None:
    a, b = RegistryPeer(registry), RegistryPeer(registry)
    assert a.request(b.node_id, "é" * 2000)["type"] == "request_handshake_ok"
    [entry] = b.poll()["requests"]
    assert entry["justification"] == "é" * 512
    assert len(entry["justification"].encode()) == 1024


def test_inbox_entries_expire_after_24_hours(registry: Registry, clock: TickClock) -> None:
    a, b = RegistryPeer(registry), RegistryPeer(registry)
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
    a, b = RegistryPeer(registry), RegistryPeer(registry)
    b.respond(a.node_id, False)
    b.respond(a.node_id, True)
    [response] = a.poll()["responses"]
    assert response["accept"] is True


def test_2000_relayed_requests_of_60_kb_stay_small(clock: TickClock) -> None:
    """Issue 11 item 2: 2,000 relayed requests of 60 KB grew the registry by 115 MiB."""
    registry = Registry(limits=ROOMY, clock=clock, wall=clock)
    targets = [RegistryPeer(registry) for _ in range(20)]
    senders = [RegistryPeer(registry) for _ in range(100)]
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
    a, b = RegistryPeer(registry), RegistryPeer(registry)
    a.request(b.node_id, "y" * 60_000)
    size = path.stat().st_size
    for _ in range(50):
        b.poll()
        assert a.request(b.node_id, "y" * 60_000)["type"] == "request_handshake_ok"
    assert path.stat().st_size == size < 4096


# -- hostnames (SPEC 11) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "-a", "a-", "A", "a_b", "a.b", "a" * 64, "localhost", "backbone", "broadcast", "é"],
)
def test_invalid_or_reserved_hostnames_are_refused(registry: Registry, name: str) -> None:
    peer = RegistryPeer(registry)
    answer = peer.set_hostname(name)
    if name == "":
        assert answer == {"type": "set_hostname_ok", "node_id": peer.node_id, "hostname": ""}
    else:
        assert refused(
            answer, "reserved" if name in ("localhost", "backbone", "broadcast") else "invalid"
        )


def test_hostnames_are_unique_set_cleared_and_resolved(registry: Registry) -> None:
    a, b = RegistryPeer(registry), RegistryPeer(registry)
    ok = a.set_hostname("agent-b")
    assert ok == {"type": "set_hostname_ok", "node_id": a.node_id, "hostname": "agent-b"}
    assert refused(b.set_hostname("agent-b"), f"taken by node {a.node_id}")
    assert a.set_hostname("a" * 63)["hostname"] == "a" * 63  # renaming frees the old name
    assert b.set_hostname("agent-b")["type"] == "set_hostname_ok"
    found = registry.handle({"type": "resolve_hostname", "hostname": "agent-b"}, "10.9.9.9")
    assert (found["node_id"], found["public"], found["hostname"]) == (b.node_id, False, "agent-b")
    lookup = registry.handle({"type": "lookup", "node_id": b.node_id}, "10.9.9.9")
    assert lookup["hostname"] == "agent-b"
    assert b.set_hostname("")["hostname"] == ""
    assert "hostname" not in registry.handle({"type": "lookup", "node_id": b.node_id}, "x")
    assert refused(
        registry.handle({"type": "resolve_hostname", "hostname": "agent-b"}, "x"),
        "'agent-b' is not registered",
    )
    # Only the node's own signature sets its name.
    forged = b.ask(
        {
            "type": "set_hostname",
            "node_id": a.node_id,
            "hostname": "mine",
            "signature": b.sig(set_hostname_challenge(a.node_id)),
        }
    )
    assert refused(forged, "bad signature")


def test_register_sets_a_free_hostname_and_skips_a_taken_one(registry: Registry) -> None:
    first, second = Identity.generate(), Identity.generate()

    def register(ident: Identity, name: str) -> dict[str, Any]:
        request = {
            "type": "register",
            "listen_addr": "127.0.0.1:1",
            "public_key": ident.public_key_b64,
            "hostname": name,
        }
        return registry.handle(request, "127.0.0.1")

    assert register(first, "alpha")["hostname"] == "alpha"
    taken = register(second, "alpha")
    assert taken["type"] == "register_ok" and "hostname" not in taken
    assert "taken by node 1" in taken["hostname_error"]
    invalid = register(second, "Not_Valid")
    assert "hostname" not in invalid and "invalid" in invalid["hostname_error"]
    # Re-registering without a name keeps the one set; with its own name, answers it.
    assert "hostname" not in register(first, "")
    assert register(first, "alpha")["hostname"] == "alpha"
    lookup = registry.handle({"type": "lookup", "node_id": 1}, "127.0.0.1")
    assert lookup["hostname"] == "alpha"


def test_hostnames_survive_a_restart(tmp_path: Path, clock: TickClock) -> None:
    path = str(tmp_path / "registry.json")
    registry = Registry(Store(path), clock=clock)
    peer = RegistryPeer(registry)
    peer.set_hostname("kept")
    registry.close()
    restarted = Registry(Store(path), clock=clock)
    found = restarted.handle({"type": "resolve_hostname", "hostname": "kept"}, "x")
    assert found["node_id"] == peer.node_id


# -- errors and log lines ---------------------------------------------------------------


def test_errors_say_why_in_the_production_shape(registry: Registry) -> None:
    peer = RegistryPeer(registry)
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


# -- round 3: a directory, not an authority (SPEC 17, issue 15 item 1) -------------------


def lookup(registry: Registry, node_id: int) -> dict[str, Any]:
    return registry.handle({"type": "lookup", "node_id": node_id}, "10.9.9.9")


def test_unsigned_register_of_a_known_key_changes_nothing(
    registry: Registry, clock: TickClock
) -> None:
    victim, other = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    assert victim.register(hostname="build-agent")["hostname"] == "build-agent"
    victim.report_trust(other.node_id)  # so that other may resolve the victim
    # What the attacker read from a lookup: the victim's key. It re-registers it from its
    # own host with a sink address and another name.
    forged = {
        "type": "register",
        "listen_addr": "10.66.6.6:9",
        "public_key": victim.identity.public_key_b64,
        "hostname": "x",
        "owner": "someone",
    }
    answer = registry.handle(forged, "10.66.6.6")
    assert answer["node_id"] == victim.node_id
    assert "hostname" not in answer and "changes nothing" in answer["hostname_error"]
    assert lookup(registry, victim.node_id)["hostname"] == "build-agent"
    assert other.resolve(victim.node_id)["real_addr"] == victim.addr
    found = registry.handle({"type": "resolve_hostname", "hostname": "build-agent"}, "x")
    assert found["node_id"] == victim.node_id
    assert refused(registry.handle({"type": "resolve_hostname", "hostname": "x"}, "x"))
    # Not even liveness: an offline victim stays offline until it signs something.
    clock.now += 3 * 60 + 1
    assert refused(lookup(registry, victim.node_id), "not online")
    registry.handle(forged, "10.66.6.6")
    assert refused(lookup(registry, victim.node_id), "not online")
    assert victim.heartbeat()["type"] == "heartbeat_ok"
    assert lookup(registry, victim.node_id)["public_key"] == victim.identity.public_key_b64


def test_a_signed_register_moves_the_nodes_own_record(registry: Registry) -> None:
    node, other = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    node.report_trust(other.node_id)
    node.addr = "127.0.0.1:4999"
    answer = node.register(hostname="moved")
    assert (answer["node_id"], answer["hostname"]) == (node.node_id, "moved")
    assert answer["features"] == ["wait_poll"]
    assert other.resolve(node.node_id)["real_addr"] == "127.0.0.1:4999"
    assert lookup(registry, node.node_id)["hostname"] == "moved"


def test_a_stale_or_foreign_register_signature_is_refused_and_changes_nothing(
    registry: Registry, clock: TickClock
) -> None:
    node = RegistryPeer(registry, 4001)
    node.register(hostname="kept")
    stale = node.register(stamp=int(time.time()) - 301, hostname="stale")
    assert refused(stale, "from the registry's clock (more than 300 s): check the node's clock")
    future = node.register(stamp=int(time.time()) + 301, hostname="future")
    assert refused(future, "more than 300 s")
    # Signed by another key over the victim's key and a fresh time.
    intruder = Identity.generate()
    stamp, key = int(time.time()), node.identity.public_key_b64
    foreign = {
        "type": "register",
        "listen_addr": "10.66.6.6:9",
        "public_key": key,
        "hostname": "stolen",
        "timestamp": stamp,
        "signature": b64encode(intruder.sign(register_challenge(key, stamp))),
    }
    assert refused(registry.handle(foreign, "10.66.6.6"), "bad register signature")
    assert refused(registry.handle(dict(foreign, timestamp="now"), "x"), "timestamp")
    assert lookup(registry, node.node_id)["hostname"] == "kept"


def test_owner_never_binds_a_node_id_to_another_key(registry: Registry) -> None:
    first, second = Identity.generate(), Identity.generate()
    ids = []
    for identity in (first, second):
        request = {
            "type": "register",
            "listen_addr": "127.0.0.1:1",
            "public_key": identity.public_key_b64,
            "owner": "alice@example.com",
        }
        ids.append(registry.handle(request, "127.0.0.1")["node_id"])
    assert ids == [1, 2]
    assert lookup(registry, 1)["public_key"] == first.public_key_b64


# -- round 3: every mutating request rate-limited, caps (SPEC 15, 17) -------------------


def test_mutations_are_limited_per_node_and_per_source_prefix(clock: TickClock) -> None:
    limits = Limits(
        register_per_minute=100, mutations_per_minute_per_node=5, mutations_per_minute_per_source=12
    )
    registry = Registry(limits=limits, clock=clock, wall=clock)
    # Each registration spends a token of its source (10.0.0.0/24 here).
    a = RegistryPeer(registry, 4001, source="10.0.0.1")
    b = RegistryPeer(registry, 4002, source="10.0.0.2")
    c = RegistryPeer(registry, 4003, source="10.0.1.1")
    src = {a: "10.0.0.1", b: "10.0.0.2", c: "10.0.1.1"}

    def toggle(peer: RegistryPeer, public: bool) -> dict[str, Any]:
        request = {
            "type": "set_visibility",
            "node_id": peer.node_id,
            "public": public,
            "signature": peer.sig(set_visibility_challenge(peer.node_id)),
        }
        return registry.handle(request, src[peer])

    # a has 5 tokens of its own.
    answers = [toggle(a, i % 2 == 0)["type"] for i in range(6)]
    assert answers == ["set_visibility_ok"] * 5 + ["error"]
    # b shares a's /24 (12 tokens: 2 spent registering, 6 by a, its refused one too): 4
    # more, then the source is empty even though b's own bucket is not.
    answers = [toggle(b, i % 2 == 0)["type"] for i in range(4)]
    assert answers == ["set_visibility_ok"] * 4
    assert toggle(b, True) == {"type": "error", "error": "request failed"}
    # Another /24 has its own bucket.
    assert toggle(c, True)["type"] == "set_visibility_ok"
    # Forged requests in b's name from elsewhere spend the forger's source, never b's node.
    clock.now += 60
    for _ in range(10):
        forged = {
            "type": "set_visibility",
            "node_id": b.node_id,
            "public": False,
            "signature": c.sig(set_visibility_challenge(b.node_id)),
        }
        registry.handle(forged, "10.0.2.1")
    assert [toggle(b, i % 2 == 0)["type"] for i in range(5)] == ["set_visibility_ok"] * 5
    # Reads are never limited.
    assert all(lookup(registry, a.node_id)["type"] == "lookup_ok" for _ in range(50))


def test_every_mutating_request_spends_a_token(clock: TickClock) -> None:
    limits = Limits(mutations_per_minute_per_node=1, mutations_per_minute_per_source=10**6)
    registry = Registry(limits=limits, clock=clock, wall=clock)
    a, b = RegistryPeer(registry, 4001), RegistryPeer(registry, 4002)
    calls = {
        "register": lambda: a.register(),
        "set_hostname": lambda: a.set_hostname("a"),
        "set_visibility": lambda: a.ask(
            {
                "type": "set_visibility",
                "node_id": a.node_id,
                "public": True,
                "signature": a.sig(set_visibility_challenge(a.node_id)),
            }
        ),
        "report_trust": lambda: a.report_trust(b.node_id),
        "revoke_trust": lambda: a.revoke_trust(b.node_id),
        "request_handshake": lambda: a.request(b.node_id),
        "respond_handshake": lambda: a.respond(b.node_id, True),
    }
    for name, call in calls.items():
        clock.now += 60  # a full bucket: one token
        a.heartbeat(), b.heartbeat()
        b.report_trust(a.node_id)  # so that a revoke has a pair to remove
        first = call()
        assert first["type"] != "error", (name, first)
        assert call() == {"type": "error", "error": "request failed"}, name
    # Polls, lookups, resolves and heartbeats are not mutations.
    assert a.poll()["type"] == "poll_handshakes_ok"
    assert a.heartbeat()["type"] == "heartbeat_ok"


def test_new_keys_beyond_max_nodes_are_refused(clock: TickClock) -> None:
    registry = Registry(limits=Limits(register_per_minute=100, max_nodes=3), clock=clock)
    peers = [RegistryPeer(registry, 4000 + i) for i in range(3)]
    extra = Identity.generate()
    request = {"type": "register", "listen_addr": "127.0.0.1:1", "public_key": extra.public_key_b64}
    assert registry.handle(request, "127.0.0.1") == {"type": "error", "error": "request failed"}
    # Known nodes still come back.
    assert peers[0].register()["node_id"] == peers[0].node_id


def test_vouches_beyond_max_vouches_per_node_are_refused_and_relaying_goes_on(
    clock: TickClock,
) -> None:
    limits = Limits(register_per_minute=100, max_vouches_per_node=2)
    registry = Registry(limits=limits, clock=clock, wall=clock)
    a, *others = [RegistryPeer(registry, 4000 + i) for i in range(5)]
    assert a.report_trust(others[0].node_id)["type"] == "report_trust_ok"
    assert a.report_trust(others[1].node_id)["type"] == "report_trust_ok"
    assert a.report_trust(others[0].node_id)["type"] == "report_trust_ok"  # already given
    assert refused(a.report_trust(others[2].node_id), "limits.max_vouches_per_node")
    # A relayed request still goes through, only without the vouch that opens resolve.
    assert a.request(others[2].node_id)["type"] == "request_handshake_ok"
    assert others[2].poll()["requests"][0]["from_node_id"] == a.node_id
    assert refused(others[2].resolve(a.node_id), "may not resolve")
    # Revoking frees a place.
    a.revoke_trust(others[0].node_id)
    assert a.report_trust(others[2].node_id)["type"] == "report_trust_ok"
