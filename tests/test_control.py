"""The control socket over a real Manager (SPEC section 13)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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

from pilothandshake import control
from pilothandshake.client import ControlClient, ControlError
from pilothandshake.constants import CONTROL_MAX_CONNECTIONS, CONTROL_MAX_LINE
from pilothandshake.control import ControlServer
from pilothandshake.errors import RegistryError
from pilothandshake.events import EventBus
from pilothandshake.logsetup import configure_logging
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
        self.manager.process_message(data, ("127.0.0.1", 40000))
        assert peer.node_id in [p.node_id for p in self.manager.pending_requests()]


NOBODY = NOGROUP = 65534


class FakeRegistry:
    """Hostnames as the registry client answers them (``lookup``, ``resolve_hostname``)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.keys = {node: Peer(node).key for node in names}
        self.lookups: list[int] = []
        self.down = False

    def lookup(self, node_id: int) -> dict[str, Any]:
        self.lookups.append(node_id)
        if self.down:
            raise RegistryError("registry unreachable")
        key = self.keys.get(node_id, "")
        return {"node_id": node_id, "hostname": self.names.get(node_id, ""), "public_key": key}

    def resolve_hostname(self, hostname: str) -> dict[str, Any]:
        for node_id, name in self.names.items():
            if name == hostname:
                return {"node_id": node_id, "public": False, "hostname": name}
        raise RegistryError(f"hostname {hostname!r} not found")


@contextlib.contextmanager
def running_node(registry: FakeRegistry | None = None, group: str = "") -> Iterator[Node]:
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
    server = ControlServer(
        path, manager, status, bus, node_id=lambda: OWN_ID, registry=registry, group=group
    )
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


def test_socket_file_is_private_to_the_owner(node: Node) -> None:
    mode = os.stat(node.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"{not json\n", "invalid_argument", "not valid JSON"),
        (b"[1, 2]\n", "invalid_argument", "JSON object"),
        (b'{"node_id": 3}\n', "invalid_argument", "command"),
        (b'{"command": "frobnicate"}\n', "invalid_argument", "frobnicate"),
        (b'{"command": "approve"}\n', "invalid_argument", "node_id"),
        (b'{"command": "approve", "node_id": "9"}\n', "invalid_argument", "node_id"),
        (b'{"command": "approve", "node_id": true}\n', "invalid_argument", "node_id"),
        (b'{"command": "approve", "node_id": 4294967296}\n', "invalid_argument", "node_id"),
        (b'{"command": "wait", "node_id": 1, "timeout": -1}\n', "invalid_argument", "timeout"),
        (b'{"command": "status", "verbose": true}\n', "invalid_argument", "verbose"),
        (b'{"command": "events", "follow": "yes"}\n', "invalid_argument", "follow"),
        (b"\xff\xfe\n", "invalid_argument", "JSON"),
        (b"[" * 100000 + b"\n", "invalid_argument", "longer"),
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
    assert responses[0]["code"] == "invalid_argument"
    assert node.client.request("status")["status"] == "ok"


def test_access_is_root_the_daemon_user_and_the_control_group() -> None:
    with running_node() as started:
        server = started.server
        server.owner_uid = 1234
        assert server.allowed(0, 0)  # root
        assert server.allowed(1234, 1234)  # the daemon's own user
        assert not server.allowed(NOBODY, NOGROUP)
        server.group_gid = NOGROUP
        assert server.allowed(NOBODY, 5)  # nobody's entry has nogroup as its group
        assert server.allowed(4321, NOGROUP)  # primary group of the process
        assert not server.allowed(4321, 4321)


