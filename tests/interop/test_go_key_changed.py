"""KEY CHANGED against the real (Go) registry (issue 15 item 5, SPEC 17).

The production registry re-binds a node ID to a new key when someone registers that node's
``owner`` string with the new key (``owner_key_update``). A pilot-handshaked that trusted the
node must not let the new key in quietly: the new key's request waits as KEY CHANGED, pins
nothing, and ``approve`` refuses it unless the operator names its fingerprint; the real
peer's own key keeps authenticating it.
"""

from __future__ import annotations

import base64
import hashlib

from fakeruntime import Peer
from integration.attacker import send_raw
from integration.conftest import wait_until

from pilothandshake.identity import Identity
from pilothandshake.messages import HANDSHAKE_REQUEST

from .conftest import GoFleet

OWNER = "build-agent@example.com"


def test_an_owner_re_bind_is_key_changed_and_the_real_key_still_gets_through(
    gofleet: GoFleet,
) -> None:
    registry = gofleet.go_registry()
    b = gofleet.node("b", registry).start()
    b_id = b.node_id
    real, attacker = Identity.generate(), Identity.generate()

    client = registry.client(real)
    try:
        node = client.register("127.0.0.1:9", real.public_key_b64, owner=OWNER)["node_id"]
    finally:
        client.close()
    genuine = Peer(node, real)
    assert send_raw(b.port, genuine.data(HANDSHAKE_REQUEST, b_id, justification="hello")) in (
        "closed",
        "open",
    )
    wait_until(lambda: b.pending() == {node}, what="the genuine request pending at B")
    b.control("approve", node_id=node)
    assert b.trusted() == {node}

    # The attack: a new key registered with the node's owner string takes over its ID.
    client = registry.client(attacker)
    try:
        taken = client.register("127.0.0.1:8", attacker.public_key_b64, owner=OWNER)
        assert taken["node_id"] == node
        assert client.lookup(node)["public_key"] == attacker.public_key_b64
    finally:
        client.close()

    impostor = Peer(node, attacker)
    send_raw(b.port, impostor.data(HANDSHAKE_REQUEST, b_id, justification="it is me, honest"))
    wait_until(lambda: b.pending() == {node}, what="the new key's request pending at B")
    [pending] = b.control("pending")["pending"]
    fingerprint = hashlib.sha256(base64.b64decode(attacker.public_key_b64)).hexdigest()
    assert (pending["key_changed"], pending["fingerprint"]) == (True, fingerprint)
    assert b.control("is_trusted", node_id=node)["trusted"] is False  # in conflict meanwhile
    [record] = b.control("trust")["trusted"]
    assert (record["public_key"], record["conflict"]) == (real.public_key_b64, True)
    table = b.ctl("pending")
    assert "KEY CHANGED" in table.stdout, table.stderr
    refused = b.ctl("approve", str(node))
    assert refused.returncode == 1 and "KEY CHANGED" in refused.stderr, refused
    assert b.control("is_trusted", node_id=node)["trusted"] is False

    # The KEY CHANGED entry pins nothing: the real peer, with the key we trusted, gets
    # through and its request takes the entry's place.
    genuine_again = genuine.data(HANDSHAKE_REQUEST, b_id, justification="the real one")
    send_raw(b.port, genuine_again)
    wait_until(
        lambda: [p["justification"] for p in b.control("pending")["pending"]] == ["the real one"],
        what="the genuine request replacing the KEY CHANGED one",
    )
    [pending] = b.control("pending")["pending"]
    assert (pending["public_key"], pending["key_changed"]) == (real.public_key_b64, False)
    approved = b.ctl("approve", str(node))
    assert approved.returncode == 0, approved.stderr
    [record] = b.control("trust")["trusted"]
    assert (record["public_key"], record["conflict"]) == (real.public_key_b64, False)
