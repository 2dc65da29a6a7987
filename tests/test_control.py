"""The control socket over a real Manager (SPEC section 13)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fakeruntime import FakeRuntime, Peer

from pilothandshake.constants import CONTROL_MAX_LINE
from pilothandshake.control import ControlClient, ControlError, ControlServer
from pilothandshake.events import EventBus
from pilothandshake.manager import Manager
from pilothandshake.messages import HANDSHAKE_REQUEST
from pilothandshake.store import parse_time

OWN_ID = 1


class BusRuntime(FakeRuntime):
    """A FakeRuntime whose events also go to a real EventBus, as in the daemon."""

    bus: EventBus | None = None

    def publish_event(self, topic: str, payload: dict[str, Any]) -> None:
        super().publish_event(topic, payload)
        if self.bus is not None:
            self.bus.publish(topic, payload)


@dataclass
class Node:
    """A Manager with its control socket, in a short /tmp directory."""

    runtime: BusRuntime
    manager: Manager
    bus: EventBus
    server: ControlServer
    path: str
    client: ControlClient

    def receive_request(self, peer: Peer, justification: str = "nightly sync") -> None:
        data = peer.data(HANDSHAKE_REQUEST, OWN_ID, justification=justification)
        self.manager.process_message(data, "127.0.0.1:40000")
        assert peer.node_id in [p.node_id for p in self.manager.pending_requests()]


@contextlib.contextmanager
def running_node() -> Iterator[Node]:
    """A started Manager, EventBus and ControlServer; also used by test_cli."""
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(dir="/tmp", prefix="phctl-")
    runtime = BusRuntime(node_id=OWN_ID, directory=directory)
    manager = Manager(runtime)
    manager.start()
    bus = EventBus(runtime.node_id)
    runtime.bus = bus
    bus.start()

    def status() -> dict[str, Any]:
        return {
            "node_id": OWN_ID,
            "listen": "127.0.0.1:444",
            "registry": None,
            "trusted": len(manager.trusted_peers()),
            "pending": manager.pending_count(),
        }

    path = os.path.join(directory, "control.sock")
    server = ControlServer(path, manager, status, bus)
    server.start()
    try:
        yield Node(runtime, manager, bus, server, path, ControlClient(path, timeout=5))
    finally:
        server.stop()
        manager.stop()
        bus.stop(timeout=2)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def node() -> Iterator[Node]:
    with running_node() as started:
        yield started


def raw_exchange(path: str, payload: bytes, answers: int = 1) -> list[dict[str, Any]]:
    """Send raw bytes and read up to ``answers`` response lines (fewer if the server closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        with sock.makefile("rb") as reader:
            lines = [reader.readline() for _ in range(answers)]
    return [json.loads(line) for line in lines if line]


def test_status_returns_the_status_callable_data(node: Node) -> None:
    assert node.client.request("status") == {
        "status": "ok",
        "data": {
            "node_id": 1,
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
    response = node.client.request("handshake", node_id=OWN_ID, justification="me")
    assert response["status"] == "error" and "own ID" in response["message"]


def test_handshake_that_cannot_be_delivered_is_send_failed(node: Node) -> None:
    node.runtime.dial_fails = True
    response = node.client.request("handshake", node_id=5, justification="sync")
    assert response["status"] == "error"
    assert response["code"] == "send_failed"
    assert "node 5" in response["message"]


def test_pending_lists_requests_with_rfc3339_times(node: Node) -> None:
    peer = Peer(9)
    node.receive_request(peer, "nightly sync")
    response = node.client.request("pending")
    assert response["status"] == "ok"
    [item] = response["data"]["pending"]
    assert set(item) == {"node_id", "public_key", "justification", "received_at"}
    assert (item["node_id"], item["public_key"], item["justification"]) == (
        9,
        peer.key,
        "nightly sync",
    )
    assert abs(parse_time(item["received_at"]).timestamp() - time.time()) < 60


def test_approve_trusts_the_pending_node_and_trust_lists_it(node: Node) -> None:
    peer = Peer(9)
    node.receive_request(peer)
    assert node.client.request("approve", node_id=9) == {
        "status": "ok",
        "data": {"node_id": 9, "status": "approved"},
    }
    assert node.manager.is_trusted(9)
    [record] = node.client.request("trust")["data"]["trusted"]
    assert set(record) == {"node_id", "public_key", "mutual", "network", "approved_at"}
    assert (record["node_id"], record["public_key"], record["mutual"], record["network"]) == (
        9,
        peer.key,
        False,
        0,
    )
    parse_time(record["approved_at"])


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


def test_untrust_revokes_and_untrusted_node_is_not_trusted_error(node: Node) -> None:
    node.receive_request(Peer(9))
    node.manager.approve_handshake(9)
    assert node.client.request("untrust", node_id=9) == {"status": "ok", "data": {"node_id": 9}}
    assert not node.manager.is_trusted(9)
    response = node.client.request("untrust", node_id=9)
    assert (response["status"], response["code"]) == ("error", "not_trusted")
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


def test_socket_file_is_private_to_the_owner(node: Node) -> None:
    mode = os.stat(node.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"{not json\n", "bad_request", "not valid JSON"),
        (b"[1, 2]\n", "bad_request", "JSON object"),
        (b'{"node_id": 3}\n', "bad_request", "command"),
        (b'{"command": "frobnicate"}\n', "unknown_command", "frobnicate"),
        (b'{"command": "approve"}\n', "bad_request", "node_id"),
        (b'{"command": "approve", "node_id": "9"}\n', "bad_request", "node_id"),
        (b'{"command": "approve", "node_id": true}\n', "bad_request", "node_id"),
        (b'{"command": "approve", "node_id": 4294967296}\n', "bad_request", "node_id"),
        (b'{"command": "wait", "node_id": 1, "timeout": -1}\n', "bad_request", "timeout"),
        (b'{"command": "status", "verbose": true}\n', "bad_request", "verbose"),
        (b'{"command": "events", "follow": "yes"}\n', "bad_request", "follow"),
        (b"\xff\xfe\n", "bad_request", "JSON"),
        (b"[" * 100000 + b"\n", "bad_request", "longer"),
    ],
)
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(
    node: Node, line: bytes, code: str, words: str
) -> None:
    [response] = raw_exchange(node.path, line + b'{"command": "status"}\n', answers=1)
    assert response["status"] == "error"
    assert response["code"] == code
    assert words in response["message"]
    assert node.client.request("status")["status"] == "ok"


def test_connection_carries_several_requests_after_an_error(node: Node) -> None:
    responses = raw_exchange(
        node.path, b'{"command": "nope"}\n\n{"command": "pending"}\n', answers=2
    )
    assert [r["status"] for r in responses] == ["error", "ok"]
    assert responses[1]["data"] == {"pending": []}


def test_oversized_line_is_refused_and_closes_only_that_connection(node: Node) -> None:
    payload = b'{"command": "status", "x": "' + b"a" * CONTROL_MAX_LINE + b'"}\n'
    responses = raw_exchange(node.path, payload + b'{"command": "status"}\n', answers=2)
    assert len(responses) == 1
    assert responses[0]["code"] == "bad_request"
    assert node.client.request("status")["status"] == "ok"


def test_connection_from_another_uid_is_refused(node: Node) -> None:
    node.server.owner_uid = os.getuid() + 1
    response = node.client.request("status")
    assert response["status"] == "error"
    assert response["code"] == "forbidden"


def test_stale_socket_file_is_replaced_at_start(node: Node) -> None:
    stale = os.path.join(os.path.dirname(node.path), "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()  # the file stays, nobody listens: a crashed daemon's socket
    server = ControlServer(stale, node.manager, lambda: {"node_id": 1}, node.bus)
    server.start()
    try:
        assert ControlClient(stale).request("status") == {"status": "ok", "data": {"node_id": 1}}
    finally:
        server.stop()
    assert not os.path.exists(stale)


def test_second_server_on_a_live_socket_refuses_to_start(node: Node) -> None:
    second = ControlServer(node.path, node.manager, lambda: {}, node.bus)
    with pytest.raises(ControlError, match="already serving"):
        second.start()
    second.stop()
    assert node.client.request("status")["status"] == "ok"


def test_regular_file_at_the_socket_path_is_not_replaced(node: Node) -> None:
    path = os.path.join(os.path.dirname(node.path), "file.sock")
    with open(path, "w") as handle:
        handle.write("keep me")
    server = ControlServer(path, node.manager, lambda: {}, node.bus)
    with pytest.raises(ControlError, match="not a socket"):
        server.start()
    server.stop()
    with open(path) as handle:
        assert handle.read() == "keep me"


def test_stop_removes_the_socket_and_client_says_daemon_not_running(node: Node) -> None:
    node.server.stop()
    node.server.stop()
    assert not os.path.exists(node.path)
    with pytest.raises(ControlError) as info:
        node.client.request("status")
    assert str(info.value) == f"pilot-handshaked is not running (no socket at {node.path})"


def test_internal_failure_is_an_error_response_not_a_traceback(node: Node) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    node.server.status = broken
    response = node.client.request("status")
    assert (response["status"], response["code"]) == ("error", "internal_error")
    assert "boom" not in response["message"]
