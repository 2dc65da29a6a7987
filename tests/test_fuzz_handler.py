"""Property tests of the port-444 handler (SPEC 3, 5): random bytes, random JSON shapes and
mutated validly signed messages thrown at ``Manager.process_message`` and
``Manager.handle_connection``.

Invariants: no exception escapes; nothing observable changes (trusted / pending / outgoing,
the bytes of trust.json, events, sends) unless the input is validly signed by a key allowed
to make that change; a connection that never completes is dropped by the read deadline; the
replay set and the pending queue stay within their caps however many inputs arrive.

Each property reuses one Manager across its examples (a Manager per example would cost a
trust.json and a directory lock each); a mutation that kept a valid signature may change
state, so the node is rebuilt after one. The longer coverage-guided runs are in fuzz/.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Callable

import pytest
from fakeruntime import Nodes, Peer, seed_trust, snapshot
from hypothesis import event, given
from hypothesis import strategies as st
from strategies import fuzz, json_values

import pilothandshake.wire as wire
from pilothandshake.constants import MAX_CLOCK_SKEW, MAX_MESSAGE_AGE, MAX_PENDING
from pilothandshake.errors import MessageError
from pilothandshake.identity import Identity, b64encode, decode_key, decode_signature, verify
from pilothandshake.manager import Manager
from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    MESSAGE_TYPES,
    HandshakeMsg,
    decode_b64,
)
from pilothandshake.store import OutgoingRequest, PendingHandshake, TrustRecord
from pilothandshake.testing import MemoryRuntime
from pilothandshake.wire import read_message

OWN = 1
TRUSTED = Peer(7)  # trusted, its key pinned by the trust record
PENDING = Peer(9)  # pending and registry-bound: its key is strongly pinned
OUTGOING = Peer(11)  # we sent it a request: its accept would grant trust
STRANGER = Peer(30)  # unknown: its request would become pending
ATTACKER = Identity.generate()
PINS = {TRUSTED.node_id: TRUSTED.identity.public_key, PENDING.node_id: PENDING.identity.public_key}
TYPES = sorted(MESSAGE_TYPES)


class HandlerNode:
    """A strict Manager (no registry) over a real trust.json holding one record of each kind.

    ``state()`` is everything the invariants compare; ``reset()`` rebuilds the node after an
    input that was allowed to change it.
    """

    def __init__(self, root: str) -> None:
        self._root = root
        self._nodes = Nodes(root)
        self._generation = 0
        self.manager: Manager
        self.runtime: MemoryRuntime
        self.directory = ""
        self.reset()

    def reset(self) -> None:
        self._nodes.close()
        self._nodes = Nodes(self._root)
        self._generation += 1
        self.directory = os.path.join(self._root, f"g{self._generation}")
        now = datetime.now(timezone.utc).replace(microsecond=0)
        seed_trust(
            self.directory,
            trusted=(TrustRecord(TRUSTED.node_id, TRUSTED.key, now, mutual=True),),
            pending=(PendingHandshake(PENDING.node_id, PENDING.key, "hello", now, bound=True),),
            outgoing=(OutgoingRequest(OUTGOING.node_id, now),),
        )
        self.manager, self.runtime = self._nodes.make(OWN, directory=self.directory)
        self.manager.start()

    def trust_json(self) -> bytes:
        with open(os.path.join(self.directory, "trust.json"), "rb") as handle:
            return handle.read()

    def state(self) -> tuple[Any, ...]:
        with self.runtime._lock:
            effects = (list(self.runtime.events), list(self.runtime.sent))
        return (snapshot(self.manager), self.trust_json(), effects)

    def close(self) -> None:
        self._nodes.close()


@pytest.fixture
def handler_node(tmp_path: Any) -> Iterator[HandlerNode]:
    node = HandlerNode(str(tmp_path))
    try:
        yield node
    finally:
        node.close()


def validly_signed(data: bytes) -> bool:
    """The test's own oracle of SPEC 5 steps 1-3 for this node (strict, no registry): may
    ``data`` change state? Errs towards True at the edges of the timestamp window."""
    try:
        msg = HandshakeMsg.from_json(data)
    except MessageError:
        return False
    if msg.node_id == OWN:
        return False
    now = time.time()
    if not now - MAX_MESSAGE_AGE - 5 <= msg.timestamp <= now + MAX_CLOCK_SKEW + 5:
        return False
    key = decode_key(msg.public_key)
    signature = decode_signature(msg.signature_v2)
    if key is None or signature is None or not verify(key, msg.v2_challenge(OWN), signature):
        return False
    pin = PINS.get(msg.node_id)
    return pin is None or pin == key


def as_read_from_a_connection(data: bytes) -> bytes:
    """What ``read_message`` hands on from a connection carrying ``data`` and then closing:
    the first complete JSON object (trailing bytes ignored, as SPEC 3 says), else the bytes."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        try:
            return read_message(theirs, deadline=5.0)
        except MessageError:
            return b""


