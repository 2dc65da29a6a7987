"""pilot-handshaked under a stand-in for systemd: a real AF_UNIX datagram socket passed as
$NOTIFY_SOCKET, the messages read in the order the daemon sent them (SPEC 13c)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import pytest

from pilothandshake.client import ControlClient

from .conftest import Fleet, Node


@pytest.fixture
def systemd(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The notify socket; children started from now on inherit $NOTIFY_SOCKET and a 0.6 s
    watchdog (a ping every 0.3 s)."""
    path = str(fleet.root / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def next_state(sock: socket.socket, pings: list[list[str]]) -> list[str]:
    """The next message that is not a watchdog ping or a bare status refresh; those are
    collected in ``pings``."""
    for _ in range(200):
        lines = receive(sock)
        if lines[0] not in ("WATCHDOG=1",) and not lines[0].startswith("STATUS="):
            return lines
        pings.append(lines)
    raise AssertionError("only pings arrived")


def serves(node: Node) -> bool:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5):
        pass
    return ControlClient(node.socket_path).request("status")["status"] == "ok"


def test_ready_reload_and_stop_are_notified_in_order_with_watchdog_pings(
    fleet: Fleet, systemd: socket.socket
) -> None:
    node = fleet.node("a", node_id=7)
    node.spawn()
    pings: list[list[str]] = []

    first = receive(systemd)  # nothing may come before READY=1
    assert first[0] == "READY=1"
    # READY=1 means port 444 and the control socket already serve: no retry needed here.
    assert serves(node)
    assert first[1] == f"STATUS=node 7 on {node.address}: 0 trusted, 0 pending"

    deadline = time.monotonic() + 10
    while len(pings) < 3 and time.monotonic() < deadline:
        pings.append(receive(systemd))
    assert pings[:3] == [["WATCHDOG=1", first[1]]] * 3

    node.signal(signal.SIGHUP)
    reloading = next_state(systemd, pings)
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1][15:]) > 0
    assert next_state(systemd, pings) == first  # READY=1 ends the reload

    node.signal(signal.SIGTERM)
    assert next_state(systemd, pings) == ["STOPPING=1", "STATUS=stopping"]
    assert node.popen is not None and node.popen.wait(10) == 0
    systemd.settimeout(0.2)
    with pytest.raises(socket.timeout):  # nothing after STOPPING=1
        receive(systemd)


def test_status_counts_follow_the_trust_state(fleet: Fleet, systemd: socket.socket) -> None:
    a, b = fleet.direct_pair(b_config={"trust": {"auto_approve": True}})
    # Both daemons notify the same socket; a's handshake is granted by b.
    a.control("handshake", node_id=9, justification="status counts")
    wanted = f"STATUS=node 9 on {b.address}: 1 trusted, 0 pending"
    for _ in range(200):
        if wanted in receive(systemd):
            break
    else:
        pytest.fail(f"never saw {wanted!r}")
