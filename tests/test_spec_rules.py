"""SPEC rules that no other test pins down, found by manual mutation testing.

Each test here was written because deleting or weakening one SPEC rule in a scratch copy of
the package left the rest of the suite green (RELIABILITY.md section 6 lists every
mutation tried and the test that kills it). Unit level: Managers over fake runtimes.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from fakeruntime import (
    FakeClock,
    FakeRegistry,
    Nodes,
    Peer,
    respell,
    seed_trust,
    settle,
    snapshot,
)

from pilothandshake.config import Config, RegistryConfig
from pilothandshake.daemon import Daemon
from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
)
from pilothandshake.store import OutgoingRequest, TrustRecord
from pilothandshake.wire import send_message

OWN = 1
REMOTE = ("127.0.0.1", 40000)
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


# SPEC 5 step 3 / 8: key pinning


def test_strict_reject_signed_with_a_key_other_than_the_pin_keeps_the_outgoing_request(
    nodes: Nodes, peer: Peer
) -> None:
    """Without a registry the reject rule itself asks for nothing: only the pin check of
    step 3 stops a stranger's key from cancelling our request to a pinned node."""
    manager, _runtime = nodes.make()
    manager.process_relayed_request(7, "relayed", peer.key)  # pending, pins peer.key
    manager.send_request(7, "we want it too")
    assert snapshot(manager)[2][7].state == "waiting"
    impostor = Peer(7)
    manager.process_message(impostor.data(HANDSHAKE_REJECT, OWN, reason="no"), REMOTE)
    assert snapshot(manager)[2][7].state == "waiting"
    # The pinned key may reject: the same message shape then ends the request.
    manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason="no"), REMOTE)
    assert snapshot(manager)[2][7].state == "rejected"


