"""``control_commands``: each control command over a real control socket (SPEC 13) — status,
handshake, pending, approve, reject, trust, untrust, wait, events, hostnames — answered as
``pilotctl --json`` would be."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
from controltools import OWN_ID, FakeRegistry, Node, running_node
from fakeruntime import Peer

from pilothandshake.store import parse_time


def test_status_returns_the_status_callable_data(node: Node) -> None:
    assert node.client.request("status") == {
        "status": "ok",
        "data": {
            "node_id": 1,
            "hostname": "",
            "listen": "127.0.0.1:444",
            "registry": None,
            "trusted": 0,
            "pending": 0,
        },
    }


def test_handshake_reports_sent_then_trusted(node: Node) -> None:
    assert node.client.request("handshake", node_id=5, justification="sync") == {
        "status": "ok",
        "data": {"node_id": 5, "status": "sent"},
    }
    assert node.runtime.sent_messages()[0][0] == 5
    node.receive_request(Peer(6))
    node.manager.approve_handshake(6)
    response = node.client.request("handshake", node_id=6, justification="again")
    assert response["data"] == {"node_id": 6, "status": "trusted"}


@pytest.mark.parametrize(
    "request_args",
    [
        {"command": "handshake", "justification": "me"},
        {"command": "wait", "timeout": 5},
        {"command": "untrust"},
    ],
)
def test_own_node_id_is_an_error_naming_the_mistake(
    node: Node, request_args: dict[str, Any]
) -> None:
    response = node.client.request(node_id=OWN_ID, **request_args)
    assert response == {
        "status": "error",
        "code": "invalid_argument",
        "message": f"node {OWN_ID} is this node itself; name the peer's node ID",
    }
    assert node.runtime.sent_messages() == []


def test_handshake_that_cannot_be_delivered_is_connection_failed(node: Node) -> None:
    node.runtime.dial_fails = True
    response = node.client.request("handshake", node_id=5, justification="sync")
    assert response["status"] == "error"
    assert response["code"] == "connection_failed"
    assert "node 5" in response["message"]


def test_pending_lists_requests_with_unix_times_as_pilotctl_and_an_rfc3339_copy(
    node: Node,
) -> None:
    peer = Peer(9)
    node.receive_request(peer, "nightly sync")
    response = node.client.request("pending")
    assert response["status"] == "ok"
    [item] = response["data"]["pending"]
    assert set(item) == {
        "node_id",
        "hostname",
        "public_key",
        "fingerprint",
        "key_changed",
        "justification",
        "received_at",
        "received_at_text",
    }
    assert item["hostname"] == ""  # no registry: no hostnames
    assert item["key_changed"] is False and len(item["fingerprint"]) == 64
    assert (item["node_id"], item["public_key"], item["justification"]) == (
        9,
        peer.key,
        "nightly sync",
    )
    assert type(item["received_at"]) is int  # pilotctl --json prints Unix seconds
    assert abs(item["received_at"] - time.time()) < 60
    assert parse_time(item["received_at_text"]).timestamp() == item["received_at"]


def test_approve_trusts_the_pending_node_and_trust_lists_it(node: Node) -> None:
    peer = Peer(9)
    node.receive_request(peer)
    assert node.client.request("approve", node_id=9) == {
        "status": "ok",
        "data": {"node_id": 9, "status": "approved"},
    }
    assert node.manager.is_trusted(9)
    [record] = node.client.request("trust")["data"]["trusted"]
    assert set(record) == {
        "node_id",
        "hostname",
        "public_key",
        "mutual",
        "network",
        "approved_at",
        "approved_at_text",
        "reason",
        "conflict",
    }
    assert (record["node_id"], record["public_key"], record["mutual"], record["network"]) == (
        9,
        peer.key,
        False,
        0,
    )
    assert (record["hostname"], record["conflict"], record["reason"]) == ("", False, "approved")
    assert type(record["approved_at"]) is int
    assert parse_time(record["approved_at_text"]).timestamp() == record["approved_at"]


def test_approve_or_reject_without_pending_request_is_not_found(node: Node) -> None:
    for command in ("approve", "reject"):
        response = node.client.request(command, node_id=42)
        assert response == {
            "status": "error",
            "code": "not_found",
            "message": "nothing pending for node 42",
        }


def test_reject_drops_the_pending_request_and_sends_the_reason(node: Node) -> None:
    node.receive_request(Peer(9))
    response = node.client.request("reject", node_id=9, reason="unknown agent")
    assert response == {"status": "ok", "data": {"node_id": 9, "status": "rejected"}}
    assert node.manager.pending_requests() == []
    assert node.runtime.wait_for_sent(1)
    assert node.runtime.sent_messages()[0][1].reason == "unknown agent"


def test_untrust_revokes_and_untrusted_node_is_not_found(node: Node) -> None:
    node.receive_request(Peer(9))
    node.manager.approve_handshake(9)
    assert node.client.request("untrust", node_id=9) == {
        "status": "ok",
        "data": {"node_id": 9, "status": "revoked"},
    }
    assert not node.manager.is_trusted(9)
    response = node.client.request("untrust", node_id=9)
    assert (response["status"], response["code"]) == ("error", "not_found")
    assert "9" in response["message"]


def test_wait_times_out_false_and_returns_true_when_trust_arrives(node: Node) -> None:
    started = time.monotonic()
    response = node.client.request("wait", node_id=9, timeout=0.2)
    assert response == {"status": "ok", "data": {"node_id": 9, "trusted": False}}
    assert time.monotonic() - started < 3
    node.receive_request(Peer(9))
    timer = threading.Timer(0.2, node.manager.approve_handshake, args=(9,))
    timer.start()
    try:
        response = node.client.request("wait", node_id=9, timeout=10)
    finally:
        timer.join()
    assert response == {"status": "ok", "data": {"node_id": 9, "trusted": True}}


def test_events_without_follow_returns_recent_events_then_ends(node: Node) -> None:
    node.receive_request(Peer(9))
    deadline = time.monotonic() + 5
    while not node.bus.recent() and time.monotonic() < deadline:
        time.sleep(0.01)
    responses = list(node.client.stream("events"))
    assert responses, "expected the recent events"
    assert all(r["status"] == "ok" for r in responses)
    topics = [r["data"]["event"] for r in responses]
    assert "handshake.pending" in topics
    event = responses[topics.index("handshake.pending")]["data"]
    assert set(event) == {"event", "node_id", "timestamp", "data"}
    assert event["data"]["peer_node_id"] == 9


def test_events_follow_streams_new_events_while_connected(node: Node) -> None:
    stream = node.client.stream("events", follow=True)
    threading.Timer(0.2, node.receive_request, args=(Peer(9),)).start()
    seen = []
    for response in stream:
        seen.append(response["data"]["event"])
        if response["data"]["event"] == "handshake.pending":
            break
    stream.close()
    assert "handshake.pending" in seen
    deadline = time.monotonic() + 5
    while node.bus._subscribers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not node.bus._subscribers, "the subscription of a gone client must be closed"


def test_is_trusted_answers_for_one_node(node: Node) -> None:
    assert node.client.request("is_trusted", node_id=9)["data"] == {"node_id": 9, "trusted": False}
    node.receive_request(Peer(9))
    node.manager.approve_handshake(9)
    assert node.client.request("is_trusted", node_id=9)["data"] == {"node_id": 9, "trusted": True}


def test_hostnames_come_from_the_registry_and_resolve_names_a_node() -> None:
    registry = FakeRegistry({OWN_ID: "agent-a", 9: "agent-b"})
    with running_node(registry) as started:
        started.receive_request(Peer(9))
        [pending] = started.client.request("pending")["data"]["pending"]
        assert pending["hostname"] == "agent-b"
        started.manager.approve_handshake(9)
        [record] = started.client.request("trust")["data"]["trusted"]
        assert record["hostname"] == "agent-b"
        assert started.client.request("status")["data"]["hostname"] == "agent-a"
        assert started.client.request("resolve", hostname="agent-b") == {
            "status": "ok",
            "data": {"node_id": 9, "hostname": "agent-b", "public": False},
        }
        response = started.client.request("resolve", hostname="nobody-here")
        assert (response["status"], response["code"]) == ("error", "not_found")
        assert "nobody-here" in response["message"]


def test_hostname_lookups_are_cached_and_stop_at_the_first_registry_failure() -> None:
    registry = FakeRegistry({})
    with running_node(registry) as started:
        for peer in range(10, 15):
            started.receive_request(Peer(peer))
        started.client.request("pending")
        assert sorted(registry.lookups) == [10, 11, 12, 13, 14]
        started.client.request("pending")
        assert len(registry.lookups) == 5  # cached
        started.server.commands._hostname_cache.clear()
        registry.down = True
        response = started.client.request("pending")
        assert response["status"] == "ok"
        assert [p["hostname"] for p in response["data"]["pending"]] == [""] * 5
        assert len(registry.lookups) == 6  # one failed lookup, then none


def test_a_resolved_hostname_is_pinned_and_a_move_fails_naming_both() -> None:
    """Issue 15 item 1 (SPEC 17): the registry's name is a hint; the first answer is pinned,
    and a later one that maps the name to another node or key is refused, announced, and
    kept out of the command until the operator forgets the pin."""
    registry = FakeRegistry({9: "build-agent"})
    with running_node(registry) as started:
        assert started.client.request("resolve", hostname="build-agent")["data"]["node_id"] == 9
        pinned_key = registry.keys[9]
        registry.names = {12: "build-agent"}  # the name now belongs to another node
        registry.keys[12] = Peer(12).key
        response = started.client.request("resolve", hostname="build-agent")
        assert response == {
            "status": "error",
            "code": "invalid_state",
            "message": "hostname build-agent moved from node 9 to node 12; if that is "
            "expected: pilot-handshakectl forget-name build-agent",
        }
        changed = [e["data"] for e in started.bus.recent() if e["event"] == "hostname.changed"]
        assert changed == [
            {
                "peer_node_id": 9,
                "hostname": "build-agent",
                "public_key": pinned_key,
                "new_node_id": 12,
                "new_public_key": registry.keys[12],
            }
        ]
        assert started.client.request("forget_name", hostname="build-agent")["data"] == {
            "hostname": "build-agent",
            "status": "forgotten",
        }
        assert started.client.request("resolve", hostname="build-agent")["data"]["node_id"] == 12
        response = started.client.request("forget_name", hostname="nobody")
        assert (response["status"], response["code"]) == ("error", "not_found")


def test_the_same_node_with_another_key_is_a_moved_hostname_too() -> None:
    registry = FakeRegistry({9: "build-agent"})
    with running_node(registry) as started:
        started.client.request("resolve", hostname="build-agent")
        old = registry.keys[9]
        registry.keys[9] = Peer(9).key  # the attack of issue 15: the ID re-bound to a new key
        response = started.client.request("resolve", hostname="build-agent")
        assert response["code"] == "invalid_state"
        assert re.fullmatch(
            r"hostname build-agent moved from node 9 \(key [0-9a-f]{16}\) to node 9 "
            r"\(key [0-9a-f]{16}\); if that is expected: pilot-handshakectl forget-name "
            r"build-agent",
            response["message"],
        )
        assert old != registry.keys[9]


def test_resolve_without_a_registry_says_so(node: Node) -> None:
    response = node.client.request("resolve", hostname="agent-b")
    assert response == {
        "status": "error",
        "code": "invalid_state",
        "message": "cannot resolve 'agent-b': this daemon has no registry",
    }


def test_trust_marks_records_the_registry_now_binds_to_another_key(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    for peer in (8, 9):
        node.receive_request(Peer(peer))
        node.manager.approve_handshake(peer)
    monkeypatch.setattr(node.manager, "conflicting_peers", lambda: [9])
    records = node.client.request("trust")["data"]["trusted"]
    assert [(r["node_id"], r["conflict"]) for r in records] == [(8, False), (9, True)]


def test_untrust_of_a_node_only_asked_says_withdrawn(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node.manager, "revoke_trust", lambda peer: "withdrawn")
    assert node.client.request("untrust", node_id=9)["data"] == {
        "node_id": 9,
        "status": "withdrawn",
    }


def test_commands_that_show_handshake_state_poll_the_relay_first(node: Node) -> None:
    # SPEC 18: an operator never looks at a stale view; status and handshake do not wait.
    polled: list[int] = []
    node.server.commands.refresh = lambda: polled.append(1)
    for command, args in (
        ("pending", {}),
        ("trust", {}),
        ("approve", {"node_id": 5}),
        ("reject", {"node_id": 5}),
        ("wait", {"node_id": 5, "timeout": 0}),
    ):
        node.client.request(command, **args)
        assert len(polled) == 1, command
        polled.clear()
    for command, args in (("status", {}), ("handshake", {"node_id": 5, "justification": ""})):
        node.client.request(command, **args)
    assert polled == []
