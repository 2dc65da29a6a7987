"""Handshakes through the embedded registry: key binding, networks, the relay, outages."""

from __future__ import annotations

import signal

from pilothandshake.errors import RegistryError
from pilothandshake.registry.client import RegistryConnection

from .conftest import Fleet, Node, Registry, wait_until


def started(*nodes: Node) -> dict[str, int]:
    """Start the nodes one after the other (the registry numbers them 1, 2, ...)."""
    ids = {}
    for node in nodes:
        node.start()
        ids[node.name] = node.node_id
        assert ids[node.name] > 0, "the node registered during start()"
    return ids


def test_same_network_nodes_trust_each_other_automatically(fleet: Fleet) -> None:
    a = fleet.node("a")
    b = fleet.node("b")
    registry = fleet.registry(networks={3: [a.key, b.key]})
    for node in (a, b):
        node.config["registry"] = {
            "address": registry.address,
            "poll_interval": 0.2,
            "poll_idle": 0.2,
        }
        node.write_config()
    registry.start()
    ids = started(a, b)
    a.control("handshake", node_id=ids["b"], justification="same team")
    wait_until(lambda: b.trusted() == {ids["a"]}, what="B trusts A")
    wait_until(lambda: a.trusted() == {ids["b"]}, what="A trusts B")
    [record] = b.control("trust")["trusted"]
    assert record["network"] == 3
    reasons = [e["data"]["reason"] for e in b.events() if e["event"] == "handshake.auto_approved"]
    assert reasons == ["same_network"]


def test_registry_bound_allowlisted_agent_is_approved(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry, public=True)
    a.start()
    assert a.node_id == 1
    b = fleet.node(
        "b", registry, public=True, trust={"allowlist": [{"node_id": 1, "name": "deployer"}]}
    )
    b.start()
    a.control("handshake", node_id=b.node_id, justification="deploy")
    wait_until(lambda: b.trusted() == {1} and a.trusted() == {b.node_id}, what="trust")
    [event] = [e for e in b.events() if e["event"] == "handshake.auto_approved"]
    assert event["data"]["agent"] == "deployer"


def _registry_client(registry: Registry, node: Node) -> RegistryConnection:
    return RegistryConnection(registry.address, node.identity.sign, timeout=5.0)


def test_two_private_nodes_complete_the_handshake_through_the_relay(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry)
    b = fleet.node("b", registry)
    ids = started(a, b)
    # Neither is public, shares a network or has peers: only the relay can carry messages.
    assert a.control("handshake", node_id=ids["b"], justification="via relay")["status"] == (
        "relayed"
    )
    wait_until(lambda: b.pending() == {ids["a"]}, what="relayed request pending at B")
    [pending] = b.control("pending")["pending"]
    assert pending["justification"] == "via relay"
    b.control("approve", node_id=ids["a"])
    wait_until(lambda: a.trusted() == {ids["b"]}, what="relayed approval reaches A")
    assert b.trusted() == {ids["a"]}


def test_revoke_is_seen_by_both_sides_and_the_registry(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry)
    # Both private: A dials B's port 444 with the revoke through the registry's resolve,
    # which the trust pair still allows, because the registry hears of the revoke last.
    b = fleet.node("b", registry)
    ids = started(a, b)
    a.control("handshake", node_id=ids["b"], justification="pair up")
    wait_until(lambda: b.pending() == {ids["a"]}, what="pending at B")
    b.control("approve", node_id=ids["a"])
    wait_until(lambda: a.trusted() == {ids["b"]}, what="A trusts B")

    client = _registry_client(registry, b)
    try:
        # B may resolve private A only while the registry holds their trust pair.
        wait_until(lambda: _resolves(client, ids["a"], ids["b"]), what="trust pair")
        a.control("untrust", node_id=ids["b"])
        assert a.trusted() == set()
        wait_until(lambda: b.trusted() == set(), what="B sees the revoke")
        wait_until(lambda: not _resolves(client, ids["a"], ids["b"]), what="pair removed")
    finally:
        client.close()


def _resolves(client: RegistryConnection, target: int, requester: int) -> bool:
    try:
        client.resolve(target, requester)
    except RegistryError:
        return False
    return True


def test_direct_handshakes_work_while_the_registry_is_down_and_the_relay_resumes(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    # Legacy mode: with the registry unreachable nothing is registry-bound, and strict mode
    # (rightly) trusts nothing unbound when a registry is configured.
    a = fleet.node("a", registry, trust={"strict": False})
    b = fleet.node("b", registry, trust={"strict": False})
    ids = started(a, b)
    a.config["peers"] = {ids["b"]: b.address}
    b.config["peers"] = {ids["a"]: a.address}
    a.write_config()
    b.write_config()
    a.signal(signal.SIGHUP)
    b.signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in a.stderr and "config reloaded" in b.stderr)

    assert registry.stop() == 0
    wait_until(lambda: not a.status()["registry"]["reachable"], what="A notices the outage")
    assert a.control("handshake", node_id=ids["b"], justification="offline")["status"] == "sent"
    wait_until(lambda: b.pending() == {ids["a"]}, what="direct request pending at B")
    b.control("approve", node_id=ids["a"])
    wait_until(lambda: a.trusted() == {ids["b"]}, what="direct accept reaches A")

    registry.spawn()
    registry.wait_output("listening")
    wait_until(lambda: a.status()["registry"]["reachable"], timeout=20, what="A reconnects")
    c = fleet.node("c", registry)
    c.start()
    # C is private and has no peers entry: its request can only travel through the relay.
    assert c.control("handshake", node_id=ids["a"], justification="after outage")["status"] == (
        "relayed"
    )
    wait_until(lambda: c.node_id in a.pending(), timeout=20, what="A polls the relay again")


def test_relay_over_tls_with_a_pinned_registry_certificate(
    fleet: Fleet, tls_cert: tuple[str, str, str]
) -> None:
    cert, key, fingerprint = tls_cert
    registry = fleet.registry()
    registry.argv += ["--tls-cert", cert, "--tls-key", key]
    registry.start()
    pinned = {"tls": True, "fingerprint": fingerprint}
    a = fleet.node("a", registry, registry_options=pinned)
    b = fleet.node("b", registry, registry_options=pinned)
    ids = started(a, b)
    assert a.control("handshake", node_id=ids["b"], justification="over tls")["status"] == (
        "relayed"
    )
    wait_until(lambda: b.pending() == {ids["a"]}, what="relayed request pending at B")
    b.control("approve", node_id=ids["a"])
    wait_until(lambda: a.trusted() == {ids["b"]}, what="relayed approval reaches A")

    # A node pinning another certificate never talks to this registry.
    wrong = fleet.node("c", registry, registry_options={"tls": True, "fingerprint": "00" * 32})
    wrong.start()
    assert wrong.node_id == 0
    assert wrong.status()["registry"]["reachable"] is False
