"""systemd's notify protocol: datagrams to a real AF_UNIX socket standing in for systemd, and
the watchdog thread that pings only while the Manager answers."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from fakeruntime import Nodes

from pilothandshake.sdnotify import Notifier, Watchdog, monotonic_usec


@pytest.fixture
def systemd() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket in a short temporary directory (AF_UNIX paths are limited to
    about 107 bytes): (its path, the socket)."""
    with tempfile.TemporaryDirectory(prefix="sd-") as root:
        path = os.path.join(root, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5.0)
        try:
            yield path, sock
        finally:
            sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def no_datagram_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        sock.recv(4096)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(5.0)
    return False


def test_each_notification_is_one_datagram_of_name_value_lines(
    systemd: tuple[str, socket.socket],
) -> None:
    path, sock = systemd
    notifier = Notifier(path)
    try:
        notifier.ready("node 7: 0 trusted")
        assert receive(sock) == ["READY=1", "STATUS=node 7: 0 trusted"]
        notifier.stopping()
        assert receive(sock) == ["STOPPING=1", "STATUS=stopping"]
    finally:
        notifier.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(
    systemd: tuple[str, socket.socket],
) -> None:
    path, sock = systemd
    notifier = Notifier(path)
    before = monotonic_usec()
    notifier.reloading()
    after = monotonic_usec()
    notifier.close()
    lines = receive(sock)
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=", 1)[1]) <= after
    # The same clock as time.monotonic() (CLOCK_MONOTONIC on Linux), not the wall clock.
    assert abs(before / 1e6 - time.monotonic()) < 60


def test_abstract_namespace_address_is_reached_with_an_at_sign() -> None:
    name = f"ph-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.notify("READY=1")
        notifier.close()
        assert receive(sock) == ["READY=1"]


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_usec == 0  # a watchdog needs somewhere to send its pings
    notifier.ready("x")
    notifier.close()


def test_watchdog_usec_for_another_pid_or_not_a_number_is_ignored(
    systemd: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = systemd
    mine = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(mine).watchdog_usec == 2_000_000
    other = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(other).watchdog_usec == 0
    assert Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "x"}).enabled
    assert "WATCHDOG_USEC='x' is not a number" in caplog.text


def test_notify_socket_that_is_not_a_path_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET='vsock:2:1234' is not a socket path" in caplog.text


def test_a_vanished_systemd_socket_is_logged_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with tempfile.TemporaryDirectory(prefix="sd-") as root:
        notifier = Notifier(os.path.join(root, "gone"))
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                notifier.notify("WATCHDOG=1")
        notifier.close()
    assert caplog.text.count("cannot notify systemd") == 1


def test_watchdog_pings_at_its_interval_with_the_status_line(
    systemd: tuple[str, socket.socket],
) -> None:
    path, sock = systemd
    notifier = Notifier(path, watchdog_usec=200_000)
    watchdog = Watchdog(notifier, 0.1, lambda: "3 trusted")
    watchdog.start()
    try:
        pings = [receive(sock) for _ in range(3)]
    finally:
        watchdog.stop()
        notifier.close()
    assert pings == [["WATCHDOG=1", "STATUS=3 trusted"]] * 3


def test_without_a_watchdog_the_thread_only_refreshes_status(
    systemd: tuple[str, socket.socket],
) -> None:
    path, sock = systemd
    notifier = Notifier(path)
    watchdog = Watchdog(notifier, 0.05, lambda: "1 pending")
    watchdog.start()
    try:
        assert receive(sock) == ["STATUS=1 pending"]
    finally:
        watchdog.stop()
        notifier.close()


def test_watchdog_stops_pinging_while_the_manager_is_wedged_and_resumes_after(
    systemd: tuple[str, socket.socket], nodes: Nodes
) -> None:
    path, sock = systemd
    manager, _ = nodes.make(7)
    notifier = Notifier(path, watchdog_usec=200_000)
    watchdog = Watchdog(notifier, 0.1, lambda: f"{manager.pending_count()} pending")
    wedged = threading.Event()
    release = threading.Event()

    def wedge() -> None:
        # A thread stuck inside the Manager: it holds the Manager's lock and never lets go.
        with manager._lock:
            wedged.set()
            release.wait(30)

    watchdog.start()
    holder = threading.Thread(target=wedge, daemon=True)
    try:
        assert receive(sock) == ["WATCHDOG=1", "STATUS=0 pending"]
        holder.start()
        assert wedged.wait(5)
        # Pings whose check ran before the lock was taken may still arrive.
        for _ in range(5):
            if no_datagram_within(sock, 0.3):
                break
        assert no_datagram_within(sock, 1.0), "pinged while the Manager was wedged"
        release.set()
        # The round that waited on the lock was late (STATUS only); the next one pings.
        assert receive(sock) == ["STATUS=0 pending"]
        assert receive(sock) == ["WATCHDOG=1", "STATUS=0 pending"]
    finally:
        release.set()
        holder.join(5)
        watchdog.stop()
        notifier.close()


def test_a_check_that_raises_or_is_too_slow_sends_no_ping(
    systemd: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    path, sock = systemd
    notifier = Notifier(path, watchdog_usec=100_000)
    calls = []

    def check() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("manager broke")
        time.sleep(0.2)  # longer than the 0.05 s interval: late, so no WATCHDOG=1
        return "slow"

    watchdog = Watchdog(notifier, 0.05, check)
    watchdog.start()
    try:
        assert receive(sock) == ["STATUS=slow"]
    finally:
        watchdog.stop()
        notifier.close()
    assert "did not answer its status check" in caplog.text
    assert "no ping this round" in caplog.text


def test_a_stopped_background_loop_stops_the_pings_and_is_said_in_status(
    systemd: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 20.1: a daemon whose registry loop died still answered its status check, so
    # systemd kept hearing that it was healthy while it could no longer be reached.
    path, sock = systemd
    notifier = Notifier(path, watchdog_usec=200_000)
    broken: list[str] = []
    watchdog = Watchdog(notifier, 0.05, lambda: "3 trusted", lambda: list(broken))
    watchdog.start()
    try:
        assert receive(sock) == ["WATCHDOG=1", "STATUS=3 trusted"]
        broken.append("registry loop stopped: boom")
        for _ in range(5):  # a round that read the problems before they appeared may ping
            if receive(sock)[0] != "WATCHDOG=1":
                break
        expected = ["STATUS=3 trusted; unhealthy: registry loop stopped: boom"]
        assert [receive(sock) for _ in range(3)] == [expected] * 3
    finally:
        watchdog.stop()
        notifier.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "watchdog: not reporting healthy to systemd: registry loop stopped: boom"
    ]
