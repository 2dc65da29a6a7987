"""Resource attacks against real pilot-handshaked processes (issue 4, item 2): junk floods,
invented identities filling the pending queue, an oversized message, and idle connections
held against the per-source and the global connection caps (SPEC 15). Attackers bind to
other loopback addresses (127.0.2.2, 127.0.10.1 ...) so the daemon sees other hosts.
"""

from __future__ import annotations

import json
import re
import time

from pilothandshake.client import ControlClient
from pilothandshake.constants import (
    EVICT_AFTER,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_SOURCE,
    MAX_MESSAGE_SIZE,
    MAX_PENDING,
)
from pilothandshake.messages import HANDSHAKE_REQUEST
from pilothandshake.registry.client import RegistryConnection

from .attacker import IdleConnections, Peer, Trickle, flood, junk, send_raw, source_address
from .conftest import Fleet, Node, wait_until

OWN = 9
PEER = 7


def log_lines(node: Node) -> int:
    return len(node.stderr.splitlines())


def dropped_in_log(node: Node) -> int:
    """Drops the daemon accounted for: one per drop line plus the summarised counts."""
    log = node.stderr
    summarised = sum(int(n) for n in re.findall(r"(\d+) more dropped messages were not", log))
    return log.count("dropped message from") + summarised


def timed_status(node: Node) -> float:
    """Seconds the control socket takes to answer ``status``."""
    started = time.monotonic()
    response = ControlClient(node.socket_path, timeout=5.0).request("status")
    assert response["status"] == "ok", response
    return time.monotonic() - started


def test_legitimate_request_is_processed_after_10000_junk_messages(fleet: Fleet) -> None:
    node = fleet.node("d", node_id=OWN, max_connections_per_source=64).start()
    lines_before = log_lines(node)
    payloads = junk(10_000, Peer(66), OWN)
    sources = [source_address(i) for i in range(8)]
    started = time.monotonic()
    counts = flood(node.port, payloads, sources, timeout=40.0)
    elapsed = time.monotonic() - started
    assert counts["unsent"] == 0 and counts["open"] == 0, counts
    assert counts["closed"] == 10_000, counts  # every one read (a refused one sent again)

    peer = Peer(PEER)
    assert send_raw(node.port, peer.data(HANDSHAKE_REQUEST, OWN, justification="real")) == (
        "closed"
    )
    wait_until(lambda: node.pending() == {PEER}, what="the legitimate request is pending")
    assert node.stop() == 0  # flushes the count of drop lines not logged
    # Every message was dropped and accounted for (logged or counted); none changed state.
    assert dropped_in_log(node) == 10_000
    state = json.loads((node.directory / "trust.json").read_text())
    assert [p["node_id"] for p in state.get("pending", [])] == [PEER]
    assert state["trusted"] in (None, [])
    # Rate-limited: 10 drop lines a second plus one summary a second, not 10,000 lines.
    grown = log_lines(node) - lines_before
    print(f"10,000 junk messages in {elapsed:.1f} s; the log grew by {grown} lines")
    assert grown < 12 * (elapsed + 3) + 20, (grown, elapsed)


