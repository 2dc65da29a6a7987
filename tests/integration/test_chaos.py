"""Fault injection in the suite (issue 20.4): a short seeded run (``scripts/chaos.py`` runs
the long one; ``chaos.py`` says what it does and checks), and the defects it found, each alone."""

from __future__ import annotations

import time

import pytest

from . import chaos
from .conftest import Fleet, Node, wait_until

SEED = 20
SECONDS = 60.0
# The defects the first runs found, each fixed and kept by a test of its own below:
# - while the registry is down, a direct answer that the receiver cannot check was dropped
#   and the sender counted it delivered (end of stream): now a dropped message gets no
#   receipt, the send fails, and the outbox retries it (issue 15 item 1, issue 20 item 2);
# - a revoke kept in the outbox arrived after the node had asked the same peer again and
#   been accepted, undoing an acknowledged approval: fresh intent now cancels a kept "no".
# Later runs under load found five more, each kept by a unit or process test of its own
# (RELIABILITY.md, issue 20, session 5): a node restarted in an outage signing and checking
# as node 0; a request that went nowhere cancelling a kept revoke; a late withdrawal, a
# late copy of a rejection and a late copy of a revoke each ending a newer request.


@pytest.mark.timeout(SECONDS + 240)
def test_a_fleet_under_faults_loses_no_acknowledged_change_and_converges(fleet: Fleet) -> None:
    options = chaos.Options(seed=SEED, seconds=SECONDS, convergence_timeout=60.0)
    report = chaos.run(fleet, options)
    print("\n".join(report.lines()))
    if not report.ok:  # what happened when, to read beside the logs printed at teardown
        print("\n".join(report.timeline))
    assert sum(report.acks.values()) >= 10, report.lines()  # the run did something
    assert all(report.faults[kind] for _, kind in chaos.FAULT_KINDS), report.lines()
    assert not report.dead, report.dead
    assert not report.lost and not report.lost_after_kill, report.lines()
    assert report.convergence is not None, report.not_converged
    assert not report.errors, report.errors


@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
def test_a_direct_answer_sent_while_the_registry_is_down_arrives(
    fleet: Fleet, restarted: bool
) -> None:
    """A asks B; the registry goes down (and A restarts, with ``restarted``); B approves
    over a direct connection (``peers``); the registry comes back: A trusts B."""
    registry = fleet.registry().start()
    a = fleet.node("a", registry, public=True)
    b = fleet.node("b", registry, public=True)
    a_id, b_id = a.start().node_id, b.start().node_id
    # Each can dial the other without the registry.
    a.config["peers"], b.config["peers"] = {b_id: b.address}, {a_id: a.address}
    a.write_config()
    b.write_config()
    a.restart()
    b.restart()
    assert a.control("handshake", node_id=b_id, justification="x")["status"] == "sent"
    wait_until(lambda: a_id in b.pending(), timeout=20, what="A's request at B")
    assert registry.popen is not None and a.popen is not None
    registry.popen.kill()
    registry.popen.wait(10)
    if restarted:
        a.popen.kill()
        a.popen.wait(10)
        with open(a.out_path, "wb"):
            pass  # a fresh start line to wait for
        a.start()  # while the registry is down: A does not know its node ID from it
    b.control("approve", node_id=a_id)
    with open(registry.out_path, "wb"):
        pass  # a fresh "listening" line to wait for
    registry.start()
    wait_until(lambda: b_id in a.trusted(), timeout=60, what="B's approval at A")


def test_a_kept_revoke_does_not_undo_a_later_approval(fleet: Fleet) -> None:
    """A trusts private B; A untrusts B while the registry is down (the revoke waits in A's
    outbox); the registry returns; A asks B again, and B, which never heard of the revoke,
    accepts: B still trusts A once A's outbox is empty (the chaos run saw the same after a
    fresh approval)."""
    registry = fleet.registry().start()
    a = fleet.node("a", registry, public=True)
    b = fleet.node("b", registry)
    a_id, b_id = a.start().node_id, b.start().node_id
    assert a.control("handshake", node_id=b_id, justification="x")["status"] == "relayed"
    wait_until(lambda: a_id in b.pending(), timeout=20, what="A's request at B")
    b.control("approve", node_id=a_id)
    wait_until(lambda: b_id in a.trusted(), timeout=20, what="B's approval at A")
    assert registry.popen is not None
    registry.popen.kill()
    registry.popen.wait(10)
    a.control("untrust", node_id=b_id)  # neither path can carry the revoke now
    wait_until(lambda: a.status()["undelivered"], timeout=20, what="the kept revoke")
    with open(registry.out_path, "wb"):
        pass  # a fresh "listening" line to wait for
    registry.start()
    wait_until(lambda: reachable(a) and reachable(b), timeout=60, what="the registry back")
    # Fresh intent, before the outbox's first retry (10 s after the failure); a second
    # later than B's first accept, whose copy within the same second A drops as a replay
    # (the messages carry whole seconds: a separate finding, not this test's).
    time.sleep(1.1)
    assert a.control("handshake", node_id=b_id, justification="again")["status"] != "trusted"
    wait_until(lambda: a_id in b.pending() or a_id in b.trusted(), timeout=20, what="A at B")
    if a_id in b.pending():
        b.control("approve", node_id=a_id)
    wait_until(lambda: b_id in a.trusted(), timeout=20, what="B's approval at A")
    wait_until(lambda: a.status()["undelivered"] == 0, timeout=60, what="A's outbox empty")
    assert a_id in b.trusted()


def reachable(node: Node) -> bool:
    return bool(node.status()["registry"]["reachable"])
