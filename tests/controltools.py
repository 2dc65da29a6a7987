"""What the control socket's tests share (``test_control``, ``test_control_commands``,
``test_cli``): a ``Node`` (Manager, event bus and ``ControlServer`` over a fake runtime in a
temporary directory) and a fake registry for hostnames."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakeruntime import Peer

from pilothandshake.cli import main_handshakectl
from pilothandshake.client import ControlClient
from pilothandshake.control import ControlServer
from pilothandshake.errors import RegistryError
from pilothandshake.events import EventBus
from pilothandshake.manager import Manager
from pilothandshake.messages import HANDSHAKE_REQUEST
from pilothandshake.testing import MemoryRuntime

OWN_ID = 1


class BusRuntime(MemoryRuntime):
    """A MemoryRuntime whose events also go to a real EventBus, as in the daemon."""

    bus: EventBus | None = None

    def publish_event(self, topic: str, payload: dict[str, Any]) -> None:
        super().publish_event(topic, payload)
        if self.bus is not None:
            self.bus.publish(topic, payload)


@dataclass
class Node:
    """A Manager with its control socket, in a short /tmp directory."""

    runtime: BusRuntime
    manager: Manager
    bus: EventBus
    server: ControlServer
    path: str
    client: ControlClient

    def receive_request(self, peer: Peer, justification: str = "nightly sync") -> None:
        data = peer.data(HANDSHAKE_REQUEST, OWN_ID, justification=justification)
        self.manager.process_message(data, ("127.0.0.1", 40000))
        assert peer.node_id in [p.node_id for p in self.manager.pending_requests()]


class FakeRegistry:
    """Hostnames as the registry client answers them (``lookup``, ``resolve_hostname``)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.keys = {node: Peer(node).key for node in names}
        self.lookups: list[int] = []
        self.down = False

    def lookup(self, node_id: int) -> dict[str, Any]:
        self.lookups.append(node_id)
        if self.down:
            raise RegistryError("registry unreachable")
        key = self.keys.get(node_id, "")
        return {"node_id": node_id, "hostname": self.names.get(node_id, ""), "public_key": key}

    def resolve_hostname(self, hostname: str) -> dict[str, Any]:
        for node_id, name in self.names.items():
            if name == hostname:
                return {"node_id": node_id, "public": False, "hostname": name}
        raise RegistryError(f"hostname {hostname!r} not found")


@contextlib.contextmanager
def running_node(registry: FakeRegistry | None = None, group: str = "") -> Iterator[Node]:
    """A started Manager, EventBus and ControlServer."""
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(dir="/tmp", prefix="phctl-")
    runtime = BusRuntime(node_id=OWN_ID, directory=directory)
    manager = Manager(runtime)
    manager.start()
    bus = EventBus(runtime.node_id)
    runtime.bus = bus
    bus.start()

    def status() -> dict[str, Any]:
        return {
            "node_id": OWN_ID,
            "listen": "127.0.0.1:444",
            "registry": None,
            "trusted": len(manager.trusted_peers()),
            "pending": manager.pending_count(),
        }

    path = os.path.join(directory, "control.sock")
    server = ControlServer(
        path, manager, status, bus, node_id=lambda: OWN_ID, registry=registry, group=group
    )
    server.start()
    try:
        yield Node(runtime, manager, bus, server, path, ControlClient(path, timeout=5))
    finally:
        server.stop()
        manager.stop()
        bus.stop(timeout=2)
        shutil.rmtree(directory, ignore_errors=True)


CTL = str(Path(__file__).resolve().parents[1] / "bin" / "pilot-handshakectl")


def run(node: Node, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main_handshakectl(["--socket", node.path, *args])
    out, err = capsys.readouterr()
    return code, out, err


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, CTL, *args], capture_output=True, text=True, timeout=30, check=False
    )
