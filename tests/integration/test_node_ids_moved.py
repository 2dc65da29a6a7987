"""Node IDs that move (issue 11 item 7), with real processes.

A registry started with ``--memory`` forgets its nodes on restart and numbers them again by
registration order. Four nodes register (A=1, B=2, C=3, D=4); A and B trust each other;
after the registry restarts, the nodes come back in reverse order (D=1, C=2, B=3, A=4). Each
daemon notices its own ID changed (an ERROR and ``node.id_changed``), and A's record of node
2 (B's key, but node 2 is now C) and B's record of node 1 (now D) are conflicts: not
trusted, not "already trusted", shown as such. The default registry (with a store) keeps
the IDs across a restart.
"""

from __future__ import annotations

from pilothandshake.client import Client

from .conftest import Fleet, Node, wait_until


def start_again(node: Node) -> Node:
    """Start a stopped node, waiting for its new start line."""
    node.out_path.write_bytes(b"")
    return node.start()


def make_trust(a: Node, b: Node) -> None:
    """A asks B, B's operator approves: both trust each other."""
    a.control("handshake", node_id=b.node_id, justification="before the restart")
    wait_until(lambda: b.pending() == {a.node_id}, what="A's request pending at B")
    b.control("approve", node_id=a.node_id)
    wait_until(lambda: a.trusted() == {b.node_id}, what="A trusts B")
    assert b.trusted() == {a.node_id}


def records(node: Node) -> dict[int, dict[str, object]]:
    return {int(r["node_id"]): r for r in node.control("trust")["trusted"]}


def test_ids_reassigned_by_a_memory_registry_are_noticed_and_not_trusted(fleet: Fleet) -> None:
    registry = fleet.registry(memory=True).start()
    nodes = [fleet.node(name, registry, public=True) for name in ("a", "b", "c", "d")]
    for node in nodes:
        node.start()
    a, b, c, d = nodes
    assert [n.node_id for n in nodes] == [1, 2, 3, 4]
    make_trust(a, b)

    for node in nodes:
        assert node.stop() == 0, node.stderr
    registry.restart()
    for node in reversed(nodes):
        start_again(node)
    assert [n.node_id for n in nodes] == [4, 3, 2, 1]

    # Each daemon says its ID moved: an ERROR line and a node.id_changed event.
    for node, old in zip(nodes, (1, 2, 3, 4)):
        new = node.node_id
        wait_until(
            lambda node=node, old=old: f"it was node {old} before" in node.stderr,
            what=f"{node.name}'s ERROR about its node ID",
        )
        [line] = [ln for ln in node.stderr.splitlines() if f"it was node {old} before" in ln]
        assert " ERROR " in line and f"node ID {new}," in line, line
        changed = [e["data"] for e in node.events() if e["event"] == "node.id_changed"]
        assert changed == [{"old": old, "new": new}], node.events()

    # A's record of node 2 holds B's key; the registry now binds 2 to C's key. Likewise
    # B's record of node 1 (A's key; now D). Both are conflicts once checked at start.
    for holder, peer, now_there in ((a, 2, c), (b, 1, d)):
        wait_until(
            lambda holder=holder, peer=peer: records(holder)[peer]["conflict"] is True,
            what=f"{holder.name}'s record of node {peer} in conflict",
        )
        assert holder.control("is_trusted", node_id=peer)["trusted"] is False
        waited = holder.ctl("wait", str(peer), "--timeout", "1")
        assert waited.returncode == 1, waited.stdout
        shown = holder.ctl("trust")
        assert shown.returncode == 0 and "CONFLICT" in shown.stdout, shown.stdout
        # Asking node 2 (or 1) again contacts the machine that holds that ID now.
        asked = holder.ctl("handshake", str(peer), "who are you now?")
        assert asked.returncode == 0, asked.stderr
        assert "already trusted" not in asked.stdout
        # Round 3: the machine now at that ID does not hold the key we trusted, so it cannot
        # prove delivery (SPEC 3 receipts): the request goes through the relay, to it.
        assert asked.stdout.startswith("request relayed to"), asked.stdout
        assert f"did not prove the key of node {peer}" in holder.stderr
        wait_until(
            lambda holder=holder, now_there=now_there: holder.node_id in now_there.pending(),
            what=f"{now_there.name} receives the request",
        )
        with Client(holder.socket_path) as client:
            assert client.is_trusted(peer) is False
    assert "trust.conflict" in a.topics() and "trust.conflict" in b.topics()


def test_the_default_registry_keeps_node_ids_across_a_restart(fleet: Fleet) -> None:
    registry = fleet.registry().start()  # with its store, as pilot-registryd is by default
    a = fleet.node("a", registry).start()
    b = fleet.node("b", registry).start()
    assert (a.node_id, b.node_id) == (1, 2)
    for node in (a, b):
        assert node.stop() == 0, node.stderr
    registry.restart()
    for node in (b, a):
        start_again(node)
    assert (a.node_id, b.node_id) == (1, 2)
    for node in (a, b):
        assert "it was node" not in node.stderr
        assert "node.id_changed" not in node.topics()
