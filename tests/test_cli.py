"""pilot-handshakectl against a real control socket (SPEC section 13)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fakeruntime import Peer
from integration.conftest import Fleet, process_env
from test_control import FakeRegistry, Node, running_node

from pilothandshake import cli
from pilothandshake.cli import main_handshakectl
from pilothandshake.config import Config
from pilothandshake.error_codes import CODES
from pilothandshake.identity import fingerprint
from pilothandshake.messages import HANDSHAKE_ACCEPT, HANDSHAKE_REJECT
from pilothandshake.store import TrustRecord

CTL = str(Path(__file__).resolve().parent.parent / "bin" / "pilot-handshakectl")


@pytest.fixture
def node() -> Iterator[Node]:
    with running_node() as started:
        yield started


def run(node: Node, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main_handshakectl(["--socket", node.path, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_prints_aligned_fields_and_json_as_sent(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(node, capsys, "status")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "node      1",
        "listen    127.0.0.1:444",
        "registry  none",
        "trusted   0",
        "pending   0",
    ]
    code, out, _ = run(node, capsys, "--json", "status")
    assert code == 0
    assert json.loads(out) == {
        "status": "ok",
        "data": {
            "node_id": 1,
            "hostname": "",
            "listen": "127.0.0.1:444",
            "registry": None,
            "trusted": 0,
            "pending": 0,
        },
    }


def test_handshake_reports_delivery(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(node, capsys, "handshake", "5", "nightly sync") == (
        0,
        "request sent to 5\n",
        "",
    )
    node.receive_request(Peer(6))
    node.manager.approve_handshake(6)
    code, out, _ = run(node, capsys, "handshake", "6", "again", "--json")
    assert (code, json.loads(out)["data"]) == (0, {"node_id": 6, "status": "trusted"})


def test_handshake_failure_exits_1_with_the_reason(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.runtime.dial_fails = True
    code, out, err = run(node, capsys, "handshake", "5", "sync")
    assert (code, out) == (1, "")
    assert err.startswith("pilot-handshakectl: cannot reach node 5")
    assert len(err.splitlines()) == 1


def test_pending_table_shows_fingerprint_justification_and_age(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(node, capsys, "pending") == (0, "no pending requests\n", "")
    peer = Peer(9)
    node.receive_request(peer, "sync\x1b[31m please")
    code, out, _ = run(node, capsys, "pending")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NODE", "KEY", "JUSTIFICATION", "AGE"]
    assert row.split()[0:2] == ["9", fingerprint(peer.key)]
    assert "sync?[31m please" in row  # the escape character never reaches the terminal
    assert row.split()[-1] in ("0s", "1s", "2s")
    assert header.index("KEY") == row.index(fingerprint(peer.key))
    code, out, _ = run(node, capsys, "--json", "pending")
    [item] = json.loads(out)["data"]["pending"]
    assert (item["node_id"], item["public_key"]) == (9, peer.key)


def test_approve_then_trust_table_then_untrust(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.receive_request(Peer(9))
    assert run(node, capsys, "approve", "9") == (0, "approved 9\n", "")
    code, out, _ = run(node, capsys, "trust")
    header, row = out.splitlines()
    assert header.split() == ["NODE", "MUTUAL", "NETWORK", "APPROVED", "AT", "WHY", "STATE"]
    assert row.split()[:3] == ["9", "no", "-"]
    assert row.split()[-2:] == ["approved", "trusted"]  # why: the operator approved it
    code, out, _ = run(node, capsys, "--json", "trust")
    assert [r["node_id"] for r in json.loads(out)["data"]["trusted"]] == [9]
    assert run(node, capsys, "untrust", "9") == (0, "untrusted 9\n", "")
    assert run(node, capsys, "trust") == (0, "no trusted peers\n", "")
    code, _, err = run(node, capsys, "untrust", "9")
    assert code == 1 and "node 9 is not trusted" in err


def test_approve_or_reject_with_nothing_pending_exits_1(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(node, capsys, "approve", "42") == (
        1,
        "",
        "pilot-handshakectl: nothing pending for node 42\n",
    )
    code, out, err = run(node, capsys, "--json", "reject", "42", "no")
    assert (code, out) == (1, "")  # as pilotctl: the envelope on stderr, stdout empty
    assert json.loads(err) == {
        "status": "error",
        "code": "not_found",
        "message": "nothing pending for node 42",
    }


def test_reject_passes_the_reason(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.receive_request(Peer(9))
    assert run(node, capsys, "reject", "9", "who are you") == (0, "rejected 9\n", "")
    assert node.runtime.wait_for_sent(1)
    assert node.runtime.sent_messages()[0][1].reason == "who are you"


def test_wait_exits_1_on_timeout_and_0_when_trust_arrives(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(node, capsys, "wait", "9", "--timeout", "0.2")
    assert (code, out) == (1, "")
    assert "timed out" in err
    node.receive_request(Peer(9))
    timer = threading.Timer(0.2, node.manager.approve_handshake, args=(9,))
    timer.start()
    try:
        code, out, err = run(node, capsys, "--json", "wait", "9", "--timeout", "10")
    finally:
        timer.join()
    assert (code, err) == (0, "")
    assert json.loads(out) == {"status": "ok", "data": {"node_id": 9, "trusted": True}}


def test_events_prints_recent_events(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.bus.publish("handshake.received", {"peer_node_id": 9, "justification": "hi"})
    node.bus.publish("handshake.pending", {"peer_node_id": 9})
    for _ in range(100):  # bounded: the dispatcher needs a moment
        if len(node.bus.recent()) >= 2:
            break
        threading.Event().wait(0.02)
    code, out, _ = run(node, capsys, "events")
    assert code == 0
    lines = out.splitlines()
    assert lines[-2].split()[1:] == ["handshake.received", "justification=hi", "peer_node_id=9"]
    assert lines[-1].split()[1] == "handshake.pending"
    code, out, _ = run(node, capsys, "--json", "events")
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["data"]["event"] == "handshake.pending"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["approve"],
        ["approve", "bad\x1bname"],
        ["approve", ""],
        ["approve", "4294967296"],
        ["wait", "3", "--timeout", "-1"],
        ["handshake"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main_handshakectl(["--socket", "/nonexistent.sock", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage:" in err
    # With --json, the envelope instead (pilotctl's code for a usage error).
    assert main_handshakectl(["--json", "--socket", "/nonexistent.sock", *argv]) == 2
    out, err = capsys.readouterr()
    envelope = json.loads(err)
    assert (out, envelope["status"], envelope["code"]) == ("", "error", "invalid_argument")
    assert set(envelope) == {"status", "code", "message"}


def test_daemon_not_running_is_one_line_naming_the_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "control.sock")
    assert main_handshakectl(["--socket", path, "status"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"pilot-handshakectl: pilot-handshaked is not running (no socket at {path})\n"


def test_socket_found_from_config_file(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    config = os.path.join(os.path.dirname(node.path), "config.yaml")
    with open(config, "w") as handle:
        handle.write("identity: identity.json\nnode_id: 7\n")
    assert main_handshakectl(["--config", config, "approve", "8"]) == 1
    assert "nothing pending for node 8" in capsys.readouterr().err


def test_bad_config_file_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("identity: [1, 2]\n")
    assert main_handshakectl(["--config", str(config), "status"]) == 1
    err = capsys.readouterr().err
    assert str(config) in err and "identity" in err
    assert len(err.splitlines()) == 1
    assert main_handshakectl(["--json", "--config", str(config), "status"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and json.loads(err)["code"] == "invalid_argument"
    assert str(config) in json.loads(err)["message"]


def test_an_error_elsewhere_in_the_config_does_not_keep_status_from_the_daemon(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator is mid-edit (a SIGHUP the daemon refused): the CLI needs only the
    socket's location, from ``identity``."""
    config = os.path.join(os.path.dirname(node.path), "config.yaml")
    with open(config, "w") as handle:
        handle.write("identity: identity.json\nlisten: nowhere\ntrust: {strict: maybe}\n")
    assert main_handshakectl(["--config", config, "status"]) == 0
    assert capsys.readouterr().out.startswith("node      1")