def process_without_change(
    node: HandlerNode, data: bytes, feed: Callable[[bytes], None], *, connection: bool = False
) -> None:
    """Feed ``data``; unless it is (or, over a connection, starts with) a validly signed
    message, nothing observable may change."""
    before = node.state()
    feed(data)
    if validly_signed(as_read_from_a_connection(data) if connection else data):
        event("kept a valid signature: state may change; node rebuilt")
        node.reset()
        return
    assert node.state() == before


# -- strategies ---------------------------------------------------------------------------

FIELDS = [f.name for f in dataclasses.fields(HandshakeMsg)]
# Message-like objects: the real field names with values of any JSON type.
message_shapes = st.dictionaries(
    st.sampled_from([*FIELDS, "extra"]),
    st.one_of(
        json_values,
        st.sampled_from(TYPES),
        st.sampled_from([0, 1, 7, 9, 11, 2**32 - 1, 2**32, -1]),
        st.just(int(time.time())),
        st.just(TRUSTED.key),
    ),
)


def respell_base64(text: str, how: int) -> str:
    """Another spelling of base64 ``text``: set unused low bits of the last data character
    (decodes to the same bytes), drop the padding, or slip in whitespace."""
    if decode_b64(text) is None:  # an earlier mutation already broke it
        return text + ("=" if how % 2 else " ")
    if how == 0 and text.endswith("="):
        stripped = text.rstrip("=")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(stripped[-1])
        spare = 0b1111 if text.endswith("==") else 0b11
        return stripped[:-1] + alphabet[last | spare] + text[len(stripped) :]
    if how == 1:
        return text.rstrip("=")
    if how == 2:
        return text[:10] + "\n" + text[10:]
    return base64.urlsafe_b64encode(base64.b64decode(text)).decode()


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A validly signed message that would change state, then one to four mutations of its
    fields or its bytes."""
    peer, msg_type = draw(
        st.sampled_from(
            [
                (TRUSTED, HANDSHAKE_REVOKE),  # would remove trust
                (OUTGOING, HANDSHAKE_ACCEPT),  # would grant trust
                (OUTGOING, HANDSHAKE_REJECT),  # would clear the outgoing request
                (PENDING, HANDSHAKE_REQUEST),  # would replace the pending request
                (PENDING, HANDSHAKE_REVOKE),  # would drop the pending request
                (STRANGER, HANDSHAKE_REQUEST),  # would add a pending request
            ]
        )
    )
    msg = peer.message(msg_type, OWN, justification="sync", reason="done")
    fields: dict[str, Any] = json.loads(msg.to_json())
    raw: bytes | None = None
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 13))
        name = draw(st.sampled_from(FIELDS))
        if op == 0:
            fields[name] = draw(json_values)
        elif op == 1:
            fields.pop(name, None)
        elif op == 2:
            fields["type"] = draw(st.sampled_from(TYPES))
        elif op == 3:
            stamp = fields.get("timestamp")
            base = stamp if type(stamp) is int else int(time.time())
            fields["timestamp"] = base + draw(st.integers(-1000, 1000))
        elif op == 4:
            fields["node_id"] = draw(st.sampled_from([0, OWN, 7, 9, 11, 30, 31, 2**32 - 1]))
        elif op == 5:
            target = draw(st.sampled_from(["public_key", "signature_v2", "signature"]))
            fields[target] = respell_base64(str(fields.get(target) or ""), draw(st.integers(0, 3)))
        elif op == 6:
            fields["signature"], fields["signature_v2"] = (
                fields.get("signature_v2", ""),
                fields.get("signature", ""),
            )
        elif op == 7:
            # The attacker's key with the real signature: must fail verification.
            fields["public_key"] = ATTACKER.public_key_b64
        elif op == 8:
            # Fully re-signed by the attacker: valid only for a node nobody pinned.
            forged = HandshakeMsg(
                type=str(fields.get("type", msg_type)),
                node_id=fields["node_id"] if type(fields.get("node_id")) is int else peer.node_id,
                public_key=ATTACKER.public_key_b64,
                justification=str(fields.get("justification") or ""),
                reason=str(fields.get("reason") or ""),
                timestamp=int(time.time()),
            )
            fields = json.loads(forged.to_json())
            fields["signature_v2"] = b64encode(ATTACKER.sign(forged.v2_challenge(OWN)))
        elif op == 9:
            fields[name if name in ("justification", "reason") else "justification"] = draw(
                st.text(max_size=20)
            )
        elif op == 10:
            fields[draw(st.text(max_size=8))] = draw(json_values)  # unknown field
        else:
            data = raw if raw is not None else json.dumps(fields).encode()
            if op == 11:
                raw = data[: draw(st.integers(0, len(data)))]
            elif op == 12:
                raw = data + draw(st.binary(max_size=16))
            else:
                index = draw(st.integers(0, max(len(data) - 1, 0)))
                raw = data[:index] + bytes([draw(st.integers(0, 255))]) + data[index + 1 :]
    if raw is None:
        raw = json.dumps(fields, ensure_ascii=draw(st.booleans())).encode("utf-8", "replace")
    return raw


# -- process_message ------------------------------------------------------------------------


def test_seeded_messages_do_change_state_so_the_invariant_can_fail(
    handler_node: HandlerNode,
) -> None:
    """Control: the unmutated messages the fuzzer starts from are accepted and change state,
    so an unchanged state after a mutation means the mutation was refused."""
    before = handler_node.state()
    data = TRUSTED.data(HANDSHAKE_REVOKE, OWN, reason="done")
    assert validly_signed(data)
    handler_node.manager.process_message(data, ("127.0.0.1", 4000))
    assert handler_node.state() != before
    assert not handler_node.manager.is_trusted(TRUSTED.node_id)


def test_random_bytes_never_raise_nor_change_state(handler_node: HandlerNode) -> None:
    @fuzz(300)
    @given(st.binary(max_size=2048) | st.binary(max_size=8).map(lambda b: b"{" + b))
    def check(data: bytes) -> None:
        process_without_change(
            handler_node, data, lambda d: handler_node.manager.process_message(d, ("127.0.0.1", 1))
        )

    check()


def test_random_json_shapes_never_raise_nor_change_state(handler_node: HandlerNode) -> None:
    @fuzz(300)
    @given(json_values | message_shapes)
    def check(value: Any) -> None:
        data = json.dumps(value).encode()
        process_without_change(
            handler_node, data, lambda d: handler_node.manager.process_message(d, ("127.0.0.2", 1))
        )

    check()


def test_mutated_signed_messages_change_nothing_unless_still_validly_signed(
    handler_node: HandlerNode,
) -> None:
    @fuzz(300)
    @given(mutated_messages())
    def check(data: bytes) -> None:
        process_without_change(
            handler_node, data, lambda d: handler_node.manager.process_message(d, ("127.0.0.3", 1))
        )

    check()


# -- handle_connection --------------------------------------------------------------------


def serve_over_socketpair(manager: Manager, data: bytes) -> None:
    """``data`` written to one end of a socketpair and half-closed; the handler reads the
    other end. It must return (not raise) and close its end."""
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        manager.handle_connection(theirs)
        assert theirs.fileno() == -1, "the handler did not close the connection"


def test_handle_connection_survives_random_and_mutated_input(handler_node: HandlerNode) -> None:
    @fuzz(150)
    @given(st.binary(max_size=4096) | mutated_messages())
    def check(data: bytes) -> None:
        process_without_change(
            handler_node,
            data,
            lambda d: serve_over_socketpair(handler_node.manager, d),
            connection=True,
        )

    check()


def test_handle_connection_gives_up_on_an_unfinished_message_at_the_deadline(
    handler_node: HandlerNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that sends part of a message and then stalls is dropped when the total read
    deadline passes (shortened here from 10 s), with nothing changed."""
    deadline = 0.3
    monkeypatch.setattr(wire, "read_message", functools.partial(read_message, deadline=deadline))

    @fuzz(10)
    @given(st.binary(max_size=64).map(lambda b: b'{"type": "' + b))
    def check(prefix: bytes) -> None:
        before = handler_node.state()
        ours, theirs = socket.socketpair()
        with ours:
            ours.sendall(prefix)  # never completed, never closed
            started = time.monotonic()
            handler_node.manager.handle_connection(theirs)
            assert time.monotonic() - started < deadline + 1.0
        assert handler_node.state() == before

    check()


