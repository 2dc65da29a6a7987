"""Withdrawing a request with ``untrust`` (issue 11 item 10e), with real daemons and the real
``pilot-handshakectl``: A asks B, B keeps it pending, A's ``untrust B`` cancels it and tells
B (a revoke signed with the key of A's own pending request), so B's operator can no longer
approve it into a one-sided trust. ``untrust`` of a node never asked still fails.
"""

from __future__ import annotations

from pilothandshake.messages import HANDSHAKE_REVOKE

from .attacker import Peer, send_raw
from .conftest import Fleet, Node, wait_until


def pending_justifications(node: Node) -> dict[int, str]:
    return {int(p["node_id"]): p["justification"] for p in node.control("pending")["pending"]}


def test_untrust_of_a_pending_request_withdraws_it_at_the_peer(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry).start()
    b = fleet.node("b", registry, public=True).start()  # A reaches B directly
    stray = fleet.node("c", registry).start()  # a node A never asks
    a_id, b_id = a.node_id, b.node_id

    assert a.control("handshake", node_id=b_id, justification="please")["status"] == "sent"
    wait_until(lambda: b.pending() == {a_id}, what="A's request pending at B")

    # Someone else claiming A's node ID, with a key of its own, cannot withdraw it.
    impostor = Peer(a_id)
    forged = impostor.data(HANDSHAKE_REVOKE, b_id, reason="request withdrawn")
    assert send_raw(b.port, forged, "127.0.0.2") == "closed"
    wait_until(lambda: f"dropped message from node {a_id} at 127.0.0.2" in b.stderr)
    assert b.pending() == {a_id}

    done = a.ctl("untrust", str(b_id))
    assert done.returncode == 0, done.stderr
    assert "request withdrawn" in done.stdout
    wait_until(lambda: b.pending() == set(), what="B drops A's withdrawn request")
    assert "withdrew our request to node" in a.stderr

    late = b.ctl("approve", str(a_id))
    assert late.returncode == 1
    assert "nothing pending" in late.stderr
    assert a.trusted() == set() and b.trusted() == set()
    # Withdrawn once: a second untrust has nothing to cancel.
    again = a.ctl("untrust", str(b_id))
    assert again.returncode == 1 and "not trusted" in again.stderr

    never = a.ctl("untrust", str(stray.node_id))
    assert never.returncode == 1
    assert "not trusted" in never.stderr
    assert stray.pending() == set()
    # The withdrawal and the refusals left no trace in the registry's relay or the events.
    assert "trust.changed" not in b.topics()


def test_untrust_withdraws_a_request_that_went_through_the_relay(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry).start()
    b = fleet.node("b", registry).start()  # private: A's request goes through the relay
    a_id, b_id = a.node_id, b.node_id
    assert a.control("handshake", node_id=b_id, justification="please")["status"] == "relayed"
    wait_until(lambda: b.pending() == {a_id}, what="A's relayed request pending at B")

    done = a.ctl("untrust", str(b_id))
    assert done.returncode == 0, done.stderr
    assert "request withdrawn" in done.stdout
    wait_until(lambda: b.pending() == set(), timeout=5.0, what="B drops A's withdrawn request")
