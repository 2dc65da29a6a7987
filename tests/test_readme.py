"""The README's embedding example runs as written: its runtime, two nodes, a full handshake."""

from __future__ import annotations

import re
import socket
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
