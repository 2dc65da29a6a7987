"""The daemon's registry loop against real registries on 127.0.0.1: outages, hangs, restarts.

Real processes (the ``fleet`` fixture); the nodes are private (no ``peers`` entries, not
public), so only the relay can carry their handshakes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from typing import Any

from pilothandshake.errors import HandshakeError
from pilothandshake.registry.client import RegistryConnection

from .conftest import Fleet, Node, wait_until
from .test_outages import kill, restart

HUNG_REGISTRY_TIMEOUT = 5.0  # REGISTRY_TIMEOUT: what one unanswered registry call costs


def registered(node: Node) -> bool:
    registry = node.status()["registry"]
    return bool(registry["reachable"] and registry["registered"])


def warnings(node: Node) -> list[str]:
    return [line for line in node.stderr.splitlines() if " WARNING " in line]


def test_an_outage_of_three_heartbeats_is_survived_quietly_and_the_relay_resumes(
    fleet: Fleet,
) -> None:
    # Issue 20.1: failed heartbeats never moved the next-heartbeat time, so the loop spun
    # (a thousand WARNINGs in a quarter second) until 2 ** failures overflowed and the
    # thread died: the node never registered again.
    registry = fleet.registry().start()
    beat = 1.0
    a = fleet.node("a", registry, registry_options={"heartbeat_interval": beat})
    b = fleet.node("b", registry, registry_options={"heartbeat_interval": beat})
    a.start()
    b.start()
    wait_until(lambda: registered(a) and registered(b), what="both registered")
    a_id, b_id = a.node_id, b.node_id
    kill(registry)
    wait_until(lambda: not registered(b), timeout=20, what="B notices the outage")
    wait_until(
        lambda: "heartbeats failed: registering again" in b.stderr,
        timeout=20,
        what="B gives up on heartbeats after three",
    )
    restart(registry)
    # The backoff is capped at 30 s (with jitter): within that B is registered again.
    wait_until(lambda: registered(b) and registered(a), timeout=40, what="both back")
    assert b.node_id == b_id
    answer = a.control("handshake", node_id=b_id, justification="after the outage")
    assert answer["status"] == "relayed"
    wait_until(lambda: a_id in b.pending(), timeout=20, what="the relayed request at B")
    assert len(warnings(b)) < 20, "\n".join(warnings(b)[:40])
    assert "Traceback" not in b.stderr


def binding_changes(node: Node) -> list[dict[str, Any]]:
    return [dict(e["data"]) for e in node.events() if e["event"] == "registry.binding_changed"]


def registry_requests(node: Node, kind: str) -> int:
    """How many ``kind`` requests the node sent its registry (its metrics)."""
    text = node.control("metrics")["text"]
    return int(
        sum(
            float(m.group(1))
            for m in re.finditer(
                rf'^pilot_handshake_registry_requests_total{{[^}}]*type="{kind}"[^}}]*}} (\S+)$',
                text,
                re.M,
            )
        )
    )


def test_a_node_notices_when_the_registry_moves_its_record(fleet: Fleet) -> None:
    # Issue 15.1 (SPEC 17): the node checks its own record after registering and then
    # once per heartbeat interval. Here the record moves through a register signed with
    # the node's own key (what a stale copy of this node elsewhere would send).
    registry = fleet.registry().start()
    a = fleet.node("a", registry, public=True, registry_options={"heartbeat_interval": 0.5})
    a.start()
    a_id = a.node_id
    wait_until(lambda: registry_requests(a, "lookup") >= 1, what="A's first own-record check")
    client = RegistryConnection(registry.address, a.identity.sign)
    try:
        assert client.register("127.0.0.9:1", a.key)["node_id"] == a_id
    finally:
        client.close()
    [change] = wait_until(lambda: binding_changes(a), what="registry.binding_changed at A")
    assert change["node_id"] == a_id
    assert change["moved"]["address"] == {"expected": a.address, "found": "127.0.0.9:1"}
    assert sum("changed this node's record" in line for line in a.stderr.splitlines()) == 1
    # pilot-registryd honours a signed re-register: A tells it its record again.
    wait_until(lambda: "as registered again" in a.stderr, what="A's record restored")
    client = RegistryConnection(registry.address)
    try:
        assert client.lookup(a_id)["real_addr"] == a.address
    finally:
        client.close()


def test_a_registry_that_never_answers_delays_neither_the_sockets_nor_a_stop(
    fleet: Fleet,
) -> None:
    # Issue 19.5: the control socket and port 444 waited one registry timeout (5.2 s) at
    # start, and SIGTERM as long ("stopped in 5.0 s").
    with socket.create_server(("127.0.0.1", 0), backlog=64) as black_hole:  # never accepts
        address = f"127.0.0.1:{black_hole.getsockname()[1]}"
        node = fleet.node("a")
        node.config["registry"] = {"address": address, "poll_interval": 0.2}
        node.write_config()
        node.spawn()
        status = wait_until(lambda: answers(node), what="the control socket")
        # Served while the first register is still in flight (no answer, no error yet).
        assert status["registry"] == {**status["registry"], "registered": False, "error": ""}
        with socket.create_connection(("127.0.0.1", node.port), timeout=5):
            pass  # port 444 accepts too
        assert node.popen is not None
        began = time.monotonic()
        node.signal(signal.SIGTERM)
        node.popen.wait(10)
        took = time.monotonic() - began
    assert node.popen.returncode == 0, node.stderr
    # The hung register was aborted, not waited out (its timeout is 5 s).
    assert took < HUNG_REGISTRY_TIMEOUT / 2, f"stopped in {took:.1f} s"


def answers(node: Node) -> dict[str, Any] | None:
    """The node's status, or None while its control socket does not answer yet."""
    if not os.path.exists(node.socket_path):
        return None
    try:
        return node.status()
    except (OSError, HandshakeError):
        return None


