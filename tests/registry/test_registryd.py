"""``pilot-registryd`` as a program (``registry.server.main``): configuration, signals, exit
codes, the store across restarts, threads at stop."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from fakeruntime import wait_until
from registrytools import REGISTRYD, Node

from pilothandshake.errors import ConfigError, RegistryError
from pilothandshake.identity import Identity
from pilothandshake.registry.client import RegistryConnection, encode_frame, read_frame
from pilothandshake.registry.config import load_config, parse_networks
from pilothandshake.registry.server import RegistryServer


def test_load_config_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    key = Identity.generate().public_key_b64
    path.write_text(f"networks:\n  3: [7, '{key}']\n")
    assert load_config(str(path)).networks == parse_networks({3: [7, key]}, "same")
    for text, where in (
        ("networks:\n  3: [7, 'not-a-key']\n", "networks.3[1]"),
        ("networks:\n  0: [7]\n", "networks.0"),
        ("networks:\n  3: 7\n", "networks.3"),
        ("peers: {}\n", "peers"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert str(path) in str(info.value)
        assert where in str(info.value)


def start_registryd(*args: str, home: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start bin/pilot-registryd; ``home`` replaces $HOME (where the default store goes)."""
    env = dict(os.environ, HOME=str(home)) if home is not None else None
    proc = subprocess.Popen(
        [sys.executable, REGISTRYD, "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15.0)
    line = proc.stdout.readline() if ready else ""  # the line, or EOF if it exited
    prefix = "pilot-registryd listening on "
    if not line.startswith(prefix):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"registryd did not start: {line!r} {err}")
    return proc, line[len(prefix) :].strip()


def test_main_serves_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "registry.yaml"
    config.write_text("networks:\n  3: [1]\n")
    proc, address = start_registryd("--memory", "--config", str(config), "--log-level", "warning")
    try:
        ident = Identity.generate()
        client = RegistryConnection(address, ident.sign)
        assert client.register("127.0.0.1:4000", ident.public_key_b64)["node_id"] == 1
        assert client.lookup(1)["networks"] == [0, 3]
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def read_stderr_until(proc: subprocess.Popen[str], text: str, timeout: float = 15.0) -> str:
    """The first line of ``proc``'s stderr (from here on) holding ``text``; fails after
    ``timeout``. Reads the pipe's descriptor itself: a buffered readline after select()
    could hold the line in its buffer while select() waits for more."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        chunk = os.read(fd, 65536) if ready else b""
        seen += chunk
        for line in seen.decode(errors="replace").splitlines(keepends=True):
            if text in line and line.endswith("\n"):
                return line
        if ready and not chunk:
            break  # end of stream: the process exited
    pytest.fail(f"no {text!r} on stderr (exit {proc.poll()}): {seen.decode(errors='replace')}")


def test_sighup_reloads_networks_and_limits_and_a_bad_config_is_kept_out(
    tmp_path: Path,
) -> None:
    """Issue 19 item 1: SIGHUP used to end pilot-registryd with status 129."""
    config = tmp_path / "registry.yaml"
    config.write_text("networks:\n  3: [1]\nlimits:\n  register_per_minute: 1\n")
    proc, address = start_registryd("--memory", "--config", str(config))
    client = RegistryConnection(address)
    try:
        first, second = Identity.generate(), Identity.generate()
        assert client.register("127.0.0.1:4000", first.public_key_b64)["node_id"] == 1
        assert client.lookup(1)["networks"] == [0, 3]
        with pytest.raises(RegistryError, match=r"^request failed$"):
            client.register("127.0.0.1:4001", second.public_key_b64)
        config.write_text("networks:\n  4: [1]\nlimits:\n  register_per_minute: 100\n")
        proc.send_signal(signal.SIGHUP)
        read_stderr_until(proc, "SIGHUP: reloaded")
        assert client.register("127.0.0.1:4001", second.public_key_b64)["node_id"] == 2
        assert client.lookup(1)["networks"] == [0, 4]
        # A config that does not load is an ERROR naming file and key; the running one stays.
        config.write_text("networks:\n  5: [1]\nlimits:\n  register_per_minute: 'x'\n")
        proc.send_signal(signal.SIGHUP)
        line = read_stderr_until(proc, "keeping the running config")
        assert "ERROR" in line and str(config) in line and "limits.register_per_minute" in line
        assert proc.poll() is None
        assert client.lookup(1)["networks"] == [0, 4]
        client.close()
        stop(proc)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_main_bad_config_exits_one_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("networks:\n  3: [7, 'bogus']\n")
    result = subprocess.run(
        [sys.executable, REGISTRYD, "--listen", "127.0.0.1:0", "--memory", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert str(config) in result.stderr
    assert "networks.3[1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_port_in_use_exits_one(server: RegistryServer) -> None:
    result = subprocess.run(
        [sys.executable, REGISTRYD, "--listen", "{}:{}".format(*server.address), "--memory"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_store_file_is_plain_json_with_next_id_after_a_clean_stop(
    make_server: Callable[..., RegistryServer], tmp_path: Path
) -> None:
    store = tmp_path / "registry.json"
    server = make_server(store_path=str(store))
    a, b = Node(server), Node(server)
    a.client.report_trust(a.node_id, b.node_id)
    server.stop()  # compacts: the snapshot alone is current
    assert (tmp_path / "registry.json.journal").read_bytes() == b""
    data = json.loads(store.read_text())
    assert data["next_id"] == 3
    assert [n["node_id"] for n in data["nodes"]] == [1, 2]
    assert data["vouches"] == [[1, 2]]


# -- issue 11 item 7: node IDs that do not move -------------------------------------------


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def register_all(address: str, identities: list[Identity]) -> list[int]:
    client = RegistryConnection(address)
    try:
        return [client.register("127.0.0.1:1", i.public_key_b64)["node_id"] for i in identities]
    finally:
        client.close()


@pytest.mark.parametrize("memory", [False, True])
def test_registryd_keeps_ids_across_a_restart_unless_told_memory(
    tmp_path: Path, memory: bool
) -> None:
    """Restarted without --store, nodes coming back in reverse order keep their IDs; with
    --memory they swap (what the README walkthrough did before)."""
    flags = ["--memory"] if memory else []
    nodes = [Identity.generate() for _ in range(3)]
    proc, address = start_registryd(*flags, home=tmp_path)
    try:
        assert register_all(address, nodes) == [1, 2, 3]
    finally:
        stop(proc)
    proc, address = start_registryd(*flags, home=tmp_path)
    try:
        again = register_all(address, nodes[::-1])[::-1]
    finally:
        stop(proc)
    store = tmp_path / ".pilot-registry" / "registry.json"
    if memory:
        assert again == [3, 2, 1]
        assert not store.parent.exists()
    else:
        assert again == [1, 2, 3]
        assert store.is_file()
        assert store.parent.stat().st_mode & 0o777 == 0o700


def test_help_names_the_default_store_and_store_excludes_memory(tmp_path: Path) -> None:
    shown = subprocess.run(
        [sys.executable, REGISTRYD, "--help"], capture_output=True, text=True, timeout=20
    )
    assert shown.returncode == 0
    assert "~/.pilot-registry/registry.json" in shown.stdout
    assert "--memory" in shown.stdout
    both = subprocess.run(
        [sys.executable, REGISTRYD, "--listen", "127.0.0.1:0", "--memory", "--store", "x"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


def test_connection_threads_are_reused_and_end_at_stop(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server()
    served_by: list[threading.Thread] = []  # kept alive: distinct objects, distinct threads
    handle = server.registry.handle

    def recording(request: dict[str, Any], source: str) -> dict[str, Any]:
        served_by.append(threading.current_thread())
        return handle(request, source)

    server.registry.handle = recording  # type: ignore[method-assign]
    for _ in range(20):  # one after the other: a few threads serve them all
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(encode_frame({"type": "lookup", "node_id": 1}))
            assert read_frame(sock, 1 << 20, 5.0, 5.0) is not None
    assert len(served_by) == 20
    assert len({id(t) for t in served_by}) <= 5
    server.stop()
    wait_until(lambda: not any(t.is_alive() for t in served_by))
