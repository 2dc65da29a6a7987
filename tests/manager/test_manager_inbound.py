"""Manager: processing an incoming message (SPEC 5) — every drop, strict and legacy
authentication, the forgeries signature_v2 stops, the replay set and the rate-limited drop
log. Key pinning and the registry's key binding are in ``test_manager_pins``."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Callable

import pytest
from fakeruntime import (
    FakeRegistry,
    Nodes,
    Peer,
    respell,
    seed_trust,
    settle,
    snapshot,
)
from managertools import OWN, REMOTE, T0, assert_dropped

from pilothandshake.drops import Drop, DropKind
from pilothandshake.manager import DropLog
from pilothandshake.manager.replay import ReplaySet
from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    HandshakeMsg,
)
from pilothandshake.store import OutgoingRequest, TrustRecord
from pilothandshake.wire import peer_text

REPLAYED = Drop(DropKind.REPLAY, "replayed message")


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# Step 1: decode, own ID, deny list


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"type":"handshake_request","node_id":true,"timestamp":1}', "node_id"),
        (b'{"type":"handshake_hello","node_id":7,"timestamp":1}', "unknown type"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_undecodable_message_is_dropped(
    nodes: Nodes, caplog: pytest.LogCaptureFixture, data: bytes, reason: str
) -> None:
    manager, runtime = nodes.make()
    assert_dropped(manager, runtime, caplog, data, reason)
    assert "node ?" in warnings(caplog)[0]


def test_message_claiming_our_own_node_id_is_dropped(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make(auto_approve=True)
    data = Peer(OWN).data(HANDSHAKE_REQUEST, OWN)
    assert_dropped(manager, runtime, caplog, data, "own node ID")


@pytest.mark.parametrize("msg_type", [HANDSHAKE_REQUEST, HANDSHAKE_ACCEPT, HANDSHAKE_REVOKE])
def test_message_from_a_denied_node_is_dropped_whatever_its_type(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, msg_type: str
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make(auto_approve=True)
    runtime.deny.add(7)
    # INFO, not WARNING: the operator asked for this drop (issue 19).
    data = peer.data(msg_type, OWN)
    assert_dropped(manager, runtime, caplog, data, "deny list", level=logging.INFO)
    [record] = [r for r in caplog.records if "deny list" in r.getMessage()]
    assert record.levelno == logging.INFO and "node 7" in record.getMessage()


# Step 2: timestamp window


@pytest.mark.parametrize("offset", [-5 * 60 - 5, 30 + 5])
def test_message_outside_the_timestamp_window_is_dropped(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, offset: int
) -> None:
    manager, runtime = nodes.make(auto_approve=True)
    data = peer.data(HANDSHAKE_REQUEST, OWN, timestamp=int(time.time()) + offset)
    assert_dropped(manager, runtime, caplog, data, "outside the window")


# Step 3: local authentication


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.data(HANDSHAKE_REQUEST, OWN, public_key=""), "public_key"),
        (lambda p: p.data(HANDSHAKE_REQUEST, OWN, public_key="AAAA"), "public_key"),
        (lambda p: p.data(HANDSHAKE_REQUEST, OWN, v2=False), "signature_v2"),
        (lambda p: p.data(HANDSHAKE_REQUEST, OWN, v2=False, legacy=True), "signature_v2"),
        (lambda p: p.data(HANDSHAKE_REQUEST, 2), "signature_v2"),  # signed for another node
        (lambda p: p.data(HANDSHAKE_REQUEST, OWN, public_key=Peer(8).key), "signature_v2"),
    ],
)
def test_strict_mode_requires_a_key_and_a_valid_signature_v2(
    nodes: Nodes,
    peer: Peer,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[Peer], bytes],
    reason: str,
) -> None:
    manager, runtime = nodes.make(auto_approve=True)
    assert_dropped(manager, runtime, caplog, make(peer), reason)


@pytest.mark.parametrize("with_registry", [False, True])
def test_legacy_mode_drops_an_unsigned_request_without_key(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, with_registry: bool
) -> None:
    """SPEC 8 (issue 11, item 10a): in every mode a port-444 message needs a key."""
    registry = FakeRegistry() if with_registry else None
    manager, runtime = nodes.make(strict=False, registry=registry)
    data = peer.data(HANDSHAKE_REQUEST, OWN, public_key="", v2=False)
    assert_dropped(manager, runtime, caplog, data, "public_key")


def test_legacy_mode_accepts_the_go_style_signature_over_a_registry_bound_key(
    nodes: Nodes, peer: Peer
) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, _ = nodes.make(strict=False, registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, v2=False, legacy=True), REMOTE)
    assert [(p.node_id, p.public_key) for p in manager.pending_requests()] == [(7, peer.key)]


@pytest.mark.parametrize("with_registry", [False, True])
def test_legacy_mode_drops_the_go_style_signature_over_an_unbound_key(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, with_registry: bool
) -> None:
    """Without a registry, or with one that knows no key for the sender, the replayable Go
    signature authenticates nothing."""
    registry = FakeRegistry() if with_registry else None
    manager, runtime = nodes.make(strict=False, registry=registry)
    data = peer.data(HANDSHAKE_REQUEST, OWN, v2=False, legacy=True)
    assert_dropped(manager, runtime, caplog, data, "Go-style signature without a registry-bound")


def test_legacy_mode_drops_a_key_without_any_valid_signature(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make(strict=False)
    data = peer.data(HANDSHAKE_REQUEST, OWN, v2=False)
    assert_dropped(manager, runtime, caplog, data, "no valid signature")


@pytest.mark.parametrize("signed", [False, True])
def test_legacy_accept_without_outgoing_request_is_ignored(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, signed: bool
) -> None:
    """Issue 11 item 10a: an unsigned accept re-trusted a node we never asked; even a signed
    one grants trust only for our own outgoing request, in every mode."""
    manager, runtime = nodes.make(strict=False)
    if signed:
        data, reason = peer.data(HANDSHAKE_ACCEPT, OWN), "without an outgoing request"
    else:
        data, reason = peer.data(HANDSHAKE_ACCEPT, OWN, public_key="", v2=False), "public_key"
    assert_dropped(manager, runtime, caplog, data, reason)
    manager.process_relayed_approval(7)
    assert manager.trusted_peers() == []


def test_strict_accept_without_outgoing_request_is_ignored(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    data = peer.data(HANDSHAKE_ACCEPT, OWN)
    assert_dropped(manager, runtime, caplog, data, "without an outgoing request")


@pytest.mark.parametrize("strict", [True, False])
def test_forged_revoke_is_dropped_in_every_mode(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, strict: bool
) -> None:
    """Issue 11 item 10a: an unsigned, keyless revoke claiming node 7 made a legacy node drop
    it; so would one signed with a key of the attacker's own."""
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make(strict=strict)
    attacker = Peer(7, Peer(66).identity)
    keyless = attacker.message(HANDSHAKE_REVOKE, OWN, public_key="", v2=False)
    assert_dropped(manager, runtime, caplog, keyless.to_json(), "public_key")
    reason = "public key differs from the pinned key" if strict else "pinned key"
    assert_dropped(manager, runtime, caplog, attacker.data(HANDSHAKE_REVOKE, OWN), reason)
    assert [r.node_id for r in manager.trusted_peers()] == [7]