def test_socket_found_from_environment_then_default_identity_dir(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_HANDSHAKE_SOCKET", node.path)
    assert main_handshakectl(["status"]) == 0
    assert capsys.readouterr().out.startswith("node      1")
    monkeypatch.delenv("PILOT_HANDSHAKE_SOCKET")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main_handshakectl(["status"]) == 1
    expected = str(tmp_path / ".pilot-handshake" / "control.sock")
    assert expected in capsys.readouterr().err


def test_age_uses_the_largest_whole_unit() -> None:
    now = 1_800_000_000.0
    ages = [5, 3 * 60 + 59, 2 * 3600 + 1, 3 * 86400]
    assert [cli._ago(int(now) - s, now) for s in ages] == ["5s", "3m", "2h", "3d"]
    assert cli._ago("garbage", now) == "?"


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CTL, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_script_exit_codes_0_1_2_without_tracebacks(node: Node, tmp_path: Path) -> None:
    ok = ctl("--socket", node.path, "--json", "status")
    assert (ok.returncode, json.loads(ok.stdout)["status"]) == (0, "ok")
    failed = ctl("--socket", node.path, "approve", "77")
    assert (failed.returncode, failed.stderr) == (
        1,
        "pilot-handshakectl: nothing pending for node 77\n",
    )
    usage = ctl("--socket", node.path, "approve", "99999999999")
    assert usage.returncode == 2 and "usage:" in usage.stderr
    waited = ctl("--socket", node.path, "wait", "77", "--timeout", "0.1")
    assert waited.returncode == 1 and "timed out" in waited.stderr
    missing = str(tmp_path / "none.sock")
    down = ctl("--socket", missing, "pending")
    assert down.returncode == 1
    assert (
        down.stderr
        == f"pilot-handshakectl: pilot-handshaked is not running (no socket at {missing})\n"
    )
    assert "Traceback" not in failed.stderr + usage.stderr + waited.stderr + down.stderr


def test_json_is_accepted_after_the_command(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(node, capsys, "pending", "--json")
    assert (code, json.loads(out)) == (0, {"status": "ok", "data": {"pending": []}})


def test_help_shows_the_socket_search_defaults_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main_handshakectl(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0 ok, 1 failed" in text
    assert "$PILOT_HANDSHAKE_SOCKET" in text and "/etc/pilot-handshake/config.yaml" in text
    with pytest.raises(SystemExit):
        main_handshakectl(["wait", "--help"])
    assert "(default 30)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["--socket", "S", "--json", "status", "--wait"],
        ["--socket", "status", "pending"],  # the first command word is the socket's path
        ["--config", "pending", "reject", "5", "no"],
        ["handshake", "status", "why"],
        ["--help", "status"],  # the top-level help lists every command
        ["status", "--help"],
        ["status", "extra"],
        ["status", "--timeout", "-1"],
        ["--socket", "S", "frobnicate", "status"],
    ],
)
def test_parsing_with_only_the_named_command_answers_as_the_full_parser(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")

    def outcome(parse: Callable[[list[str]], object]) -> tuple[object, str, str]:
        try:
            result: object = vars(parse(argv))
        except SystemExit as exc:
            result = exc.code
        except cli._UsageError as exc:
            result = (str(exc), exc.usage)
        out, err = capsys.readouterr()
        return result, out, err

    assert outcome(cli._parse) == outcome(lambda args: cli._parser().parse_args(args))


def test_a_command_builds_its_own_parser_only(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str | None] = []
    full_parser = cli._parser

    def parser(only: str | None = None) -> argparse.ArgumentParser:
        built.append(only)
        return full_parser(only)

    monkeypatch.setattr(cli, "_parser", parser)
    assert cli._parse(["--socket", "S", "status"]).command == "status"
    assert built == ["status"]
    assert cli._parse(["--socket", "status", "pending"]).command == "pending"
    assert built == ["status", "status", None]


def test_help_is_wrapped_to_the_terminal_with_the_epilog_as_written(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    epilog = [line for line in cli._EPILOG.splitlines() if line]
    with pytest.raises(SystemExit):
        main_handshakectl(["--help"])
    shown = capsys.readouterr().out.splitlines()
    assert all(line in shown for line in epilog)
    with pytest.raises(SystemExit):
        main_handshakectl(["wait", "--help"])
    wait_help = capsys.readouterr().out.splitlines()
    # The rest is wrapped to the terminal's width (argparse's usage may overrun it by one).
    assert "  --socket PATH  the daemon's control" in shown
    assert max(len(line) for line in wait_help) <= 41


@pytest.mark.parametrize("argv", [["handshake", "1", "me"], ["wait", "1"], ["untrust", "1"]])
def test_own_node_id_exits_1_naming_the_mistake(
    node: Node, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert run(node, capsys, *argv) == (
        1,
        "",
        "pilot-handshakectl: node 1 is this node itself; name the peer's node ID\n",
    )


def test_untrust_of_a_node_only_asked_says_request_withdrawn(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node.manager, "revoke_trust", lambda peer: "withdrawn")
    code, out, err = run(node, capsys, "untrust", "9")
    assert (code, err) == (0, "")
    assert out.startswith("request withdrawn from 9")


def test_trust_shows_hostnames_and_conflicting_records(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_node(FakeRegistry({1: "agent-a", 9: "agent-b"})) as started:
        for peer in (8, 9):
            started.receive_request(Peer(peer))
            started.manager.approve_handshake(peer)
        monkeypatch.setattr(started.manager, "conflicting_peers", lambda: [9])
        code, out, _ = run(started, capsys, "trust")
        lines = out.splitlines()
        assert lines[1].split()[0] == "8" and lines[1].split()[-1] == "trusted"
        assert lines[2].split()[:2] == ["9", "(agent-b)"] and lines[2].split()[-1] == "CONFLICT"
        assert lines[3].startswith("CONFLICT: the registry now binds")
        code, out, _ = run(started, capsys, "status")
        assert out.splitlines()[0] == "node      1 (agent-a)"
        started.receive_request(Peer(12))
        code, out, _ = run(started, capsys, "approve", "agent-b")
        assert (code, out) == (1, "")  # resolved to 9, which has nothing pending


def test_swapped_socket_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exposed = tmp_path / "exposed"
    exposed.mkdir()
    os.chmod(exposed, 0o777)
    path = str(exposed / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as forged:
        forged.bind(path)
        forged.listen(1)
        assert main_handshakectl(["--socket", path, "pending"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"pilot-handshakectl: refusing the control socket {path}: ")
    assert len(err.splitlines()) == 1


def test_status_wait_waits_for_the_daemon_to_answer(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        fleet = Fleet(Path(root))
        try:
            daemon = fleet.node("a", node_id=7)
            waiting = subprocess.Popen(
                [sys.executable, CTL, "--socket", daemon.socket_path, "status", "--wait"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=process_env(),
            )
            daemon.start()
            out, err = waiting.communicate(timeout=40)
            assert (waiting.returncode, err) == (0, "")
            assert out.splitlines()[0] == "node      7"
        finally:
            fleet.close()
    gave_up = ctl("--socket", str(tmp_path / "none.sock"), "status", "--wait", "--timeout", "0.3")
    assert gave_up.returncode == 1
    assert gave_up.stderr.startswith("pilot-handshakectl: gave up after 0.3 s: ")


def test_a_moved_hostname_fails_the_command_and_forget_name_drops_the_pin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 15 item 1 (SPEC 17): `handshake build-agent` after the name moved to another
    node does nothing and says how to accept the move."""
    registry = FakeRegistry({9: "build-agent"})
    with running_node(registry) as started:
        code, out, err = run(started, capsys, "handshake", "build-agent", "hello")
        assert (code, out, err) == (0, "request sent to 9\n", "")
        registry.names = {12: "build-agent"}
        registry.keys[12] = Peer(12).key
        sent = len(started.runtime.sent)
        code, out, err = run(started, capsys, "handshake", "build-agent", "hello")
        assert (code, out) == (1, "")
        assert err.strip() == (
            "pilot-handshakectl: hostname build-agent moved from node 9 to node 12; if that "
            "is expected: pilot-handshakectl forget-name build-agent"
        )
        assert len(started.runtime.sent) == sent  # the command did nothing
        assert run(started, capsys, "forget-name", "build-agent")[:2] == (
            0,
            "forgot hostname build-agent\n",
        )
        code, out, err = run(started, capsys, "forget-name", "build-agent")
        assert (code, err.strip()) == (1, "pilot-handshakectl: hostname build-agent is not pinned")


def test_a_key_changed_request_is_marked_and_approve_passes_the_named_key(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 5 (SPEC 17): node 9 is trusted with one key and asks again with another
    (the decision itself is tested in test_manager_conflict)."""
    peer = Peer(9)
    node.receive_request(peer)
    trusted_with = Peer(9).key
    record = TrustRecord(9, trusted_with, datetime.now(timezone.utc))
    monkeypatch.setattr(node.manager, "trusted_peers", lambda: [record])
    code, out, _ = run(node, capsys, "pending")
    assert code == 0 and f"{fingerprint(peer.key)} KEY CHANGED" in out
    code, out, _ = run(node, capsys, "--json", "pending")
    (entry,) = json.loads(out)["data"]["pending"]
    full = hashlib.sha256(base64.b64decode(peer.key)).hexdigest()
    assert (entry["key_changed"], entry["fingerprint"]) == (True, full)
    asked: list[tuple[int, str | None]] = []

    def approve(peer_node_id: int, new_key: str | None = None) -> bool:
        asked.append((peer_node_id, new_key))
        return True

    monkeypatch.setattr(node.manager, "approve_handshake", approve)
    assert run(node, capsys, "approve", "9", "--new-key", full[:16])[:2] == (0, "approved 9\n")
    assert run(node, capsys, "approve", "9")[0] == 0
    assert asked == [(9, full[:16]), (9, None)]


def test_status_wait_stops_at_once_when_the_daemon_exited_at_start(tmp_path: Path) -> None:
    """The walkthrough's stumble: the daemon died on "address already in use" while
    `status --wait` waited for it (issue 19). The state lock, taken and free again, says so
    long before the timeout; the message says where to look."""
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        fleet = Fleet(Path(root))
        try:
            for restart in (False, True):  # a fresh state directory, then an existing one
                daemon = fleet.node("a", node_id=7)
                waiting = subprocess.Popen(
                    [
                        *(sys.executable, CTL, "--socket", daemon.socket_path),
                        *("status", "--wait", "--timeout", "600"),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=process_env(),
                )
                with socket.socket() as blocker:
                    blocker.bind(("127.0.0.1", daemon.port))
                    blocker.listen()
                    daemon.spawn()
                    assert daemon.popen is not None and daemon.popen.wait(60) == 1
                out, err = waiting.communicate(timeout=120)
                assert (waiting.returncode, out) == (1, ""), (restart, err)
                assert "it exited; its log says why" in err, err
                # Started after the daemon died (it had taken the lock moments before).
                late = ctl("--socket", daemon.socket_path, "status", "--wait", "--timeout", "600")
                assert late.returncode == 1 and "it exited" in late.stderr, late.stderr
        finally:
            fleet.close()


def test_status_wait_for_a_daemon_started_again_after_a_failed_start_waits_for_it(
    tmp_path: Path,
) -> None:
    """The walkthrough's retry: the first start died on a taken port, the port is freed,
    the daemon is started again and `status --wait` at once: the lock the dead daemon took
    moments ago must not be read as "exited" while the new one starts."""
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        fleet = Fleet(Path(root))
        try:
            daemon = fleet.node("a", node_id=7)
            with socket.socket() as blocker:
                blocker.bind(("127.0.0.1", daemon.port))
                blocker.listen()
                daemon.spawn()
                assert daemon.popen is not None and daemon.popen.wait(60) == 1
            daemon.spawn()
            waited = ctl("--socket", daemon.socket_path, "status", "--wait", "--timeout", "60")
            assert waited.returncode == 0, waited.stderr
            assert waited.stdout.splitlines()[0] == "node      7"
        finally:
            fleet.close()


def test_the_cli_names_the_lock_the_store_takes() -> None:
    from pilothandshake.statelock import lock_path
    from pilothandshake.store import LOCK_SUFFIX

    config = Config(identity="/srv/x/identity.json", node_id=7)
    assert lock_path(config.control_socket) == config.trust_path + LOCK_SUFFIX


def test_events_no_history_asks_the_daemon_for_new_events_only() -> None:
    follow = cli._parse(["--socket", "S", "events", "--follow", "--no-history"])
    assert cli._request_args(None, follow) == {"follow": True, "history": False}  # type: ignore[arg-type]
    recent = cli._parse(["--socket", "S", "events", "--follow"])
    assert cli._request_args(None, recent) == {"follow": True}  # type: ignore[arg-type]


def test_completion_scripts_come_from_the_parser_and_bash_completes_commands() -> None:
    bash_script = ctl("completion", "bash")
    assert bash_script.returncode == 0
    for command in cli._COMMANDS:
        assert command in bash_script.stdout
    probe = (
        bash_script.stdout
        + "COMP_WORDS=(pilot-handshakectl events --); COMP_CWORD=2; _pilot_handshakectl; "
        'echo "${COMPREPLY[*]}"\n'
        + "COMP_WORDS=(pilot-handshakectl rel); COMP_CWORD=1; _pilot_handshakectl; "
        'echo "${COMPREPLY[*]}"\n'
    )
    run = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert run.stdout.splitlines() == ["--follow --help --json --no-history", "reload"], run
    zsh_script = ctl("completion", "zsh")
    assert zsh_script.returncode == 0 and zsh_script.stdout.startswith(
        "#compdef pilot-handshakectl"
    )
    assert "'--no-history[" in zsh_script.stdout and "'--timeout[" in zsh_script.stdout
    zsh = shutil.which("zsh")
    if zsh is not None:  # the script at least parses
        check = subprocess.run([zsh, "-n"], input=zsh_script.stdout, text=True, timeout=30)
        assert check.returncode == 0


# Issue 16: what became of our requests, and pilotctl's shapes


def _rejected_by(node: Node, peer: Peer, reason: str) -> None:
    node.manager.process_message(
        peer.data(HANDSHAKE_REJECT, node.runtime.node_id(), reason=reason), ("127.0.0.1", 40000)
    )


def test_wait_says_who_rejected_our_request_and_why(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = Peer(2)
    assert run(node, capsys, "handshake", "2")[0] == 0  # the justification is optional
    _rejected_by(node, peer, "not today")
    code, out, err = run(node, capsys, "wait", "2", "--timeout", "30")
    assert (code, out, err) == (
        1,
        "",
        "pilot-handshakectl: node 2 rejected our request: not today\n",
    )
    # --json: a result, not an error: the data on stdout, exit 1, stderr empty.
    code, out, err = run(node, capsys, "--json", "wait", "2", "--timeout", "30")
    assert (code, err) == (1, "")
    assert json.loads(out) == {
        "status": "ok",
        "data": {"node_id": 2, "trusted": False, "rejected": True, "reason": "not today"},
    }


def test_requests_lists_every_state_with_unix_times(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.runtime.dial_fails = True  # no registry either: the request cannot be sent ...
    assert run(node, capsys, "handshake", "5")[0] == 1
    node.runtime.dial_fails = False
    for peer in (2, 3, 4):
        assert run(node, capsys, "handshake", str(peer), "sync")[0] == 0
    _rejected_by(node, Peer(2), "not today")
    node.manager.process_message(
        Peer(3).data(HANDSHAKE_ACCEPT, node.runtime.node_id()), ("127.0.0.1", 40000)
    )
    assert (
        run(node, capsys, "untrust", "4")[1]
        == "request withdrawn from 4 (it was not trusted yet)\n"
    )
    _, out, _ = run(node, capsys, "requests")
    header, *rows = out.splitlines()
    assert header.split() == ["NODE", "PATH", "STATE", "SENT", "REASON"]
    assert [row.split()[:3] for row in rows] == [
        ["2", "direct", "rejected"],
        ["3", "direct", "accepted"],
        ["4", "direct", "withdrawn"],
    ]  # ... and is forgotten
    assert rows[0].endswith("not today")
    _, out, _ = run(node, capsys, "--json", "requests")
    requests = json.loads(out)["data"]["requests"]
    assert [set(r) >= {"node_id", "sent_at", "path", "state", "reason"} for r in requests] == [
        True
    ] * 3
    assert all(type(r["sent_at"]) is int for r in requests)
    assert (requests[0]["state"], requests[0]["reason"]) == ("rejected", "not today")


def test_a_pilot_address_names_its_node(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.receive_request(Peer(11))
    assert run(node, capsys, "approve", "0:0000.0000.000B") == (0, "approved 11\n", "")
    assert run(node, capsys, "untrust", "3:0003.0000.000b") == (0, "untrusted 11\n", "")


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--socket", "/nonexistent/control.sock", "status"], "not_running"),
        (["untrust", "42"], "not_found"),
        (["approve", "42"], "not_found"),
        (["wait", "1"], "invalid_argument"),  # our own node
        (["approve", "no-such-host"], "invalid_state"),  # no registry to resolve it
    ],
)
def test_every_error_is_pilotctl_s_envelope_on_stderr_with_stdout_empty(
    node: Node, capsys: pytest.CaptureFixture[str], argv: list[str], code: str
) -> None:
    assert main_handshakectl(["--json", "--socket", node.path, *argv]) == 1
    out, err = capsys.readouterr()
    envelope = json.loads(err)
    assert out == ""
    assert set(envelope) == {"status", "code", "message"}
    assert (envelope["status"], envelope["code"]) == ("error", code)
    assert envelope["code"] in CODES


def test_an_unknown_hostname_is_not_found() -> None:
    with running_node(FakeRegistry({})) as started:
        result = ctl("--json", "--socket", started.path, "approve", "nobody-here")
    assert (result.returncode, result.stdout) == (1, "")
    assert json.loads(result.stderr)["code"] == "not_found"


def test_every_code_the_cli_can_print_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code in CODES:
        assert f"`{code}`" in readme, code
