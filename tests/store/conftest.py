"""Fixtures of the trust store's tests: where trust.json lives."""

from __future__ import annotations

from pathlib import Path

import pytest
from storetools import BASE

from pilothandshake.store import encode_state


@pytest.fixture
def trust_path(tmp_path: Path) -> Path:
    return tmp_path / "identity" / "trust.json"


@pytest.fixture
def trust(tmp_path: Path) -> Path:
    """trust.json holding BASE; its journal (not yet created) is trust.json.journal."""
    path = tmp_path / "trust.json"
    path.write_bytes(encode_state(BASE))
    return path