def test_invented_identities_cannot_keep_a_registry_bound_peer_out_of_a_full_queue(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    node = fleet.node("d", registry).start()
    own = node.node_id
    # 300 self-signed requests from identities the registry never heard of, 15 from each of
    # 20 source addresses (under the per-source quota of 16 unbound pending requests).
    invented = [Peer(100_000 + i) for i in range(300)]
    payloads = [p.data(HANDSHAKE_REQUEST, own, justification="let me in") for p in invented]
    counts = flood(node.port, payloads, [source_address(i) for i in range(20)], timeout=40.0)
    assert counts["closed"] == 300, counts  # every one read
    node.settle()  # and decided
    before = {int(p["node_id"]): p for p in node.control("pending")["pending"]}
    assert len(before) == MAX_PENDING
    assert ": pending queue full" in node.stderr  # the 44 beyond it were dropped

    real = Peer(0)
    client = RegistryConnection(registry.address, real.identity.sign, timeout=5.0)
    try:
        real.node_id = int(client.register("127.0.0.1:1", real.key)["node_id"])
    finally:
        client.close()
    assert send_raw(node.port, real.data(HANDSHAKE_REQUEST, own, justification="real")) == (
        "closed"
    )
    wait_until(lambda: real.node_id in node.pending(), what="the bound request evicts one")
    pending = node.pending()
    assert len(pending) == MAX_PENDING
    [evicted] = set(before) - pending  # exactly one invented identity made room ...
    assert f"evicted the request of node {evicted}" in node.stderr
    oldest = min(p["received_at"] for p in before.values())
    assert before[evicted]["received_at"] == oldest  # ... one of the oldest (1 s resolution)
    # Still responsive: the control socket answers at once, and an approval works.
    assert timed_status(node) < 1.0
    node.control("approve", node_id=real.node_id)
    assert node.trusted() == {real.node_id}


def test_message_one_byte_over_64_kib_is_dropped_and_64_kib_is_read(fleet: Fleet) -> None:
    node = fleet.node("d", node_id=OWN).start()
    peer = Peer(PEER)

    def sized(size: int) -> bytes:
        base = len(peer.data(HANDSHAKE_REQUEST, OWN, justification=""))
        data = peer.data(HANDSHAKE_REQUEST, OWN, justification="x" * (size - base))
        assert len(data) == size
        return data

    # Refused unread past the cap: the daemon resets (or closes) without waiting 10 s.
    started = time.monotonic()
    assert send_raw(node.port, sized(MAX_MESSAGE_SIZE + 1)) in ("closed", "reset")
    assert time.monotonic() - started < 2.0
    wait_until(lambda: "message too large" in node.stderr, what="the too-large drop line")
    assert node.pending() == set()

    assert send_raw(node.port, sized(MAX_MESSAGE_SIZE)) == "closed"
    wait_until(lambda: node.pending() == {PEER}, what="a message of exactly 64 KiB is read")
    [pending] = node.control("pending")["pending"]
    assert len(pending["justification"]) == 1024  # stored truncated to 1 KiB


def test_idle_connections_from_one_host_do_not_delay_a_handshake_from_another(
    fleet: Fleet,
) -> None:
    a, b = fleet.direct_pair(b_config={"trust": {"auto_approve": True}})
    with IdleConnections(b.port, 300, "127.0.0.2") as idle:
        # Only the per-source cap (16) is admitted; the rest are reset at once, unread.
        wait_until(lambda: len(idle.open_ones(settle=0.1)) <= 16, what="the surplus refused")
        assert len(idle.open_ones(settle=0.1)) == 16
        started = time.monotonic()
        a.control("handshake", node_id=OWN, justification="from 127.0.0.1")
        wait_until(lambda: a.trusted() == {OWN} and b.trusted() == {PEER}, timeout=2.0)
        assert time.monotonic() - started < 2.0
        assert "connection limit reached" in b.stderr


def age_past_evict_after(opened: float) -> None:
    """Wait until connections opened at ``opened`` (monotonic) may be evicted."""
    wait_until(
        lambda: time.monotonic() - opened > EVICT_AFTER + 0.1,
        timeout=EVICT_AFTER + 1.0,
        what="the held connections to age past EVICT_AFTER",
    )


def test_at_the_global_cap_a_newcomer_evicts_the_oldest_idle_connection(fleet: Fleet) -> None:
    node = fleet.node("d", node_id=OWN, max_connections=20, max_connections_per_source=4).start()
    sources = [source_address(i) for i in range(5)]  # 5 hosts x 4 = the global cap of 20
    holders = []
    try:
        for source in sources:
            holders.append(IdleConnections(node.port, 4, source))
        assert sum(len(h.open_ones(settle=0.3)) for h in holders) == 20
        age_past_evict_after(time.monotonic())

        # A newcomer from yet another host is served at once: the oldest idle one makes room.
        started = time.monotonic()
        data = Peer(PEER).data(HANDSHAKE_REQUEST, OWN, justification="newcomer")
        assert send_raw(node.port, data, source_address(6), wait=5.0) == "closed"
        assert time.monotonic() - started < 2.0
        wait_until(lambda: node.pending() == {PEER}, what="the newcomer's request pending")
        first, *others = holders
        assert first.socks[0] not in first.open_ones(settle=0.5)  # the oldest was evicted
        assert len(first.open_ones(settle=0.0)) == 3
        assert sum(len(h.open_ones(settle=0.0)) for h in others) == 16
        wait_until(lambda: f"evicted 1 open over {EVICT_AFTER:g} s" in node.stderr)
        assert timed_status(node) < 1.0  # the operator is never locked out
    finally:
        for holder in holders:
            holder.close()


def test_slowloris_over_17_hosts_at_the_default_caps_does_not_keep_a_handshake_out(
    fleet: Fleet,
) -> None:
    """17 hosts x 16 connections, each trickling one byte a second and reconnecting when
    ended: more than the 256-connection cap, held full the whole time. A real handshake
    from another host still completes within 2 s (issue 11 item 4)."""
    a, b = fleet.direct_pair(b_config={"trust": {"auto_approve": True}})
    hosts = MAX_CONNECTIONS // MAX_CONNECTIONS_PER_SOURCE + 1
    sources = [source_address(i) for i in range(hosts)]
    with Trickle(b.port, sources, MAX_CONNECTIONS_PER_SOURCE) as attack:
        attack.open_all()
        opened = time.monotonic()
        # The cap is full: the surplus is refused (or, on a slow machine, made room by
        # evicting the first ones, which then reconnect).
        # A loaded machine may still hold some in the accept backlog: wait until the daemon
        # has taken or refused every one.
        wait_until(
            lambda: attack.open_ones(settle=0.2) == MAX_CONNECTIONS,
            timeout=15.0,
            what="the cap full and the surplus refused",
        )
        attack.start()
        age_past_evict_after(opened)

        started = time.monotonic()
        a.control("handshake", node_id=OWN, justification="from 127.0.0.1")
        wait_until(lambda: a.trusted() == {OWN} and b.trusted() == {PEER}, timeout=2.0)
        assert time.monotonic() - started < 2.0
        # Refusal lines come at most once a second, counting what happened since the last.
        wait_until(
            lambda: re.search(r"evicted [1-9]\d* open over", b.stderr),
            what="a refusal line counting evictions",
        )


def test_one_host_flooding_valid_requests_fills_only_its_own_quotas(fleet: Fleet) -> None:
    """Self-signed requests from invented identities, all from 127.0.2.2: that host (its
    /24) gets at most 16 pending requests and its replay quota; a request from 127.0.0.1
    still gets in."""
    node = fleet.node("d", node_id=OWN, max_replay_per_source=64).start()
    invented = [Peer(200_000 + i) for i in range(100)]
    payloads = [p.data(HANDSHAKE_REQUEST, OWN, justification="me too") for p in invented]
    counts = flood(node.port, payloads, ["127.0.2.2"], timeout=30.0)
    assert counts["closed"] == 100, counts
    node.settle()
    held = node.pending()
    assert len(held) == 16
    assert "too many pending requests from this source address" in node.stderr

    # A pending node updating its own request needs no pending slot, only a replay entry:
    # 127.0.2.2 has used its 64, so it is dropped there; the same update from 127.0.0.1
    # gets in. (Sleep past the one-second drop-log window, so its line is not suppressed.)
    time.sleep(1.1)
    sender = next(p for p in invented if p.node_id in held)
    update = sender.data(HANDSHAKE_REQUEST, OWN, justification="updated")
    assert send_raw(node.port, update, "127.0.2.2") == "closed"
    wait_until(lambda: "replay set full for this source address" in node.stderr)
    assert {p["justification"] for p in node.control("pending")["pending"]} == {"me too"}
    assert send_raw(node.port, update, "127.0.0.1") == "closed"
    wait_until(
        lambda: "updated" in {p["justification"] for p in node.control("pending")["pending"]},
        what="the update from another host is applied",
    )

    peer = Peer(PEER)
    assert send_raw(node.port, peer.data(HANDSHAKE_REQUEST, OWN, justification="real")) == (
        "closed"
    )
    wait_until(lambda: PEER in node.pending(), what="the other host's request pending")
    assert len(node.pending()) == 17
