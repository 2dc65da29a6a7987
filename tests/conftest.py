"""Fixtures shared by the unit tests: Managers over fake runtimes in a temporary directory,
and a node serving its control socket."""

from __future__ import annotations

import selectors
import shutil
import socketserver
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from controltools import Node, running_node
from fakeruntime import Nodes, Peer

from pilothandshake.server import HandshakeServer


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Makes Managers (each in its own directory under tmp_path) and closes them all."""
    made = Nodes(str(tmp_path))
    yield made
    made.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (AF_UNIX socket paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        yield Path(root)


@pytest.fixture
def peer() -> Peer:
    """A remote node 7 with its own Ed25519 key, to sign messages to the Manager."""
    return Peer(7)


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[str, str, str]:
    """A self-signed certificate: (certfile, keyfile, SHA-256 fingerprint with colons)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=registry"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    out = subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha256"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    return cert, key, out.strip().split("=", 1)[1]


@pytest.fixture
def accept_waits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, one entry per wait of a socketserver accept loop: ``"accept"`` for each
    call of a server's ``get_request`` and ``"select <timeout>"`` for each poll of
    socketserver's selector. An accept loop that polls, or that accepts with a timeout and
    goes round again, shows up as repeated entries while the server is idle."""
    waits: list[str] = []
    selector = socketserver._ServerSelector  # type: ignore[attr-defined]
    select = selector.select

    def counted_select(self: selectors.BaseSelector, timeout: float | None = None) -> Any:
        waits.append(f"select {timeout}")
        return select(self, timeout)

    monkeypatch.setattr(selector, "select", counted_select)
    for server in (socketserver.TCPServer, HandshakeServer):
        get_request = server.get_request

        def counted_get_request(self: Any, original: Any = get_request) -> Any:
            waits.append("accept")
            return original(self)

        monkeypatch.setattr(server, "get_request", counted_get_request)
    return waits


@pytest.fixture
def node() -> Iterator[Node]:
    """A Manager serving its control socket in a temporary directory (``controltools``)."""
    with running_node() as started:
        yield started
