"""DaemonRuntime and Daemon in this process: dialling rules, policy reload, lifecycle, start
errors, and the helpers of the pilot-handshaked entry point."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pilothandshake.addresses import format_address
from pilothandshake.config import Config, EventsConfig, RegistryConfig, TrustConfig
from pilothandshake.daemon import Daemon, DaemonRuntime
from pilothandshake.errors import (
    ConfigError,
    HandshakeError,
    RegistryError,
    SendError,
    StoreError,
)
from pilothandshake.events import EventBus
from pilothandshake.handshaked import main, move_corrupt_aside
from pilothandshake.identity import Identity, fingerprint
from pilothandshake.logsetup import JsonLogFormatter
from pilothandshake.messages import receipt_challenge
from pilothandshake.registry.server import RegistryServer
from pilothandshake.runtime import AllowlistEntry
from pilothandshake.store import load_state
from pilothandshake.wire import read_message, write_receipt

WAIT = 5.0


class FakeResolver:
    address = "127.0.0.1:9"

    def __init__(self, answer: dict[str, Any] | None = None) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int]] = []

    def resolve(self, node_id: int, requester_id: int) -> dict[str, Any]:
        self.asked.append((node_id, requester_id))
        if self.answer is None:
            raise RegistryError("request failed")
        return self.answer


class Receiver:
    """A port-444 stand-in that records the bytes of its one connection and answers with a
    receipt signed by ``identity`` (None: a well-formed signature of no one's; "": no
    receipt, as a round-2 node or an address that swallows messages)."""

    def __init__(self, identity: Identity | str | None = None, receiver_id: int = 9) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.identity = identity
        self.receiver_id = receiver_id
        self.data: list[bytes] = []
        self.thread = threading.Thread(target=self._accept_one, daemon=True)
        self.thread.start()

    def _accept_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(WAIT)
            data = read_message(conn)
            self.data.append(data)
            if isinstance(self.identity, Identity):
                sender = json.loads(data).get("node_id", 3)
                challenge = receipt_challenge(self.receiver_id, sender, data)
                write_receipt(conn, self.identity.sign(challenge))
            elif self.identity is None:
                write_receipt(conn, bytes(64))

    def close(self) -> None:
        self.thread.join(WAIT)
        self.sock.close()


def runtime(config: Config, client: Any = None) -> DaemonRuntime:
    return DaemonRuntime(config, Identity.generate(), EventBus(lambda: 0), client)


def test_node_id_comes_from_config_without_registry_and_from_registration_with_one() -> None:
    assert runtime(Config(node_id=7)).node_id() == 7
    with_registry = runtime(Config(node_id=7), FakeResolver())
    assert with_registry.node_id() == 0
    with_registry.set_node_id(12)
    assert with_registry.node_id() == 12


def test_dial_uses_the_peers_address_first() -> None:
    receiver = Receiver()
    resolver = FakeResolver({"real_addr": "127.0.0.1:1"})
    rt = runtime(Config(peers={9: receiver.address}), resolver)
    rt.set_node_id(3)
    rt.dial_and_send(9, 444, b'{"hello":1}')
    receiver.close()
    assert receiver.data == [b'{"hello":1}']
    assert resolver.asked == []


def test_dial_falls_back_to_the_registry_resolve() -> None:
    receiver = Receiver()
    resolver = FakeResolver({"node_id": 9, "real_addr": receiver.address})
    rt = runtime(Config(), resolver)
    rt.set_node_id(3)
    rt.dial_and_send(9, 444, b"{}")
    receiver.close()
    assert receiver.data == [b"{}"]
    assert resolver.asked == [(9, 3)]


# Issue 15 item 1: delivery is proven by the receiver's key (SPEC 3 receipts).

MESSAGE = b'{"type":"handshake_request","node_id":3}'


@pytest.mark.parametrize("who", ["peer", "first contact"])
def test_a_receipt_signed_by_the_expected_key_is_delivery(who: str) -> None:
    peer = Identity.generate()
    receiver = Receiver(peer)
    rt = runtime(Config(node_id=3, peers={9: receiver.address}))
    if who == "peer":
        rt.set_peer_keys(lambda node: peer.public_key if node == 9 else None)
    rt.dial_and_send(9, 444, MESSAGE)  # no SendError
    receiver.close()
    assert receiver.data == [MESSAGE]


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("", "no receipt"),  # read and closed: round 2's bare end of stream is not delivery
        ("impostor", "a receipt not signed by its key"),
        ("wrong node", "a receipt not signed by its key"),
    ],
)
def test_no_receipt_or_one_not_signed_by_the_peers_key_is_a_failed_send(
    answer: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink of the issue read the message and closed: it printed "sent". Now the send
    fails (the caller relays) and one WARNING names the address that proved nothing."""
    peer = Identity.generate()
    signer: Identity | str = {"": "", "impostor": Identity.generate(), "wrong node": peer}[answer]
    receiver = Receiver(signer, receiver_id=10 if answer == "wrong node" else 9)
    rt = runtime(Config(node_id=3, peers={9: receiver.address}))
    rt.set_peer_keys(lambda node: peer.public_key)
    expected = f"did not prove the key of node 9: {problem}"
    logged = caplog.at_level(logging.WARNING, logger="pilothandshake.daemon")
    with logged, pytest.raises(SendError, match=expected):
        rt.dial_and_send(9, 444, MESSAGE)
    receiver.close()
    assert receiver.data == [MESSAGE]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"{receiver.address} did not prove the key of node 9 ({problem}); not delivered"