class _HookedRegistry(FakeRegistry):
    """Runs ``hook`` once, inside the first lookup: state changes while a message from the
    same node is between its pin check and its decision (SPEC 16: re-check under the lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Any = None

    def lookup(self, node_id: int) -> dict[str, Any]:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return super().lookup(node_id)


def test_pin_is_checked_again_under_the_lock_after_the_registry_lookup(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = _HookedRegistry()  # knows no key for node 7: direct requests are unbound
    manager, _runtime = nodes.make(registry=registry)
    impostor = Peer(7)
    # While the impostor's request waits for its lookup, the real node's relayed request
    # arrives and pins its key.
    registry.hook = lambda: manager.process_relayed_request(7, "real", peer.key)
    with caplog.at_level(logging.WARNING):
        manager.process_message(impostor.data(HANDSHAKE_REQUEST, OWN, justification="x"), REMOTE)
    assert [(p.public_key, p.justification, p.bound) for p in manager.pending_requests()] == [
        (peer.key, "real", True)
    ]
    assert any("pinned key" in r.getMessage() for r in caplog.records)


def test_pin_compares_decoded_key_bytes_not_base64_text(nodes: Nodes, peer: Peer) -> None:
    """SPEC 4: another base64 spelling of the pinned key is the same key."""
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make()
    data = peer.data(HANDSHAKE_REVOKE, OWN, public_key=respell(peer.key))
    manager.process_message(data, REMOTE)
    assert manager.trusted_peers() == []
    assert "trust.revoked_by_peer" in runtime.topics()


# SPEC 5 step 3: the registry answer cache


def test_registry_answer_is_cached_for_30_seconds_only(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    clock = FakeClock()
    manager, _ = nodes.make(registry=registry, clock=clock)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="a"), REMOTE)
    assert registry.calls_of("lookup") == [(7,)]
    clock.advance(29.0)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="b"), REMOTE)
    assert registry.calls_of("lookup") == [(7,)]
    clock.advance(1.5)  # now 30.5 s old: stale
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="c"), REMOTE)
    assert registry.calls_of("lookup") == [(7,), (7,)]
    assert manager.pending_requests()[0].justification == "c"


# SPEC 5 step 1 / 6: relayed input


def test_relayed_input_claiming_our_own_node_id_changes_nothing(nodes: Nodes) -> None:
    manager, runtime = nodes.make(registry=FakeRegistry())
    manager.send_request(5, "unrelated")  # an outgoing entry, so an accept would matter
    before = snapshot(manager)
    manager.process_relayed_request(OWN, "from myself?", Peer(OWN).key)
    manager.process_relayed_approval(OWN)
    manager.process_relayed_rejection(OWN)
    settle(manager)
    assert snapshot(manager) == before
    assert runtime.topics() == []


# SPEC 7: reject received


def test_strict_reject_with_registry_neither_bound_nor_pinned_keeps_the_outgoing_request(
    nodes: Nodes, peer: Peer
) -> None:
    registry = FakeRegistry()
    registry.lookup_errors.add(7)  # registry cannot vouch for node 7: the reject is unbound
    manager, _runtime = nodes.make(registry=registry)
    manager.send_request(7, "please")
    manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason="no"), REMOTE)
    assert snapshot(manager)[2][7].state == "waiting"
    # Once the registry binds the key, the same kind of reject is believed.
    registry.lookup_errors.clear()
    registry.keys[7] = peer.key
    manager.process_message(peer.data(HANDSHAKE_REJECT, OWN, reason="still no"), REMOTE)
    assert (snapshot(manager)[2][7].state, snapshot(manager)[2][7].reason) == (
        "rejected",
        "still no",
    )


# SPEC 3: sending


def test_send_message_half_closes_so_a_receiver_reading_to_eof_finishes_at_once() -> None:
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
    data = Peer(7).data(HANDSHAKE_REQUEST, OWN)
    with server:
        started = time.monotonic()
        send_message(server.getsockname(), data, timeout=5, grace=5)
        elapsed = time.monotonic() - started
        thread.join(timeout=10)
    assert received == [data]
    assert elapsed < 2.5  # returned at the receiver's close, long before the 5 s grace


# SPEC 4: the registry credential in the clear


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_strict_daemon_warns_at_start_about_a_non_loopback_registry_without_tls(
    caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    # A port nothing listens on: 0.0.0.0 is not a loopback address, yet connecting to it
    # reaches this host and is refused at once, so the registry loop just backs off.
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="phd-") as root:  # short AF_UNIX socket path
        config = Config(
            identity=os.path.join(root, "identity.json"),
            listen="127.0.0.1:0",
            registry=RegistryConfig(address=f"{host}:{port}", poll_interval=0.05),
        )
        with caplog.at_level(logging.WARNING, logger="pilothandshake"), Daemon(config):
            pass
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not on loopback and TLS is off" in line for line in lines) == warned


# SPEC 7: accept received


def test_accept_from_an_already_trusted_peer_changes_nothing(nodes: Nodes, peer: Peer) -> None:
    """An accept for an outgoing request to a node already trusted reaches the "already
    trusted" rule: the record (``mutual=False``, its approval time) stays as it is."""
    record = TrustRecord(7, peer.key, T0, mutual=False)
    outgoing = OutgoingRequest(7, datetime.now(timezone.utc))
    seed_trust(f"{nodes.root}/n1", trusted=(record,), outgoing=(outgoing,))
    manager, runtime = nodes.make()
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    settle(manager)
    assert manager.trusted_peers() == [record]
    assert runtime.events == []


def test_strict_accept_matching_only_a_pending_pin_is_not_a_trust_record_pin(
    nodes: Nodes, peer: Peer
) -> None:
    """With a registry, an unbound direct accept is believed only when it matches a
    trust-record pin; the key of a pending request (even a relayed one) is not that."""
    registry = FakeRegistry()
    registry.lookup_errors.add(7)  # the direct accept cannot be registry-bound
    manager, _runtime = nodes.make(registry=registry)
    manager.process_relayed_request(7, "relayed", peer.key)  # pending, strongly pinned
    manager.send_request(7, "we want it too")
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN), REMOTE)
    assert not manager.is_trusted(7)
    assert 7 in snapshot(manager)[2]
    # The same accept, once the registry binds the key, is believed.
    registry.lookup_errors.clear()
    registry.keys[7] = peer.key
    fresh = int(time.time()) - 1  # not a replay of the first accept
    manager.process_message(peer.data(HANDSHAKE_ACCEPT, OWN, timestamp=fresh), REMOTE)
    assert manager.is_trusted(7)


