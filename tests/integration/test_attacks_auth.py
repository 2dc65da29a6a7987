"""Attacks on authentication against real pilot-handshaked processes (issue 4, item 2):
forged, unsigned, mis-keyed, replayed, rewritten and out-of-window port-444 messages, sent
raw by ``attacker``. Every test checks the daemon's state through its control socket, waits
for the drop line the daemon logs (so the attack was processed, not merely not yet seen),
and ends with a control that shows the same setup honours the genuine message.
"""

from __future__ import annotations

import base64
import json
import time

from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    handshake_challenge,
)
from pilothandshake.registry.challenges import (
    heartbeat_challenge,
    poll_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
)
from pilothandshake.registry.client import RegistryConnection

from .attacker import Capture, Peer, rewrite, send_raw
from .conftest import Fleet, Node, wait_until

OWN = 9  # the daemon under attack
PEER = 7  # the node whose identity the attacker claims


def wait_drops(node: Node, reason: str, count: int = 1) -> None:
    """Wait until the daemon logged ``count`` drops with ``reason`` (it processed them)."""
    wait_until(
        lambda: node.stderr.count(reason) >= count,
        what=f"{count} drop(s) {reason!r} in {node.name}'s log",
    )


def daemon_with_outgoing(fleet: Fleet, capture: Capture) -> Node:
    """Node 9 that has sent a request to node 7 (whose port 444 is ``capture``)."""
    node = fleet.node("d", node_id=OWN, peers={PEER: capture.address}).start()
    assert node.control("handshake", node_id=PEER, justification="hi")["status"] == "sent"
    capture.wait_for(HANDSHAKE_REQUEST)
    return node


def daemon_trusting(fleet: Fleet, capture: Capture, peer: Peer) -> Node:
    """Node 9 that trusts ``peer`` (node 7) with its key pinned in the trust record."""
    node = daemon_with_outgoing(fleet, capture)
    assert send_raw(node.port, peer.data(HANDSHAKE_ACCEPT, OWN)) == "closed"
    wait_until(lambda: node.trusted() == {PEER}, what="trust in node 7")
    [record] = node.control("trust")["trusted"]
    assert record["public_key"] == peer.key
    return node


def test_strict_daemon_ignores_unsigned_accepts_to_its_own_request(fleet: Fleet) -> None:
    peer = Peer(PEER)
    with Capture(receipts=peer) as capture:
        node = daemon_with_outgoing(fleet, capture)
        unsigned = [
            peer.data(HANDSHAKE_ACCEPT, OWN, v2=False, public_key=""),  # Go: no key, no checks
            peer.data(HANDSHAKE_ACCEPT, OWN, v2=False),  # a key but no signature
            peer.data(HANDSHAKE_ACCEPT, OWN, v2=False, legacy=True),  # Go's replayable one
        ]
        for data in unsigned:
            assert send_raw(node.port, data) == "closed"
        wait_drops(node, "public_key is not base64")
        wait_drops(node, "signature_v2 missing or invalid", 2)
        assert node.trusted() == set()

        assert send_raw(node.port, peer.data(HANDSHAKE_ACCEPT, OWN)) == "closed"
        wait_until(lambda: node.trusted() == {PEER}, what="the signed accept is believed")


def test_strict_daemon_ignores_unsigned_revokes(fleet: Fleet) -> None:
    peer = Peer(PEER)
    with Capture(receipts=peer) as capture:
        node = daemon_trusting(fleet, capture, peer)
        for data in (
            peer.data(HANDSHAKE_REVOKE, OWN, v2=False, public_key=""),
            peer.data(HANDSHAKE_REVOKE, OWN, v2=False),
            peer.data(HANDSHAKE_REVOKE, OWN, v2=False, legacy=True),
        ):
            assert send_raw(node.port, data) == "closed"
        wait_drops(node, "public_key is not base64")
        wait_drops(node, "signature_v2 missing or invalid", 2)
        assert node.trusted() == {PEER}

        assert send_raw(node.port, peer.data(HANDSHAKE_REVOKE, OWN)) == "closed"
        wait_until(lambda: node.trusted() == set(), what="the signed revoke is applied")
        assert "trust.revoked_by_peer" in node.topics()


def test_accept_without_an_outgoing_request_grants_nothing(fleet: Fleet) -> None:
    node = fleet.node("d", node_id=OWN).start()
    assert send_raw(node.port, Peer(PEER).data(HANDSHAKE_ACCEPT, OWN)) == "closed"
    wait_drops(node, "accept without an outgoing request")
    assert node.trusted() == set()
    assert "handshake.approved" not in node.topics()


