"""Property tests of the registry frame decoder (SPEC 11) on both ends: random bytes and
random or mutated frames sent to the embedded server over a real loopback socket, random
bytes answered by a fake server to the real ``RegistryConnection``, and random bytes fed to
``read_frame`` directly.

Invariants: the server answers every frame with an error or an ``*_ok`` frame (or closes),
logs no internal error, and keeps serving a well-formed request afterwards; no trust pair
appears or disappears unless the request carried the node's valid signature; the client
raises ``RegistryError`` and nothing else, within its timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from strategies import fuzz, json_values
from test_registry_client import Stub

from pilothandshake.errors import RegistryError
from pilothandshake.identity import Identity, b64encode, decode_signature, verify
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.challenges import (
    report_trust_challenge,
    respond_challenge,
    revoke_trust_challenge,
)
from pilothandshake.registry.client import RegistryConnection, encode_frame, read_frame
from pilothandshake.registry.config import RegistryLimits, ServerConfig
from pilothandshake.registry.server import RegistryServer

HEADER = struct.Struct(">I")


REQUEST_TYPES = [
    "register",
    "set_hostname",
    "resolve_hostname",
    "heartbeat",
    "lookup",
    "resolve",
    "set_visibility",
    "report_trust",
    "revoke_trust",
    "request_handshake",
    "poll_handshakes",
    "respond_handshake",
]
FIELD_NAMES = [
    "type",
    "node_id",
    "peer_id",
    "requester_id",
    "from_node_id",
    "to_node_id",
    "public_key",
    "listen_addr",
    "signature",
    "justification",
    "accept",
    "public",
    "owner",
    "hostname",
]
# Request-like objects: a real type and real field names with values of any JSON type.
request_shapes = st.builds(
    lambda kind, rest: {"type": kind, **rest},
    st.sampled_from(REQUEST_TYPES),
    st.dictionaries(
        st.sampled_from(FIELD_NAMES[1:]),
        json_values | st.sampled_from([1, 2, 3, 0, 2**32]) | st.just("127.0.0.1:4000"),
        max_size=6,
    ),
)


class ErrorLog(logging.Handler):
    """Collects ERROR records of the registry server: each is an internal failure."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Registry:
    """A started embedded registry with two registered nodes, A and B."""

    def __init__(self) -> None:
        # Hundreds of signed requests from two nodes: no rate limit should hide a change.
        roomy = RegistryLimits(
            mutations_per_minute_per_node=10**6, mutations_per_minute_per_source=10**6
        )
        self.server = RegistryServer("127.0.0.1", 0, config=ServerConfig(limits=roomy))
        self.server.start()
        host, port = self.server.address
        self.address = f"{host}:{port}"
        self.a = Identity.generate()
        self.b = Identity.generate()
        client = RegistryConnection(self.address, timeout=2.0)
        try:
            self.a_id = client.register("127.0.0.1:4001", self.a.public_key_b64)["node_id"]
            self.b_id = client.register("127.0.0.1:4002", self.b.public_key_b64)["node_id"]
        finally:
            client.close()
        self.keys = {self.a_id: self.a.public_key, self.b_id: self.b.public_key}
        self.errors = ErrorLog()
        logging.getLogger("pilothandshake.registry").addHandler(self.errors)

    @property
    def trust(self) -> set[tuple[int, int]]:
        """The vouches (directed: who vouched for whom), read under the registry's lock."""
        registry = self.server.registry
        with registry._lock:
            return set(registry._state.vouches)

    def set_trust(self, vouches: set[tuple[int, int]]) -> None:
        registry = self.server.registry
        with registry._lock:
            state = registry._state
            for pair in list(state.vouches):
                state.apply(["unvouch", *pair])
            for pair in vouches:
                state.apply(["vouch", *pair])

    def assert_still_serving(self) -> None:
        """A fresh connection gets a well-formed lookup answered."""
        with socket.create_connection(self.server.address, timeout=5.0) as sock:
            sock.sendall(encode_frame({"type": "lookup", "node_id": self.a_id}))
            answer = read_frame(sock, 1 << 20, 5.0, 5.0)
        assert answer is not None and answer["type"] == "lookup_ok"
        assert answer["public_key"] == self.a.public_key_b64

    def close(self) -> None:
        logging.getLogger("pilothandshake.registry").removeHandler(self.errors)
        self.server.stop()


@pytest.fixture
def registry() -> Iterator[Registry]:
    started = Registry()
    try:
        yield started
    finally:
        started.close()


def assert_well_formed_answer(frame: dict[str, Any] | None) -> None:
    assert frame is not None
    kind = frame.get("type")
    assert isinstance(kind, str) and (kind == "error" or kind.endswith("_ok")), frame
    if kind == "error":
        # The embedded registry says why; whatever the request held, in one short line.
        text = frame.get("error")
        assert isinstance(text, str) and text and "\n" not in text and len(text) < 400


