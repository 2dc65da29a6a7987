"""Metrics of real daemons (SPEC 13b): scraped over HTTP and through the control socket while
they handshake directly, through the registry relay, and drop bad input."""

from __future__ import annotations

import re
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .conftest import Fleet, Node, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> Samples:
    """GET /metrics at the address the daemon printed in its start line."""
    found = re.search(r"metrics (http://\S+/metrics)", node.stdout)
    assert found, node.stdout
    with urllib.request.urlopen(found.group(1), timeout=10) as response:
        text = response.read().decode()
    return parse(text)


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_through_a_direct_handshake_a_relayed_one_and_a_drop(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    metrics = {"listen": "127.0.0.1:0"}
    a = fleet.node("a", registry, metrics=metrics)  # private
    b = fleet.node("b", registry, metrics=metrics)  # private: reached only through the relay
    c = fleet.node("c", registry, public=True, metrics=metrics, trust={"auto_approve": True})
    ids = {}
    for node in (a, b, c):
        node.start()
        ids[node.name] = node.node_id

    # Direct: A dials C's port 444 (C is public); C approves automatically.
    assert a.control("handshake", node_id=ids["c"], justification="direct")["status"] == "sent"
    wait_until(lambda: ids["c"] in a.trusted(), what="C's accept reaches A")
    # Relay: neither A nor B can dial the other.
    assert a.control("handshake", node_id=ids["b"], justification="relay")["status"] == "relayed"
    wait_until(lambda: b.pending() == {ids["a"]}, what="relayed request pending at B")
    b.control("approve", node_id=ids["a"])
    wait_until(lambda: ids["b"] in a.trusted(), what="relayed approval reaches A")
    # A drop: bytes that are no handshake message, straight to C's port 444.
    with socket.create_connection(("127.0.0.1", c.port), timeout=5) as sock:
        sock.sendall(b"not json at all")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)

    def drop_counted() -> Samples | None:
        samples = scrape(c)
        return samples if get(samples, "pilot_handshake_drops_total", reason="malformed") else None

    at_c = wait_until(drop_counted, what="the drop counted at C")
    assert get(at_c, "pilot_handshake_events_total", topic="handshake.auto_approved") == 1
    assert get(at_c, "pilot_handshake_trusted_peers") == 1
    assert get(at_c, "pilot_handshake_store_changes_per_write_count") >= 1
    assert get(at_c, "pilot_handshake_store_write_seconds_count") >= 1

    at_a = scrape(a)
    # Sent directly (to C), relayed (to B, whose direct dial failed), failed both ways: none.
    requests = {
        result: get(at_a, "pilot_handshake_messages_total", type="handshake_request", result=result)
        for result in ("sent", "relayed", "failed")
    }
    assert requests == {"sent": 1, "relayed": 1, "failed": 0}, requests
    assert (
        get(
            at_a,
            "pilot_handshake_relayed_messages_total",
            type="handshake_request",
            direction="out",
        )
        == 1
    )
    # B's accept comes through the relay; C's too when C cannot dial private A back yet.
    assert (
        get(at_a, "pilot_handshake_relayed_messages_total", type="handshake_accept", direction="in")
        >= 1
    )
    assert get(at_a, "pilot_handshake_trusted_peers") == 2
    assert get(at_a, "pilot_handshake_outgoing_requests") == 0
    assert get(at_a, "pilot_handshake_registry_up") == 1
    assert get(at_a, "pilot_handshake_registry_requests_total", type="register", outcome="ok") == 1
    assert get(at_a, "pilot_handshake_registry_request_seconds_count", type="register") == 1
    assert get(at_a, "process_resident_memory_bytes") > 0

    # B through pilot-handshakectl: the same text the HTTP endpoint serves.
    printed = b.ctl("metrics")
    assert printed.returncode == 0, printed.stderr
    at_b = parse(printed.stdout)
    assert (
        get(
            at_b, "pilot_handshake_relayed_messages_total", type="handshake_request", direction="in"
        )
        == 1
    )
    assert (
        get(
            at_b, "pilot_handshake_relayed_messages_total", type="handshake_accept", direction="out"
        )
        == 1
    )
    assert get(at_b, "pilot_handshake_events_total", topic="handshake.approved") == 1
    assert get(at_b, "pilot_handshake_pending_requests") == 0
