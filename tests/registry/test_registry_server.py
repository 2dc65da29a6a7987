"""The embedded registry, driven through the real ``RegistryConnection`` over loopback sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from fakeruntime import wait_until
from registrytools import REGISTRYD, Node

from pilothandshake.constants import MAX_REGISTRY_FRAME_SERVER, REGISTRY_INBOX
from pilothandshake.errors import RegistryError, StoreError
from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.challenges import register_challenge, respond_challenge
from pilothandshake.registry.client import RegistryConnection, encode_frame, read_frame
from pilothandshake.registry.config import RegistryLimits
from pilothandshake.registry.server import RegistryServer


def unsigned_register(identity: Identity, listen_addr: str) -> dict[str, Any]:
    """A ``register`` request without a signature, as a Go daemon (or anyone) sends it."""
    return {"type": "register", "listen_addr": listen_addr, "public_key": identity.public_key_b64}


def signed_register(
    identity: Identity, listen_addr: str, stamp: int | None = None, **fields: Any
) -> dict[str, Any]:
    """A ``register`` request signed by ``identity`` (SPEC 17), stamped now by default."""
    stamp = int(time.time()) if stamp is None else stamp
    key = identity.public_key_b64
    signature = b64encode(identity.sign(register_challenge(key, stamp)))
    return {
        "type": "register",
        "listen_addr": listen_addr,
        "public_key": key,
        "timestamp": stamp,
        "signature": signature,
        **fields,
    }


def raw_exchange(server: RegistryServer, payload: bytes) -> tuple[Any, bytes]:
    """Send raw bytes; return the first response frame and whatever follows until EOF."""
    with socket.create_connection(server.address, timeout=2.0) as sock:
        sock.sendall(payload)
        response = read_frame(sock, 1 << 20, 2.0, 2.0)
        rest = sock.recv(100)
    return response, rest


def test_same_key_gets_same_id_and_ids_count_up_from_one(server: RegistryServer) -> None:
    a, b = Node(server), Node(server)
    assert (a.node_id, b.node_id) == (1, 2)
    again = a.client.register("127.0.0.1:5000", a.identity.public_key_b64)
    assert again["node_id"] == 1
    assert again["public_key"] == a.identity.public_key_b64
    assert again["address"] == "0:0000.0000.0001"
    assert Node(server).node_id == 3


def test_lookup_reports_key_networks_and_real_addr_only_when_public(
    server: RegistryServer,
) -> None:
    a, b = Node(server, "127.0.0.1:4001"), Node(server)
    private = b.client.lookup(a.node_id)
    assert private["type"] == "lookup_ok"
    assert private["public_key"] == a.identity.public_key_b64
    assert private["networks"] == [0]
    assert private["public"] is False
    assert "real_addr" not in private
    a.client.set_visibility(a.node_id, True)
    public = b.client.lookup(a.node_id)
    assert public["public"] is True
    assert public["real_addr"] == "127.0.0.1:4001"


def test_unspecified_listen_host_is_replaced_by_the_source_ip(server: RegistryServer) -> None:
    for listen in ("0.0.0.0:4002", ":4002"):
        node = Node(server, listen)
        node.client.set_visibility(node.node_id, True)
        assert node.client.lookup(node.node_id)["real_addr"] == "127.0.0.1:4002"


def test_lookup_of_unknown_node_fails(server: RegistryServer) -> None:
    a = Node(server)
    with pytest.raises(RegistryError, match=r"^node 99 is not online$"):
        a.client.lookup(99)


def test_config_networks_apply_to_a_key_listed_before_registration(
    make_server: Callable[..., RegistryServer],
) -> None:
    future = Identity.generate()
    server = make_server(networks={3: [1, future.public_key_b64], 5: [1]})
    first = Node(server)
    second_client = RegistryConnection("{}:{}".format(*server.address), future.sign)
    second = second_client.register("127.0.0.1:4000", future.public_key_b64)["node_id"]
    assert first.client.lookup(first.node_id)["networks"] == [0, 3, 5]
    assert first.client.lookup(second)["networks"] == [0, 3]


def test_resolve_requires_public_shared_network_or_the_targets_vouch(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server(networks={7: [1, 2]})
    a, b, c, d = (Node(server, f"127.0.0.1:{4000 + i}") for i in range(4))
    # b shares network 7 with a.
    assert a.client.resolve(b.node_id, a.node_id)["real_addr"] == "127.0.0.1:4001"
    # c is private and unrelated to d: denied, and the error says why.
    with pytest.raises(RegistryError, match=r"^node 4 may not resolve private node 3 "):
        d.client.resolve(c.node_id, d.node_id)
    # c's report of trust in d lets d resolve c, and only that way round.
    c.client.report_trust(c.node_id, d.node_id)
    assert d.client.resolve(c.node_id, d.node_id)["real_addr"] == "127.0.0.1:4002"
    with pytest.raises(RegistryError, match="may not resolve"):
        c.client.resolve(d.node_id, c.node_id)
    d.client.report_trust(d.node_id, c.node_id)
    assert c.client.resolve(d.node_id, c.node_id)["node_id"] == d.node_id
    # Public opens it to anyone.
    with pytest.raises(RegistryError):
        a.client.resolve(d.node_id, a.node_id)
    d.client.set_visibility(d.node_id, True)
    assert a.client.resolve(d.node_id, a.node_id)["real_addr"] == "127.0.0.1:4003"


def test_wrong_or_missing_signatures_are_refused(server: RegistryServer) -> None:
    a, b = Node(server), Node(server)
    impostor = RegistryConnection("{}:{}".format(*server.address), b.identity.sign)
    with pytest.raises(RegistryError, match=r"^bad signature from node 1$"):
        impostor.heartbeat(a.node_id)
    with pytest.raises(RegistryError, match=r"^bad signature from node 1$"):
        impostor.poll_handshakes(a.node_id)
    with pytest.raises(RegistryError, match=r"^missing or malformed signature from node 1$"):
        a.client.call({"type": "heartbeat", "node_id": a.node_id})
    with pytest.raises(RegistryError, match=r"^missing or malformed signature"):
        a.client.call({"type": "set_visibility", "node_id": a.node_id, "public": True})
    with pytest.raises(RegistryError, match=r"^bad signature from node 1$"):
        # A signature over the right challenge by the wrong key.
        b.client.request_handshake(
            a.node_id, b.node_id, "x", b.sig(handshake_challenge(a.node_id, b.node_id))
        )
    assert a.client.heartbeat(a.node_id)["type"] == "heartbeat_ok"
    assert b.client.lookup(a.node_id)["public"] is False  # the refused set_visibility did nothing


def test_second_request_while_first_waits_fails_until_polled(server: RegistryServer) -> None:
    a, b = Node(server), Node(server)
    sig = a.sig(handshake_challenge(a.node_id, b.node_id))
    ok = a.client.request_handshake(a.node_id, b.node_id, "sync", sig)
    assert ok == {"type": "request_handshake_ok", "status": "delivered"}
    with pytest.raises(RegistryError, match=r"^a request from node 1 already waits in node 2's"):
        a.client.request_handshake(a.node_id, b.node_id, "again", sig)
    b.client.poll_handshakes(b.node_id)
    assert a.client.request_handshake(a.node_id, b.node_id, "after poll", sig)["status"]


def test_inbox_holds_at_most_100_requests(server: RegistryServer) -> None:
    target = Node(server)
    registrar = RegistryConnection("{}:{}".format(*server.address))
    results = []
    for _ in range(REGISTRY_INBOX + 1):
        ident = Identity.generate()
        sender = registrar.register("127.0.0.1:4000", ident.public_key_b64)["node_id"]
        sig = b64encode(ident.sign(handshake_challenge(sender, target.node_id)))
        try:
            registrar.request_handshake(sender, target.node_id, "hi", sig)
            results.append(True)
        except RegistryError:
            results.append(False)
    assert results == [True] * REGISTRY_INBOX + [False]
    assert len(target.client.poll_handshakes(target.node_id)["requests"]) == REGISTRY_INBOX


def test_poll_returns_and_drains_requests_and_responses(server: RegistryServer) -> None:
    a, b = Node(server), Node(server)
    a.client.request_handshake(
        a.node_id, b.node_id, "nightly", a.sig(handshake_challenge(a.node_id, b.node_id))
    )
    b.client.respond_handshake(
        b.node_id, a.node_id, False, b.sig(respond_challenge(b.node_id, a.node_id))
    )
    polled_b = b.client.poll_handshakes(b.node_id)
    [request] = polled_b["requests"]
    assert request["from_node_id"] == a.node_id
    assert request["justification"] == "nightly"
    assert request["public_key"] == a.identity.public_key_b64
    assert abs(request["timestamp"] - time.time()) < 60
    assert polled_b["responses"] == []
    polled_a = a.client.poll_handshakes(a.node_id)
    [response] = polled_a["responses"]
    assert (response["from_node_id"], response["accept"]) == (b.node_id, False)
    assert isinstance(response["timestamp"], int)
    for node in (a, b):
        empty = node.client.poll_handshakes(node.node_id)
        assert (empty["requests"], empty["responses"]) == ([], [])


def test_accepting_response_creates_trust_pair_and_queues_response(
    server: RegistryServer,
) -> None:
    a, b = Node(server), Node(server)
    with pytest.raises(RegistryError):
        a.client.resolve(b.node_id, a.node_id)
    bad = a.sig(respond_challenge(b.node_id, a.node_id))  # signed by the wrong node
    with pytest.raises(RegistryError, match=r"^bad signature from node 2$"):
        b.client.respond_handshake(b.node_id, a.node_id, True, bad)
    b.client.respond_handshake(
        b.node_id, a.node_id, True, b.sig(respond_challenge(b.node_id, a.node_id))
    )
    assert a.client.resolve(b.node_id, a.node_id)["node_id"] == b.node_id
    [response] = a.client.poll_handshakes(a.node_id)["responses"]
    assert (response["from_node_id"], response["accept"]) == (b.node_id, True)
    assert a.client.revoke_trust(a.node_id, b.node_id)["type"] == "revoke_trust_ok"


def test_revoking_a_missing_trust_pair_fails(server: RegistryServer) -> None:
    a, b = Node(server), Node(server)
    with pytest.raises(RegistryError, match=r"^no trust pair 1-2 to revoke$"):
        a.client.revoke_trust(a.node_id, b.node_id)
    a.client.report_trust(a.node_id, b.node_id)
    b.client.revoke_trust(b.node_id, a.node_id)
    with pytest.raises(RegistryError, match=r"^no trust pair 1-2 to revoke$"):
        a.client.revoke_trust(a.node_id, b.node_id)


def test_node_missing_heartbeats_goes_offline_and_keeps_its_id(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server(expiry=0.3)
    a, b = Node(server), Node(server)
    a.client.report_trust(a.node_id, b.node_id)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        b.client.heartbeat(b.node_id)  # b stays online
        try:
            b.client.lookup(a.node_id)
        except RegistryError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("node never went offline")
    # An unsigned register answers the ID but proves nothing: a stays offline (SPEC 17).
    assert a.client.call(unsigned_register(a.identity, "127.0.0.1:4000"))["node_id"] == 1
    with pytest.raises(RegistryError, match="not online"):
        b.client.lookup(a.node_id)
    # Its own signed heartbeat brings it back, with its ID and its pairs.
    a.client.heartbeat(a.node_id)
    assert b.client.lookup(a.node_id)["node_id"] == a.node_id
    b.client.revoke_trust(b.node_id, a.node_id)  # the pair survived


def test_request_frame_over_64_kib_is_refused_and_closed(server: RegistryServer) -> None:
    header = struct.pack(">I", MAX_REGISTRY_FRAME_SERVER + 1)
    response, rest = raw_exchange(server, header)
    assert response == {"type": "error", "error": "frame of 65537 bytes exceeds the limit of 65536"}
    assert rest == b""


def test_malformed_json_and_fields_get_an_error_not_a_crash(server: RegistryServer) -> None:
    body = b"{not json"
    response, rest = raw_exchange(server, struct.pack(">I", len(body)) + body)
    assert response is not None and response["type"] == "error"
    assert response["error"].startswith("malformed frame: ")
    assert rest == b""
    a = Node(server)
    for bad in (
        {"type": "lookup", "node_id": True},
        {"type": "lookup", "node_id": 2**32},
        {"type": "nonsense"},
        {"node_id": 1},
        {"type": "register", "listen_addr": "nope", "public_key": a.identity.public_key_b64},
        {"type": "register", "listen_addr": "127.0.0.1:1", "public_key": "AAAA"},
        {"type": "set_visibility", "node_id": 1, "public": "yes", "signature": ""},
    ):
        with pytest.raises(RegistryError) as info:
            a.client.call(bad)
        # The error says which field is wrong (and is never the production's blanket text).
        assert str(info.value) != "request failed"
        assert any(word in str(info.value) for word in ("field", "type", "listen_addr", "key"))
    assert a.client.lookup(a.node_id)["node_id"] == a.node_id  # still serving


def test_store_keeps_ids_and_trust_pairs_across_restart(
    make_server: Callable[..., RegistryServer], tmp_path: Path
) -> None:
    store = str(tmp_path / "registry.json")
    server = make_server(store_path=store)
    a, b, c = Node(server, "127.0.0.1:4000"), Node(server), Node(server)
    a.client.report_trust(a.node_id, b.node_id)
    a.client.set_visibility(a.node_id, True)
    server.stop()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    restarted = make_server(store_path=store)
    address = "{}:{}".format(*restarted.address)
    for node in (a, b, c):
        node.client = RegistryConnection(address, node.identity.sign)
    assert b.client.register("127.0.0.1:4000", b.identity.public_key_b64)["node_id"] == 2
    assert c.client.lookup(a.node_id)["real_addr"] == "127.0.0.1:4000"
    assert Node(restarted).node_id == 4
    b.client.revoke_trust(b.node_id, a.node_id)  # the pair was restored
    with pytest.raises(RegistryError):
        c.client.revoke_trust(c.node_id, a.node_id)


def test_corrupt_or_unwritable_store_is_a_clear_error(tmp_path: Path) -> None:
    store = tmp_path / "registry.json"
    store.write_text("{broken")
    with pytest.raises(StoreError, match=r"registry\.json"):
        RegistryServer("127.0.0.1", 0, store_path=str(store))
    result = subprocess.run(
        [sys.executable, REGISTRYD, "--listen", "127.0.0.1:0", "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert "registry.json" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(StoreError, match=r"cannot (lock|write) .*missing/registry\.json"):
        RegistryServer("127.0.0.1", 0, store_path=str(tmp_path / "missing" / "registry.json"))


# -- issue 11: resolve gating, limits and log lines over real sockets ----------------------


@pytest.fixture
def default_server() -> Iterator[RegistryServer]:
    """A registry with the production limits (10 new keys a minute per source, ...)."""
    server = RegistryServer("127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def test_attackers_own_calls_never_reveal_a_private_victims_address(
    default_server: RegistryServer,
) -> None:
    victim, attacker = Node(default_server, "127.0.0.1:4001"), Node(default_server)
    attacker.client.report_trust(attacker.node_id, victim.node_id)
    attacker.client.respond_handshake(
        attacker.node_id,
        victim.node_id,
        True,
        attacker.sig(respond_challenge(attacker.node_id, victim.node_id)),
    )
    with pytest.raises(RegistryError, match="may not resolve private node"):
        attacker.client.resolve(victim.node_id, attacker.node_id)
    # The victim's own vouch is what opens it.
    victim.client.report_trust(victim.node_id, attacker.node_id)
    assert attacker.client.resolve(victim.node_id, attacker.node_id)["real_addr"] == (
        "127.0.0.1:4001"
    )


def test_eleventh_new_key_from_one_address_in_a_minute_is_refused(
    default_server: RegistryServer,
) -> None:
    nodes = [Node(default_server) for _ in range(10)]
    extra = Identity.generate()
    with pytest.raises(RegistryError, match=r"^request failed$"):
        nodes[0].client.call(unsigned_register(extra, "127.0.0.1:4000"))
    # Registered keys come back freely when they sign (SPEC 17); unsigned they pay.
    again = nodes[3].client.call(signed_register(nodes[3].identity, "127.0.0.1:4100"))
    assert again["node_id"] == nodes[3].node_id
    with pytest.raises(RegistryError, match=r"^request failed$"):
        nodes[3].client.call(unsigned_register(nodes[3].identity, "127.0.0.1:4100"))


def assert_refused_unread(address: tuple[str, int]) -> None:
    """A new connection gets no answer: it is reset (at connect, send or receive) or closed."""
    try:
        with socket.create_connection(address, timeout=5.0) as extra:
            extra.sendall(encode_frame({"type": "lookup", "node_id": 1}))
            assert extra.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def test_connections_beyond_64_from_one_address_are_reset_unread(
    default_server: RegistryServer,
) -> None:
    held = [socket.create_connection(default_server.address, timeout=5.0) for _ in range(64)]
    try:
        wait_until(lambda: default_server.open_connections() == 64)
        assert_refused_unread(default_server.address)
        # One held connection still gets answers.
        held[0].sendall(encode_frame({"type": "lookup", "node_id": 1}))
        assert read_frame(held[0], 1 << 20, 5.0, 5.0) == {
            "type": "error",
            "error": "node 1 is not online",
        }
    finally:
        for sock in held:
            sock.close()


def test_global_connection_cap_and_idle_timeout_come_from_limits(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server(limits=RegistryLimits(max_connections=3, idle_timeout=0.5))
    held = [socket.create_connection(server.address, timeout=5.0) for _ in range(3)]
    try:
        wait_until(lambda: server.open_connections() == 3)
        assert_refused_unread(server.address)
        # Idle connections are closed by the server after 0.5 s, freeing the slots.
        wait_until(lambda: server.open_connections() == 0)
        for sock in held:
            sock.settimeout(5.0)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
    finally:
        for sock in held:
            sock.close()


def test_client_strings_never_forge_log_lines(
    default_server: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "x\n2030-01-01 00:00:00 WARNING pilothandshake.manager: trusted node 7"
    client = RegistryConnection("{}:{}".format(*default_server.address))
    with caplog.at_level(logging.DEBUG, logger="pilothandshake.registry"):
        with pytest.raises(RegistryError) as info:
            client.call({"type": forged})
        with pytest.raises(RegistryError):
            client.call({"type": "lookup", "node_id": "q" * 9000})
    client.close()
    assert "\n" not in str(info.value)
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused" in m for m in messages)
    for message in messages:
        assert "\n" not in message
        assert len(message) < 400
