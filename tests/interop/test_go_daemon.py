"""pilot-handshaked beside the real (Go) Pilot daemon, both at the Go registry.

The Go daemon speaks port 444 only inside its UDP overlay (encrypted tunnels); pilot-handshaked
speaks it over plain TCP. Neither can reach the other's port 444, so every message between
them travels through the registry relay: a request (``request_handshake``) and an accept or
reject (``respond_handshake``). The relay carries no revoke: see the last test.
"""

from __future__ import annotations

import json
import os
import shutil

from integration.conftest import wait_until

from .conftest import GoFleet


def test_a_go_daemon_request_is_approved_by_a_python_daemon(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    py = gofleet.node("py", registry).start()
    go = gofleet.go_daemon("go", registry).start()
    py_id, go_id = py.node_id, go.node_id

    # pilotctl's direct dial fails (the Python node is private), so the Go daemon relays.
    assert go.pilotctl("handshake", str(py_id), "from go")["status"] == "sent"
    assert "handshake relayed via registry" in go.stderr
    wait_until(lambda: py.pending() == {go_id}, what="the Go request pending at the Python node")
    [pending] = py.control("pending")["pending"]
    assert pending["justification"] == "from go"
    assert pending["public_key"] == go.key  # bound to the Go identity through the registry

    py.control("approve", node_id=go_id)
    assert py.trusted() == {go_id}
    [record] = py.control("trust")["trusted"]
    assert record["public_key"] == go.key
    # The Go daemon learns of the approval on its next poll and fetches the key.
    wait_until(
        lambda: go.trusted().get(py_id, {}).get("public_key") == py.key,
        what="the Go daemon trusts the Python node under its key",
    )
    assert go.trusted()[py_id]["mutual"] is True
    assert f'trust established via relayed approval" peer_node_id={py_id}' in go.stderr


def test_a_python_request_is_approved_by_a_go_daemon_with_pilotctl(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    go = gofleet.go_daemon("go", registry).start()
    py = gofleet.node("py", registry).start()
    py_id, go_id = py.node_id, go.node_id

    assert py.control("handshake", node_id=go_id, justification="from python")["status"] == (
        "relayed"
    )
    wait_until(lambda: py_id in go.pending(), what="the Python request pending at the Go daemon")
    assert go.pending()[py_id]["justification"] == "from python"

    # `pilotctl approve` relays the accept at once, then also dials the Python node over the
    # overlay, which only times out (about 30 s) when the registry already lets it resolve
    # the node: the tests do not wait for that call to return.
    go.pilotctl_background("approve", str(py_id))
    wait_until(lambda: py.trusted() == {go_id}, what="the Go approval reaches the Python node")
    assert py_id in go.trusted()
    [record] = py.control("trust")["trusted"]
    assert record["public_key"] == go.key


def test_a_go_daemon_rejection_reaches_the_python_requester(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    go = gofleet.go_daemon("go", registry).start()
    py = gofleet.node("py", registry).start()
    py_id, go_id = py.node_id, go.node_id
    py.control("handshake", node_id=go_id, justification="please")
    wait_until(lambda: py_id in go.pending(), what="the request pending at the Go daemon")
    go.pilotctl("reject", str(py_id), "not today")
    # The relay carries only "rejected" (no reason) back to the requester.
    wait_until(
        lambda: f"node {go_id} rejected our request" in py.stderr,
        what="the rejection reaches the Python node",
    )
    assert py.trusted() == set() and go.trusted() == {}
    # Our request ended rejected (the Go registry drops the reason): a wait ends at once.
    [request] = py.control("requests")["requests"]
    assert (request["state"], request["reason"]) == ("rejected", "")
    assert py.control("wait", node_id=go_id, timeout=30) == {
        "node_id": go_id,
        "trusted": False,
        "rejected": True,
        "reason": "",
    }


def test_a_revoke_reaches_the_go_registry_but_not_the_go_daemon(gofleet: GoFleet) -> None:
    # A known limit, pinned here so that a change in either program shows up: a revoke
    # travels only on port 444 (TCP here, the overlay in Go) and the registry relay has no
    # revoke message, so between a Go and a Python node it reaches the registry alone.
    registry = gofleet.go_registry()
    py = gofleet.node("py", registry).start()
    go = gofleet.go_daemon("go", registry).start()
    py_id, go_id = py.node_id, go.node_id
    go.pilotctl("handshake", str(py_id), "pair up")
    wait_until(lambda: py.pending() == {go_id}, what="pending at the Python node")
    py.control("approve", node_id=go_id)
    wait_until(lambda: py_id in go.trusted(), what="the Go daemon trusts the Python node")

    py.control("untrust", node_id=go_id)
    assert py.trusted() == set()
    wait_until(
        lambda: f'"trust pair revoked" node_a={py_id} node_b={go_id}' in registry.stderr,
        what="the registry drops the trust pair",
    )
    assert py_id in go.trusted()


def test_a_go_identity_moved_to_pilothandshake_keeps_its_node_id(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    peer = gofleet.node("peer", registry).start()
    go = gofleet.go_daemon("go", registry).start()
    go_id, go_key, peer_id = go.node_id, go.key, peer.node_id
    go.pilotctl("handshake", str(peer_id), "before the move")
    wait_until(lambda: peer.pending() == {go_id}, what="pending at the peer")
    peer.control("approve", node_id=go_id)
    trust_json = go.directory / "trust.json"
    wait_until(
        lambda: trust_json.exists() and peer.key in trust_json.read_text(),
        what="the Go daemon writes the peer (with its key) to trust.json",
    )
    assert go.stop() == 0

    # identity.json and trust.json move as they are: the formats are the same (SPEC 4, 10).
    moved_dir = gofleet.root / "moved"
    moved_dir.mkdir(mode=0o700)
    for name in ("identity.json", "trust.json"):
        shutil.copy2(go.directory / name, moved_dir / name)
        os.chmod(moved_dir / name, 0o600)
    moved = gofleet.node("moved", registry)
    assert moved.key == go_key
    moved.start()

    assert moved.node_id == go_id
    assert f'"registered node" node_id={go_id} listen={moved.address} ' in registry.stderr
    [record] = moved.control("trust")["trusted"]
    assert record["node_id"] == peer_id and record["public_key"] == peer.key
    # The Go registry still holds the pair the Go daemon made: the moved node may resolve
    # its private peer.
    client = registry.client(moved.identity)
    try:
        assert client.resolve(peer_id, go_id)["real_addr"] == peer.address
    finally:
        client.close()


def test_a_pilothandshake_identity_moved_to_the_go_daemon_keeps_its_node_id(
    gofleet: GoFleet,
) -> None:
    registry = gofleet.go_registry()
    py = gofleet.node("py", registry).start()
    py_id = py.node_id
    assert py.stop() == 0
    go = gofleet.go_daemon("go", registry)
    shutil.copy2(py.directory / "identity.json", go.identity_path)
    go.start()
    assert go.node_id == py_id
    assert json.loads(go.identity_path.read_text())["public_key"] == py.key
    assert go.pilotctl("info")["public_key"] == py.key


def test_crossed_requests_between_go_and_python_approve_each_other(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    go = gofleet.go_daemon("go", registry).start()
    py = gofleet.node("py", registry).start()
    py_id, go_id = py.node_id, go.node_id
    py.control("handshake", node_id=go_id, justification="crossed")
    go.pilotctl("handshake", str(py_id), "crossed")
    # Each side holds an outgoing request when the other's arrives: no operator needed.
    wait_until(lambda: py.trusted() == {go_id}, what="the Python node trusts the Go node")
    wait_until(lambda: py_id in go.trusted(), what="the Go daemon trusts the Python node")
    assert py.pending() == set() and go.pending() == {}
