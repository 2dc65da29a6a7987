"""``pilothandshake.Client`` against real ``pilot-handshaked`` processes (SPEC 13a)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fakeruntime import in_threads
from integration.conftest import Fleet, Node, free_port, process_env, wait_until

from pilothandshake import (
    Client,
    HandshakeError,
    NotTrustedError,
    PendingHandshake,
    SendError,
    StoreError,
    TrustRecord,
)
from pilothandshake.client import ControlError, raise_for_error
from pilothandshake.control_socket import check_socket, find_socket


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """Real daemons under a short directory (AF_UNIX paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        started = Fleet(Path(root))
        try:
            yield started
        finally:
            started.close()


@pytest.fixture
def pair(fleet: Fleet) -> tuple[Node, Node]:
    """Nodes 7 (A) and 9 (B), no registry, each in the other's peers; started."""
    return fleet.direct_pair()


def test_client_has_the_managers_names_and_types(pair: tuple[Node, Node]) -> None:
    a, b = pair
    with (
        Client.connect(config=str(a.config_path)) as node_a,
        Client.connect(socket=b.socket_path) as node_b,
    ):
        assert node_a.node_id == 7
        assert node_a.status()["listen"] == a.address
        assert node_a.send_request(9, "nightly sync") == "sent"
        wait_until(lambda: node_b.pending_count() == 1, what="the request at B")
        [pending] = node_b.pending_requests()
        assert isinstance(pending, PendingHandshake)
        assert (pending.node_id, pending.public_key, pending.justification) == (
            7,
            a.key,
            "nightly sync",
        )
        assert isinstance(pending.received_at, datetime)
        assert not node_a.is_trusted(9)

        result: list[bool] = []
        waiter = threading.Thread(target=lambda: result.append(node_a.wait_for_trust(9, 30)))
        waiter.start()
        assert node_b.approve_handshake("7")  # an ID as text works too
        waiter.join(40)
        assert result == [True]
        assert node_a.is_trusted(9)
        [record] = node_a.trusted_peers()
        assert isinstance(record, TrustRecord)
        assert (record.node_id, record.public_key, record.mutual) == (9, b.key, True)
        assert node_b.approve_handshake(7) is False  # nothing pending any more
        assert node_b.reject_handshake(12345, "who?") is False

        assert node_a.revoke_trust(9) == "revoked"
        with pytest.raises(NotTrustedError, match="node 9 is not trusted"):
            node_a.revoke_trust(9)
        assert not node_a.wait_for_trust(9, 0.2)


def test_wait_without_limit_returns_when_trust_arrives(pair: tuple[Node, Node]) -> None:
    a, b = pair
    node_a, node_b = Client(a.socket_path), Client(b.socket_path)
    node_a.send_request(9, "sync")
    wait_until(lambda: node_b.pending_count() == 1, what="the request at B")
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(node_a.wait_for_trust(9, None)))
    waiter.start()
    time.sleep(0.3)  # not synchronisation: gives the wait a chance to be in the daemon first
    assert result == []
    node_b.approve_handshake(7)
    waiter.join(40)
    assert result == [True]


def test_errors_map_to_the_package_exceptions(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7, peers={9: "127.0.0.1:1"}).start()
    with Client.connect(socket=node.socket_path, timeout=5) as client:
        with pytest.raises(SendError):
            client.send_request(9, "nobody listens there")
        with pytest.raises(HandshakeError, match="this node itself"):
            client.wait_for_trust(7, 1)
        with pytest.raises(HandshakeError, match="no registry"):
            client.send_request("agent-b", "by hostname")


def test_an_internal_error_of_the_daemon_is_a_store_error_with_its_message() -> None:
    message = "cannot write /var/lib/x/trust.json: No space left on device"
    with pytest.raises(StoreError, match=message) as caught:
        raise_for_error({"status": "error", "code": "internal", "message": message}, "approve")
    assert caught.value.path == ""  # the daemon's file is named in the message only


def test_events_iterate_and_close_from_another_thread(pair: tuple[Node, Node]) -> None:
    a, b = pair
    client = Client(b.socket_path)
    stream = client.events()
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(e["event"] for e in stream))
    reader.start()
    Client(a.socket_path).send_request(9, "sync")
    wait_until(lambda: "handshake.pending" in seen, what="B's pending event")
    client.close()  # ends the stream the client opened, while the reader waits in it
    reader.join(10)
    assert not reader.is_alive()
    with pytest.raises(ControlError, match="closed"):
        client.status()


def test_events_with_history_start_with_the_recent_ones(pair: tuple[Node, Node]) -> None:
    a, b = pair
    Client(a.socket_path).send_request(9, "sync")
    wait_until(lambda: b.pending(), what="the request at B")
    with Client(b.socket_path).events(history=True) as stream:
        first = next(iter(stream))
    assert first["event"].startswith("handshake.")


def test_daemon_not_running_raises_naming_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with pytest.raises(HandshakeError, match=f"not running \\(no socket at {path}\\)"):
        Client.connect(socket=path)