def test_can_dial_answers_from_the_peers_map_and_registration_without_asking() -> None:
    alone = runtime(Config(peers={9: "127.0.0.1:1"}))
    assert (alone.can_dial(9), alone.can_dial(10)) == (True, False)
    resolver = FakeResolver({"real_addr": "127.0.0.1:1"})
    registered = runtime(Config(), resolver)
    assert registered.can_dial(10) is False  # not registered yet: nothing to resolve with
    registered.set_node_id(3)
    assert registered.can_dial(10) is True
    assert resolver.asked == []


@pytest.mark.parametrize(
    ("client", "node_id", "reason"),
    [
        (None, 0, "not in peers and no registry"),
        (FakeResolver(), 3, "cannot resolve node 9"),
        (FakeResolver({"node_id": 9}), 3, "no address"),
        (FakeResolver({"real_addr": "nonsense"}), 3, "bad address"),
        (FakeResolver({"real_addr": "127.0.0.1:1"}), 0, "not registered"),
    ],
)
def test_dial_without_an_address_raises_send_error(
    client: FakeResolver | None, node_id: int, reason: str
) -> None:
    rt = runtime(Config(), client)
    rt.set_node_id(node_id)
    with pytest.raises(SendError, match=reason):
        rt.dial_and_send(9, 444, b"{}")


def test_reload_swaps_trust_and_peers_but_not_the_rest() -> None:
    rt = runtime(Config(node_id=7, listen="127.0.0.1:4444"))
    fresh = Config(
        node_id=8,
        listen="127.0.0.1:5555",
        peers={9: "127.0.0.1:9999"},
        trust=TrustConfig(
            auto_approve=True,
            strict=False,
            outgoing_ttl=60.0,
            allowlist={42: AllowlistEntry(42, "builder")},
            deny=frozenset({13}),
        ),
    )
    rt.reload(fresh)
    assert rt.trust_auto_approve() and not rt.trust_strict()
    assert rt.trust_outgoing_ttl() == 60.0
    assert rt.trusted_agent(42) == AllowlistEntry(42, "builder") and rt.trusted_agent(43) is None
    assert rt.is_denied(13) and not rt.is_denied(42)
    assert rt.config.peers == {9: "127.0.0.1:9999"}
    assert rt.node_id() == 7 and rt.config.listen == "127.0.0.1:4444"


