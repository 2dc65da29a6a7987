"""One message over TCP: the bounded reader, the receipt, the sender's delivery rule and the
reset that refuses a connection (SPEC 3)."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fakeruntime import Peer

from pilothandshake.constants import MAX_MESSAGE_SIZE
from pilothandshake.errors import MessageError, SendError
from pilothandshake.messages import HANDSHAKE_REQUEST, HandshakeMsg
from pilothandshake.wire import (
    peer_of,
    peer_text,
    read_message,
    reset_close,
    send_message,
    serve_message,
    write_receipt,
)

Address = tuple[str, int]  # wire.Peer: where a connection came from

SIGNATURE = bytes(range(64))  # what a receipt carries; whose key signed it is not wire's job

MESSAGE = HandshakeMsg(
    HANDSHAKE_REQUEST, 7, justification="deploy ✓", timestamp=1_700_000_000
).to_json()

# --- reading one message --------------------------------------------------------------------


class ChunkSocket:
    """A socket stand-in returning preset chunks, one per recv, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.recvs = 0

    def gettimeout(self) -> float:
        return 1.0  # a socket with a timeout: every recv waits with the message's deadline

    def settimeout(self, value: float) -> None:
        assert value > 0

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        return self.chunks.pop(0) if self.chunks else b""

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_RD


def test_read_message_finds_the_end_across_recv_boundaries() -> None:
    data = '{"a":"x\\"}{\\\\","b":[{"c":"é"}],"d":"}"}'.encode()
    # Split at every byte, so escapes, brackets in strings and UTF-8 straddle recv calls.
    sock = ChunkSocket([data[i : i + 1] for i in range(len(data))] + [b"trailing"])
    assert read_message(sock) == data  # type: ignore[arg-type]
    assert sock.recvs == len(data)
    assert json.loads(data)["d"] == "}"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_a_message_already_arrived_is_read_without_setting_a_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    left.sendall(MESSAGE)
    assert right.gettimeout() is None
    assert read_message(right) == MESSAGE
    assert right.gettimeout() is None  # one recv of what had arrived: no ioctl, no poll


def test_a_blocking_socket_waits_for_a_late_message_with_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = pair
    threading.Timer(0.2, left.sendall, (MESSAGE,)).start()
    assert read_message(right, deadline=5.0) == MESSAGE
    timeout = right.gettimeout()
    assert timeout is not None and 4.0 < timeout <= 5.0  # waited with what was left of 5 s


def test_read_message_returns_the_object_without_whitespace_or_trailing_bytes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(b' \r\n\t{"type":"x","n":{"m":[1]}}{"second":2}')
    started = time.monotonic()
    assert read_message(reader, deadline=5) == b'{"type":"x","n":{"m":[1]}}'
    assert time.monotonic() - started < 1  # did not wait for the peer to close


def test_read_message_rejects_a_non_object_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(b"  [1,2]")
    started = time.monotonic()
    with pytest.raises(MessageError, match="not a JSON object"):
        read_message(reader, deadline=5)
    assert time.monotonic() - started < 1


