"""Hostnames end to end (issue 9 item 5), with real processes and the real CLI: two daemons
named ``agent-a`` and ``agent-b`` at a real pilot-registryd; every command takes the name
where a node goes, and the tables show it. The README's happy path logs no WARNING. A third
daemon asking for a taken name starts anyway and says so.
"""

from __future__ import annotations

import re
import subprocess
import sys

from pilothandshake.client import Client

from .conftest import BIN, Fleet, Node, process_env, wait_until

# The relayed copy of an accept that arrived directly: ignored at DEBUG.
SECOND_ACCEPT = "accept from a node already trusted"


def ctl(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """``pilot-handshakectl --config <node's config> ...``, as the README runs it."""
    return subprocess.run(
        [sys.executable, str(BIN / "pilot-handshakectl"), "--config", str(node.config_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=process_env(),
    )


def ok(node: Node, *args: str) -> str:
    done = ctl(node, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def warnings(node: Node) -> list[str]:
    return [line for line in node.stderr.splitlines() if re.search(r" (WARNING|ERROR) ", line)]


def test_commands_take_hostnames_and_tables_show_them(fleet: Fleet) -> None:
    registry = fleet.registry().start()
    # As the README's demo configs: both public, so the messages go directly.
    a = fleet.node("a", registry, public=True, hostname="agent-a").start()
    b = fleet.node("b", registry, public=True, hostname="agent-b").start()
    a_id, b_id = a.node_id, b.node_id
    assert a.status()["hostname"] == "agent-a" and b.status()["hostname"] == "agent-b"
    assert re.search(rf"^node\s+{a_id} \(agent-a\)$", ok(a, "status"), re.M)

    assert ok(a, "handshake", "agent-b", "nightly sync").strip() == f"request sent to {b_id}"
    wait_until(lambda: b.pending() == {a_id}, what="A's request pending at B")
    [pending] = b.control("pending")["pending"]
    assert pending["hostname"] == "agent-a"
    assert re.search(rf"^{a_id} \(agent-a\)\s.*nightly sync", ok(b, "pending"), re.M)

    assert ok(b, "approve", "agent-a").strip() == f"approved {a_id}"
    assert ok(a, "wait", "agent-b", "--timeout", "10").strip() == f"trusted {b_id}"
    assert re.search(rf"^{b_id} \(agent-b\)\s+yes\s", ok(a, "trust"), re.M)
    assert re.search(rf"^{a_id} \(agent-a\)\s+no\s", ok(b, "trust"), re.M)
    assert [r["hostname"] for r in a.control("trust")["trusted"]] == ["agent-b"]
    assert [r["hostname"] for r in b.control("trust")["trusted"]] == ["agent-a"]

    # The README: "on this happy path nothing is logged above INFO". B's approval reaches A
    # twice (directly and through the registry's response inbox); wait for the second copy.
    wait_until(
        lambda: SECOND_ACCEPT in a.stderr,
        what="the relayed copy of B's accept at A",
    )
    for node in (a, b):
        assert warnings(node) == [], node.name

    # The Python Client takes hostnames too.
    with Client(a.socket_path) as client:
        assert client.resolve("agent-b") == b_id
        assert client.is_trusted("agent-b") is True
        assert client.wait_for_trust("agent-b", timeout=1.0) is True
    # An unknown hostname is a clear error naming it, exit 1.
    unknown = ctl(a, "handshake", "agent-zz", "hello?")
    assert unknown.returncode == 1 and "agent-zz" in unknown.stderr, unknown.stderr

    # A third daemon asking for a taken hostname starts anyway, unnamed, and says why.
    c = fleet.node("c", registry, hostname="agent-b").start()
    assert c.node_id not in (0, a_id, b_id)
    wait_until(lambda: "ERROR" in c.stderr and "'agent-b'" in c.stderr, what="c's ERROR")
    [line] = [ln for ln in c.stderr.splitlines() if " ERROR " in ln]
    # Why, as the registry said it (issue 19: not "taken by another node, or invalid").
    assert f"hostname 'agent-b' is taken by node {b_id}" in line, line
    state = c.status()
    assert state["hostname"] == ""
    assert "hostname" not in state["registry"], state  # one hostname field in status --json
    assert f"taken by node {b_id}" in state["registry"]["hostname_error"], state
    shown = ok(c, "status")
    assert re.search(rf"^hostname +hostname 'agent-b' is taken by node {b_id}$", shown, re.M), shown
    with Client(a.socket_path) as client:
        assert client.resolve("agent-b") == b_id  # the name stays B's