def node_config(directory: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "identity": str(directory / "identity.json"),
        "node_id": 7,
        "listen": "127.0.0.1:0",
    }
    values.update(overrides)
    return Config(**values)


def test_daemon_start_and_stop_are_idempotent_and_release_everything(short_dir: Path) -> None:
    config = node_config(short_dir)
    daemon = Daemon(config)
    daemon.start()
    daemon.start()
    host, port = daemon.listen_address
    assert host == "127.0.0.1" and port > 0
    status = daemon.status()
    assert status == {
        "node_id": 7,
        "listen": f"127.0.0.1:{port}",
        "registry": None,
        "trusted": 0,
        "pending": 0,
        "public_key": daemon.identity.public_key_b64,
        "fingerprint": fingerprint(daemon.identity.public_key_b64),
        "undelivered": 0,
        "webhook": None,
    }
    assert os.path.exists(config.control_socket)
    daemon.stop()
    daemon.stop()
    assert not os.path.exists(config.control_socket)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    Daemon(config).stop()  # the directory lock was released


def test_daemon_never_started_releases_the_directory_on_stop(short_dir: Path) -> None:
    config = node_config(short_dir)
    Daemon(config).stop()
    with Daemon(config) as daemon:
        assert daemon.node_id == 7


def test_second_daemon_on_the_same_directory_fails_with_store_error(short_dir: Path) -> None:
    config = node_config(short_dir)
    with Daemon(config), pytest.raises(StoreError, match="in use"):
        Daemon(config)


def test_port_in_use_gives_a_clear_error_and_frees_the_directory(short_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        listen = f"127.0.0.1:{blocker.getsockname()[1]}"
        daemon = Daemon(node_config(short_dir, listen=listen))
        with pytest.raises(HandshakeError, match=f"cannot listen on {listen}: address already"):
            daemon.start()
    Daemon(node_config(short_dir)).stop()


def test_identity_readable_by_others_is_refused(short_dir: Path) -> None:
    identity = short_dir / "identity.json"
    Identity.load_or_create(str(identity))
    os.chmod(identity, 0o640)
    with pytest.raises(StoreError, match=f"chmod 600 {identity}"):
        Daemon(node_config(short_dir))


def test_registry_down_at_start_still_serves_and_reports_unreachable(short_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    config = node_config(short_dir, registry=RegistryConfig(address=dead, poll_interval=0.05))
    with Daemon(config) as daemon:
        assert daemon.node_id == 0
        assert daemon.listen_address[1] > 0
        registry = daemon.status()["registry"]
        assert registry["address"] == dead and registry["reachable"] is False


def test_json_log_lines_are_one_object_each() -> None:
    record = logging.LogRecord(
        "pilothandshake.x", logging.WARNING, __file__, 1, "a %s", ("b",), None
    )
    line = JsonLogFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "warning" and entry["logger"] == "pilothandshake.x"
    assert entry["message"] == "a b" and entry["time"].endswith("Z")


def test_move_corrupt_aside_renames_only_a_corrupt_trust_file(tmp_path: Path) -> None:
    trust = tmp_path / "trust.json"
    assert move_corrupt_aside(str(trust)) == []
    trust.write_text('{"trusted": null}')
    assert move_corrupt_aside(str(trust)) == [] and trust.exists()
    trust.write_text("{not json")
    (moved,) = move_corrupt_aside(str(trust))
    assert moved.startswith(f"{trust}.corrupt-") and not trust.exists()
    assert Path(moved).read_text() == "{not json"


def test_move_corrupt_aside_renames_a_corrupt_journal_and_keeps_trust_json(
    tmp_path: Path,
) -> None:
    trust = tmp_path / "trust.json"
    trust.write_text('{"trusted": [{"node_id": 7, "public_key": ""}]}')
    journal = tmp_path / "trust.json.journal"
    journal.write_text("garbage that is no journal\n[]\n")
    (moved,) = move_corrupt_aside(str(trust))
    assert moved.startswith(f"{journal}.corrupt-") and not journal.exists()
    assert list(load_state(str(trust)).trusted) == [7]


def test_a_store_error_carries_the_file_it_is_about(tmp_path: Path) -> None:
    """``--move-corrupt-aside`` moves the file the error names: by its ``path``, not by
    matching the message."""
    trust = tmp_path / "trust.json"
    trust.write_text("{not json")
    with pytest.raises(StoreError) as caught:
        load_state(str(trust))
    assert caught.value.path == str(trust)
    trust.write_text('{"trusted": []}')
    journal = tmp_path / "trust.json.journal"
    journal.write_text("garbage that is no journal\n[]\n")
    with pytest.raises(StoreError) as caught:
        load_state(str(trust))
    assert caught.value.path == str(journal)
    identity = tmp_path / "identity.json"
    identity.write_text("{}")
    with pytest.raises(StoreError) as caught:
        Identity.load_or_create(str(identity))
    assert caught.value.path == str(identity)


def test_main_with_a_bad_config_prints_one_line_and_returns_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"listen": 444}))
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pilot-handshaked: ") and str(config) in err and "listen" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def test_missing_state_directory_is_created_private(short_dir: Path) -> None:
    state = short_dir / "state"
    Daemon(node_config(short_dir, identity=str(state / "identity.json"))).stop()
    assert (state.stat().st_mode & 0o777) == 0o700