# -- the embedded server --------------------------------------------------------------------


def test_server_answers_random_bytes_with_errors_and_keeps_serving(registry: Registry) -> None:
    """Random bytes, then a half-close: every frame the server sends back is an error or an
    ok answer, it closes the connection within the timeout, and it serves the next client."""

    @fuzz(200)
    @given(
        st.binary(max_size=512)
        | st.builds(lambda n, body: HEADER.pack(n) + body, st.integers(0, 2**32 - 1), st.binary())
        | st.builds(lambda body: HEADER.pack(len(body)) + body, st.binary(max_size=256))
    )
    def check(data: bytes) -> None:
        with socket.create_connection(registry.server.address, timeout=5.0) as sock:
            # The server may refuse an oversized header and close before reading the rest.
            with contextlib.suppress(OSError):
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            while True:
                try:
                    frame = read_frame(sock, 1 << 20, 5.0, 5.0)
                except RegistryError as exc:
                    pytest.fail(f"server sent a malformed frame: {exc}")
                except ConnectionResetError:
                    break  # closed with our unread bytes pending: the kernel sends a reset
                if frame is None:
                    break
                assert_well_formed_answer(frame)
                assert time.monotonic() - started < 5.0
        registry.assert_still_serving()
        assert registry.errors.records == []

    check()


def test_server_answers_random_json_frames_and_the_connection_goes_on(
    registry: Registry,
) -> None:
    """Well-framed random JSON objects (request-like or not): each gets an error or an ok
    answer on the same connection, which then still answers a well-formed lookup."""

    @fuzz(250)
    @given(st.dictionaries(st.text(max_size=12), json_values) | request_shapes)
    def check(request: dict[str, Any]) -> None:
        before = registry.trust
        with socket.create_connection(registry.server.address, timeout=5.0) as sock:
            sock.sendall(encode_frame(request))
            assert_well_formed_answer(read_frame(sock, 1 << 20, 5.0, 5.0))
            sock.sendall(encode_frame({"type": "lookup", "node_id": registry.b_id}))
            answer = read_frame(sock, 1 << 20, 5.0, 5.0)
            assert answer is not None and answer["type"] == "lookup_ok"
        # Unsigned random requests cannot create or remove trust pairs.
        assert registry.trust == before
        assert registry.errors.records == []

    check()


@st.composite
def mutated_signed_requests(draw: st.DrawFn, registry: Registry) -> dict[str, Any]:
    """A request signed by node A that would change the trust pairs, then one to three
    mutations: a field set to a random value or removed, node IDs swapped, or the signature
    replaced by B's or by A's signature of another challenge."""
    a, b = registry.a_id, registry.b_id
    kind = draw(st.sampled_from(["report_trust", "respond_handshake", "revoke_trust"]))
    if kind == "respond_handshake":
        challenge = respond_challenge(a, b)
    elif kind == "report_trust":
        challenge = report_trust_challenge(a, b)
    else:
        challenge = revoke_trust_challenge(a, b)
    request: dict[str, Any] = {
        "type": kind,
        "node_id": a,
        "peer_id": b,
        "signature": b64encode(registry.a.sign(challenge)),
    }
    if kind == "respond_handshake":
        request["accept"] = True
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 5))
        name = draw(st.sampled_from(["type", "node_id", "peer_id", "signature", "accept"]))
        if op == 0:
            request[name] = draw(json_values)
        elif op == 1:
            request.pop(name, None)
        elif op == 2:
            request["node_id"], request["peer_id"] = request.get("peer_id"), request.get("node_id")
        elif op == 3:
            request["signature"] = b64encode(registry.b.sign(challenge))
        elif op == 4:
            request["signature"] = b64encode(registry.a.sign(handshake_challenge(a, b)))
        else:
            request["type"] = draw(st.sampled_from(REQUEST_TYPES))
    return request


def signed_trust_change(registry: Registry, request: dict[str, Any]) -> bool:
    """The test's oracle: does ``request`` carry a valid signature for a trust-pair change?"""
    kind, node, peer = request.get("type"), request.get("node_id"), request.get("peer_id")
    if type(node) is not int or type(peer) is not int or node not in registry.keys:
        return False
    if kind == "report_trust":
        challenge = report_trust_challenge(node, peer)
    elif kind == "revoke_trust":
        challenge = revoke_trust_challenge(node, peer)
    elif kind == "respond_handshake":
        challenge = respond_challenge(node, peer)
    else:
        return False
    signature = decode_signature(request.get("signature"))
    return signature is not None and verify(registry.keys[node], challenge, signature)