# -- bounds ---------------------------------------------------------------------------------


def test_replay_set_stays_within_its_caps_under_a_flood() -> None:
    """Thousands of distinct, validly signed messages from 20 source addresses: the replay
    set never exceeds its total cap (shrunk to 512 here) nor 64 per source, and memory
    stops growing once the caps are reached."""
    manager = Manager(MemoryRuntime(OWN), max_replay=512, max_replay_per_source=64)
    replay = manager._intake._replay
    sender = Identity.generate()
    key = sender.public_key_b64
    now = int(time.time())

    def flood(start: int, count: int) -> None:
        for n in range(start, start + count):
            # A reject from a node we have no outgoing request to changes nothing but
            # enters the replay set.
            msg = HandshakeMsg(HANDSHAKE_REJECT, 100 + n, key, timestamp=now, reason=str(n))
            msg.signature_v2 = b64encode(sender.sign(msg.v2_challenge(OWN)))
            manager.process_message(msg.to_json(), (f"127.0.0.{1 + n % 20}", 5000))
            if n % 97 == 0:
                assert len(replay._owner) <= 512
                assert all(len(entries) <= 64 for entries in replay._sources.values())

    try:
        flood(0, 1500)
        assert len(replay._owner) == 512  # the caps were reached, not merely approached
        tracemalloc.start()
        baseline, _ = tracemalloc.get_traced_memory()
        flood(1500, 1500)
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert grown - baseline < 512 * 1024
        assert len(replay._owner) <= 512
        assert len(replay._expiry) <= 2 * 512 + 64
    finally:
        manager.close()