def connect_as_nobody(path: str) -> dict[str, Any]:
    """A status request from a forked child running as nobody (root drops its rights); the
    child only touches a socket and a pipe before ``os._exit``."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        answer = b""
        try:
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(path)
                except PermissionError:
                    answer = b'{"denied": "by the file mode"}'
                else:
                    # The daemon may refuse and close before the request is sent: its
                    # answer is still buffered, so read it (as ControlClient does).
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        sock.sendall(b'{"command": "status"}\n')
                    answer = sock.makefile("rb").readline()
        finally:
            os.write(writer, answer)
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(output))


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")


@needs_root
def test_connection_from_another_uid_is_refused_by_the_daemon(node: Node) -> None:
    os.chmod(os.path.dirname(node.path), 0o711)
    assert connect_as_nobody(node.path) == {"denied": "by the file mode"}
    os.chmod(node.path, 0o666)  # past the file mode: the daemon itself still refuses
    response = connect_as_nobody(node.path)
    assert (response["status"], response["code"]) == ("error", "forbidden")
    assert f"uid {NOBODY} may not use" in response["message"]


@needs_root
def test_control_group_gets_a_0660_socket_and_its_members_are_served() -> None:
    with running_node(group="nogroup") as started:
        info = os.stat(started.path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOGROUP)
        os.chmod(os.path.dirname(started.path), 0o711)
        response = connect_as_nobody(started.path)
        assert (response["status"], response["data"]["node_id"]) == ("ok", OWN_ID)


def test_unknown_control_group_fails_to_start_naming_the_key(node: Node) -> None:
    path = os.path.join(os.path.dirname(node.path), "group.sock")
    server = ControlServer(path, node.manager, dict, node.bus, lambda: 1, group="no-such-grp")
    with pytest.raises(ControlError, match=r"control\.group: no group named 'no-such-grp'"):
        server.start()
    server.stop()
    assert not os.path.exists(path)


def test_stale_socket_file_is_replaced_at_start(node: Node) -> None:
    stale = os.path.join(os.path.dirname(node.path), "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()  # the file stays, nobody listens: a crashed daemon's socket
    server = ControlServer(stale, node.manager, lambda: {"node_id": 1}, node.bus, lambda: 1)
    server.start()
    try:
        response = ControlClient(stale).request("status")
        assert response == {"status": "ok", "data": {"node_id": 1, "hostname": ""}}
    finally:
        server.stop()
    assert not os.path.exists(stale)


def test_second_server_on_a_live_socket_refuses_to_start(node: Node) -> None:
    second = ControlServer(node.path, node.manager, lambda: {}, node.bus, lambda: 1)
    with pytest.raises(ControlError, match="already serving"):
        second.start()
    second.stop()
    assert node.client.request("status")["status"] == "ok"


def test_regular_file_at_the_socket_path_is_not_replaced(node: Node) -> None:
    path = os.path.join(os.path.dirname(node.path), "file.sock")
    with open(path, "w") as handle:
        handle.write("keep me")
    server = ControlServer(path, node.manager, lambda: {}, node.bus, lambda: 1)
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

    node.server.commands.status = broken
    response = node.client.request("status")
    assert (response["status"], response["code"]) == ("error", "internal")
    assert "boom" not in response["message"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_failing_handler_is_logged_in_the_configured_format_not_as_a_bare_traceback(
    node: Node, log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15 item 8: socketserver calls ``handle_error`` by that name; the override that a
    rename had made dead printed a bare traceback, whatever ``log_format`` said."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom in a handler")

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.logThreads
    configure_logging("info", log_format)
    try:
        node.server.commands.execute = broken  # type: ignore[method-assign]
        assert raw_exchange(node.path, b'{"command": "status"}\n') == []  # closed, no answer
    finally:
        root.handlers[:], level, logging.logThreads = saved
        root.setLevel(level)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any(line.startswith("Exception occurred during processing") for line in lines)
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        (entry,) = [e for e in entries if e["level"] == "error"]
        assert entry["logger"] == "pilothandshake.control"
        assert entry["message"] == "control connection failed"
        assert "RuntimeError: boom in a handler" in entry["exception"]
    else:
        assert " ERROR pilothandshake.control: control connection failed" in lines[0]
        assert lines[-1] == "RuntimeError: boom in a handler"


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


def connect(path: str) -> socket.socket:
    """A connection, retried while the listen queue is full (bounded)."""
    for _ in range(500):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            time.sleep(0.01)
            continue
        return sock
    raise AssertionError("the control socket's listen queue stayed full")


def open_connections(path: str, count: int) -> list[socket.socket]:
    return [connect(path) for _ in range(count)]


def served_connections(server: ControlServer) -> int:
    return len(server._slots)


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.02)


def test_connections_beyond_the_cap_are_refused_with_busy(node: Node) -> None:
    held = open_connections(node.path, CONTROL_MAX_CONNECTIONS)
    try:
        wait_for(lambda: served_connections(node.server) == CONTROL_MAX_CONNECTIONS)
        response = node.client.request("status")
        assert response["code"] == "busy"
        assert f"already serves {CONTROL_MAX_CONNECTIONS} connections" in response["message"]
        held.pop().close()
        wait_for(lambda: served_connections(node.server) < CONTROL_MAX_CONNECTIONS)
        assert node.client.request("status")["status"] == "ok"
    finally:
        for sock in held:
            sock.close()


def test_idle_connection_is_closed(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control._Handler, "timeout", 0.3)
    [sock] = open_connections(node.path, 1)
    with sock:
        assert sock.recv(1) == b""  # closed by the daemon, within the 10 s socket timeout
    wait_for(lambda: served_connections(node.server) == 0)


def test_waits_whose_clients_go_away_leave_no_thread_waiting(node: Node) -> None:
    """400 `wait`s with a huge timeout from clients that then disconnect (issue 11)."""
    before = threading.active_count()
    request = json.dumps({"command": "wait", "node_id": 99, "timeout": 10**9}).encode() + b"\n"
    clients = []
    try:
        for _ in range(400):
            sock = connect(node.path)
            with contextlib.suppress(OSError):  # refused ones may be closed already
                sock.sendall(request)
            clients.append(sock)
        wait_for(lambda: served_connections(node.server) == CONTROL_MAX_CONNECTIONS)
        assert threading.active_count() <= before + CONTROL_MAX_CONNECTIONS
        assert node.manager.waiting()  # the daemon does wait on the Manager's condition
    finally:
        for sock in clients:
            sock.close()
    wait_for(lambda: served_connections(node.server) == 0)
    wait_for(lambda: threading.active_count() <= before)
    assert node.manager.waiting() == 0
    assert node.client.request("status")["status"] == "ok"


def test_an_idle_control_socket_waits_without_polling_and_stops_at_once(
    accept_waits: list[str],
) -> None:
    with running_node() as started:
        wait_for(lambda: bool(accept_waits))
        time.sleep(0.5)  # idle: the accept loop must not wake (it polled every 0.1 s)
        assert accept_waits == ["accept"]  # one blocking accept(), no poll before it
        assert started.client.request("status")["status"] == "ok"
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0  # woken, not timed out
    assert not os.path.exists(started.path)


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
