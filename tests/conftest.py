"""Fixtures shared by the unit tests: Managers over fake runtimes in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakeruntime import Nodes, Peer


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Makes Managers (each in its own directory under tmp_path) and closes them all."""
    made = Nodes(str(tmp_path))
    yield made
    made.close()


@pytest.fixture
def peer() -> Peer:
    """A remote node 7 with its own Ed25519 key, to sign messages to the Manager."""
    return Peer(7)