def test_pending_queue_stays_within_its_caps_under_a_flood() -> None:
    """Unbound requests from invented node IDs: one source address gets at most 16 pending;
    1200 more over 100 addresses fill the queue to 256 and no further; the side tables
    stay as small."""
    manager = Manager(MemoryRuntime(OWN))
    sender = Identity.generate()
    now = int(time.time())

    def request(node: int, remote: str) -> None:
        msg = HandshakeMsg(HANDSHAKE_REQUEST, node, sender.public_key_b64, timestamp=now)
        msg.signature_v2 = b64encode(sender.sign(msg.v2_challenge(OWN)))
        manager.process_message(msg.to_json(), remote)

    try:
        for n in range(100):
            request(1000 + n, ("127.0.0.200", 5000))
        assert manager.pending_count() == 16
        for n in range(1200):
            request(5000 + n, (f"127.0.{n % 100}.9", 5000))
        assert manager.pending_count() == MAX_PENDING
        per_source: dict[str, int] = {}
        for pending in manager.pending_requests():
            per_source[pending.source] = per_source.get(pending.source, 0) + 1
        assert max(per_source.values()) <= 16
        assert len(manager._state._arrival) <= MAX_PENDING
        assert len(manager._state._protected) == 0
    finally:
        manager.close()


def test_concurrent_garbage_connections_never_raise(handler_node: HandlerNode) -> None:
    """Eight threads serving random garbage at once: no handler raises, nothing changes."""
    before = handler_node.state()
    errors: list[BaseException] = []
    rng = random.Random(444)
    payloads = [rng.randbytes(rng.randrange(0, 600)) for _ in range(200)]

    def worker(chunk: list[bytes]) -> None:
        try:
            for data in chunk:
                serve_over_socketpair(handler_node.manager, data)
        except BaseException as exc:  # collected for the main thread's assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(payloads[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert handler_node.state() == before
