"""The registry is a directory, not an authority (issue 15 item 1, SPEC 17), with real
processes: pilot-registryd, three daemons and the real CLI.

The attack of the issue: anyone who read node A's public key from ``lookup`` re-registers it,
unsigned, with another hostname and a sink's address. A's name is then free, and the
attacker's own node takes it. On B, ``handshake build-agent`` must not reach the attacker
(the name was pinned to A's node and key on first use), and ``handshake <A>`` must not say
"sent" while the sink swallows it (no receipt under A's key: the request is relayed).
Whether this registry still lets the re-register through (a later round closes it there
too) does not matter here: the daemon must stay safe with a registry as it is.
"""

from __future__ import annotations

import contextlib

from pilothandshake.errors import RegistryError
from pilothandshake.registry.client import RegistryConnection

from .attacker import Capture
from .conftest import Fleet, wait_until


def test_a_stolen_hostname_and_a_moved_address_reach_neither_the_attacker_nor_a_sink(
    fleet: Fleet,
) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry, public=True, hostname="build-agent").start()
    b = fleet.node("b", registry, public=True).start()
    a_id, b_id = a.node_id, b.node_id

    # First use: B resolves the name for a command, which pins it to A's node and key.
    sent = b.ctl("handshake", "build-agent", "nightly sync")
    assert (sent.returncode, sent.stdout.strip()) == (0, f"request sent to {a_id}"), sent.stderr
    wait_until(lambda: a.pending() == {b_id}, what="B's request pending at A")

    # The attacker: A's key re-registered unsigned, renamed, its address moved to a sink.
    sink = Capture()
    try:
        attacker = RegistryConnection(registry.address, lambda data: b"", timeout=5.0)
        with contextlib.suppress(RegistryError):  # a registry that refuses it is fine too
            attacker.call(
                {
                    "type": "register",
                    "listen_addr": sink.address,
                    "public_key": a.key,
                    "hostname": "renamed",
                }
            )
        attacker.close()
        e = fleet.node("e", registry, public=True, hostname="build-agent").start()
        e_id = e.node_id
        look = RegistryConnection(registry.address, lambda data: b"", timeout=5.0)
        try:
            taken = look.resolve_hostname("build-agent").get("node_id") == e_id
        except RegistryError:
            taken = False
        # Whether the unsigned re-register went through (a registry that checks its
        # signature changes nothing): then A is "renamed", and its address is the sink's.
        moved = look.lookup(a_id).get("hostname") == "renamed"
        look.close()

        # (Another text than the first request's: the same bytes within the same second
        # would be a replay, dropped without a receipt.)
        refused = b.ctl("handshake", "build-agent", "nightly sync, by name")
        if taken:  # the registry let the attack through: the pin is what stops it
            assert refused.returncode == 1
            assert refused.stderr.strip() == (
                f"pilot-handshakectl: hostname build-agent moved from node {a_id} to node "
                f"{e_id}; if that is expected: pilot-handshakectl forget-name build-agent"
            )
            assert "hostname.changed" in b.topics()
        b.settle()
        assert e.pending() == set()  # nothing reached the attacker's node

        # By ID: the registry's address for A is the sink's (if the re-register went
        # through); the sink reads and closes, which proves nothing: relayed, not "sent".
        by_id = b.ctl("handshake", str(a_id), "nightly sync, again")
        assert by_id.returncode == 0, by_id.stderr
        if moved:
            assert by_id.stdout.strip() == f"request relayed to {a_id} through the registry"
            assert f"{sink.address} did not prove the key of node {a_id}" in b.stderr
        else:
            assert by_id.stdout.strip() == f"request sent to {a_id}"
        wait_until(
            lambda: (
                [p["justification"] for p in a.control("pending")["pending"]]
                == ["nightly sync, again"]
            ),
            what="B's second request at A, relayed",
        )
    finally:
        sink.close()