def test_mutated_signed_requests_change_trust_only_when_still_signed(
    registry: Registry,
) -> None:
    # Start from a pair that exists (vouched both ways), so that a revoke could (wrongly)
    # remove it too.
    pair = {(registry.a_id, registry.b_id), (registry.b_id, registry.a_id)}

    @fuzz(200)
    @given(mutated_signed_requests(registry))
    def check(request: dict[str, Any]) -> None:
        registry.set_trust(pair)
        before = registry.trust
        with socket.create_connection(registry.server.address, timeout=5.0) as sock:
            sock.sendall(encode_frame(request))
            assert_well_formed_answer(read_frame(sock, 1 << 20, 5.0, 5.0))
        if signed_trust_change(registry, request):
            event("kept a valid signature")
        else:
            assert registry.trust == before
        assert registry.errors.records == []

    check()


# -- the client -------------------------------------------------------------------------


class Replayer:
    """A fake registry that answers every connection with the current ``payload``, then
    closes (``stall`` False) or goes silent until the client hangs up."""

    def __init__(self) -> None:
        self.payload = b""
        self.stall = False
        self.stub = Stub(self._behave)

    def _behave(self, stub: Stub, conn: socket.socket, index: int) -> None:
        payload, stall = self.payload, self.stall
        conn.settimeout(5.0)
        conn.recv(65536)  # the request (its content does not matter here)
        conn.sendall(payload)
        if stall:
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.stub.close()


def test_client_raises_only_registry_error_within_its_timeout() -> None:
    timeout = 0.1
    replayer = Replayer()
    client = RegistryConnection(replayer.stub.address, timeout=timeout)

    @fuzz(80)
    @given(
        st.binary(max_size=300)
        | st.builds(lambda n, body: HEADER.pack(n) + body, st.integers(0, 2**32 - 1), st.binary())
        | st.builds(
            lambda obj: encode_frame(obj) if isinstance(obj, dict) else b"",
            st.dictionaries(st.text(max_size=8), json_values)
            | st.just({"type": "lookup_ok", "node_id": 5}),
        ),
        st.booleans(),
    )
    def check(payload: bytes, stall: bool) -> None:
        replayer.payload, replayer.stall = payload, stall
        started = time.monotonic()
        try:
            answer = client.lookup(5)
        except RegistryError:
            event("RegistryError")
        else:
            assert answer["type"] == "lookup_ok"
        # Two attempts at most (one retry of a broken connection), each bounded by the
        # header and the body timeouts.
        assert time.monotonic() - started < 4 * timeout + 1.0

    try:
        check()
    finally:
        client.close()
        replayer.close()


def test_read_frame_raises_only_documented_errors_on_random_bytes() -> None:
    """Straight to the decoder: a dict, None (clean close), ``RegistryError`` or a timeout."""

    @fuzz(300)
    @given(
        st.binary(max_size=300)
        | st.builds(lambda body: HEADER.pack(len(body)) + body, st.binary(max_size=256))
        | st.builds(
            lambda text: HEADER.pack(len(text.encode())) + text.encode(),
            st.text(alphabet='{}[]":,0123456789.eE-tfnrulsa\\u ', max_size=64),
        )
    )
    def check(data: bytes) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.sendall(data)
            ours.shutdown(socket.SHUT_WR)
            try:
                frame = read_frame(theirs, 1 << 16, 1.0, 1.0)
            except RegistryError:
                return
            assert frame is None or isinstance(frame, dict)

    check()


def test_many_threads_of_garbage_leave_the_server_serving(registry: Registry) -> None:
    """Eight clients sending garbage at once: the server stays up and answers correctly."""
    failures: list[BaseException] = []

    def garbage(seed: int) -> None:
        try:
            for n in range(25):
                with socket.create_connection(registry.server.address, timeout=5.0) as sock:
                    # A complete bad frame may be refused and closed before our half-close.
                    with contextlib.suppress(OSError):
                        sock.sendall(HEADER.pack(3 + n % 5) + json.dumps([seed, n]).encode()[:7])
                        sock.shutdown(socket.SHUT_WR)
                    with contextlib.suppress(ConnectionResetError):
                        while read_frame(sock, 1 << 20, 5.0, 5.0) is not None:
                            pass
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=garbage, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    registry.assert_still_serving()


def test_unmutated_signed_request_does_change_trust_so_the_invariant_can_fail(
    registry: Registry,
) -> None:
    """Control for the mutation property: the request it starts from is accepted."""
    registry.set_trust(set())
    request = {
        "type": "report_trust",
        "node_id": registry.a_id,
        "peer_id": registry.b_id,
        "signature": b64encode(
            registry.a.sign(report_trust_challenge(registry.a_id, registry.b_id))
        ),
    }
    assert signed_trust_change(registry, request)
    with socket.create_connection(registry.server.address, timeout=5.0) as sock:
        sock.sendall(encode_frame(request))
        assert_well_formed_answer(read_frame(sock, 1 << 20, 5.0, 5.0))
    assert registry.trust == {(registry.a_id, registry.b_id)}
