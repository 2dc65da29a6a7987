"""Manager: key pinning and the registry's key binding (SPEC 5 step 3, SPEC 8, SPEC 16) —
which key a node is held to, when the registry is asked again, and which answers are
believed."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from fakeruntime import FakeRegistry, Nodes, Peer, respell, seed_trust, snapshot
from managertools import OWN, REMOTE, T0, assert_dropped

from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
)
from pilothandshake.store import PendingHandshake, TrustRecord
from pilothandshake.testing import FakeClock

# Key pinning


def test_key_differing_from_a_trust_record_pin_is_dropped(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make()
    impostor = Peer(7)
    assert_dropped(manager, runtime, caplog, impostor.data(HANDSHAKE_REVOKE, OWN), "pinned key")


def test_key_differing_from_a_bound_pending_request_is_dropped(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    seed_trust(f"{nodes.root}/n1", pending=(PendingHandshake(7, peer.key, "x", T0, True),))
    manager, runtime = nodes.make()
    impostor = Peer(7)
    assert_dropped(manager, runtime, caplog, impostor.data(HANDSHAKE_REQUEST, OWN), "pinned key")


def test_invalid_stored_key_pins_nothing(nodes: Nodes, peer: Peer) -> None:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, "not a key", T0),))
    manager, _runtime = nodes.make()
    manager.process_message(peer.data(HANDSHAKE_REVOKE, OWN), REMOTE)
    # Not pinned and not bound: the strict revoke rule refuses it, but as a revoke, not
    # as a pin mismatch.
    assert manager.trusted_peers() == [TrustRecord(7, "not a key", T0)]


def test_unbound_pending_pins_weakly_and_a_bound_request_replaces_it(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    squatter = Peer(7)
    registry = FakeRegistry()
    registry.lookup_errors.add(7)  # registry unreachable for node 7 at first
    manager, runtime = nodes.make(registry=registry)
    manager.process_message(squatter.data(HANDSHAKE_REQUEST, OWN, justification="squat"), REMOTE)
    assert [(p.public_key, p.bound) for p in manager.pending_requests()] == [(squatter.key, False)]
    # Another unbound key for the same node: dropped by the weak pin.
    assert_dropped(manager, runtime, caplog, peer.data(HANDSHAKE_REQUEST, OWN), "pending request")
    # Once the registry vouches for the real key, its request replaces the squatter's.
    registry.lookup_errors.clear()
    registry.keys[7] = peer.key
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification="real"), REMOTE)
    assert [(p.public_key, p.justification, p.bound) for p in manager.pending_requests()] == [
        (peer.key, "real", True)
    ]


# Registry key binding


def test_registry_answers_are_cached(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.keys[7] = peer.key
    manager, _ = nodes.make(registry=registry)
    for text in ("a", "b", "c"):
        manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN, justification=text), REMOTE)
    assert registry.calls_of("lookup") == [(7,)]
    assert manager.pending_requests()[0].justification == "c"


def test_registry_key_mismatch_is_dropped_after_one_fresh_re_ask(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FakeRegistry()
    registry.keys[7] = Peer(70).key
    manager, runtime = nodes.make(registry=registry)
    assert_dropped(
        manager, runtime, caplog, peer.data(HANDSHAKE_REQUEST, OWN), "differs from the registry"
    )
    assert registry.calls_of("lookup") == [(7,), (7,)]
    # Within 5 s no second re-ask: dropped on the cached answer alone.
    data = peer.data(HANDSHAKE_REQUEST, OWN, justification="again")
    assert_dropped(manager, runtime, caplog, data, "re-ask not allowed yet")
    assert registry.calls_of("lookup") == [(7,), (7,)]


def test_registry_re_ask_that_matches_binds_the_request(nodes: Nodes, peer: Peer) -> None:
    registry = FakeRegistry()
    registry.lookup_answers[7] = [Peer(70).key, peer.key]  # stale first answer, then fresh
    manager, _ = nodes.make(registry=registry)
    manager.process_message(peer.data(HANDSHAKE_REQUEST, OWN), REMOTE)
    assert [(p.public_key, p.bound) for p in manager.pending_requests()] == [(peer.key, True)]


def test_registry_re_ask_that_fails_drops(
    nodes: Nodes, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FakeRegistry()
    registry.keys[7] = Peer(70).key
    manager, runtime = nodes.make(registry=registry)
    original = registry.lookup

    def lookup_once(node_id: int) -> dict[str, object]:
        registry.lookup = registry_error  # type: ignore[method-assign]
        return original(node_id)

    def registry_error(node_id: int) -> dict[str, object]:
        from pilothandshake.errors import RegistryError

        raise RegistryError("request failed")

    registry.lookup = lookup_once  # type: ignore[method-assign]
    assert_dropped(manager, runtime, caplog, peer.data(HANDSHAKE_REQUEST, OWN), "re-ask failed")


# SPEC 5 step 3 / 8: key pinning


def test_spec8_strict_reject_signed_with_a_key_other_than_the_pin_keeps_the_outgoing_request(
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


def test_spec16_pin_is_checked_again_under_the_lock_after_the_registry_lookup(
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


def test_spec8_pin_compares_decoded_key_bytes_not_base64_text(nodes: Nodes, peer: Peer) -> None:
    """SPEC 4: another base64 spelling of the pinned key is the same key."""
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, peer.key, T0),))
    manager, runtime = nodes.make()
    data = peer.data(HANDSHAKE_REVOKE, OWN, public_key=respell(peer.key))
    manager.process_message(data, REMOTE)
    assert manager.trusted_peers() == []
    assert "trust.revoked_by_peer" in runtime.topics()


# SPEC 5 step 3: the registry answer cache


def test_spec5_step3_registry_answer_is_cached_for_30_seconds_only(
    nodes: Nodes, peer: Peer
) -> None:
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


# SPEC 7: reject received


def test_spec7_strict_reject_with_registry_neither_bound_nor_pinned_keeps_the_outgoing_request(
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


def test_spec8_strict_accept_matching_only_a_pending_pin_is_not_a_trust_record_pin(
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


# SPEC 7 / 8: revoke received


def test_spec8_strict_revoke_signed_with_the_key_of_a_relayed_pending_request_is_applied(
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
