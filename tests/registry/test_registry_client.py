"""The registry client: framing, limits, retry, concurrency and TLS pinning, on loopback."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from pilothandshake.constants import MAX_REGISTRY_FRAME_CLIENT
from pilothandshake.errors import RegistryError
from pilothandshake.identity import Identity, decode_signature, verify
from pilothandshake.registry.client import (
    RegistryConnection,
    encode_frame,
    normalize_fingerprint,
    read_frame,
)
from pilothandshake.registry.server import RegistryServer

Behaviour = Callable[["Stub", socket.socket, int], None]


class Stub:
    """A loopback TCP server running ``behaviour(stub, conn, index)`` per connection."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.connections += 1
            threading.Thread(target=self._run, args=(conn, self.connections), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        # The client hanging up mid-exchange is part of several tests.
        with conn, contextlib.suppress(OSError):
            self.behaviour(self, conn, index)

    def read(self, conn: socket.socket) -> dict[str, Any] | None:
        request = read_frame(conn, 1 << 16, 5.0, 5.0)
        if request is not None:
            self.requests.append(request)
        return request

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    made: list[Stub] = []
    yield made
    for stub in made:
        stub.close()


def make_stub(stubs: list[Stub], behaviour: Behaviour) -> Stub:
    stub = Stub(behaviour)
    stubs.append(stub)
    return stub


def answer_ok(stub: Stub, conn: socket.socket, index: int) -> None:
    """Answer every request with ``<type>_ok`` until the client closes."""
    while (request := stub.read(conn)) is not None:
        conn.sendall(encode_frame({"type": f"{request['type']}_ok"}))


def test_response_frame_over_1_mib_is_refused_and_connection_dropped(
    stubs: list[Stub],
) -> None:
    closed = threading.Event()

    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        stub.read(conn)
        conn.sendall(struct.pack(">I", MAX_REGISTRY_FRAME_CLIENT + 1))
        conn.settimeout(5.0)
        if conn.recv(1) == b"":
            closed.set()

    stub = make_stub(stubs, behaviour)
    client = RegistryConnection(stub.address, timeout=2.0)
    with pytest.raises(RegistryError, match="exceeds"):
        client.lookup(1)
    assert closed.wait(5.0), "client kept the connection open"
    assert stub.connections == 1  # not retried


def test_client_reconnects_once_after_the_server_drops_the_connection(
    stubs: list[Stub],
) -> None:
    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        request = stub.read(conn)
        assert request is not None
        conn.sendall(encode_frame({"type": "lookup_ok", "conn": index}))
        # The first connection is dropped after one answer; later ones stay open.
        while index > 1 and (request := stub.read(conn)) is not None:
            conn.sendall(encode_frame({"type": "lookup_ok", "conn": index}))

    stub = make_stub(stubs, behaviour)
    client = RegistryConnection(stub.address, timeout=2.0)
    assert client.lookup(1)["conn"] == 1
    assert client.lookup(1)["conn"] == 2
    assert client.lookup(1)["conn"] == 2  # the new connection is reused
    assert stub.connections == 2


def test_client_retries_a_broken_connection_only_once(stubs: list[Stub]) -> None:
    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        stub.read(conn)  # read the request, then close without answering

    stub = make_stub(stubs, behaviour)
    client = RegistryConnection(stub.address, timeout=2.0)
    with pytest.raises(RegistryError, match="closed"):
        client.lookup(1)
    assert stub.connections == 2
    assert len(stub.requests) == 2


def test_error_response_raises_its_text_and_is_not_retried(stubs: list[Stub]) -> None:
    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        while stub.read(conn) is not None:
            conn.sendall(encode_frame({"type": "error", "error": "request failed"}))

    stub = make_stub(stubs, behaviour)
    client = RegistryConnection(stub.address, timeout=2.0)
    with pytest.raises(RegistryError, match=r"^request failed$"):
        client.lookup(1)
    assert len(stub.requests) == 1


def test_unexpected_response_type_is_an_error(stubs: list[Stub]) -> None:
    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        while stub.read(conn) is not None:
            conn.sendall(encode_frame({"type": "heartbeat_ok"}))

    stub = make_stub(stubs, behaviour)
    with pytest.raises(RegistryError, match="unexpected type 'heartbeat_ok'"):
        RegistryConnection(stub.address, timeout=2.0).lookup(1)


def test_silent_server_times_out(stubs: list[Stub]) -> None:
    release = threading.Event()

    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        stub.read(conn)
        release.wait(5.0)

    stub = make_stub(stubs, behaviour)
    started = time.monotonic()
    with pytest.raises(RegistryError, match="did not answer"):
        RegistryConnection(stub.address, timeout=0.3).lookup(1)
    release.set()
    assert time.monotonic() - started < 2.0
    assert stub.connections == 1


def test_slow_call_does_not_block_another_thread(stubs: list[Stub]) -> None:
    release = threading.Event()

    def behaviour(stub: Stub, conn: socket.socket, index: int) -> None:
        while (request := stub.read(conn)) is not None:
            if request["type"] == "poll_handshakes":
                release.wait(5.0)
            conn.sendall(encode_frame({"type": f"{request['type']}_ok"}))

    stub = make_stub(stubs, behaviour)
    ident = Identity.generate()
    client = RegistryConnection(stub.address, ident.sign, timeout=5.0)
    polled: list[dict[str, Any]] = []
    poller = threading.Thread(target=lambda: polled.append(client.poll_handshakes(1)))
    poller.start()
    deadline = time.monotonic() + 5.0
    while not any(r["type"] == "poll_handshakes" for r in stub.requests):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.lookup(2)["type"] == "lookup_ok"
    assert poller.is_alive()  # the poll is still waiting, yet the lookup went through
    release.set()
    poller.join(timeout=5.0)
    assert polled == [{"type": "poll_handshakes_ok"}]


def test_requests_carry_the_documented_fields_and_signatures(stubs: list[Stub]) -> None:
    stub = make_stub(stubs, answer_ok)
    ident = Identity.generate()
    client = RegistryConnection(stub.address, ident.sign, timeout=2.0)
    client.register("127.0.0.1:444", ident.public_key_b64, hostname="h")
    client.resolve(5, 7)
    client.request_handshake(7, 5, "why", "c2ln")
    client.respond_handshake(7, 5, True, "c2ln")
    register, resolve, request, respond = stub.requests
    # SPEC 17: register is always signed, over register:<key>:<timestamp>.
    stamp, signed = register.pop("timestamp"), register.pop("signature")
    assert register == {
        "type": "register",
        "listen_addr": "127.0.0.1:444",
        "public_key": ident.public_key_b64,
        "hostname": "h",
    }
    assert type(stamp) is int and abs(stamp - time.time()) < 60
    signature = decode_signature(signed)
    assert signature is not None
    challenge = f"register:{ident.public_key_b64}:{stamp}".encode()
    assert verify(ident.public_key, challenge, signature)
    assert (resolve["node_id"], resolve["requester_id"]) == (5, 7)
    signature = decode_signature(resolve["signature"])
    assert signature is not None
    assert verify(ident.public_key, b"resolve:7:5", signature)
    assert request == {
        "type": "request_handshake",
        "from_node_id": 7,
        "to_node_id": 5,
        "justification": "why",
        "signature": "c2ln",
    }
    assert respond["accept"] is True and respond["signature"] == "c2ln"


def test_signed_call_without_signer_is_an_error() -> None:
    client = RegistryConnection("127.0.0.1:1")
    with pytest.raises(RegistryError, match="no identity"):
        client.heartbeat(1)


def test_unreachable_registry_is_a_registry_error() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(RegistryError, match="cannot connect"):
        RegistryConnection(f"127.0.0.1:{port}", timeout=1.0).lookup(1)


def test_client_is_safe_to_share_between_threads() -> None:
    server = RegistryServer("127.0.0.1", 0)
    server.start()
    try:
        client = RegistryConnection("{}:{}".format(*server.address), timeout=5.0)
        idents = [Identity.generate() for _ in range(4)]
        ids = [client.register("127.0.0.1:4000", i.public_key_b64)["node_id"] for i in idents]
        errors: list[str] = []

        def worker(n: int) -> None:
            for _ in range(25):
                node_id = ids[n % len(ids)]
                got = client.lookup(node_id)
                if got["public_key"] != idents[n % len(ids)].public_key_b64:
                    errors.append(f"wrong answer for {node_id}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert errors == []
        client.close()
        with pytest.raises(RegistryError, match="closed"):
            client.lookup(ids[0])
    finally:
        server.stop()


def test_tls_with_pinned_fingerprint(tls_cert: tuple[str, str, str]) -> None:
    cert, key, fingerprint = tls_cert
    server = RegistryServer("127.0.0.1", 0, certfile=cert, keyfile=key)
    server.start()
    try:
        address = "{}:{}".format(*server.address)
        ident = Identity.generate()
        pinned = RegistryConnection(address, ident.sign, tls=True, fingerprint=fingerprint.lower())
        node_id = pinned.register("127.0.0.1:4000", ident.public_key_b64)["node_id"]
        assert pinned.heartbeat(node_id)["type"] == "heartbeat_ok"

        wrong = "00" * 32
        with pytest.raises(RegistryError) as info:
            RegistryConnection(address, tls=True, fingerprint=wrong).lookup(node_id)
        assert wrong in str(info.value)
        assert normalize_fingerprint(fingerprint) in str(info.value)

        # Without a pin the self-signed certificate fails normal verification.
        with pytest.raises(RegistryError, match="TLS"):
            RegistryConnection(address, tls=True, timeout=2.0).lookup(node_id)
        # A plain client cannot talk to a TLS registry.
        with pytest.raises(RegistryError):
            RegistryConnection(address, timeout=1.0).lookup(node_id)
    finally:
        server.stop()


def test_hostname_methods_against_the_embedded_registry() -> None:
    server = RegistryServer("127.0.0.1", 0)
    server.start()
    try:
        address = "{}:{}".format(*server.address)
        a, b = Identity.generate(), Identity.generate()
        client_a, client_b = (
            RegistryConnection(address, a.sign),
            RegistryConnection(address, b.sign),
        )
        answer = client_a.register("127.0.0.1:4000", a.public_key_b64, hostname="agent-a")
        assert answer["hostname"] == "agent-a"
        b_id = client_b.register("127.0.0.1:4001", b.public_key_b64, hostname="agent-a")["node_id"]
        assert client_b.set_hostname(b_id, "agent-b") == {
            "type": "set_hostname_ok",
            "node_id": b_id,
            "hostname": "agent-b",
        }
        found = client_a.resolve_hostname("agent-b")
        assert (found["node_id"], found["public"], found["hostname"]) == (b_id, False, "agent-b")
        assert client_a.lookup(b_id)["hostname"] == "agent-b"
        with pytest.raises(RegistryError, match=r"^hostname 'agent-a' is taken by node 1$"):
            client_b.set_hostname(b_id, "agent-a")
        with pytest.raises(RegistryError, match="is reserved"):
            client_b.set_hostname(b_id, "localhost")
        with pytest.raises(RegistryError, match="is not registered"):
            client_b.resolve_hostname("nobody")
        client_a.close()
        client_b.close()
    finally:
        server.stop()


def test_registry_error_text_is_kept_but_never_raw(stubs: list[Stub]) -> None:
    text = "node 99 is not online\n2030-01-01 WARNING forged\x1b[2J" + "z" * 1000

    def answer(stub: Stub, conn: socket.socket, index: int) -> None:
        while stub.read(conn) is not None:
            conn.sendall(encode_frame({"type": "error", "error": text}))

    client = RegistryConnection(make_stub(stubs, answer).address, timeout=2.0)
    with pytest.raises(RegistryError) as info:
        client.lookup(99)
    shown = str(info.value)
    assert shown.startswith("node 99 is not online\\n2030-01-01 WARNING forged\\x1b[2J")
    assert shown.isprintable()
    assert len(shown) < 320
    client.close()


def test_a_held_poll_carries_its_wait_and_is_awaited_past_the_client_timeout(
    stubs: list[Stub],
) -> None:
    def hold(stub: Stub, conn: socket.socket, index: int) -> None:
        while (request := stub.read(conn)) is not None:
            if request.get("wait"):
                time.sleep(0.8)  # longer than the client's timeout, within the wait
            conn.sendall(encode_frame({"type": "poll_handshakes_ok", "requests": []}))

    stub = make_stub(stubs, hold)
    client = RegistryConnection(stub.address, Identity.generate().sign, timeout=0.5)
    try:
        assert client.poll_handshakes(3, wait=1.0)["type"] == "poll_handshakes_ok"
        assert stub.requests[0]["wait"] == 1.0
        client.poll_handshakes(3)
        assert "wait" not in stub.requests[1]  # the production registry's plain poll
    except RegistryError:
        pytest.fail("a held poll was given up after the client's timeout")
    finally:
        client.close()


def test_close_aborts_a_call_in_flight_at_once(stubs: list[Stub]) -> None:
    # Issue 19.5: a registry that accepts and never answers held a stop for a whole
    # registry timeout; the loop's held poll must also end at once on stop.
    def silent(stub: Stub, conn: socket.socket, index: int) -> None:
        stub.read(conn)
        stub.stopping.wait(30)

    stub = make_stub(stubs, silent)
    client = RegistryConnection(stub.address, Identity.generate().sign, timeout=30.0)
    failed: list[str] = []

    def poll() -> None:
        try:
            client.poll_handshakes(3, wait=30.0)
        except RegistryError as exc:
            failed.append(str(exc))

    caller = threading.Thread(target=poll)
    caller.start()
    deadline = time.monotonic() + 5
    while not stub.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stub.requests, "the poll never reached the stub"
    client.close()
    caller.join(5)
    assert not caller.is_alive(), "close() did not end the call in flight"
    assert failed and stub.connections == 1  # aborted, not retried on a new connection


def test_respond_handshake_carries_a_rejection_s_reason_only_when_there_is_one(
    stubs: list[Stub],
) -> None:
    """Issue 16: the reason crosses the relay when the registry passes it on; an empty one
    is not sent, so the request is what it was before for every other answer."""
    stub = make_stub(stubs, answer_ok)
    client = RegistryConnection(stub.address, timeout=2.0)
    client.respond_handshake(1, 2, False, "c2ln", reason="not today")
    client.respond_handshake(1, 2, True, "c2ln")
    assert [r.get("reason") for r in stub.requests] == ["not today", None]
    assert "reason" not in stub.requests[1]
