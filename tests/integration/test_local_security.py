"""Local security (SPEC 4, 10, 13): who may use the control socket, and file modes.

The other-uid checks fork a child that drops to ``nobody`` and talks to a real daemon's
socket, so they need root; they skip otherwise. The fleet's directories are opened for
traversal first, so that a refusal comes from the socket itself, not from its directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shlex
import socket
import stat
import time
from pathlib import Path

import pytest
from fakeruntime import Peer

from .conftest import Fleet, Node, wait_until

CHILD_TIMEOUT = 5.0

needs_root = pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0, reason="dropping to another uid needs root"
)


def nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def talk_as_nobody(path: str, request: bytes) -> str:
    """In a forked child running as ``nobody``: connect to the Unix socket ``path``, send
    ``request``, read one line. Returns ``"errno <NAME>"`` or ``"answer <line>"``."""
    uid = nobody()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only async-signal-safe-ish calls, then _exit
        result = b"child failed"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CHILD_TIMEOUT)
            try:
                sock.connect(path)
                # Refused before reading: the answer is still buffered (as ControlClient).
                with contextlib.suppress(BrokenPipeError):
                    sock.sendall(request)
                result = b"answer " + sock.makefile("rb").readline()
            except OSError as exc:
                result = f"errno {errno.errorcode.get(exc.errno or 0, exc)}".encode()
            os.write(write_end, result)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    try:
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def open_for_traversal(node: Node) -> None:
    """Let other users reach the socket's directory (x only), as in a shared /run."""
    for directory in (node.directory.parent, node.directory):
        os.chmod(directory, 0o711)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def send_request(node: Node, peer: Peer) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(peer.data("handshake_request", 7, justification="modes"))
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(4096):
            pass


@needs_root
def test_control_socket_mode_keeps_other_users_out(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7).start()
    open_for_traversal(node)
    assert mode(Path(node.socket_path)) == 0o600
    assert talk_as_nobody(node.socket_path, b'{"command": "status"}\n') == "errno EACCES"
    assert node.status()["node_id"] == 7  # the owner still gets in


@needs_root
def test_peer_credentials_refuse_another_uid_even_when_the_socket_is_opened_up(
    fleet: Fleet,
) -> None:
    node = fleet.node("a", node_id=7).start()
    send_request(node, Peer(9))  # something a foreign uid must not approve
    wait_until(lambda: 9 in node.pending(), what="the request to be pending")
    open_for_traversal(node)
    os.chmod(node.socket_path, 0o666)  # an operator mistake: SO_PEERCRED is the last line
    answer = talk_as_nobody(node.socket_path, b'{"command": "approve", "node_id": 9}\n')
    assert answer.startswith("answer "), answer
    response = json.loads(answer[len("answer ") :])
    assert response["status"] == "error"
    assert response["code"] == "forbidden"
    assert str(nobody()) in response["message"]
    assert node.pending() == {9} and node.trusted() == set()


def test_files_the_daemon_creates_are_private_even_with_umask_0(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    (node.directory / "identity.json").unlink()  # let the daemon create it
    node.argv = ["/bin/sh", "-c", "umask 000 && exec " + shlex.join(node.argv)]
    node.start()
    peer = Peer(5)
    send_request(node, peer)
    wait_until(lambda: 5 in node.pending(), what="the request to be pending")
    for name in (
        "identity.json",
        "trust.json",
        "trust.json.lock",
        "control.sock",
    ):
        assert mode(node.directory / name) == 0o600, name
    leftover = [p.name for p in node.directory.iterdir() if mode(p) & 0o077 and p.is_file()]
    assert set(leftover) <= {"config.yaml", "a.out", "a.err"}, leftover


def test_trust_file_readable_by_others_becomes_private_at_the_next_write(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    trust = node.directory / "trust.json"
    trust.write_text('{"trusted": []}\n')
    os.chmod(trust, 0o644)  # copied in from elsewhere
    node.start()
    send_request(node, Peer(5))
    wait_until(lambda: 5 in node.pending(), what="the request to be pending")
    assert mode(trust) == 0o600


def test_identity_readable_by_others_stops_the_daemon_with_the_fix_in_the_message(
    fleet: Fleet,
) -> None:
    node = fleet.node("a", node_id=7)
    identity = node.directory / "identity.json"
    os.chmod(identity, 0o604)
    node.spawn()
    assert node.popen is not None
    deadline = time.monotonic() + 20
    while node.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.popen.returncode == 1
    assert f"chmod 600 {identity}" in node.stderr
    assert "Traceback" not in node.stderr
    assert not Path(node.socket_path).exists()
    assert not (node.directory / "trust.json").exists()
