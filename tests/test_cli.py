"""``pilot-handshakectl`` as a program (SPEC 13): arguments and usage errors, exit codes,
which socket it finds, help and completion, ``status --wait``, pilotctl's error envelope.
What each command prints is in ``test_cli_commands``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from controltools import CTL, Node, ctl, run
from integration.conftest import Fleet, process_env

from pilothandshake import cli
from pilothandshake.cli import main_handshakectl
from pilothandshake.config import Config
from pilothandshake.error_codes import CODES


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


def test_every_code_the_cli_can_print_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code in CODES:
        assert f"`{code}`" in readme, code
