"""Fixtures shared by the unit tests: Managers over fake runtimes in a temporary directory,
and a node serving its control socket."""

from __future__ import annotations

import selectors
import shutil
import socketserver
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from controltools import Node, running_node
from fakeruntime import Nodes, Peer

from pilothandshake.manager.decide import Decision
from pilothandshake.manager.state import State
from pilothandshake.server import HandshakeServer
from pilothandshake.store import Change, TrustState, TrustStore


def _tables(state: State) -> tuple[object, ...]:
    """The side tables of ``state``, copied."""
    side = (state._conflicts, state._revoked_at, state._arrival)
    return (*(dict(table) for table in side), set(state._protected))


def _replayed(store: TrustStore) -> TrustState:
    """What ``working`` must be: ``visible`` with the changes not yet written applied."""
    state = store.visible.copy()
    for _seq, change, _text in store._log:
        state.apply(change)
    return state


@pytest.fixture(autouse=True)
def only_apply_writes() -> Iterator[list[str]]:
    """Every test fails when a Manager's state changes outside ``State.apply`` (issue 17):
    its trust store is written only from ``apply`` (the caller of ``TrustStore.change``),
    the working state is never edited in place (it is always ``visible`` plus the changes
    not yet written), and the side tables (conflicts, revoke times, the pending queue's
    order and protection) do not change between two applies. Yields the violations, which
    a test of the guard itself may inspect and clear."""
    violations: list[str] = []
    init, apply, change = State.__init__, State.apply, TrustStore.change
    states: weakref.WeakKeyDictionary[State, tuple[object, ...]] = weakref.WeakKeyDictionary()
    stores: weakref.WeakSet[TrustStore] = weakref.WeakSet()

    def check(state: State, when: str) -> None:
        if states.get(state) != _tables(state):
            violations.append(f"side tables changed outside State.apply ({when})")
        if state.store.working != _replayed(state.store):
            violations.append(f"working state edited outside TrustStore.change ({when})")

    def guarded_init(state: State, *args: Any, **kwargs: Any) -> None:
        init(state, *args, **kwargs)
        stores.add(state.store)
        states[state] = _tables(state)

    def guarded_apply(state: State, decision: Decision) -> int | None:
        check(state, "before an apply")
        try:
            return apply(state, decision)
        finally:
            states[state] = _tables(state)

    def guarded_change(store: TrustStore, made: Change) -> int:
        caller = sys._getframe(1).f_code
        if store in stores and caller is not apply.__code__:
            violations.append(f"{made} written by {caller.co_name}, not State.apply")
        return change(store, made)

    # A patch of its own: a test's monkeypatch.undo() must not lift the guard.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(State, "__init__", guarded_init)
        patch.setattr(State, "apply", guarded_apply)
        patch.setattr(TrustStore, "change", guarded_change)
        yield violations
    for state in list(states.keys()):
        with state.lock:
            check(state, "at the end of the test")
    assert violations == []


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
