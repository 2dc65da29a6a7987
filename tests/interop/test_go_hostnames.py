"""Hostnames (SPEC 11) at the real (Go) Pilot registry.

The first test sends the raw frames, so it shows what the Go registry answers whatever the
client does. The others use ``RegistryConnection.set_hostname`` / ``resolve_hostname`` (BRIEF
point 5, added on the ``registry`` branch): until that branch is merged they are skipped,
with that reason.
"""

from __future__ import annotations

from typing import Any

import pytest
from integration.conftest import wait_until

from pilothandshake.errors import RegistryError
from pilothandshake.identity import Identity, b64encode
from pilothandshake.registry.client import RegistryConnection

from .conftest import GoFleet, GoRegistry

needs_hostname_client = pytest.mark.skipif(
    not hasattr(RegistryConnection, "set_hostname")
    or not hasattr(RegistryConnection, "resolve_hostname"),
    reason="needs RegistryConnection.set_hostname/resolve_hostname (BRIEF point 5): merge "
    "the registry branch",
)


def _refused(call: Any, *args: Any) -> str:
    """The error text of a registry call that must fail."""
    with pytest.raises(RegistryError) as failure:
        call(*args)
    return str(failure.value)


def _registered(registry: GoRegistry) -> tuple[RegistryConnection, Identity, int]:
    identity = Identity.generate()
    client = registry.client(identity)
    node_id = int(client.register("127.0.0.1:1", identity.public_key_b64)["node_id"])
    return client, identity, node_id


def test_the_go_registry_hostname_messages_match_spec_11(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    client, identity, node_id = _registered(registry)
    other, other_identity, other_id = _registered(registry)

    def set_hostname(
        c: RegistryConnection, ident: Identity, node: int, name: str
    ) -> dict[str, Any]:
        signature = b64encode(ident.sign(f"set_hostname:{node}".encode()))
        return c.call(
            {"type": "set_hostname", "node_id": node, "hostname": name, "signature": signature}
        )

    try:
        answer = set_hostname(client, identity, node_id, "agent-b")
        assert answer == {"type": "set_hostname_ok", "node_id": node_id, "hostname": "agent-b"}
        resolved = client.call({"type": "resolve_hostname", "hostname": "agent-b"})
        assert resolved["type"] == "resolve_hostname_ok"
        assert (resolved["node_id"], resolved["public"], resolved["hostname"]) == (
            node_id,
            False,
            "agent-b",
        )
        assert client.lookup(node_id)["hostname"] == "agent-b"
        assert "hostname" not in client.lookup(other_id)
        # Taken, invalid, reserved, or signed by another key: refused, cause hidden.
        for name, signer in (
            ("agent-b", other_identity),
            ("Agent_B", other_identity),
            ("localhost", other_identity),
            ("free-name", identity),
        ):
            with pytest.raises(RegistryError, match="request failed"):
                set_hostname(other, signer, other_id, name)
        # "" clears it.
        set_hostname(client, identity, node_id, "")
        with pytest.raises(RegistryError, match="request failed"):
            client.call({"type": "resolve_hostname", "hostname": "agent-b"})
        # register may carry the hostname; a taken one registers without it.
        set_hostname(client, identity, node_id, "agent-b")
        again = other.register("127.0.0.1:1", other_identity.public_key_b64, hostname="agent-b")
        assert again["node_id"] == other_id and "hostname" not in again
        fresh = Identity.generate()
        named = other.register("127.0.0.1:1", fresh.public_key_b64, hostname="agent-c")
        assert named["hostname"] == "agent-c"
    finally:
        client.close()
        other.close()


@needs_hostname_client
def test_the_registry_client_sets_and_resolves_hostnames_at_the_go_registry(
    gofleet: GoFleet,
) -> None:
    registry = gofleet.go_registry()
    client, _, node_id = _registered(registry)
    other, _, other_id = _registered(registry)
    try:
        answer = client.set_hostname(node_id, "agent-b")
        assert answer["node_id"] == node_id and answer["hostname"] == "agent-b"
        resolved = client.resolve_hostname("agent-b")
        assert {k: resolved[k] for k in ("node_id", "public", "hostname")} == {
            "node_id": node_id,
            "public": False,
            "hostname": "agent-b",
        }
        assert client.lookup(node_id)["hostname"] == "agent-b"
        # The production registry hides the cause; the client passes its text on.
        assert _refused(other.set_hostname, other_id, "agent-b") == "request failed"
        assert _refused(other.set_hostname, other_id, "localhost") == "request failed"
        client.set_hostname(node_id, "")
        assert _refused(client.resolve_hostname, "agent-b") == "request failed"
    finally:
        client.close()
        other.close()


@needs_hostname_client
def test_a_go_daemon_hostname_resolves_for_pilothandshake(gofleet: GoFleet) -> None:
    registry = gofleet.go_registry()
    go = gofleet.go_daemon("go", registry, "-hostname", "go-agent").start()
    client = registry.client()
    try:
        wait_until(lambda: "hostname set" in go.stderr, what="the Go daemon sets its hostname")
        assert client.resolve_hostname("go-agent")["node_id"] == go.node_id
    finally:
        client.close()


@needs_hostname_client
def test_pilotctl_handshake_by_hostname_reaches_a_python_daemon(gofleet: GoFleet) -> None:
    # The Pilot docs' first example, `pilotctl handshake agent-b "..."`, with agent-b a
    # pilot-handshaked node.
    registry = gofleet.go_registry()
    py = gofleet.node("py", registry).start()
    go = gofleet.go_daemon("go", registry).start()
    client = registry.client(py.identity)
    try:
        client.set_hostname(py.node_id, "agent-b")
    finally:
        client.close()
    go_id = go.node_id
    assert go.pilotctl("handshake", "agent-b", "by name")["node_id"] == py.node_id
    wait_until(lambda: py.pending() == {go_id}, what="the request pending at agent-b")
    [pending] = py.control("pending")["pending"]
    assert pending["justification"] == "by name"
