"""``registry.state``'s limits: registers per source, mutations per node and per source
prefix, the node and vouch caps (SPEC 11, pilot-registryd's ``limits``)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fakeruntime import TickClock
from registrytools import Peer, lookup, refused

from pilothandshake.identity import Identity
from pilothandshake.registry.challenges import (
    set_visibility_challenge,
)
from pilothandshake.registry.config import RegistryLimits
from pilothandshake.registry.state import Registry

# -- register: 10 new keys per source address per minute --------------------------------


def test_register_is_rate_limited_per_source_and_known_keys_are_exempt(
    clock: TickClock, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(clock=clock)  # the default limits: 10 a minute
    peers = [Peer(registry, source="10.0.0.1") for _ in range(10)]
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


# -- round 3: every mutating request rate-limited, caps (SPEC 15, 17) -------------------


def test_mutations_are_limited_per_node_and_per_source_prefix(clock: TickClock) -> None:
    limits = RegistryLimits(
        register_per_minute=100, mutations_per_minute_per_node=5, mutations_per_minute_per_source=12
    )
    registry = Registry(limits=limits, clock=clock, wall=clock)
    # Each registration spends a token of its source (10.0.0.0/24 here).
    a = Peer(registry, 4001, source="10.0.0.1")
    b = Peer(registry, 4002, source="10.0.0.2")
    c = Peer(registry, 4003, source="10.0.1.1")
    src = {a: "10.0.0.1", b: "10.0.0.2", c: "10.0.1.1"}

    def toggle(peer: Peer, public: bool) -> dict[str, Any]:
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
    limits = RegistryLimits(mutations_per_minute_per_node=1, mutations_per_minute_per_source=10**6)
    registry = Registry(limits=limits, clock=clock, wall=clock)
    a, b = Peer(registry, 4001), Peer(registry, 4002)
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
    registry = Registry(limits=RegistryLimits(register_per_minute=100, max_nodes=3), clock=clock)
    peers = [Peer(registry, 4000 + i) for i in range(3)]
    extra = Identity.generate()
    request = {"type": "register", "listen_addr": "127.0.0.1:1", "public_key": extra.public_key_b64}
    assert registry.handle(request, "127.0.0.1") == {"type": "error", "error": "request failed"}
    # Known nodes still come back.
    assert peers[0].register()["node_id"] == peers[0].node_id


def test_vouches_beyond_max_vouches_per_node_are_refused_and_relaying_goes_on(
    clock: TickClock,
) -> None:
    limits = RegistryLimits(register_per_minute=100, max_vouches_per_node=2)
    registry = Registry(limits=limits, clock=clock, wall=clock)
    a, *others = [Peer(registry, 4000 + i) for i in range(5)]
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
