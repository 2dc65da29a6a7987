"""Relay inboxes of a real pilot-registryd survive its restart (issue 20 item 3): a request
acknowledged as relayed reaches its target after the registry stops cleanly or is killed."""

from __future__ import annotations

import signal

from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.challenges import poll_challenge
from pilothandshake.registry.client import RegistryConnection

from .conftest import Fleet, wait_until


def test_a_relayed_request_reaches_a_stopped_target_after_the_registry_restarts(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry)
    b = fleet.node("b", registry)
    a_id, b_id = a.start().node_id, b.start().node_id
    b.signal(signal.SIGSTOP)  # B cannot poll before the registry restarts
    try:
        answer = a.control("handshake", node_id=b_id, justification="kept across")
        assert answer["status"] == "relayed"
        registry.restart()
    finally:
        b.signal(signal.SIGCONT)
    wait_until(lambda: b.pending() == {a_id}, timeout=60, what="the request at B")
    [pending] = b.control("pending")["pending"]
    assert pending["justification"] == "kept across"


def test_a_relayed_request_survives_a_sigkill_of_the_registry(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    sender, target = Identity.generate(), Identity.generate()
    client = RegistryConnection(registry.address, timeout=5.0)
    try:
        ids = [
            client.register("127.0.0.1:1", who.public_key_b64)["node_id"]
            for who in (sender, target)
        ]
        signature = b64encode(sender.sign(handshake_challenge(ids[0], ids[1])))
        relayed = {
            "type": "request_handshake",
            "from_node_id": ids[0],
            "to_node_id": ids[1],
            "justification": "acknowledged, then the registry died",
            "signature": signature,
        }
        assert client.call(relayed)["type"] == "request_handshake_ok"  # acknowledged
    finally:
        client.close()
    assert registry.popen is not None
    registry.popen.kill()
    registry.popen.wait(10)
    registry.out_path.write_bytes(b"")
    registry.start()
    client = RegistryConnection(registry.address, timeout=5.0)
    try:
        poll = {
            "type": "poll_handshakes",
            "node_id": ids[1],
            "signature": b64encode(target.sign(poll_challenge(ids[1]))),
        }
        [request] = client.call(poll)["requests"]
        assert request["from_node_id"] == ids[0]
        assert request["justification"] == "acknowledged, then the registry died"
    finally:
        client.close()
