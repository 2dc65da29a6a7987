"""The relay inboxes of the embedded registry (issue 15 item 3, issue 20 item 3, SPEC 17):
a response tied to its recipient is never pushed out by free identities, untied responses
are rate-limited and go first, a request inbox is shared fairly between sources, ``reason``
is passed on, and inboxes survive a restart with their bounds and expiry."""

from __future__ import annotations

from pathlib import Path

from fakeruntime import TickClock
from registrytools import ROOMY, Peer

from pilothandshake.constants import MAX_TEXT_BYTES, REGISTRY_INBOX
from pilothandshake.registry.state import Registry
from pilothandshake.registry.storage import Store


def free_identities(registry: Registry, count: int) -> list[Peer]:
    """``count`` throwaway identities spread over sources 127.0.2.1, 127.0.3.1, ...: each
    /24 stands for another host."""
    return [Peer(registry, source=f"127.0.{2 + i % 200}.1") for i in range(count)]


# -- responses: tied ones are never pushed out -----------------------------------------------


def test_free_identities_cannot_push_a_real_approval_out(registry: Registry) -> None:
    a, b = Peer(registry), Peer(registry)
    assert b.request(a.node_id)["type"] == "request_handshake_ok"  # B asked A, relayed
    assert a.poll()["requests"][0]["from_node_id"] == b.node_id
    attackers = free_identities(registry, 101)
    # The strongest free tie: each attacker first vouches for B, then answers B.
    for attacker in attackers[:50]:
        attacker.report_trust(b.node_id)
        attacker.respond(b.node_id)
    assert a.respond(b.node_id, True)["type"] == "respond_handshake_ok"  # the real approval
    refusals = 0
    for _ in range(3):  # cycling, as the attack in issue 15 did
        for attacker in attackers:
            attacker.report_trust(b.node_id)
            refusals += attacker.respond(b.node_id)["type"] == "error"
    assert refusals > 0  # the inbox was full: newcomers were refused, not the approval
    responses = b.poll()["responses"]
    assert len(responses) == REGISTRY_INBOX
    [approval] = [r for r in responses if r["from_node_id"] == a.node_id]
    assert approval["accept"] is True


def test_an_approval_arriving_at_a_full_inbox_evicts_a_less_tied_response(
    registry: Registry,
) -> None:
    a, b = Peer(registry), Peer(registry)
    b.request(a.node_id)
    attackers = free_identities(registry, REGISTRY_INBOX)
    for attacker in attackers:
        attacker.report_trust(b.node_id)
        assert attacker.respond(b.node_id)["type"] == "respond_handshake_ok"
    assert a.respond(b.node_id)["type"] == "respond_handshake_ok"
    responses = b.poll()["responses"]
    senders = [r["from_node_id"] for r in responses]
    assert len(senders) == REGISTRY_INBOX and senders[-1] == a.node_id
    assert attackers[0].node_id not in senders  # the oldest of the lowest rank made room


def test_untied_responses_are_rate_limited_per_identity_and_per_source(
    registry: Registry,
) -> None:
    targets = [Peer(registry) for _ in range(12)]
    stranger = Peer(registry, source="127.0.9.1")
    answers = [stranger.respond(t.node_id)["type"] for t in targets]
    assert answers == ["respond_handshake_ok"] * 10 + ["error"] * 2
    # Many identities behind one source: 100 untied responses a minute for all of them.
    crowd = [Peer(registry, source="127.0.8.1") for _ in range(110)]
    answers = [c.respond(targets[i % 12].node_id)["type"] for i, c in enumerate(crowd)]
    assert answers.count("respond_handshake_ok") == 100
    # A tied response from the same source is not limited with them.
    asker = targets[1]
    asker.request(crowd[0].node_id)
    assert crowd[0].respond(asker.node_id)["type"] == "respond_handshake_ok"


def test_untied_responses_go_first_when_tied_ones_need_room(registry: Registry) -> None:
    b = Peer(registry)
    strangers = free_identities(registry, REGISTRY_INBOX)
    for stranger in strangers:
        assert stranger.respond(b.node_id)["type"] == "respond_handshake_ok"
    # An untied newcomer cannot push out another untied one.
    late = free_identities(registry, 1)[0]
    assert late.respond(b.node_id)["type"] == "error"
    # One that B vouched for (it reported trust in it) can.
    friend = Peer(registry)
    b.report_trust(friend.node_id)
    assert friend.respond(b.node_id)["type"] == "respond_handshake_ok"
    senders = [r["from_node_id"] for r in b.poll()["responses"]]
    assert friend.node_id in senders and strangers[0].node_id not in senders