def test_a_relayed_request_lost_with_the_registry_inbox_is_sent_again(fleet: Fleet) -> None:
    # Issue 20.3: the target was stopped, the request relayed, the registry restarted (its
    # inboxes lost), the target continued: the request never arrived. The requester now
    # sends its waiting relayed requests again once the registry answers after an outage.
    registry = fleet.registry().start()
    a, b = fleet.node("a", registry), fleet.node("b", registry)
    a.start()
    b.start()
    a_id, b_id = a.node_id, b.node_id
    b.signal(signal.SIGSTOP)
    try:
        answer = a.control("handshake", node_id=b_id, justification="before the restart")
        assert answer["status"] == "relayed"
        kill(registry)
        # Whatever the registry kept, a copy of the inbox it had is gone: what the daemon
        # does about a registry that lost it is the question here.
        for inbox in registry.directory.glob("*inbox*"):
            inbox.unlink()
        wait_until(lambda: not registered(a), timeout=20, what="A notices the outage")
        restart(registry)
        # Sent again, or refused as a copy of one the registry still holds (DEBUG).
        wait_until(
            lambda: f"relayed request to node {b_id} " in a.stderr,
            timeout=40,
            what="A sends its relayed request again",
        )
    finally:
        b.signal(signal.SIGCONT)
    wait_until(lambda: a_id in b.pending(), timeout=60, what="the request pending at B")
    [pending] = [p for p in b.control("pending")["pending"] if p["node_id"] == a_id]
    assert pending["justification"] == "before the restart"


def pending_event(node: Node, peer: int) -> bool:
    return any(
        e["event"] == "handshake.pending" and e["data"].get("peer_node_id") == peer
        for e in node.events()
    )


def test_with_pilot_registryd_relayed_input_is_pushed_and_a_restart_is_not_a_spin(
    fleet: Fleet,
) -> None:
    # Issue 18.2 (SPEC 18): pilot-registryd advertises wait_poll; each node keeps one poll
    # held open and gets relayed input as soon as it arrives, whatever its schedule.
    registry = fleet.registry().start()
    slow = {"poll_interval": 30, "poll_idle": 60}  # no poll of the schedule within the test
    a = fleet.node("a", registry, registry_options=slow).start()
    b = fleet.node("b", registry, registry_options=slow).start()
    a_id, b_id = a.node_id, b.node_id
    wait_until(lambda: a.status()["registry"]["relay"] == "push", what="A sees push")
    assert a.control("handshake", node_id=b_id, justification="pushed")["status"] == "relayed"
    # Read from B's events (they poll nothing on demand): pushed, not polled.
    wait_until(lambda: pending_event(b, a_id), timeout=10, what="the request pushed to B")
    b.control("approve", node_id=a_id)
    wait_until(lambda: b_id in a.trusted(), timeout=10, what="the approval pushed to A")
    # The registry restarts: the held polls break, the nodes back off (no spin) and hold
    # a poll again once it is back: a newcomer's request reaches A at once.
    before = registry_requests(a, "poll_handshakes")
    registry.restart()
    c = fleet.node("c", registry, registry_options=slow).start()
    c_id = c.node_id
    assert c.control("handshake", node_id=a_id, justification="after")["status"] == "relayed"
    wait_until(lambda: pending_event(a, c_id), timeout=40, what="the request pushed to A")
    assert registry_requests(a, "poll_handshakes") < before + 20


def test_a_rejection_through_the_relay_carries_the_operators_reason(fleet: Fleet) -> None:
    # SPEC 17: respond_handshake carries the reject reason; pilot-registryd passes it on in
    # the poll answer, and the requester's loop hands it to the Manager.
    registry = fleet.registry().start()
    a, b = fleet.node("a", registry).start(), fleet.node("b", registry).start()
    a_id, b_id = a.node_id, b.node_id
    assert a.control("handshake", node_id=b_id, justification="may I")["status"] == "relayed"
    wait_until(lambda: a_id in b.pending(), what="the request at B")
    b.control("reject", node_id=a_id, reason="not today")
    [request] = wait_until(
        lambda: [r for r in a.control("requests")["requests"] if r["state"] == "rejected"],
        what="the rejection at A",
    )
    assert (request["node_id"], request["reason"]) == (b_id, "not today")
