"""pilot-handshaked against the real (Go) Pilot registry: registration, heartbeats, the
relay between two pilot-handshaked nodes, and the Go registry's relay inbox format."""

from __future__ import annotations

import time
from typing import Any, Callable

from integration.conftest import wait_until

from pilothandshake.identity import Identity

from .conftest import GoFleet, Wiretap

HEARTBEAT = 0.3  # the nodes' registry.heartbeat_interval here (60 s by default)


def test_python_daemon_registers_and_heartbeats_at_the_go_registry(
    gofleet: GoFleet, wiretap_of: Callable[[str], Wiretap]
) -> None:
    registry = gofleet.go_registry()
    tap = wiretap_of(registry.address)
    node = gofleet.node("a", tap, registry_options={"heartbeat_interval": HEARTBEAT})
    node.start()

    node_id = node.node_id
    assert node_id > 0
    [registered] = tap.responses("register_ok")
    assert registered["node_id"] == node_id and registered["public_key"] == node.key
    # SPEC 17: the register is signed (timestamp and signature), and the production
    # registry takes it all the same (it ignores both fields).
    [register] = tap.requests("register")
    assert type(register["timestamp"]) is int and register["signature"]
    # The Go registry binds the ID to the key pilot-handshaked registered.
    client = registry.client()
    try:
        answer = client.lookup(node_id)
    finally:
        client.close()
    assert answer["public_key"] == node.key and answer["public"] is False

    # Signed heartbeats (heartbeat:<N>) are accepted: several answered, none refused.
    wait_until(lambda: len(tap.responses("heartbeat_ok")) >= 3, what="three heartbeats")
    assert all(type(r["time"]) is int for r in tap.responses("heartbeat_ok"))
    assert {r["node_id"] for r in tap.requests("heartbeat")} == {node_id}
    assert tap.responses("error") == []
    assert "registry handle error" not in registry.stderr
    status = node.status()["registry"]
    assert status["reachable"] and status["registered"] and status["error"] == ""


def test_a_heartbeat_signed_by_another_key_is_refused_by_the_go_registry(
    gofleet: GoFleet,
) -> None:
    # What makes the heartbeats above evidence: the Go registry checks their signature.
    registry = gofleet.go_registry()
    owner, stranger = Identity.generate(), Identity.generate()
    client = registry.client(owner)
    forged = registry.client(stranger)
    try:
        node_id = client.register("127.0.0.1:1", owner.public_key_b64)["node_id"]
        assert client.heartbeat(node_id)["type"] == "heartbeat_ok"
        try:
            forged.heartbeat(node_id)
        except Exception as exc:  # RegistryError: the Go registry hides the cause
            assert "request failed" in str(exc)
        else:
            raise AssertionError("a heartbeat signed by another key was accepted")
    finally:
        client.close()
        forged.close()
    assert "signature verification failed" in registry.stderr


def test_two_private_python_daemons_complete_a_handshake_through_the_go_registry(
    gofleet: GoFleet,
) -> None:
    registry = gofleet.go_registry()
    a = gofleet.node("a", registry).start()
    b = gofleet.node("b", registry).start()
    a_id, b_id = a.node_id, b.node_id
    # Private, no networks, no peers: the relay is the only path.
    assert a.control("handshake", node_id=b_id, justification="via go")["status"] == "relayed"
    wait_until(lambda: b.pending() == {a_id}, what="relayed request pending at B")
    [pending] = b.control("pending")["pending"]
    assert pending["justification"] == "via go"
    # The Go relay carries no key: B bound the request to the key the Go registry holds.
    assert pending["public_key"] == a.key

    # B's accept reaches A directly (the new trust pair lets B resolve A) and as a relayed
    # response; either way A trusts B under the key the registry holds.
    b.control("approve", node_id=a_id)
    wait_until(lambda: a.trusted() == {b_id}, what="the approval reaches A")
    assert b.trusted() == {a_id}
    [a_record] = a.control("trust")["trusted"]
    [b_record] = b.control("trust")["trusted"]
    assert a_record["public_key"] == b.key and b_record["public_key"] == a.key

    # The accept created the trust pair at the Go registry: A may now resolve private B.
    client = registry.client(a.identity)
    try:
        assert client.resolve(b_id, a_id)["real_addr"] == b.address
    finally:
        client.close()


