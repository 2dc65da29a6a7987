"""The attack of issue 15 item 1 against the production (Go) registry, which takes an
unsigned re-register of a known key: the daemon alone must keep B's requests away from the
attacker and from the sink (SPEC 17: names pinned on first use, receipts)."""

from __future__ import annotations

from integration.attacker import Capture
from integration.conftest import wait_until

from pilothandshake.registry.client import RegistryConnection

from .conftest import GoFleet


def test_a_stolen_name_and_a_moved_address_at_the_go_registry(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    a = gofleet.node("a", registry, public=True, hostname="build-agent").start()
    b = gofleet.node("b", registry, public=True).start()
    a_id, b_id = a.node_id, b.node_id
    sent = b.ctl("handshake", "build-agent", "nightly sync")
    assert (sent.returncode, sent.stdout.strip()) == (0, f"request sent to {a_id}"), sent.stderr
    wait_until(lambda: a.pending() == {b_id}, what="B's request pending at A")

    with Capture() as sink:
        attacker = RegistryConnection(registry.address, lambda data: b"", timeout=5.0)
        try:
            attacker.call(
                {
                    "type": "register",
                    "listen_addr": sink.address,
                    "public_key": a.key,
                    "hostname": "renamed",
                }
            )
            # The production registry took it: A is renamed, its address is the sink's.
            assert attacker.lookup(a_id).get("hostname") == "renamed"
        finally:
            attacker.close()
        e = gofleet.node("e", registry, public=True, hostname="build-agent").start()
        e_id = e.node_id

        refused = b.ctl("handshake", "build-agent", "nightly sync, by name")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"pilot-handshakectl: hostname build-agent moved from node {a_id} to node {e_id}; "
            "if that is expected: pilot-handshakectl forget-name build-agent"
        )
        by_id = b.ctl("handshake", str(a_id), "nightly sync, again")
        assert by_id.returncode == 0, by_id.stderr
        assert by_id.stdout.strip() == f"request relayed to {a_id} through the registry"
        assert f"{sink.address} did not prove the key of node {a_id}" in b.stderr
        b.settle()
        assert e.pending() == set()
