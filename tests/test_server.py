"""HandshakeServer: hands connections to the handler, enforces the connection caps with an
immediate reset, evicts the slowest unfinished connection at the global cap, releases slots,
and closes with a bounded wait for handlers in flight."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pilothandshake.errors import MessageError
from pilothandshake.server import HandshakeServer
from pilothandshake.wire import read_message, write_receipt

WAIT = 5.0


class Gate:
    """A handler that records each connection and holds it until released."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.received: list[bytes] = []
        self.entered = 0
        self.release = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        with self.cond:
            self.entered += 1
            self.cond.notify_all()
        self.release.wait(WAIT)
        conn.settimeout(WAIT)
        data = conn.recv(1024)
        with self.cond:
            self.received.append(data)
            self.cond.notify_all()
        conn.close()

    def wait_entered(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.entered >= count, WAIT)

    def wait_received(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.received) >= count, WAIT)


def serve(gate: Gate | Reader, **caps: float) -> HandshakeServer:
    server = HandshakeServer(("127.0.0.1", 0), gate, **caps)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


def connect(server: HandshakeServer, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(server.address)
    return sock


def refused(server: HandshakeServer, source: str = "127.0.0.1") -> bool:
    """True when the server resets a new connection (rather than holding it open).

    On loopback the reset can arrive before ``connect()`` returns, so both count."""
    try:
        sock = connect(server, source)
    except ConnectionResetError:
        return True
    with sock:
        try:
            sock.recv(1)
        except ConnectionResetError:
            return True
    return False


def test_handler_receives_each_connection_on_the_bound_port(gate: Gate) -> None:
    server = serve(gate)
    try:
        assert server.address[0] == "127.0.0.1" and server.address[1] > 0
        gate.release.set()
        with connect(server) as sock:
            sock.sendall(b'{"type":"x"}')
            assert gate.wait_received(1)
        assert gate.received == [b'{"type":"x"}']
    finally:
        server.close()


def test_connection_beyond_global_cap_is_reset_when_none_is_old_enough_to_evict(
    gate: Gate,
) -> None:
    server = serve(gate, max_connections=2, max_connections_per_source=10, evict_after=60)
    try:
        held = [connect(server), connect(server)]
        assert gate.wait_entered(2)
        assert refused(server)
        assert gate.entered == 2
        assert server.active_connections() == 2
        gate.release.set()
        for sock in held:
            sock.close()
    finally:
        server.close()


def test_per_source_cap_refuses_that_source_but_not_another(gate: Gate) -> None:
    # evict_after 0: even a connection old enough to evict does not make room beyond the
    # per-source cap.
    server = serve(gate, max_connections=10, max_connections_per_source=1, evict_after=0)
    try:
        first = connect(server, "127.0.0.1")
        assert gate.wait_entered(1)
        assert refused(server, "127.0.0.1")
        other = connect(server, "127.0.0.2")
        assert gate.wait_entered(2)
        gate.release.set()
        first.close()
        other.close()
    finally:
        server.close()


class Reader:
    """A handler that reads one message as the daemon does (``wire.read_message``, which
    half-closes once the message is whole), records it, then holds the connection (as if
    still processing) until released."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.read: list[bytes | str] = []
        self.release = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        try:
            result: bytes | str = read_message(conn, deadline=WAIT)
            write_receipt(conn, bytes(64))  # processed: the rest is holding the connection
        except MessageError as exc:
            result = str(exc)
        with self.cond:
            self.read.append(result)
            self.cond.notify_all()
        self.release.wait(WAIT)
        conn.close()

    def wait_read(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.read) >= count, WAIT)


@pytest.fixture
def reader() -> Iterator[Reader]:
    r = Reader()
    yield r
    r.release.set()


def receipted(sock: socket.socket) -> bool:
    """True when the server wrote ``sock`` a receipt and its end of stream within WAIT."""
    sock.settimeout(WAIT)
    with sock.makefile("rb") as stream:
        return stream.readline().startswith(b'{"receipt": ') and stream.read() == b""


def ended(sock: socket.socket) -> bool:
    """True when the server has ended ``sock`` (end of stream or reset) within WAIT."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_at_the_global_cap_a_newcomer_evicts_the_oldest_unfinished_connection(
    reader: Reader, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(reader, max_connections=3, max_connections_per_source=10, evict_after=0.2)
    try:
        done = connect(server, "127.0.0.2")  # the oldest, but its message is whole
        done.sendall(b"{}")
        assert reader.wait_read(1)
        assert receipted(done)  # read and processed; the reader still holds it
        slow = [connect(server, "127.0.0.3"), connect(server, "127.0.0.4")]
        for sock in slow:
            sock.sendall(b'{"justification":"')
        time.sleep(0.3)  # let both unfinished ones age past evict_after
        caplog.set_level(logging.WARNING, logger="pilothandshake.server")
        with connect(server, "127.0.0.5") as newcomer:
            newcomer.sendall(b'{"type":"real"}')
            assert receipted(newcomer)  # admitted, not reset
            assert ended(slow[0])  # the older unfinished one made room
        assert reader.wait_read(3)
        # Two handler threads finish these two reads: in either order on a loaded machine.
        assert sorted(reader.read[1:]) == [b'{"justification":"', b'{"type":"real"}']
        assert server.active_connections() == 3  # the evicted slot was handed over, once
        slow[1].settimeout(0.2)
        with pytest.raises(socket.timeout):
            slow[1].recv(1)  # the younger unfinished one is still being read
        assert any("evicted 1 open over 0.2 s" in r.getMessage() for r in caplog.records)
        for sock in (done, *slow):
            sock.close()
    finally:
        reader.release.set()
        server.close()


def test_connections_with_a_whole_message_are_never_evicted(reader: Reader) -> None:
    server = serve(reader, max_connections=2, max_connections_per_source=10, evict_after=0)
    try:
        held = []
        for index in range(2):
            sock = connect(server, f"127.0.0.{2 + index}")
            sock.sendall(b"{}")
            held.append(sock)
        assert reader.wait_read(2)
        assert refused(server, "127.0.0.9")  # both are being processed: no room
        assert server.active_connections() == 2
        for sock in held:
            sock.close()
    finally:
        reader.release.set()
        server.close()


def test_slot_is_released_when_handler_finishes(gate: Gate) -> None:
    server = serve(gate, max_connections=1, max_connections_per_source=1)
    try:
        gate.release.set()
        for expected in (1, 2, 3):
            with connect(server) as sock:
                sock.sendall(b"{}")
                assert gate.wait_received(expected)
            deadline = time.monotonic() + WAIT
            while server.active_connections() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.active_connections() == 0
    finally:
        server.close()


def test_handler_exception_is_logged_and_releases_slot(caplog: pytest.LogCaptureFixture) -> None:
    def boom(conn: socket.socket) -> None:
        raise RuntimeError("handler bug")

    server = HandshakeServer(("127.0.0.1", 0), boom, max_connections=1)
    server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="pilothandshake.server"):
            with connect(server) as sock:
                sock.settimeout(WAIT)
                assert sock.recv(1) == b""  # closed normally after the failure
            assert server.wait_idle(WAIT)
        assert any("handler bug" in (r.exc_text or "") for r in caplog.records)
    finally:
        server.close()