def test_relayed_inbox_timestamps_in_the_go_registry_format_are_read(
    gofleet: GoFleet, wiretap_of: Callable[[str], Wiretap]
) -> None:
    registry = gofleet.go_registry()
    tap = wiretap_of(registry.address)
    a = gofleet.node("a", tap).start()
    b = gofleet.node("b", tap).start()
    a_id, b_id = a.node_id, b.node_id
    before = int(time.time())
    a.control("handshake", node_id=b_id, justification="stamped")
    wait_until(lambda: b.pending() == {a_id}, what="relayed request pending at B")
    b.control("approve", node_id=a_id)

    def items(key: str) -> list[dict[str, Any]]:
        return [i for r in tap.responses("poll_handshakes_ok") for i in r[key] or []]

    wait_until(lambda: items("responses"), what="A polls the relayed accept")
    wait_until(lambda: a.trusted() == {b_id}, what="A trusts B")
    after = int(time.time())

    # The Go registry stamps inbox items with Unix seconds (an int), not RFC 3339 text,
    # and pilot-handshaked read both kinds (the request is pending, the accept applied).
    [request] = items("requests")
    [response] = items("responses")
    for item in (request, response):
        assert type(item["timestamp"]) is int
        assert before - 2 <= item["timestamp"] <= after + 2
    assert request["from_node_id"] == a_id and "public_key" not in request
    assert response == {"from_node_id": b_id, "accept": True, "timestamp": response["timestamp"]}
    for node in (a, b):
        assert "relay: dropped" not in node.stderr


def test_a_re_registration_of_the_node_key_by_someone_else_is_noticed_and_not_fought(
    gofleet: GoFleet, wiretap_of: Callable[[str], Wiretap]
) -> None:
    # Issue 15.1: the production registry takes an unsigned register of anyone's key: the
    # attacker renamed A and moved its address to a sink, and A never noticed.
    registry = gofleet.go_registry()
    tap = wiretap_of(registry.address)
    a = gofleet.node(
        "a",
        tap,
        public=True,
        hostname="build-agent",
        registry_options={"heartbeat_interval": HEARTBEAT},
    ).start()
    a_id = a.node_id
    wait_until(lambda: len(tap.responses("lookup_ok")) >= 1, what="A's first own-record check")
    attacker = registry.client()  # no identity at all: the register is unsigned
    try:
        answer = attacker.register("127.0.0.1:9", a.key, hostname="sink")
    finally:
        attacker.close()
    assert answer["node_id"] == a_id  # the production registry moved A's record

    def binding_changed() -> dict[str, Any] | None:
        for event in a.events():
            if event["event"] == "registry.binding_changed":
                return dict(event["data"])
        return None

    data = wait_until(binding_changed, what="registry.binding_changed at A")
    assert data["node_id"] == a_id
    assert data["moved"]["hostname"] == {"expected": "build-agent", "found": "sink"}
    assert data["moved"]["address"] == {"expected": a.address, "found": "127.0.0.1:9"}
    assert "changed this node's record" in a.stderr
    # No tug of war with whoever holds the key's registration at an unsigned registry.
    time.sleep(3 * HEARTBEAT)
    assert len(tap.requests("register")) == 1


def test_with_the_go_registry_nodes_poll_on_go_schedule_idle_fast_and_on_demand(
    gofleet: GoFleet, wiretap_of: Callable[[str], Wiretap]
) -> None:
    # Issue 18.1 (SPEC 18): the production registry holds no polls, so the relay is polled
    # once a minute when idle, every poll_interval while an answer is awaited, and once
    # before a command that shows handshake state.
    registry = gofleet.go_registry()
    tap = wiretap_of(registry.address)
    schedule = {"poll_interval": 0.2, "poll_idle": 60}
    a = gofleet.node("a", tap, registry_options=schedule).start()
    b = gofleet.node("b", tap, registry_options=schedule).start()
    a_id, b_id = a.node_id, b.node_id
    [register] = [r for r in tap.responses("register_ok") if r["node_id"] == b_id]
    assert "features" not in register  # no push: the schedule applies

    def polls(node_id: int) -> int:
        return sum(1 for r in tap.requests("poll_handshakes") if r["node_id"] == node_id)

    time.sleep(2.5)  # idle: each polled once at start, and not since
    assert polls(a_id) == 1 and polls(b_id) == 1
    assert a.control("handshake", node_id=b_id, justification="go schedule")["status"] == (
        "relayed"
    )
    # B asks for its pending requests: that polls the relay first (not a minute later).
    wait_until(lambda: a_id in b.pending(), timeout=10, what="the request at B, on demand")
    assert polls(b_id) <= 4
    # A awaits an answer: it polls every poll_interval meanwhile (the fast window).
    wait_until(lambda: polls(a_id) >= 6, timeout=10, what="A's fast window")
    assert "wait" not in tap.requests("poll_handshakes")[-1]
    b.control("approve", node_id=a_id)
    wait_until(lambda: b_id in a.trusted(), timeout=10, what="the approval at A")
    # Answered: A's window ends early, back to the idle period.
    time.sleep(0.5)
    settled = polls(a_id)
    time.sleep(2.0)
    assert polls(a_id) == settled
