"""``control.ControlServer``: the control socket itself (SPEC 13) — who may connect, the
socket file, malformed and oversized lines, connection caps, idle connections, stopping.
What each command does is in ``test_control_commands``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from typing import Any

import pytest
from controltools import OWN_ID, Node, running_node

from pilothandshake import control
from pilothandshake.client import ControlClient, ControlError
from pilothandshake.constants import CONTROL_MAX_CONNECTIONS, CONTROL_MAX_LINE
from pilothandshake.control import ControlServer
from pilothandshake.logsetup import configure_logging

NOBODY = NOGROUP = 65534


def raw_exchange(path: str, payload: bytes, answers: int = 1) -> list[dict[str, Any]]:
    """Send raw bytes and read up to ``answers`` response lines (fewer if the server closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        with sock.makefile("rb") as reader:
            lines = [reader.readline() for _ in range(answers)]
    return [json.loads(line) for line in lines if line]


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