# SPEC 6 / 15: the per-source pending quota


def test_pending_quota_per_source_counts_unbound_requests_only(nodes: Nodes) -> None:
    registry = FakeRegistry()  # knows only node 30's key: the others are unbound
    vouched = Peer(30)
    registry.keys[30] = vouched.key
    manager, _ = nodes.make(registry=registry, max_pending_per_source=2)
    for node in (20, 21, 22):
        manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert [p.node_id for p in manager.pending_requests()] == [20, 21]
    # The quota keeps one host from filling the queue with invented identities; a request
    # the registry vouches for is not one of those.
    manager.process_message(vouched.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert [(p.node_id, p.bound) for p in manager.pending_requests()] == [
        (20, False),
        (21, False),
        (30, True),
    ]


def test_pending_quota_per_source_is_per_address_not_per_port(nodes: Nodes) -> None:
    manager, _ = nodes.make(max_pending_per_source=2)
    for port, node in zip((40001, 40002, 40003), (20, 21, 22)):
        manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), ("127.0.0.1", port))
    assert [p.node_id for p in manager.pending_requests()] == [20, 21]
    manager.process_message(Peer(22).data(HANDSHAKE_REQUEST, OWN), ("127.0.1.2", 40003))
    assert [p.node_id for p in manager.pending_requests()] == [20, 21, 22]


# SPEC 7 / 8: revoke received


def test_strict_revoke_signed_with_the_key_of_a_relayed_pending_request_is_applied(
    nodes: Nodes, peer: Peer
) -> None:
    """A relayed pending request pins its key (SPEC 5), and a revoke signed with the
    pinned key is applied even without a registry to bind it."""
    manager, runtime = nodes.make()
    manager.process_relayed_request(7, "relayed", peer.key)
    assert manager.pending_count() == 1
    manager.process_message(peer.data(HANDSHAKE_REVOKE, OWN, reason="changed my mind"), REMOTE)
    assert manager.pending_count() == 0
    assert "trust.revoked_by_peer" in runtime.topics()


# SPEC 7 / 15: texts are cut to 1 KiB


def test_reject_reason_is_truncated_to_1_kib_on_a_utf8_boundary(nodes: Nodes, peer: Peer) -> None:
    manager, runtime = nodes.make()
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    reason = "\u00e9" * 1000  # 2000 bytes of two-byte characters
    assert manager.reject_handshake(7, reason)
    settle(manager)
    (payload,) = [p for t, p in runtime.events if t == "handshake.rejected"]
    assert payload["reason"] == "\u00e9" * 512
    sent = [m for _, m in runtime.sent_messages() if m.type == HANDSHAKE_REJECT]
    assert [m.reason for m in sent] == ["\u00e9" * 512]


# SPEC 4 / 5 step 3: legacy receivers


def test_legacy_receiver_accepts_a_signature_v2_in_place_of_the_go_signature(
    nodes: Nodes, peer: Peer
) -> None:
    """This implementation's senders fill only ``signature_v2``: a legacy-mode node must
    still accept them, or two Python nodes in a mixed fleet could never meet."""
    manager, _ = nodes.make(strict=False)
    data = peer.data(HANDSHAKE_REQUEST, OWN, justification="v2 only", v2=True, legacy=False)
    manager.process_message(data, REMOTE)
    assert [(p.node_id, p.public_key) for p in manager.pending_requests()] == [(7, peer.key)]