def test_revoke_signed_by_a_key_other_than_the_pinned_one_is_dropped(fleet: Fleet) -> None:
    peer = Peer(PEER)
    impostor = Peer(PEER)  # same node ID, its own key
    with Capture(receipts=peer) as capture:
        node = daemon_trusting(fleet, capture, peer)
        # Signed (validly) with the impostor's own key: the pin must stop it.
        assert send_raw(node.port, impostor.data(HANDSHAKE_REVOKE, OWN)) == "closed"
        wait_drops(node, "public key differs from the pinned key")
        # The pinned key in public_key, but the impostor's signature: verification stops it.
        forged = impostor.message(HANDSHAKE_REVOKE, OWN)
        forged.public_key = peer.key
        assert send_raw(node.port, forged.to_json()) == "closed"
        wait_drops(node, "signature_v2 missing or invalid")
        assert node.trusted() == {PEER}
        [record] = node.control("trust")["trusted"]
        assert record["public_key"] == peer.key

        assert send_raw(node.port, peer.data(HANDSHAKE_REVOKE, OWN)) == "closed"
        wait_until(lambda: node.trusted() == set(), what="the pinned key's revoke is applied")


def test_request_with_a_key_the_registry_does_not_have_for_that_node_is_dropped(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    node = fleet.node("d", registry).start()
    real = Peer(0)
    client = RegistryConnection(registry.address, real.identity.sign, timeout=5.0)
    try:
        real.node_id = int(client.register("127.0.0.1:1", real.key)["node_id"])
    finally:
        client.close()
    own = node.node_id
    impostor = Peer(real.node_id)

    assert send_raw(node.port, impostor.data(HANDSHAKE_REQUEST, own, justification="x")) == (
        "closed"
    )
    wait_drops(node, "public key differs from the registry's")
    assert node.pending() == set()

    assert send_raw(node.port, real.data(HANDSHAKE_REQUEST, own, justification="me")) == "closed"
    wait_until(lambda: node.pending() == {real.node_id}, what="the real node's request pending")
    [pending] = json.loads((node.directory / "trust.json").read_text())["pending"]
    assert pending["public_key"] == real.key and pending["bound"] is True
    # The registry-bound pending request pins the real key from now on.
    impostor2 = Peer(real.node_id)
    assert send_raw(node.port, impostor2.data(HANDSHAKE_REQUEST, own)) == "closed"
    wait_drops(node, "public key differs from the pinned key")
    [record] = node.control("pending")["pending"]
    assert record["public_key"] == real.key


def test_replayed_and_rewritten_captured_messages_are_dropped(fleet: Fleet) -> None:
    """A man in the middle on plain TCP 444 captures A's genuine request to B; replaying it,
    retyping it into a revoke, or refreshing its timestamp must change nothing at B."""
    b = fleet.node("b", node_id=OWN)
    with Capture(forward_to=b.port) as mitm:
        a = fleet.node("a", node_id=PEER, peers={OWN: mitm.address})
        b.config["peers"] = {PEER: a.address}
        b.write_config()
        a.start()
        b.start()
        assert a.control("handshake", node_id=OWN, justification="captured")["status"] == "sent"
        captured = mitm.wait_for(HANDSHAKE_REQUEST)
        wait_until(lambda: b.pending() == {PEER}, what="A's request pending at B")
        b.control("approve", node_id=PEER)
        wait_until(lambda: a.trusted() == {OWN}, what="A trusts B")
        assert b.trusted() == {PEER}

        # The captured request retyped: a revoke (or an accept) with the request's signature.
        assert send_raw(b.port, rewrite(captured, type=HANDSHAKE_REVOKE)) == "closed"
        assert send_raw(b.port, rewrite(captured, type=HANDSHAKE_ACCEPT)) == "closed"
        wait_drops(b, "signature_v2 missing or invalid", 2)
        assert b.trusted() == {PEER}

        a.control("untrust", node_id=OWN)
        wait_until(lambda: b.trusted() == set(), what="A's genuine revoke reaches B")

        # Now the request would create a pending entry again, if it were believed.
        assert send_raw(b.port, captured) == "closed"
        wait_drops(b, "replayed message")
        fresh = rewrite(captured, timestamp=int(time.time()) + 1)
        assert send_raw(b.port, fresh) == "closed"
        wait_drops(b, "signature_v2 missing or invalid", 3)
        assert b.pending() == set() and b.trusted() == set()


def test_stale_and_future_timestamps_are_dropped(fleet: Fleet) -> None:
    node = fleet.node("d", node_id=OWN).start()
    peer = Peer(PEER)
    now = int(time.time())
    for timestamp in (now - 5 * 60 - 30, now + 90):
        data = peer.data(HANDSHAKE_REQUEST, OWN, justification="when?", timestamp=timestamp)
        assert send_raw(node.port, data) == "closed"
    wait_drops(node, "outside the window", 2)
    assert node.pending() == set()

    in_window = peer.data(HANDSHAKE_REQUEST, OWN, justification="now", timestamp=now - 60)
    assert send_raw(node.port, in_window) == "closed"
    wait_until(lambda: node.pending() == {PEER}, what="a request inside the window is pending")


def test_no_private_key_or_signature_is_ever_logged(fleet: Fleet) -> None:
    """A full handshake, a revoke and a few drops at log_level debug: the logs hold neither
    private key nor any signature value that crossed port 444 (in base64 or hex)."""
    a = fleet.node("a", node_id=PEER)
    b = fleet.node("b", node_id=OWN)
    with Capture(forward_to=b.port) as to_b, Capture(forward_to=a.port) as to_a:
        a.config["peers"] = {OWN: to_b.address}
        b.config["peers"] = {PEER: to_a.address}
        a.write_config()
        b.write_config()
        a.start()
        b.start()
        a.control("handshake", node_id=OWN, justification="log me")
        wait_until(lambda: b.pending() == {PEER}, what="pending at B")
        b.control("approve", node_id=PEER)
        wait_until(lambda: a.trusted() == {OWN}, what="A trusts B")
        captured = to_b.wait_for(HANDSHAKE_REQUEST)
        assert send_raw(b.port, captured) == "closed"  # replay: dropped
        assert send_raw(b.port, rewrite(captured, type=HANDSHAKE_REVOKE)) == "closed"
        stranger = Peer(5)
        assert send_raw(a.port, stranger.data(HANDSHAKE_ACCEPT, PEER)) == "closed"
        a.control("untrust", node_id=OWN)
        wait_until(lambda: b.trusted() == set(), what="B sees the revoke")
        signatures = [*to_b.signatures(), *to_a.signatures()]
    assert a.stop() == 0 and b.stop() == 0
    logs = a.stderr + a.stdout + b.stderr + b.stdout
    assert logs.count("dropped message") >= 3 and "trusted node" in logs  # debug logs exist

    assert len(signatures) >= 3  # request, accept, revoke at least
    secrets: list[str] = []
    for node in (a, b):
        identity = json.loads((node.directory / "identity.json").read_text())
        private = identity["private_key"]
        raw = base64.b64decode(private)
        secrets += [private, raw.hex(), base64.b64encode(raw[:32]).decode()]
    for signature in signatures:
        secrets += [signature, base64.b64decode(signature).hex()]
    for secret in secrets:
        assert secret not in logs
        assert secret[:24] not in logs  # not even a prefix


def test_no_registry_credential_is_logged_on_the_relay_path(fleet: Fleet) -> None:
    """Two private nodes meet through the registry relay at log_level debug. Ed25519 is
    deterministic, so the test recomputes every signature the nodes sent the registry
    (``handshake:<S>:<R>`` is a reusable relay credential) and finds none in any log."""
    registry = fleet.registry().start()
    a = fleet.node("a", registry).start()
    b = fleet.node("b", registry).start()
    ida, idb = a.node_id, b.node_id
    assert a.control("handshake", node_id=idb, justification="relay me")["status"] == "relayed"
    wait_until(lambda: b.pending() == {ida}, what="relayed request pending at B")
    b.control("approve", node_id=ida)
    wait_until(lambda: a.trusted() == {idb}, what="relayed approval reaches A")
    a.control("untrust", node_id=idb)
    assert a.stop() == 0 and b.stop() == 0 and registry.stop() == 0
    logs = a.stderr + a.stdout + b.stderr + b.stdout + registry.stderr + registry.stdout
    assert "relay" in logs or "registered" in logs  # the logs are there

    secrets = []
    for node, own, peer in ((a, ida, idb), (b, idb, ida)):
        for challenge in (
            handshake_challenge(own, peer),
            respond_challenge(own, peer),
            poll_challenge(own),
            heartbeat_challenge(own),
            report_trust_challenge(own, peer),
            revoke_trust_challenge(own, peer),
            resolve_challenge(own, peer),
        ):
            signature = node.identity.sign(challenge)
            secrets += [base64.b64encode(signature).decode(), signature.hex()]
        private = json.loads((node.directory / "identity.json").read_text())["private_key"]
        secrets += [private, base64.b64decode(private).hex()]
    for secret in secrets:
        assert secret[:24] not in logs
