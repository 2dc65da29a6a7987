"""Answers given while the registry is down still arrive (issue 20 item 2).

B is private (reachable only through the relay) and A's address is known only to the
registry: while the registry is down, B's answer can go neither way. It is kept in B's
outbox (on disk) and delivered once the registry is back. Real processes on 127.0.0.1.
"""

from __future__ import annotations

import json
import time

from .conftest import Fleet, Node, Registry, wait_until
from .test_outages import kill, restart

# The outbox's first retry (10 s) and backoff, plus A's poll backoff, after the return.
DELIVERY_DEADLINE = 60.0


def kept(node: Node) -> list[tuple[int, str]]:
    """The answers in ``node``'s outbox.json, as (node ID, kind)."""
    path = node.directory / "outbox.json"
    rows = json.loads(path.read_text())["answers"] if path.exists() else []
    return [(row["node_id"], row["kind"]) for row in rows]


def asked_through_the_relay(fleet: Fleet) -> tuple[Node, Node, Registry]:
    """A (public) asks B (private, so only through the relay); then the registry is killed
    and B knows it is down."""
    registry = fleet.registry().start()
    a, b = fleet.node("a", registry, public=True), fleet.node("b", registry)
    a.start()
    b.start()
    a_id, b_id = a.node_id, b.node_id
    assert a.control("handshake", node_id=b_id, justification="nightly sync")["status"] == "relayed"
    wait_until(lambda: a_id in b.pending(), timeout=20, what="the relayed request at B")
    kill(registry)
    wait_until(lambda: not b.status()["registry"]["reachable"], timeout=20, what="B sees it down")
    return a, b, registry


def test_an_approval_given_during_a_registry_outage_arrives_after_it(fleet: Fleet) -> None:
    a, b, registry = asked_through_the_relay(fleet)
    a_id, b_id = a.node_id, b.node_id
    b.control("approve", node_id=a_id)  # B trusts A at once; the answer cannot leave
    assert a_id in b.trusted()
    wait_until(lambda: b.status()["undelivered"] == 1, timeout=20, what="the kept approval")
    # Written down once the first attempt has failed both ways.
    wait_until(lambda: kept(b) == [(a_id, "accept")], timeout=30, what="outbox.json")
    assert b_id not in a.trusted()

    restart(registry)
    back = time.monotonic()
    wait_until(lambda: b_id in a.trusted(), timeout=DELIVERY_DEADLINE, what="A trusts B")
    print(f"A trusted B {time.monotonic() - back:.1f} s after the registry came back")
    wait_until(lambda: b.status()["undelivered"] == 0, timeout=20, what="B's outbox empty")
    assert kept(b) == []


def test_a_rejection_given_during_a_registry_outage_arrives_after_it(fleet: Fleet) -> None:
    a, b, registry = asked_through_the_relay(fleet)
    a_id, b_id = a.node_id, b.node_id
    b.control("reject", node_id=a_id, reason="not today")
    wait_until(lambda: b.status()["undelivered"] == 1, timeout=20, what="the kept rejection")
    restart(registry)
    # A hears of it: its request to B ends (the log says B rejected it).
    wait_until(
        lambda: f"node {b_id} rejected our request" in a.stderr,
        timeout=DELIVERY_DEADLINE,
        what="A hears the rejection",
    )
    wait_until(lambda: b.status()["undelivered"] == 0, timeout=20, what="B's outbox empty")


def test_a_node_restarted_during_an_outage_still_takes_messages_addressed_to_it(
    fleet: Fleet,
) -> None:
    """B restarts while the registry is down: it goes by the node ID the registry gave it
    last time (node.json), so a message signed for that ID (SPEC 4: the challenge names the
    receiver) is checked and taken, not dropped as "signature_v2 missing or invalid"."""
    registry = fleet.registry().start()
    a, b = fleet.node("a", registry, public=True), fleet.node("b", registry, public=True)
    a.start()
    b.start()
    a_id, b_id = a.node_id, b.node_id
    a.config["peers"] = {b_id: b.address}  # A can dial B without the registry
    a.write_config()
    a.restart()
    kill(registry)
    kill(b)
    with open(b.out_path, "wb"):
        pass  # a fresh start line to wait for
    b.start()
    status = b.status()
    assert (status["node_id"], status["registry"]["registered"]) == (b_id, False)
    waited = b.ctl("status", "--wait", "--timeout", "1")  # it waits for the registry still
    assert waited.returncode == 1 and "is not registered yet" in waited.stderr, waited.stderr
    assert a.control("handshake", node_id=b_id, justification="x")["status"] == "sent"
    assert a_id in b.pending()
