"""Direct handshakes between daemon processes on loopback, without a registry."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import BIN, Fleet, process_env, wait_until


def test_direct_request_is_pending_until_approved_then_both_trust(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    assert a.control("handshake", node_id=9, justification="nightly sync")["status"] == "sent"
    wait_until(lambda: b.pending() == {7}, what="request pending at B")
    [pending] = b.control("pending")["pending"]
    assert pending["justification"] == "nightly sync"
    assert pending["public_key"] == a.key
    assert a.trusted() == set() and b.trusted() == set()

    approve = b.ctl("approve", "7")
    assert approve.returncode == 0, approve.stderr
    assert b.trusted() == {7} and b.pending() == set()
    wait_until(lambda: a.trusted() == {9}, what="A trusts B after the accept")
    [record] = a.control("trust")["trusted"]
    assert record["mutual"] is True and record["public_key"] == b.key
    assert "handshake.pending" in b.topics()
    assert "handshake.approved" in a.topics()


def test_mutual_requests_are_approved_automatically(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    a.control("handshake", node_id=9, justification="a wants b")
    wait_until(lambda: b.pending() == {7}, what="A's request pending at B")
    assert b.control("handshake", node_id=7, justification="b wants a")["status"] in (
        "sent",
        "trusted",
    )
    wait_until(lambda: a.trusted() == {9} and b.trusted() == {7}, what="mutual trust")
    auto = [e for e in a.events() if e["event"] == "handshake.auto_approved"]
    assert auto and auto[0]["data"]["reason"] == "mutual"


def test_auto_approve_fleet_trusts_a_request_at_once(fleet: Fleet) -> None:
    a, b = fleet.direct_pair(b_config={"trust": {"auto_approve": True}})
    a.control("handshake", node_id=9, justification="join the fleet")
    wait_until(lambda: b.trusted() == {7} and a.trusted() == {9}, what="auto-approved trust")
    assert b.pending() == set()
    reasons = [e["data"].get("reason") for e in b.events() if e["event"].endswith("auto_approved")]
    assert reasons == ["auto_approve"]


def test_key_pinned_allowlisted_agent_is_approved_without_a_registry(fleet: Fleet) -> None:
    a = fleet.node("a", node_id=7)
    b = fleet.node(
        "b",
        node_id=9,
        trust={"allowlist": [{"node_id": 7, "name": "builder", "public_key": a.key}]},
    )
    a.config["peers"] = {9: b.address}
    b.config["peers"] = {7: a.address}
    a.write_config()
    b.write_config()
    a.start()
    b.start()
    a.control("handshake", node_id=9, justification="build")
    wait_until(lambda: b.trusted() == {7} and a.trusted() == {9}, what="allowlisted trust")
    [event] = [e for e in b.events() if e["event"] == "handshake.auto_approved"]
    assert event["data"]["reason"] == "trusted_agent" and event["data"]["agent"] == "builder"


def test_rejection_reason_reaches_the_requester(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    a.control("handshake", node_id=9, justification="please")
    wait_until(lambda: b.pending() == {7}, what="pending at B")
    result = b.ctl("reject", "7", "not on the change calendar")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "not on the change calendar" in a.stderr, what="reason in A's log")
    assert a.trusted() == set() and b.pending() == set()


def test_revoke_is_seen_by_both_sides(fleet: Fleet) -> None:
    a, b = fleet.direct_pair(b_config={"trust": {"auto_approve": True}})
    a.control("handshake", node_id=9, justification="short-lived")
    wait_until(lambda: a.trusted() == {9} and b.trusted() == {7}, what="trust")
    result = a.ctl("untrust", "9")
    assert result.returncode == 0, result.stderr
    assert a.trusted() == set()
    wait_until(lambda: b.trusted() == set(), what="B sees the revoke")
    assert "trust.revoked_by_peer" in b.topics()


def test_wait_exits_0_when_trust_arrives_and_1_on_timeout(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    timed_out = a.ctl("wait", "9", "--timeout", "0.5")
    assert timed_out.returncode == 1
    a.control("handshake", node_id=9, justification="wait for me")
    wait_until(lambda: b.pending() == {7}, what="pending at B")
    waiter = subprocess.Popen(
        [
            sys.executable,
            str(BIN / "pilot-handshakectl"),
            "--socket",
            a.socket_path,
            "wait",
            "9",
            "--timeout",
            "15",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=process_env(),
    )
    try:
        b.control("approve", node_id=7)
        assert waiter.wait(15) == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.communicate()


def test_pending_and_trusted_survive_a_daemon_restart(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    a.control("handshake", node_id=9, justification="survive restarts")
    wait_until(lambda: b.pending() == {7}, what="pending at B")
    b.restart()
    assert b.pending() == {7}
    a.restart()  # A's outgoing request must survive too, or B's accept is ignored
    b.control("approve", node_id=7)
    wait_until(lambda: a.trusted() == {9}, what="A trusts B")
    a.restart()
    b.restart()
    assert a.trusted() == {9} and b.trusted() == {7}


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    cond: threading.Condition

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.cond:
            self.received.append(json.loads(body))
            self.cond.notify_all()
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[type[_Collector]]:
    handler = type("Collector", (_Collector,), {"received": [], "cond": threading.Condition()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/events"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_receives_the_events(fleet: Fleet, webhook: type[_Collector]) -> None:
    a, b = fleet.direct_pair(b_config={"events": {"webhook": webhook.url}})  # type: ignore[attr-defined]
    a.control("handshake", node_id=9, justification="hooked")
    wait_until(lambda: b.pending() == {7}, what="pending at B")
    b.control("approve", node_id=7)

    def topics() -> set[str]:
        with webhook.cond:
            return {str(e["event"]) for e in webhook.received}

    wait_until(
        lambda: {"handshake.pending", "handshake.approved", "trust.changed"} <= topics(),
        what="webhook events",
    )
    with webhook.cond:
        body = next(e for e in webhook.received if e["event"] == "handshake.pending")
    assert set(body) == {"event", "node_id", "timestamp", "data"}
    assert body["node_id"] == 9 and body["data"]["peer_node_id"] == 7
