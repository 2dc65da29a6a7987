"""Free registry identities against the pending queue, with real daemons (issue 11 item 1).

Registering at the registry costs nothing, so 300 fresh identities fill B's queue with
registry-bound requests: 64 direct from 127.0.0.1 (the address the real nodes send from),
64 direct from 127.0.3.3 (another /24: round 3 counts a source as its /24), the rest
relayed. Real nodes still get in as the rules say: the allowlisted agent and the network
peer are trusted (SPEC 6 rows 4 and 3), a formerly trusted node's request is protected (it
passes its source's full quota), a registered stranger from another /24 takes the place of
one from the fullest direct source (fairness; each relayed request is a source of its own
since round 3, so relayed ones are not taken). 300 more identities and a restart of B
change none of that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pilothandshake.constants import MAX_PENDING, MAX_PENDING_BOUND_PER_SOURCE
from pilothandshake.errors import RegistryError
from pilothandshake.identity import b64encode
from pilothandshake.messages import HANDSHAKE_REQUEST, handshake_challenge
from pilothandshake.registry.client import RegistryConnection

from .attacker import Peer, flood, send_raw
from .conftest import POLL, Fleet, Node, Registry, wait_until

NETWORK = 3
QUOTA = MAX_PENDING_BOUND_PER_SOURCE
REAL_SOURCE = "127.0.0.1"  # where the real daemons' connections come from
JUNK_SOURCE = "127.0.3.3"  # each source below in a /24 of its own (round 3)
LATE_SOURCE = "127.0.4.4"  # a fresh junk address, once the queue is full
STRANGER_SOURCE = "127.0.2.2"


@pytest.fixture
def registry_client(fleet: Fleet) -> Iterator[list[RegistryConnection]]:
    """A holder for the test's raw registry client, closed at the end."""
    clients: list[RegistryConnection] = []
    yield clients
    for client in clients:
        client.close()


def attach(node: Node, registry: Registry, public: bool = False) -> Node:
    node.config["registry"] = {
        "address": registry.address,
        "poll_interval": POLL,
        "poll_idle": POLL,
        "public": public,
    }
    node.write_config()
    return node


def register(client: RegistryConnection, count: int) -> list[Peer]:
    """``count`` fresh identities, each registered once (the attack: it costs nothing)."""
    peers = []
    for _ in range(count):
        peer = Peer(0)
        peer.node_id = int(client.register("127.0.0.1:1", peer.key)["node_id"])
        peers.append(peer)
    return peers


def relayed(client: RegistryConnection, peer: Peer, to: int, deadline: float) -> None:
    """Queue ``peer``'s relayed request to ``to``; the registry's inbox holds 100 requests
    and one per sender, so a refused one is sent again once B's poll has drained it."""
    signature = b64encode(peer.identity.sign(handshake_challenge(peer.node_id, to)))
    while True:
        try:
            client.request_handshake(peer.node_id, to, "free identity", signature)
            return
        except RegistryError as exc:
            # A full inbox answers the source over its share "request failed" (SPEC 17).
            assert str(exc) == "request failed" or "already waits" in str(exc), exc
            assert time.monotonic() < deadline, f"B's relay inbox never drained: {exc}"
            time.sleep(POLL / 2)


def relay_requests(client: RegistryConnection, peers: list[Peer], to: int) -> None:
    """One relayed request per identity, then wait until B has polled and decided them all:
    the last one is sent twice more, each accepted only once the previous copy was drained
    (B polls, decides every item, then polls again)."""
    deadline = time.monotonic() + 30.0
    for peer in peers:
        relayed(client, peer, to, deadline)
    for _ in range(2):
        relayed(client, peers[-1], to, deadline)


def direct_requests(b: Node, peers: list[Peer], to: int, source: str) -> None:
    payloads = [p.data(HANDSHAKE_REQUEST, to, justification="free identity") for p in peers]
    counts = flood(b.port, payloads, [source], timeout=60.0)
    assert counts["closed"] == len(peers), counts  # each one read
    b.settle()  # and decided, before anything else arrives


def held_count(pending: set[int], peers: list[Peer]) -> int:
    return sum(p.node_id in pending for p in peers)


def pending_count(node: Node) -> int:
    return int(node.status()["pending"])