def test_state_directory_writable_by_others_is_refused_naming_the_fix(short_dir: Path) -> None:
    os.chmod(short_dir, 0o777)
    with pytest.raises(StoreError) as caught:
        Daemon(node_config(short_dir))
    message = str(caught.value)
    assert f"state directory {short_dir} is writable by group or others" in message
    assert f"run: chmod go-w {short_dir}" in message
    assert not (short_dir / "identity.json").exists()  # refused before anything is written


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_identity_file_owned_by_another_user_is_refused(short_dir: Path) -> None:
    identity = short_dir / "identity.json"
    Identity.load_or_create(str(identity))
    os.chown(identity, 12345, 12345)
    with pytest.raises(StoreError, match=f"identity file {identity} is owned by uid 12345"):
        Daemon(node_config(short_dir))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_state_directory_owned_by_another_user_is_refused(short_dir: Path) -> None:
    os.chown(short_dir, 12345, 12345)
    with pytest.raises(StoreError, match=f"state directory {short_dir} is owned by uid 12345"):
        Daemon(node_config(short_dir))


def test_planted_journal_link_is_refused_and_its_target_untouched(short_dir: Path) -> None:
    victim = short_dir.parent / f"{short_dir.name}-victim"
    victim.write_bytes(b"root's file\n")
    os.chmod(victim, 0o644)
    try:
        (short_dir / "trust.json.journal").symlink_to(victim)
        with pytest.raises(StoreError, match="symbolic link"):
            Daemon(node_config(short_dir))
        assert victim.read_bytes() == b"root's file\n"
        assert (victim.stat().st_mode & 0o777) == 0o644
    finally:
        victim.unlink()


def test_reload_of_a_file_with_a_5000_digit_integer_keeps_the_old_config(
    short_dir: Path,
) -> None:
    path = short_dir / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {"identity": str(short_dir / "identity.json"), "listen": "127.0.0.1:0", "node_id": 7}
        )
    )
    daemon = Daemon.from_file(str(path))
    try:
        before = daemon.config
        path.write_text(path.read_text() + "trust: {deny: [" + "7" * 5000 + "]}\n")
        with pytest.raises(ConfigError, match=str(path)):
            daemon.reload()
        assert daemon.config is before
    finally:
        daemon.stop()


def test_runtime_reads_pending_ttl_from_the_config() -> None:
    config = Config(listen="127.0.0.1:0", trust=TrustConfig(pending_ttl=30.0))
    assert runtime(config).trust_pending_ttl() == 30.0


