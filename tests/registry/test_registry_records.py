"""``registry.state``: what a node's record holds and who may change it — hostnames (SPEC 11)
and a node's own record, moved only by a signed register (SPEC 17)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fakeruntime import TickClock
from registrytools import Peer, lookup, refused

from pilothandshake.identity import Identity, b64encode
from pilothandshake.registry.challenges import (
    register_challenge,
    set_hostname_challenge,
)
from pilothandshake.registry.state import Registry
from pilothandshake.registry.storage import Store

# -- hostnames (SPEC 11) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "-a", "a-", "A", "a_b", "a.b", "a" * 64, "localhost", "backbone", "broadcast", "é"],
)
def test_invalid_or_reserved_hostnames_are_refused(registry: Registry, name: str) -> None:
    peer = Peer(registry)
    answer = peer.set_hostname(name)
    if name == "":
        assert answer == {"type": "set_hostname_ok", "node_id": peer.node_id, "hostname": ""}
    else:
        assert refused(
            answer, "reserved" if name in ("localhost", "backbone", "broadcast") else "invalid"
        )


def test_hostnames_are_unique_set_cleared_and_resolved(registry: Registry) -> None:
    a, b = Peer(registry), Peer(registry)
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
    peer = Peer(registry)
    peer.set_hostname("kept")
    registry.close()
    restarted = Registry(Store(path), clock=clock)
    found = restarted.handle({"type": "resolve_hostname", "hostname": "kept"}, "x")
    assert found["node_id"] == peer.node_id


# -- round 3: a directory, not an authority (SPEC 17, issue 15 item 1) -------------------


def test_unsigned_register_of_a_known_key_changes_nothing(
    registry: Registry, clock: TickClock
) -> None:
    victim, other = Peer(registry, 4001), Peer(registry, 4002)
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
    node, other = Peer(registry, 4001), Peer(registry, 4002)
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
    node = Peer(registry, 4001)
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