# -- requests: fair between sources ----------------------------------------------------------


def test_a_real_request_gets_in_while_free_identities_flood_the_inbox(
    registry: Registry,
) -> None:
    b = Peer(registry)
    flood = [Peer(registry, source="127.0.2.1") for _ in range(150)]
    real = Peer(registry, source="127.0.0.7")
    got_in = 0
    for round_ in range(5):  # the attacker refills B's inbox after every poll
        answers = [attacker.request(b.node_id) for attacker in flood]
        # Over its share (all of it, while it is alone), the flooding source is refused.
        assert [a["type"] for a in answers].count("request_handshake_ok") == REGISTRY_INBOX
        assert answers[-1] == {"type": "error", "error": "request failed"}
        assert real.request(b.node_id, f"real {round_}")["type"] == "request_handshake_ok"
        requests = b.poll()["requests"]
        assert len(requests) == REGISTRY_INBOX
        got_in += any(r["from_node_id"] == real.node_id for r in requests)
    assert got_in == 5


def test_the_request_inbox_is_shared_evenly_between_sources(registry: Registry) -> None:
    b = Peer(registry)
    hog = [Peer(registry, source="127.0.2.1") for _ in range(REGISTRY_INBOX)]
    for attacker in hog:
        assert attacker.request(b.node_id)["type"] == "request_handshake_ok"
    others = [Peer(registry, source="127.0.3.1") for _ in range(60)]
    answers = [o.request(b.node_id)["type"] for o in others]
    # Two sources: 50 each; the second gets in until it holds its half.
    assert answers.count("request_handshake_ok") == REGISTRY_INBOX // 2
    sources = [r["from_node_id"] in {o.node_id for o in others} for r in b.poll()["requests"]]
    assert sources.count(True) == sources.count(False) == REGISTRY_INBOX // 2


# -- reason ----------------------------------------------------------------------------------


def test_the_reason_of_a_response_is_passed_on_and_cut_to_1_kib(registry: Registry) -> None:
    a, b, c = Peer(registry), Peer(registry), Peer(registry)
    b.request(a.node_id)
    c.request(a.node_id)
    a.respond(b.node_id, False, reason="not on weekends")
    a.respond(c.node_id, False, reason="é" * 1000)
    [to_b] = b.poll()["responses"]
    assert (to_b["accept"], to_b["reason"]) == (False, "not on weekends")
    [to_c] = c.poll()["responses"]
    assert to_c["reason"] == "é" * (MAX_TEXT_BYTES // 2)
    assert a.respond(b.node_id, True, reason=7)["type"] == "error"
    a.respond(b.node_id, True)
    [plain] = b.poll()["responses"]
    assert "reason" not in plain


# -- durable inboxes (issue 20 item 3) -------------------------------------------------------


def test_inboxes_survive_a_restart_with_their_expiry(tmp_path: Path, clock: TickClock) -> None:
    path = str(tmp_path / "registry.json")
    registry = Registry(Store(path), limits=ROOMY, clock=clock, wall=clock)
    a, b, c = Peer(registry), Peer(registry), Peer(registry)
    a.request(b.node_id, "relayed before the restart")
    c.request(a.node_id)
    a.respond(c.node_id, True, reason="ok")
    registry.close()
    clock.now += 3600
    restarted = Registry(Store(path), limits=ROOMY, clock=clock, wall=clock)
    for peer in (a, b, c):
        peer.registry = restarted
    [request] = b.poll()["requests"]
    assert (request["from_node_id"], request["justification"]) == (
        a.node_id,
        "relayed before the restart",
    )
    assert request["public_key"] == a.identity.public_key_b64
    # The one-per-sender rule holds across the restart too.
    assert "already waits" in c.request(a.node_id)["error"]
    restarted.close()
    # 24 hours after it was queued, an entry is gone, restart or not.
    clock.now += 23 * 3600 + 1
    again = Registry(Store(path), limits=ROOMY, clock=clock, wall=clock)
    for peer in (a, b, c):
        peer.registry = again
        peer.heartbeat()
    assert a.poll() == {"type": "poll_handshakes_ok", "requests": [], "responses": []}
    assert c.poll()["responses"] == []
    again.close()