def test_read_message_rejects_more_than_64_kib(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    payload = b'{"x":"' + b"a" * (MAX_MESSAGE_SIZE + 1)
    sender = threading.Thread(target=writer.sendall, args=(payload,))
    sender.start()
    with pytest.raises(MessageError, match="too large"):
        read_message(reader, deadline=5)
    reader.close()  # unblocks the sender if the socket buffer is full
    sender.join(timeout=5)
    assert not sender.is_alive()


def test_read_message_accepts_an_object_of_exactly_the_limit(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    payload = b'{"x":"' + b"a" * (MAX_MESSAGE_SIZE - 8) + b'"}'
    assert len(payload) == MAX_MESSAGE_SIZE
    sender = threading.Thread(target=writer.sendall, args=(payload + b"more",))
    sender.start()
    assert read_message(reader, deadline=5) == payload
    reader.close()
    sender.join(timeout=5)


def test_read_message_times_out_on_a_silent_peer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(b'{"type":')
    started = time.monotonic()
    with pytest.raises(MessageError, match="timed out"):
        read_message(reader, deadline=0.3)
    assert 0.25 <= time.monotonic() - started < 2


def test_read_message_deadline_is_total_not_per_recv(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    stop = threading.Event()

    def trickle() -> None:
        writer.sendall(b'{"x":"')
        for _ in range(100):  # at most 5 s
            if stop.wait(0.05):
                return
            writer.sendall(b"a")

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(MessageError, match="timed out"):
            read_message(reader, deadline=0.3)
        assert time.monotonic() - started < 1.5
    finally:
        stop.set()
        sender.join(timeout=5)


def test_read_message_returns_partial_bytes_when_the_peer_closes_early(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(b'{"type":"handshake_request"')
    writer.shutdown(socket.SHUT_WR)
    data = read_message(reader, deadline=5)
    assert data == b'{"type":"handshake_request"'
    with pytest.raises(MessageError, match="invalid JSON"):
        HandshakeMsg.from_json(data)


def test_read_message_returns_empty_bytes_when_the_peer_sends_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.shutdown(socket.SHUT_WR)
    assert read_message(reader, deadline=5) == b""


def test_the_sender_hears_nothing_until_the_receiver_writes_its_receipt(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Issue 15 item 1: round 2's end of stream right after the read proved only that some
    process read the bytes. Now the receiver's write side stays open until it has taken
    the message and writes the receipt line, then the end of stream."""
    reader, writer = pair
    writer.settimeout(0.2)
    writer.sendall(MESSAGE)  # the writer does not half-close: the object's end is enough
    assert read_message(reader, deadline=5) == MESSAGE
    with pytest.raises(socket.timeout):
        writer.recv(1)
    write_receipt(reader, SIGNATURE)
    writer.settimeout(5)
    with writer.makefile("rb") as stream:
        assert json.loads(stream.readline()) == {"receipt": base64.b64encode(SIGNATURE).decode()}
        assert stream.read() == b""


def test_read_message_does_not_shut_down_before_the_message_is_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.sendall(MESSAGE[:-1])
    with pytest.raises(MessageError, match="timed out"):
        read_message(reader, deadline=0.2)
    writer.settimeout(0.2)
    with pytest.raises(socket.timeout):
        writer.recv(1)  # no end of stream: an unfinished message is not confirmed


# --- sending one message --------------------------------------------------------------------


class Listener:
    """A loopback listener whose single accepted connection is handled by ``behaviour``."""

    def __init__(self, behaviour: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(5)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.behaviour = behaviour
        self.receipt = SIGNATURE
        self.received = b""
        self.read = threading.Event()  # set once ``received`` holds what was read
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        if self.behaviour == "reset":
            reset_close(conn)
            return
        if self.behaviour == "hung":  # accepted, never read: a stopped or swamped peer
            self.release.wait(5)
            conn.close()
            return
        with conn:
            if self.behaviour == "reply":  # a receiver that answers before it closes
                conn.settimeout(5)
                self.received = conn.recv(65536)
                conn.sendall(b"x" * 10000)
                return
            self.received = read_message(conn, deadline=5)
            self.read.set()
            if self.behaviour in ("receipt", "hold"):
                answer = SIGNATURE if self.behaviour == "hold" else self.receipt
                conn.sendall(b'{"receipt": "' + base64.b64encode(answer) + b'"}\n')
            if self.behaviour == "hold":
                self.release.wait(5)

    def close(self) -> None:
        self.release.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[Listener]:
    server = Listener(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("listener", ["receipt"], indirect=True)
def test_send_message_returns_the_receipts_signature(listener: Listener) -> None:
    started = time.monotonic()
    assert send_message(listener.address, MESSAGE, timeout=5, grace=3) == SIGNATURE
    assert time.monotonic() - started < 2  # returned at the receipt, not the end of the grace
    listener.thread.join(timeout=5)
    assert listener.received == MESSAGE


@pytest.mark.parametrize("listener", ["close", "reply"], indirect=True)
def test_send_message_returns_none_when_the_peer_closes_without_a_receipt(
    listener: Listener,
) -> None:
    """A round-2 receiver (end of stream after the read), one that dropped the message, or
    one that answers something else: it answered, but proved nothing."""
    started = time.monotonic()
    assert send_message(listener.address, MESSAGE, timeout=5, grace=3) is None
    assert time.monotonic() - started < 2  # returned at the close, not the end of the grace
    listener.thread.join(timeout=5)
    assert listener.received == MESSAGE


@pytest.mark.parametrize("listener", ["receipt"], indirect=True)
@pytest.mark.parametrize("receipt", [b"", b"x" * 63, b"x" * 65])
def test_a_receipt_that_is_not_a_signature_is_none(listener: Listener, receipt: bytes) -> None:
    listener.receipt = receipt
    assert send_message(listener.address, MESSAGE, timeout=5, grace=3) is None


@pytest.mark.parametrize("listener", ["hold"], indirect=True)
def test_send_message_returns_at_the_receipt_line_before_the_receiver_closes(
    listener: Listener,
) -> None:
    started = time.monotonic()
    assert send_message(listener.address, MESSAGE, timeout=5, grace=3) == SIGNATURE
    assert time.monotonic() - started < 2  # did not wait for the grace to run out
    assert listener.thread.is_alive()  # the receiver still holds the connection
    assert listener.received == MESSAGE


@pytest.mark.parametrize("listener", ["hung"], indirect=True)
def test_send_message_to_a_peer_that_accepts_but_never_reads_raises_send_error(
    listener: Listener,
) -> None:
    started = time.monotonic()
    with pytest.raises(SendError, match=r"did not confirm the message within 0\.3 s"):
        send_message(listener.address, MESSAGE, timeout=5, grace=0.3)
    assert 0.25 <= time.monotonic() - started < 3


def test_send_message_to_a_listener_that_never_accepts_raises_send_error() -> None:
    """A stopped process: the kernel completes the TCP handshake from the listen backlog,
    takes the bytes, and nobody ever reads them."""
    with socket.socket() as backlog:
        backlog.bind(("127.0.0.1", 0))
        backlog.listen(4)
        with pytest.raises(SendError, match="did not confirm"):
            send_message(backlog.getsockname(), MESSAGE, timeout=5, grace=0.3)


@pytest.mark.parametrize("listener", ["reset"], indirect=True)
def test_send_message_raises_send_error_on_reset(listener: Listener) -> None:
    # Depending on when the reset lands it fails the write, the half-close or the wait.
    host, port = listener.address
    with pytest.raises(SendError, match=re.escape(f"{host}:{port}")):
        send_message(listener.address, MESSAGE, timeout=5, grace=3)


def test_send_message_raises_send_error_when_refused() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()  # nothing listens there now
    with pytest.raises(SendError, match=r"connect to 127\.0\.0\.1"):
        send_message(address, b"{}", timeout=2, grace=0.2)


def test_reset_close_makes_the_peer_see_a_reset_and_never_raises() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with server, socket.create_connection(server.getsockname(), timeout=5) as client:
        conn, _ = server.accept()
        reset_close(conn)
        reset_close(conn)  # already closed: still no exception
        with pytest.raises(ConnectionResetError):
            client.recv(10)


# SPEC 3: sending


def test_spec3_send_message_half_closes_so_a_receiver_reading_to_eof_finishes_at_once() -> None:
    """A receiver that reads until the sender's end of stream (Go's ``io.ReadAll``) must see
    it right after the write, not when the sender gives up waiting at the end of its grace."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)  # accept is bounded even if the send fails
    received: list[bytes] = []

    def read_to_eof() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            chunks = []
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            received.append(b"".join(chunks))

    thread = threading.Thread(target=read_to_eof, daemon=True)
    thread.start()
    data = Peer(7).data(HANDSHAKE_REQUEST, 1)
    with server:
        started = time.monotonic()
        send_message(server.getsockname(), data, timeout=5, grace=5)
        elapsed = time.monotonic() - started
        thread.join(timeout=10)
    assert received == [data]
    assert elapsed < 2.5  # returned at the receiver's close, long before the 5 s grace


# -- serve_message: one port-444 connection, the socket side of Manager.handle_connection --


def serve_over_tcp(
    data: bytes,
    take: Callable[[bytes, Address], bytes | None],
    unreadable: Callable[[Address, MessageError], None] = lambda peer, problem: None,
) -> tuple[bytes, Address]:
    """Send ``data`` over loopback TCP to ``serve_message``; what came back, and from where
    the client connected."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        with client:
            conn, _ = server.accept()
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            serve_message(conn, take, unreadable)
            assert conn.fileno() == -1  # closed
            client.settimeout(10)
            answer = b""
            while chunk := client.recv(4096):  # ends: the server closed its end
                answer += chunk
            return answer, client.getsockname()[:2]


def test_serve_message_hands_the_message_and_the_peer_as_a_tuple_and_writes_the_receipt() -> None:
    taken: list[tuple[bytes, Address]] = []

    def take(data: bytes, peer: Address) -> bytes | None:
        taken.append((data, peer))
        return b"\x01" * 64

    answer, client = serve_over_tcp(b' {"type": "x"} ', take)
    assert taken == [(b'{"type": "x"}', ("127.0.0.1", client[1]))]
    assert json.loads(answer) == {"receipt": base64.b64encode(b"\x01" * 64).decode()}


def test_serve_message_writes_no_receipt_for_a_message_not_taken() -> None:
    answer, _ = serve_over_tcp(b"{}", lambda data, peer: None)
    assert answer == b""


def test_serve_message_reports_an_unreadable_message_with_its_peer() -> None:
    reports: list[tuple[Address, str]] = []
    answer, client = serve_over_tcp(
        b"[1, 2]",
        lambda data, peer: pytest.fail("an unreadable message was taken"),
        lambda peer, problem: reports.append((peer, str(problem))),
    )
    assert answer == b"" and reports == [(("127.0.0.1", client[1]), "not a JSON object")]


def test_serve_message_never_raises_and_logs_an_unexpected_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(data: bytes, peer: Address) -> bytes | None:
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR):
        assert serve_over_tcp(b"{}", broken)[0] == b""
    assert [r.getMessage() for r in caplog.records] == [
        "unexpected error serving a port 444 connection"
    ]


def test_a_peer_off_tcp_is_named_by_its_host_alone() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert peer_of(ours) == ("local", 0)
        assert peer_text(peer_of(ours)) == "local"
    assert peer_text(("::1", 5)) == "[::1]:5"
    assert peer_text(("127.0.0.1", 5)) == "127.0.0.1:5"