def test_daemon_that_does_not_answer_raises_within_the_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        silent.listen(8)  # accepts into the backlog, never answers
        started = time.monotonic()
        with pytest.raises(HandshakeError, match=f"no answer from pilot-handshaked at {path}"):
            Client(path, timeout=0.5).status()
        assert time.monotonic() - started < 5


def test_client_reaches_a_restarted_daemon_again(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    client = Client(a.socket_path)
    assert client.node_id == 7
    a.restart()
    assert client.node_id == 7
    assert client.pending_count() == 0


def test_calls_from_many_threads_at_once(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    client = Client(a.socket_path)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                assert client.node_id == 7
                assert client.trusted_peers() == []
        except BaseException as exc:  # reported below
            failures.append(exc)

    in_threads(work, 8)
    assert failures == []


def test_swapped_socket_in_a_world_writable_directory_is_refused(
    pair: tuple[Node, Node], tmp_path: Path
) -> None:
    a, _ = pair
    exposed = tmp_path / "exposed"
    exposed.mkdir()
    os.chmod(exposed, 0o777)  # anyone could have put this control.sock here
    swapped = exposed / "control.sock"
    os.symlink(a.socket_path, swapped)  # a live socket, reached through the open directory
    real = exposed / "real.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as forged:
        forged.bind(str(real))
        forged.listen(1)
        for path in (str(real), str(swapped)):
            with pytest.raises(ControlError, match="writable by group or others") as info:
                Client(path).status()
            assert f"refusing the control socket {path}" in str(info.value)
    check_socket(a.socket_path)  # the daemon's own socket passes


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
def test_socket_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as forged:
        forged.bind(str(path))
        forged.listen(1)
        os.chown(path, 65534, 65534)
        with pytest.raises(ControlError, match="owned by uid 65534"):
            Client(str(path)).status()


def test_socket_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("identity: state/identity.json\nnode_id: 7\n")
    monkeypatch.setenv("PILOT_HANDSHAKE_SOCKET", "/run/from-env.sock")
    assert find_socket("/run/given.sock", str(config)) == "/run/given.sock"
    assert find_socket(None, str(config)) == str(tmp_path / "state" / "control.sock")
    assert find_socket() == "/run/from-env.sock"
    monkeypatch.delenv("PILOT_HANDSHAKE_SOCKET")
    monkeypatch.setenv("HOME", str(tmp_path))
    if not os.access("/etc/pilot-handshake/config.yaml", os.R_OK):
        assert find_socket() == str(tmp_path / ".pilot-handshake" / "control.sock")


def readme_client_example() -> str:
    """The README's "From another process" block, as written there."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From another process", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs_against_a_real_daemon(pair: tuple[Node, Node], tmp_path: Path) -> None:
    a, b = pair
    script = tmp_path / "example.py"
    script.write_text(readme_client_example())
    example = subprocess.Popen(
        [sys.executable, str(script), str(a.config_path), "9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=process_env(),
    )
    try:
        wait_until(lambda: b.pending(), timeout=20, what="the example's request at B")
        b.control("approve", node_id=7)
        out, err = example.communicate(timeout=40)
    finally:
        if example.poll() is None:
            example.kill()
            example.wait()
    assert example.returncode == 0, err
    assert out.splitlines() == ["I am node 7", "sent", "trusted by 9"]


def test_importing_the_client_loads_nothing_heavy() -> None:
    probe = (
        "import sys\n"
        "import pilothandshake\n"
        "loaded = [m for m in sys.modules if m.startswith('pilothandshake.')]\n"
        "assert loaded == ['pilothandshake._version'], loaded\n"
        "before = set(sys.modules)\n"
        "from pilothandshake import Client\n"
        "import pilothandshake.cli\n"
        "heavy = ('yaml', 'nacl', 'filelock', 'typing', 'pilothandshake.daemon',\n"
        "         'pilothandshake.store',\n"
        "         'pilothandshake.manager', 'pilothandshake.config', 'pilothandshake.identity')\n"
        "print(sorted(m for m in heavy if m in set(sys.modules) - before))\n"
    )
    # -S: no site, so no .pth file runs first (3.9's editable-install finder imports typing
    # at start); the installed dependencies stay importable through PYTHONPATH. What matters
    # is what importing the client adds, on every Python.
    env = process_env()
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], paths["purelib"], paths["platlib"]])
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")


# Issue 16: a rejection ends the wait, with the reason, directly and through the relay


def _run_readme_example(a: Node, peer: int, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "example.py"
    script.write_text(readme_client_example())
    return subprocess.Popen(
        [sys.executable, str(script), str(a.config_path), str(peer)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=process_env(),
    )


def _rejected_while_waiting(
    example: subprocess.Popen[str], a: Node, b: Node, a_id: int, b_id: int
) -> tuple[str, float]:
    """B rejects A's request once A's script waits; the script's output, and how long it
    ran on after the rejection."""
    try:
        wait_until(lambda: a_id in b.pending(), timeout=20, what="the example's request at B")
        # Whether the script already waits or asks a moment later, it must learn at once.
        rejected_at = time.monotonic()
        b.control("reject", node_id=a_id, reason="not today")
        out, err = example.communicate(timeout=40)
        took = time.monotonic() - rejected_at
    finally:
        if example.poll() is None:
            example.kill()
            example.wait()
    assert example.returncode == 0, err
    return out, took


def test_the_readme_script_learns_of_a_direct_rejection_at_once(
    pair: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = pair
    example = _run_readme_example(a, 9, tmp_path)
    out, took = _rejected_while_waiting(example, a, b, 7, 9)
    assert out.splitlines() == ["I am node 7", "sent", "9 rejected not today"]
    assert took < 3, f"the script returned {took:.1f} s after the rejection (its wait is 30 s)"
    with Client.connect(config=str(a.config_path)) as node_a:
        assert node_a.wait(9, 30) == {
            "node_id": 9,
            "trusted": False,
            "rejected": True,
            "reason": "not today",
        }
        [request] = node_a.outgoing_requests()
        assert (request.node_id, request.path, request.state) == (9, "direct", "rejected")
    assert [e["data"] for e in a.events() if e["event"] == "handshake.rejected_by_peer"] == [
        {"peer_node_id": 9, "reason": "not today", "relayed": False}
    ]


def registry_passes_reasons(address: str) -> bool:
    """Whether the registry at ``address`` passes a rejection's reason on in its poll
    responses (SPEC 11: pilot-registryd does, the production registry does not), probed
    with two throwaway identities."""
    from pilothandshake.identity import Identity, b64encode
    from pilothandshake.messages import handshake_challenge
    from pilothandshake.registry.challenges import respond_challenge
    from pilothandshake.registry.client import RegistryConnection as RegistryClient

    asker, answerer = Identity.generate(), Identity.generate()
    asking = RegistryClient(address, asker.sign, timeout=5)
    answering = RegistryClient(address, answerer.sign, timeout=5)
    try:
        x = int(asking.register("127.0.0.1:1", asker.public_key_b64)["node_id"])
        y = int(answering.register("127.0.0.1:1", answerer.public_key_b64)["node_id"])
        asking.request_handshake(x, y, "probe", b64encode(asker.sign(handshake_challenge(x, y))))
        signature = b64encode(answerer.sign(respond_challenge(y, x)))
        answering.respond_handshake(y, x, False, signature, reason="probe")
        responses = asking.poll_handshakes(x)["responses"]
    finally:
        asking.close()
        answering.close()
    assert [r["from_node_id"] for r in responses] == [y]  # the probe itself worked
    return bool(responses[0].get("reason") == "probe")


def test_the_readme_script_learns_of_a_relayed_rejection_at_once(
    fleet: Fleet, tmp_path: Path
) -> None:
    registry = fleet.registry().start()
    a = fleet.node("a", registry).start()  # private: B cannot resolve it ...
    a_id = a.node_id
    b = fleet.node("b", registry)  # private: A's request goes through the relay
    b.config["peers"] = {a_id: f"127.0.0.1:{free_port()}"}  # ... and B's direct reject fails
    b.write_config()
    b.start()
    b_id = b.node_id
    example = _run_readme_example(a, b_id, tmp_path)
    out, took = _rejected_while_waiting(example, a, b, a_id, b_id)
    reason = "not today" if registry_passes_reasons(registry.address) else "-"
    assert out.splitlines() == [f"I am node {a_id}", "relayed", f"{b_id} rejected {reason}"]
    assert took < 3, f"the script returned {took:.1f} s after the rejection (its wait is 30 s)"
    [request] = a.control("requests")["requests"]
    assert (request["path"], request["state"]) == ("relay", "rejected")
    rejections = [e["data"] for e in a.events() if e["event"] == "handshake.rejected_by_peer"]
    assert rejections == [{"peer_node_id": b_id, "reason": reason.strip("-"), "relayed": True}]


def test_client_reads_addresses_and_unix_times(pair: tuple[Node, Node]) -> None:
    a, b = pair
    with Client.connect(socket=a.socket_path) as node_a, Client(b.socket_path) as node_b:
        assert node_a.send_request("0:0000.0000.0009") == "sent"  # no justification needed
        wait_until(lambda: node_b.pending_count() == 1, what="the request at B")
        [pending] = node_b.pending_requests()
        assert abs(pending.received_at.timestamp() - time.time()) < 60
        assert node_b.approve_handshake(7)
        assert node_a.wait_for_trust(9, 30)
        [record] = node_b.trusted_peers()
        assert record.reason == "approved"
        [request] = node_a.outgoing_requests()
        assert (request.node_id, request.state, request.reason) == (9, "accepted", "")
    # Go's payloads, as a webhook or `events` consumer reads them (SPEC 14).
    payloads = {e["event"]: e["data"] for e in b.events()}
    assert payloads["handshake.pending"] == {"peer_node_id": 7, "justification": ""}
    assert payloads["trust.changed"] == {
        "peer_node_id": 7,
        "state": "granted",
        "reason": "approved",
    }
    assert {e["event"]: e["data"] for e in a.events()}["trust.changed"]["reason"] == "mutual"