# The forgeries signature_v2 stops (SPEC 4)


def test_captured_request_rewritten_into_a_revoke_is_dropped(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make()
    captured = peer.message(HANDSHAKE_REQUEST, OWN, justification="hi", legacy=True)
    captured.type = HANDSHAKE_REVOKE
    assert_dropped(manager, runtime, caplog, captured.to_json(), "signature_v2")


@pytest.mark.parametrize("strict", [True, False])
def test_captured_message_replayed_with_a_new_timestamp_is_dropped(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture, strict: bool
) -> None:
    manager, runtime = nodes.make(strict=strict)
    captured = peer.message(HANDSHAKE_REQUEST, OWN, timestamp=int(time.time()) - 10)
    manager.process_message(captured.to_json(), REMOTE)
    manager.reject_handshake(7)
    captured.timestamp += 5
    reason = "signature_v2" if strict else "no valid signature"
    assert_dropped(manager, runtime, caplog, captured.to_json(), reason)


def test_base64_respelling_of_the_signature_is_a_replay(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    original = peer.message(HANDSHAKE_REQUEST, OWN)
    manager.process_message(original.to_json(), REMOTE)
    manager.reject_handshake(7)
    original.signature_v2 = respell(original.signature_v2)
    assert_dropped(manager, runtime, caplog, original.to_json(), "replayed")


def test_legacy_base64_respelling_of_the_go_signature_is_a_replay(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, runtime = nodes.make(strict=False, registry=registry)
    original = peer.message(HANDSHAKE_REQUEST, OWN, v2=False, legacy=True)
    manager.process_message(original.to_json(), REMOTE)
    manager.reject_handshake(7)
    original.signature = respell(original.signature)
    assert_dropped(manager, runtime, caplog, original.to_json(), "replayed")


def test_identical_message_twice_is_a_replay(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    data = peer.data(HANDSHAKE_REQUEST, OWN)
    manager.process_message(data, REMOTE)
    manager.reject_handshake(7)
    assert_dropped(manager, runtime, caplog, data, "replayed")


# Replay set bounds


def test_replay_set_per_source_bound_drops_others_and_lets_pinned_senders_evict(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make(max_replay_per_source=3, max_pending_per_source=100)
    strangers = [Peer(n) for n in (20, 21, 22, 23)]
    first = strangers[0].data(HANDSHAKE_REQUEST, OWN)
    manager.process_message(first, REMOTE)
    for stranger in strangers[1:3]:
        manager.process_message(stranger.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert manager.pending_count() == 3
    fourth = strangers[3].data(HANDSHAKE_REQUEST, OWN)
    assert_dropped(manager, runtime, caplog, fourth, "replay set full")
    # Another source address is not affected.
    manager.process_message(fourth, ("127.0.0.2", 1))
    assert manager.pending_count() == 4
    # A sender matching its trust-record pin evicts the oldest entry of the full source ...
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    settle(manager)
    assert runtime.sent_messages()[-1][1].type == HANDSHAKE_ACCEPT
    # ... so the first message is no longer remembered: from an address with room it passes.
    manager.reject_handshake(20)
    events = len(runtime.events)
    manager.process_message(first, ("127.0.0.2", 2))
    assert runtime.events[events:][0][0] == "handshake.received"


# The drop log


def test_drop_log_is_rate_limited_and_summarised() -> None:
    now = [100.0]
    logger = logging.getLogger("test.droplog")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        drops = DropLog(logger, per_second=10, clock=lambda: now[0])
        for i in range(25):
            drops.drop(i, peer_text(REMOTE), Drop(DropKind.MALFORMED, "bad"))
        assert len(records) == 10
        now[0] += 1.5
        drops.drop(99, peer_text(REMOTE), Drop(DropKind.STALE, "late"))
        assert records[10:] == [
            "15 more dropped messages were not logged",
            f"dropped message from node 99 at {peer_text(REMOTE)}: late",
        ]
        drops.flush()
        assert len(records) == 12
    finally:
        logger.removeHandler(handler)


def test_a_flood_of_bad_messages_logs_at_most_ten_lines_a_second(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    manager, _ = nodes.make()
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            manager.process_message(b"garbage", REMOTE)
    # Ten in the first second; at most one more window can start during the loop.
    assert 10 <= len(warnings(caplog)) <= 21


def test_undecodable_fields_never_reach_the_store(nodes: Nodes) -> None:
    manager, runtime = nodes.make()
    peer = Peer(7)
    msg = peer.message(HANDSHAKE_REQUEST, OWN)
    raw = json.loads(msg.to_json())
    raw["justification"] = "\ud800"
    manager.process_message(json.dumps(raw).encode(), REMOTE)
    assert manager.pending_count() == 0
    assert HandshakeMsg.from_json(msg.to_json()) == msg
    assert runtime.events == []


def test_replay_set_total_bound_lets_privileged_messages_evict_from_the_largest_source() -> None:
    replay = ReplaySet(max_total=4, max_per_source=10)
    for digest in (b"a1", b"a2", b"a3"):
        assert replay.add(digest, "A", 1000.0, 0.0, privileged=False) is None
    assert replay.add(b"b1", "B", 1000.0, 0.0, privileged=False) is None
    assert replay.add(b"c1", "C", 1000.0, 0.0, privileged=False) == Drop(
        DropKind.REPLAY, "replay set full"
    )
    assert replay.add(b"c1", "C", 1000.0, 0.0, privileged=True) is None
    # The oldest entry of A (the largest source) went; B's single entry stayed.
    assert replay.add(b"b1", "B", 1000.0, 0.0, privileged=True) == REPLAYED
    assert replay.add(b"a1", "A", 1000.0, 0.0, privileged=True) is None


def test_replay_entries_live_until_their_timestamp_leaves_the_window() -> None:
    replay = ReplaySet(max_total=4, max_per_source=4)
    assert replay.add(b"d", "A", 100.0, 50.0, privileged=False) is None
    assert replay.add(b"d", "A", 100.0, 99.0, privileged=False) == REPLAYED
    assert replay.add(b"d", "A", 200.0, 100.0, privileged=False) is None
    # Expired entries free their room.
    for index in range(3):
        assert replay.add(bytes([index]), "A", 150.0, 100.0, privileged=False) is None
    assert replay.add(b"x", "A", 300.0, 151.0, privileged=False) is None


# Issue 11 item 6: what drop lines quote; a full disk


def test_drop_line_quotes_at_most_100_characters_of_a_huge_timestamp(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()
    huge = int("9" * 4300)
    data = json.dumps(
        {"type": "handshake_request", "node_id": 7, "public_key": peer.key, "timestamp": huge}
    ).encode()
    assert_dropped(manager, runtime, caplog, data, "outside the window")
    (line,) = warnings(caplog)
    assert len(line) < 250 and "9" * 101 not in line


def test_drop_line_cuts_a_long_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        DropLog().drop(7, peer_text(REMOTE), Drop(DropKind.MALFORMED, "x" * 5000))
    (line,) = warnings(caplog)
    assert len(line) < 300


def test_requests_while_the_disk_is_full_log_one_error(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manager, runtime = nodes.make()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with caplog.at_level(logging.ERROR):
        for node in range(10, 30):
            manager.process_message(Peer(node).data(HANDSHAKE_REQUEST, OWN), REMOTE)
    monkeypatch.undo()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert manager.pending_count() == 0 and runtime.events == []


# SPEC 5 step 1 / 6: relayed input


def test_spec5_step1_relayed_input_claiming_our_own_node_id_changes_nothing(nodes: Nodes) -> None:
    manager, runtime = nodes.make(registry=FakeRegistry())
    manager.send_request(5, "unrelated")  # an outgoing entry, so an accept would matter
    before = snapshot(manager)
    manager.process_relayed_request(OWN, "from myself?", Peer(OWN).key)
    manager.process_relayed_approval(OWN)
    manager.process_relayed_rejection(OWN)
    settle(manager)
    assert snapshot(manager) == before
    assert runtime.topics() == []


# SPEC 7: accept received


def test_spec7_accept_from_an_already_trusted_peer_changes_nothing(
    nodes: Nodes, peer: Peer
) -> None:
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


# SPEC 4 / 5 step 3: legacy receivers


def test_spec4_legacy_receiver_accepts_a_signature_v2_in_place_of_the_go_signature(
    nodes: Nodes, peer: Peer
) -> None:
    """This implementation's senders fill only ``signature_v2``: a legacy-mode node must
    still accept them, or two Python nodes in a mixed fleet could never meet."""
    manager, _ = nodes.make(strict=False)
    data = peer.data(HANDSHAKE_REQUEST, OWN, justification="v2 only", v2=True, legacy=False)
    manager.process_message(data, REMOTE)
    assert [(p.node_id, p.public_key) for p in manager.pending_requests()] == [(7, peer.key)]