def test_free_identities_do_not_push_real_nodes_out_of_the_pending_queue(
    fleet: Fleet, registry_client: list[RegistryConnection]
) -> None:
    agent = fleet.node("agent")  # allowlisted at B
    mate = fleet.node("mate")  # shares network 3 with B
    former = fleet.node("former")  # trusted by B before: in its trust history
    b = fleet.node("b")
    registry = fleet.registry(networks={NETWORK: [b.key, mate.key]}).start()
    for node in (agent, mate, former):
        attach(node, registry).start()
    b.config["trust"] = {
        "allowlist": [{"node_id": agent.node_id, "name": "deployer", "public_key": agent.key}]
    }
    attach(b, registry, public=True).start()  # public: the real nodes reach it directly
    own = b.node_id

    # The former peer: trusted by B, then revoked by B (it stays in B's trust history).
    former.control("handshake", node_id=own, justification="first time")
    wait_until(lambda: former.node_id in b.pending(), what="the former peer's first request")
    b.control("approve", node_id=former.node_id)
    wait_until(lambda: former.trusted() == {own}, what="the former peer trusts B")
    b.control("untrust", node_id=former.node_id)
    wait_until(lambda: former.trusted() == set(), what="the former peer hears the revoke")

    # The attack: 300 free identities, 64 direct from each of two addresses, 172 relayed.
    client = RegistryConnection(registry.address, None, timeout=5.0)
    registry_client.append(client)
    started = time.monotonic()
    junk = register(client, 300)
    direct_requests(b, junk[:QUOTA], own, REAL_SOURCE)
    direct_requests(b, junk[QUOTA : 2 * QUOTA], own, JUNK_SOURCE)
    relay_requests(client, junk[2 * QUOTA :], own)
    assert pending_count(b) == MAX_PENDING
    # 44 direct ones made room for relayed ones (each relayed request is its own source).
    assert "pending queue full: evicted" in b.stderr
    print(f"300 free identities filled the queue in {time.monotonic() - started:.1f} s")
    assert b.pending() <= {p.node_id for p in junk}

    # The real nodes ask (directly: B is public), and a registered stranger from 127.0.2.2.
    for node in (former, agent, mate):
        answer = node.control("handshake", node_id=own, justification=f"{node.name} here")
        assert answer["status"] == "sent", (node.name, answer)
    stranger = register(client, 1)[0]
    request = stranger.data(HANDSHAKE_REQUEST, own, justification="a stranger here")
    assert send_raw(b.port, request, STRANGER_SOURCE) == "closed"
    held = {former.node_id, stranger.node_id}
    granted = {agent.node_id, mate.node_id}
    wait_until(lambda: b.trusted() >= granted, what="the agent and the network peer trusted")
    # The former peer's address holds its full quota of free identities: only its
    # protection lets it in. The stranger's source holds nothing: it takes the place of
    # one from the fullest direct source (a relayed one is a source of its own).
    wait_until(lambda: b.pending() >= held, what="the former peer and the stranger pending")
    assert pending_count(b) == MAX_PENDING
    assert b.trusted() == granted
    reasons = {
        e["data"]["peer_node_id"]: e["data"]["reason"]
        for e in b.events()
        if e["event"] == "handshake.auto_approved"
    }
    assert reasons == {agent.node_id: "trusted_agent", mate.node_id: "same_network"}
    wait_until(lambda: agent.trusted() == mate.trusted() == {own}, what="B's accepts arrive")

    # 300 more: direct from both full addresses, direct from a fresh address (which takes
    # places from the two direct sources, the largest), relayed (each relayed request is a
    # source of its own since round 3: it takes a place from the fullest direct source, and
    # none is ever taken from it).
    relayed_before = held_count(b.pending(), junk[2 * QUOTA :])
    more = register(client, 300)
    direct_requests(b, more[:50], own, REAL_SOURCE)
    direct_requests(b, more[50:100], own, JUNK_SOURCE)
    direct_requests(b, more[100:200], own, LATE_SOURCE)
    fresh = held_count(b.pending(), more[100:200])
    full = [held_count(b.pending(), junk[:QUOTA]), held_count(b.pending(), junk[QUOTA : 2 * QUOTA])]
    assert 0 < fresh <= QUOTA and max(full) <= fresh + 1, (fresh, full)
    relay_requests(client, more[200:], own)
    pending = b.pending()
    assert len(pending) == MAX_PENDING
    assert pending >= held
    assert b.trusted() == granted
    assert not {p.node_id for p in more[:100]} & pending  # their sources held their share
    relayed = held_count(pending, junk[2 * QUOTA :])
    late_relayed = held_count(pending, more[200:])
    assert relayed == relayed_before  # no relayed request lost its place
    # Fair: every place was taken from the fullest direct source in turn.
    direct = [
        held_count(pending, junk[:QUOTA]),
        held_count(pending, junk[QUOTA : 2 * QUOTA]),
        held_count(pending, more[100:200]),
    ]
    assert max(direct) - min(direct) <= 1, direct
    # ... until every relayed newcomer had one, or no direct source held more than one.
    assert late_relayed == len(more[200:]) or max(direct) <= 1, (late_relayed, direct)
    assert sum(direct) + relayed + late_relayed + len(held) == MAX_PENDING
    print(f"600 free identities in {time.monotonic() - started:.1f} s")

    # A restart keeps every entry, the protected one included, and the trust records.
    b.restart()
    assert b.pending() == pending
    assert b.trusted() == granted
    # Still protected after the restart (from the persisted trust history): the former
    # peer's update passes its address's full quota.
    update = former.control("handshake", node_id=own, justification="former, updated")
    assert update["status"] == "sent"
    wait_until(
        lambda: any(
            p["justification"] == "former, updated" for p in b.control("pending")["pending"]
        ),
        what="the former peer's update",
    )
