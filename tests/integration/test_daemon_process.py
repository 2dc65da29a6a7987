"""The daemon as a process and as an embedded object: start errors, SIGHUP, embedding."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import yaml

from pilothandshake.daemon import Daemon

from .conftest import BIN, Fleet, Node, process_env, wait_until


def run_daemon(node: Node, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run pilot-handshaked to completion (for start failures, which exit at once)."""
    return subprocess.run(
        [sys.executable, str(BIN / "pilot-handshaked"), "--config", str(node.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=20,
        env=process_env(),
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("pilot-handshaked:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_port_in_use_is_one_clear_line_and_exit_1(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", node.port))
        blocker.listen()
        line = one_error_line(run_daemon(node))
    assert f"cannot listen on {node.address}: address already in use" in line


def test_corrupt_trust_file_names_the_file_and_the_flag_that_moves_it_aside(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    trust = node.directory / "trust.json"
    trust.write_text('{"trusted": [')
    line = one_error_line(run_daemon(node))
    assert str(trust) in line and "--move-corrupt-aside" in line
    assert trust.read_text() == '{"trusted": ['  # never silently replaced

    node.argv.append("--move-corrupt-aside")
    node.start()
    assert node.trusted() == set()
    moved = [p.name for p in node.directory.iterdir() if p.name.startswith("trust.json.corrupt-")]
    assert len(moved) == 1
    assert (node.directory / moved[0]).read_text() == '{"trusted": ['


def test_second_daemon_on_the_same_identity_directory_is_refused(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7).start()
    other_port = socket.socket()
    other_port.bind(("127.0.0.1", 0))
    node.config["listen"] = f"127.0.0.1:{other_port.getsockname()[1]}"
    other_port.close()
    second = node.directory / "second.yaml"
    second.write_text(yaml.safe_dump(node.config))
    result = subprocess.run(
        [sys.executable, str(BIN / "pilot-handshaked"), "--config", str(second)],
        capture_output=True,
        text=True,
        timeout=20,
        env=process_env(),
    )
    line = one_error_line(result)
    assert "in use" in line and str(node.directory) in line
    assert node.status()["node_id"] == 7  # the first one is unharmed


def test_identity_readable_by_others_is_refused_with_chmod_advice(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    identity = node.directory / "identity.json"
    os.chmod(identity, 0o644)
    line = one_error_line(run_daemon(node))
    assert f"chmod 600 {identity}" in line


def test_config_error_is_one_line_naming_file_and_key(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7, max_connections="many")
    line = one_error_line(run_daemon(node))
    assert str(node.config_path) in line and "max_connections" in line


def test_sighup_reloads_the_policy_and_a_bad_file_keeps_the_old_one(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    b.config["trust"] = {"auto_approve": "yes please"}
    b.write_config()
    b.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the old config" in b.stderr, what="reload failure logged")
    b.config["trust"] = {"auto_approve": True}
    b.write_config()
    b.signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in b.stderr, what="reload logged")
    a.control("handshake", node_id=9, justification="after reload")
    wait_until(lambda: b.trusted() == {7}, what="auto-approved after reload")
    assert b.popen is not None and b.popen.poll() is None


HUGE_INTEGER = "max_replay_per_source: " + "9" * 5000 + "\n"  # past int()'s digit limit


def test_5000_digit_integer_is_one_line_at_start_and_kept_out_at_sighup(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    good = node.config_path.read_text()
    node.config_path.write_text(good + HUGE_INTEGER)
    line = one_error_line(run_daemon(node))
    assert str(node.config_path) in line

    node.config_path.write_text(good)
    node.start()
    node.config_path.write_text(good + HUGE_INTEGER)
    node.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the old config" in node.stderr, what="reload failure logged")
    assert "Traceback" not in node.stderr
    assert node.popen is not None and node.popen.poll() is None
    assert node.status()["node_id"] == 7


def test_sigterm_stops_the_daemon_with_exit_0_and_removes_the_socket(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7).start()
    assert os.path.exists(node.socket_path)
    assert node.stop() == 0
    assert not os.path.exists(node.socket_path)


def test_embedded_daemon_handshakes_with_a_daemon_process(fleet: Fleet) -> None:
    remote = fleet.node("remote", node_id=9)
    directory = fleet.root / "embedded"
    directory.mkdir()
    config_path = directory / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "identity": str(directory / "identity.json"),
                "node_id": 7,
                "listen": "127.0.0.1:0",
                "peers": {9: remote.address},
            }
        )
    )
    with Daemon.from_file(str(config_path)) as node:
        host, port = node.listen_address
        assert (host, node.node_id) == ("127.0.0.1", 7) and port > 0
        remote.config["peers"] = {7: f"127.0.0.1:{port}"}
        remote.write_config()
        remote.start()
        assert node.manager.send_request(9, "nightly sync") == "sent"
        wait_until(lambda: remote.pending() == {7}, what="request pending at the process")
        remote.control("approve", node_id=7)
        assert node.manager.wait_for_trust(9, timeout=10)
        assert remote.trusted() == {7}
    # stop() released the directory: the same identity can run again at once.
    again = Daemon.from_file(str(config_path))
    try:
        assert again.manager.is_trusted(9)
    finally:
        again.stop()


def test_with_log_format_json_every_line_is_json_and_stopped_in_counts_from_the_signal(
    fleet: Fleet,
) -> None:
    import json
    import time

    node = fleet.node("a", node_id=7, log_format="json", log_level="info").start()
    assert node.popen is not None
    started = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.popen.wait(20) == 0
    waited = time.monotonic() - started
    lines = node.stdout.splitlines() + node.stderr.splitlines()
    entries = [json.loads(line) for line in lines]  # every line, the start line included
    messages = [e["message"] for e in entries]
    assert any(m.startswith("pilot-handshaked: node 7 listening on") for m in messages), lines
    [stopped] = [m for m in messages if m.startswith("stopped in ")]
    seconds = float(stopped.split()[2])
    # From the signal to the end of the stop: more than nothing, not more than the test saw.
    assert 0 < seconds <= waited, (stopped, waited)


def test_a_start_failure_with_log_format_json_is_one_json_line(fleet: Fleet) -> None:
    import json

    node = fleet.node("a", node_id=7, log_format="json")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", node.port))
        blocker.listen()
        result = run_daemon(node)
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["level"] for e in entries][-1] == "error", entries
    assert "address already in use" in entries[-1]["message"]


def test_text_log_lines_carry_an_iso_8601_time_with_its_offset(fleet: Fleet) -> None:
    import re

    node = fleet.node("a", node_id=7, log_level="info").start()
    node.stop()
    lines = [ln for ln in node.stderr.splitlines() if " INFO " in ln]
    assert lines, node.stderr
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
    for line in lines:
        assert re.match(rf"{stamp} INFO pilothandshake\.", line), line


def test_check_config_lists_every_problem_without_binding_or_locking(fleet: Fleet) -> None:
    node = fleet.node("a", node_id=7)
    node.config.update(hostname="Not_A_Name", colour="blue", trust={"deny": ["bad-node"]})
    node.write_config()
    with socket.socket() as blocker:  # the port is taken: a check must not try to bind it
        blocker.bind(("127.0.0.1", node.port))
        blocker.listen()
        bad = subprocess.run(
            [
                sys.executable,
                str(BIN / "pilot-handshaked"),
                "--check-config",
                str(node.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=20,
            env=process_env(),
        )
    assert bad.returncode == 1
    problems = [ln for ln in bad.stderr.splitlines() if ln.startswith(f"{node.config_path}: ")]
    keys = [ln.split(": ")[1] for ln in problems]
    assert keys == ["colour", "hostname", "trust.deny[0]", "3 problem(s)"], bad.stderr
    assert "not a hostname" in problems[2]
    assert not (node.directory / "trust.json.lock").exists()  # no lock taken, nothing made

    node.config = {k: v for k, v in node.config.items() if k not in ("colour", "trust")}
    node.config["hostname"] = "node-a"
    node.write_config()
    good = subprocess.run(
        [sys.executable, str(BIN / "pilot-handshaked"), "--check-config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=20,
        env=process_env(),
    )
    assert (good.returncode, good.stdout.strip()) == (0, f"{node.config_path}: OK"), good.stderr


def test_ctl_reload_is_the_sighup_path_with_its_result(fleet: Fleet) -> None:
    a, b = fleet.direct_pair()
    b.config["trust"] = {"deny": [7]}
    b.config["max_connections"] = 99  # needs a restart: said, not applied
    b.write_config()
    done = b.ctl("reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"reloaded {b.config_path}: allowlist, deny list, peers, auto-approve",
        "changed but needs a restart: max_connections",
    ]
    as_json = b.ctl("--json", "reload")
    data = json.loads(as_json.stdout)["data"]
    assert data["restart_needed"] == ["max_connections"] and data["reloaded"] == ["trust", "peers"]
    # The deny list is in force: A's request is dropped (at INFO: asked for).
    a.control("handshake", node_id=9, justification="denied?")
    wait_until(lambda: "deny list" in b.stderr, what="B's drop")
    assert b.pending() == set()
    lines = [ln for ln in b.stderr.splitlines() if "dropped message" in ln]
    assert lines and all(" INFO " in ln and "deny list" in ln for ln in lines), lines

    b.config_path.write_text("trust: {deny: [nope]}\n")
    bad = b.ctl("reload")
    assert bad.returncode == 1 and "trust.deny[0]" in bad.stderr, bad.stderr
    assert "keeping the old config" in b.stderr
