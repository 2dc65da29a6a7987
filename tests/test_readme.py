"""The README's embedding example runs as written: its runtime, two nodes, a full handshake."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_namespace() -> dict[str, Any]:
    """Execute the README's custom-runtime block up to the point where it makes a Manager."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (block,) = [b for b in blocks if "class MyRuntime" in b]
    definitions, _, usage = block.partition("\nmanager = Manager(")
    assert "wait_for_trust(42, 30)" in usage
    namespace: dict[str, Any] = {}
    exec(compile(definitions, str(README), "exec"), namespace)
    return namespace


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_readme_runtime_completes_a_handshake_between_two_managers(tmp_path: Path) -> None:
    ns = _example_namespace()
    port_a, port_b = _free_port(), _free_port()
    ns["PEERS"].clear()
    ns["PEERS"].update({7: ("127.0.0.1", port_a), 42: ("127.0.0.1", port_b)})
    manager_a = ns["Manager"](
        ns["MyRuntime"](7, str(tmp_path / "a" / "identity.json"), ("127.0.0.1", port_a))
    )
    manager_b = ns["Manager"](
        ns["MyRuntime"](42, str(tmp_path / "b" / "identity.json"), ("127.0.0.1", port_b))
    )
    manager_a.start()
    manager_b.start()
    try:
        assert manager_a.send_request(42, "nightly sync") == "sent"
        deadline = time.monotonic() + 10
        while manager_b.pending_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p.node_id for p in manager_b.pending_requests()] == [7]
        approver = threading.Timer(0.1, manager_b.approve_handshake, args=(7,))
        approver.start()
        assert manager_a.wait_for_trust(42, 10)
        approver.join(5)
        assert manager_b.is_trusted(7)
        assert [r.node_id for r in manager_a.trusted_peers()] == [42]
        assert manager_a.trusted_peers()[0].mutual is True
    finally:
        manager_a.stop()
        manager_b.stop()
    assert '"node_id": 42' in (tmp_path / "a" / "trust.json").read_text()


# The walkthrough's fixed ports; the test swaps each for a free one.
WALKTHROUGH_PORTS = (19000, 14441, 14442)
WALKTHROUGH_CONFIGS = ("demo-registry.yaml", "demo-node-a.yaml", "demo-node-b.yaml")
WALKTHROUGH_TIMEOUT = 120.0


def _walkthrough_script(ports: dict[int, int]) -> tuple[str, list[str]]:
    """The README's walkthrough as one bash script: the start block as pasted, every
    ``$ pilot-handshakectl ...`` / ``$ cat`` / ``$ grep`` line of its transcripts (each
    followed by a marker line with its exit code), then the stop block."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Walkthrough by hand", 1)[1].split("\n## ", 1)[0]
    shell_blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    (start,) = [b for b in shell_blocks if "mktemp -d" in b]
    # The stop block kills by process ID: the job table may hold other jobs (issue 19).
    (stop,) = [b for b in shell_blocks if "kill $NODE_B $NODE_A $REGISTRY" in b]
    commands = re.findall(r"^\$ (.+)$", section, re.M)
    lines = [start]
    for index, command in enumerate(commands):
        lines.append(f"{command}\necho '@@ {index} rc='$?")
    lines.append(stop)
    lines.append("wait")  # for the daemons to exit after the stop block's SIGTERM
    script = "\n".join(lines)
    for fixed, free in ports.items():
        script = script.replace(str(fixed), str(free))
    return script, commands


def _fake_checkout(root: Path, ports: dict[int, int]) -> None:
    """What the walkthrough needs of a checkout: ``conf/`` (ports swapped for free ones, so
    the test never binds a fixed port) and ``.venv/bin`` holding the three programs."""
    (root / "conf").mkdir(parents=True)
    for name in WALKTHROUGH_CONFIGS:
        config = (README.parent / "conf" / name).read_text()
        for fixed, free in ports.items():
            config = config.replace(str(fixed), str(free))
        (root / "conf" / name).write_text(config)
    scripts = root / ".venv" / "bin"
    scripts.mkdir(parents=True)
    for program in ("pilot-registryd", "pilot-handshaked", "pilot-handshakectl"):
        source = (README.parent / "bin" / program).read_text()
        (scripts / program).write_text(f"#!{sys.executable}\n{source}")
        (scripts / program).chmod(0o755)


def test_readme_walkthrough_pasted_as_one_block_works(tmp_path: Path) -> None:
    ports = {fixed: _free_port() for fixed in WALKTHROUGH_PORTS}
    checkout = tmp_path / "checkout"
    _fake_checkout(checkout, ports)
    script, commands = _walkthrough_script(ports)
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(README.parent))
    env.pop("PILOT_HANDSHAKE_SOCKET", None)
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the daemons join this group: one signal stops them all
    )
    try:
        out, _ = process.communicate(timeout=WALKTHROUGH_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    results = dict(re.findall(r"^@@ (\d+) rc=(\d+)$", out, re.M))
    assert len(results) == len(commands), out
    # Output of command i: after marker i-1 (the start block's output precedes command 0's).
    outputs = re.split(r"^@@ \d+ rc=\d+$", out, flags=re.M)
    untrust_at = next(i for i, c in enumerate(commands) if " untrust " in c)
    for index, command in enumerate(commands):
        expected = "0"
        if command.startswith("grep -c"):
            expected = "1"  # grep's exit code when it counted no match in any file
        elif " approve " in command and index > untrust_at:
            expected = "1"  # nothing pending any more
        assert results[str(index)] == expected, f"{command}:\n{outputs[index]}"
    by_command = dict(zip(commands, outputs))
    assert "nightly sync" in by_command["pilot-handshakectl --config demo-node-b.yaml pending"]
    trust_a = by_command["pilot-handshakectl --config demo-node-a.yaml trust"]
    assert re.search(r"^2\b.*\byes\b", trust_a, re.M), trust_a
    counts = re.findall(r"^\S+\.log:(\d+)$", by_command["grep -c WARNING *.log"], re.M)
    assert counts == ["0", "0", "0"], out


def test_readme_walkthrough_text_matches_what_the_programs_do() -> None:
    """The walkthrough's claims a run cannot show: each process's log file, the status
    lines (the node's own key), the state directory's files, the stop by process ID."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Walkthrough by hand", 1)[1].split("\n## ", 1)[0]
    for log in ("registry.log", "node-a.log", "node-b.log"):
        assert f">{log} 2>&1 &" in section and f"`{log}`" in section, log
    assert "%1" not in section
    assert re.search(r"^key +[0-9a-f]{16}  \S+=$", section, re.M)
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 INFO ", section, re.M)
    running = text.split("## Running a node", 1)[1].split("\n## ", 1)[0]
    assert "two lock files" not in running
    assert "`node.json`" in running and "one lock file, `trust.json.lock`" in running