def test_status_shows_the_events_the_webhook_dropped(short_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"  # nothing listens after this
    config = node_config(short_dir, events=EventsConfig(webhook=url))
    with Daemon(config) as daemon:
        assert daemon.status()["webhook"] == {"url": url, "dropped": 0}
        daemon.events.publish("handshake.received", {"peer_node_id": 5})
        deadline = time.monotonic() + WAIT
        while daemon.status()["webhook"]["dropped"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert daemon.status()["webhook"]["dropped"] == 1
    assert Daemon(node_config(short_dir)).status()["webhook"] is None


@pytest.fixture
def embedded_registry() -> Iterator[str]:
    server = RegistryServer("127.0.0.1", 0)
    server.start()
    try:
        yield format_address(server.address)
    finally:
        server.stop()


def registered_config(directory: Path, registry: str) -> Config:
    return node_config(directory, node_id=0, registry=RegistryConfig(address=registry))


def test_a_node_id_the_registry_changed_is_an_error_and_an_event(
    short_dir: Path, embedded_registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = short_dir / "node.json"
    memory.write_text(json.dumps({"registry": embedded_registry, "node_id": 99}))
    daemon = Daemon(registered_config(short_dir, embedded_registry))
    subscription = daemon.events.subscribe()
    with caplog.at_level(logging.ERROR, logger="pilothandshake.statedir"), daemon:
        assert daemon.node_id == 1
        event = subscription.get(timeout=WAIT)
    assert event is not None and event["event"] == "node.id_changed"
    assert event["data"] == {"old": 99, "new": 1} and event["node_id"] == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ID 1, but it was node 99 before" in errors[0]
    assert json.loads(memory.read_text()) == {"registry": embedded_registry, "node_id": 1}
    assert memory.stat().st_mode & 0o777 == 0o600


def test_the_same_node_id_again_is_no_event(
    short_dir: Path, embedded_registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = registered_config(short_dir, embedded_registry)
    with Daemon(config) as first:
        assert first.node_id == 1
    daemon = Daemon(config)
    subscription = daemon.events.subscribe()
    with caplog.at_level(logging.ERROR, logger="pilothandshake.statedir"), daemon:
        assert daemon.node_id == 1
        assert subscription.get(timeout=0.2) is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_legacy_mode_logs_one_warning_saying_what_it_relaxes(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = node_config(short_dir, trust=TrustConfig(strict=False))
    with caplog.at_level(logging.WARNING, logger="pilothandshake.daemon"), Daemon(config):
        pass
    (line,) = [r.getMessage() for r in caplog.records if "legacy mode" in r.getMessage()]
    assert "Go-style signature" in line and "still needs a valid key and signature" in line


def test_status_shows_the_nodes_own_key_as_pending_shows_keys(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pilothandshake.cli import main_handshakectl

    with Daemon(node_config(short_dir)) as daemon:
        key = daemon.identity.public_key_b64
        status = daemon.status()
        assert (status["public_key"], status["fingerprint"]) == (key, fingerprint(key))
        assert len(status["fingerprint"]) == 16
        assert main_handshakectl(["--socket", daemon.config.control_socket, "status"]) == 0
        shown = capsys.readouterr().out
    assert f"key       {fingerprint(key)}  {key}" in shown.splitlines(), shown


# SPEC 4: the registry credential in the clear


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_spec4_strict_daemon_warns_at_start_about_a_non_loopback_registry_without_tls(
    caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    # A port nothing listens on: 0.0.0.0 is not a loopback address, yet connecting to it
    # reaches this host and is refused at once, so the registry loop just backs off.
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="phd-") as root:  # short AF_UNIX socket path
        config = Config(
            identity=os.path.join(root, "identity.json"),
            listen="127.0.0.1:0",
            registry=RegistryConfig(address=f"{host}:{port}", poll_interval=0.05),
        )
        with caplog.at_level(logging.WARNING, logger="pilothandshake"), Daemon(config):
            pass
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not on loopback and TLS is off" in line for line in lines) == warned
