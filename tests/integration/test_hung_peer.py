"""A peer that accepts TCP but never reads (issue 11 item 5, SPEC 3): the sender waits 2 s for
the receiver's end of stream, counts its absence as a failed send and relays the request; the
stopped daemon, once continued, gets the request by both paths and keeps it once."""

from __future__ import annotations

import signal
import time

from pilothandshake.constants import SEND_GRACE
from pilothandshake.identity import b64encode
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.client import RegistryConnection

from .attacker import Peer
from .conftest import Fleet, Registry, wait_until

_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def open_connections_to(port: int) -> int:
    """TCP connections on this machine whose local end is 127.0.0.1:``port``, the listening
    socket aside: a connection the daemon has not yet read and answered with its end of
    stream stays listed (established, or waiting for the daemon to close)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] != _LISTEN)


def relay_request(registry: Registry, to: int, justification: str) -> int:
    """Register a fresh identity with the registry and relay a request from it to ``to``;
    returns its node ID."""
    peer = Peer(0)
    client = RegistryConnection(registry.address, peer.identity.sign, timeout=5.0)
    try:
        peer.node_id = int(client.register("127.0.0.1:1", peer.key)["node_id"])
        signature = b64encode(peer.identity.sign(handshake_challenge(peer.node_id, to)))
        client.request_handshake(peer.node_id, to, justification, signature)
    finally:
        client.close()
    return peer.node_id


def test_request_to_a_stopped_daemon_falls_back_to_the_relay_and_arrives_once(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry).start()
    b = fleet.node("b", registry, public=True).start()  # public: A dials it directly first
    a_id, b_id = a.node_id, b.node_id

    b.signal(signal.SIGSTOP)
    try:
        # The stopped daemon's kernel still completes the TCP handshake and takes the bytes.
        started = time.monotonic()
        answer = a.control("handshake", node_id=b_id, justification="while you sleep")
        elapsed = time.monotonic() - started
        assert answer["status"] == "relayed", answer
        assert elapsed >= SEND_GRACE * 0.9  # it waited for the end of stream first
        assert open_connections_to(b.port) == 1  # the direct message, unread
    finally:
        b.signal(signal.SIGCONT)

    wait_until(lambda: a_id in b.pending(), what="B holds A's request after SIGCONT")
    # Both copies are processed before the events are counted: the direct one once B has
    # read it (its connection is gone), the relayed one once a request relayed after it
    # has arrived (B's poll hands the inbox over in arrival order).
    wait_until(lambda: open_connections_to(b.port) == 0, what="B read the direct message")
    marker = relay_request(registry, b_id, "after A")
    wait_until(lambda: marker in b.pending(), what="B polled past A's relayed request")

    [held] = [p for p in b.control("pending")["pending"] if p["node_id"] == a_id]
    assert held["justification"] == "while you sleep"
    about_a = [e for e in b.events() if e["data"].get("peer_node_id") == a_id]
    topics = [e["event"] for e in about_a]
    assert topics.count("handshake.received") == 1, about_a
    assert topics.count("handshake.pending") == 1, about_a