def test_refusals_are_logged_at_most_once_a_second(
    gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(gate, max_connections=1, max_connections_per_source=1)
    try:
        held = connect(server)
        assert gate.wait_entered(1)
        with caplog.at_level(logging.WARNING, logger="pilothandshake.server"):
            for _ in range(20):
                assert refused(server)
        refusals = [r for r in caplog.records if "connection limit" in r.getMessage()]
        assert 1 <= len(refusals) <= 2
        gate.release.set()
        held.close()
    finally:
        server.close()


def test_close_waits_for_handlers_in_flight_then_refuses_new_connections(gate: Gate) -> None:
    server = serve(gate)
    sock = connect(server)
    assert gate.wait_entered(1)
    closer = threading.Thread(target=server.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive(), "close() returned while a handler was still running"
    sock.sendall(b"{}")
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert gate.received == [b"{}"]
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.address, timeout=WAIT)
    server.close()  # idempotent


def test_close_wait_for_stuck_handler_is_bounded() -> None:
    stuck = threading.Event()

    def hang(conn: socket.socket) -> None:
        stuck.wait(WAIT)
        conn.close()

    server = HandshakeServer(("127.0.0.1", 0), hang, drain_timeout=0.2)
    server.start()
    try:
        sock = connect(server)
        deadline = time.monotonic() + WAIT
        while not server.active_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 2.0
        sock.close()
    finally:
        stuck.set()


def test_bind_to_port_in_use_raises_oserror(gate: Gate) -> None:
    server = serve(gate)
    try:
        with pytest.raises(OSError):
            HandshakeServer(server.address, gate)
    finally:
        server.close()


def test_close_before_start_releases_the_port(gate: Gate) -> None:
    server = HandshakeServer(("127.0.0.1", 0), gate)
    address = server.address
    server.close()
    again = HandshakeServer(address, gate)
    again.close()


def test_an_idle_server_waits_without_polling_and_closes_at_once(
    gate: Gate, accept_waits: list[str]
) -> None:
    server = serve(gate)
    deadline = time.monotonic() + WAIT
    while not accept_waits and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # idle: the accept loop must not wake (it polled every 0.1 s)
    assert accept_waits == ["accept"]  # one blocking accept(), no poll before it
    with connect(server) as sock:  # still serves
        sock.sendall(b"hello")
        gate.release.set()
        assert gate.wait_received(1)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 2.0  # woken, not timed out
    assert gate.received == [b"hello"]


def test_a_failing_accept_is_logged_once_retried_and_serving_goes_on(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [OSError(24, "Too many open files")] * 3
    accept = HandshakeServer.get_request

    def flaky(self: HandshakeServer) -> Any:
        if failures:
            raise failures.pop()
        return accept(self)

    monkeypatch.setattr(HandshakeServer, "get_request", flaky)
    with caplog.at_level(logging.WARNING, logger="pilothandshake.server"):
        server = serve(gate)
        try:
            with connect(server) as sock:  # served once the failures are over
                sock.sendall(b"hello")
                gate.release.set()
                assert gate.wait_received(1)
        finally:
            server.close()
    assert not failures
    lines = [r.getMessage() for r in caplog.records if "accept on" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0]  # 3 failures in < 1 s
