"""The daemon's registry loop against real registries on 127.0.0.1: outages, hangs, restarts.

Real processes (the ``fleet`` fixture); the nodes are private (no ``peers`` entries, not
public), so only the relay can carry their handshakes.
"""

from __future__ import annotations

from .conftest import Fleet, Node, Registry, wait_until


def kill(registry: Registry) -> None:
    assert registry.popen is not None
    registry.popen.kill()
    registry.popen.wait(10)


def restart(registry: Registry) -> None:
    """Start the registry again on the same port (and store)."""
    with open(registry.out_path, "wb"):
        pass  # a fresh "listening" line to wait for
    registry.start()


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
