"""Hostnames pinned on first use (SPEC 17, issue 15 item 1): ``names.json`` in the state
directory, durable, checked by node ID and key bytes, forgotten on request."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from fakeruntime import Peer

from pilothandshake.errors import StoreError
from pilothandshake.names import HostnameMoved, NamePins


def test_a_pin_survives_a_restart_and_a_move_is_refused_after_it(tmp_path: Path) -> None:
    path = str(tmp_path / "names.json")
    a, b = Peer(1), Peer(3)
    NamePins(path).check("build-agent", 1, a.key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    reopened = NamePins(path)
    assert reopened.pinned("build-agent") == (1, a.key)
    with pytest.raises(HostnameMoved) as moved:
        reopened.check("build-agent", 3, b.key)
    assert str(moved.value) == (
        "hostname build-agent moved from node 1 to node 3; if that is expected: "
        "pilot-handshakectl forget-name build-agent"
    )
    assert reopened.pinned("build-agent") == (1, a.key)  # a refused move changes nothing
    assert reopened.forget("build-agent") and not reopened.forget("build-agent")
    assert NamePins(path).pinned("build-agent") is None
    assert json.loads(Path(path).read_text()) == {"names": {}}


def test_keys_compare_as_bytes_not_as_spellings(tmp_path: Path) -> None:
    pins = NamePins(str(tmp_path / "names.json"))
    key = Peer(1).key
    pins.check("a", 1, key)
    respelled = base64.b64encode(base64.b64decode(key)).decode()
    pins.check("a", 1, respelled)  # the same bytes: no move
    with pytest.raises(HostnameMoved):
        pins.check("a", 1, Peer(1).key)


def test_learn_pins_only_a_new_name(tmp_path: Path) -> None:
    pins = NamePins(str(tmp_path / "names.json"))
    a, b = Peer(1), Peer(2)
    assert pins.learn("a", 1, a.key)
    assert not pins.learn("a", 2, b.key)  # never overwrites: the first answer stands
    assert pins.pinned("a") == (1, a.key)


@pytest.mark.parametrize(
    "content", [b"{not json", b"[]", b'{"names": {"a": {"node_id": "1", "public_key": ""}}}']
)
def test_a_damaged_file_is_an_error_naming_it_not_an_empty_pin_set(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "names.json"
    path.write_bytes(content)
    with pytest.raises(StoreError, match=str(path)):
        NamePins(str(path))


def test_a_pin_that_cannot_be_written_is_not_kept(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    pins = NamePins(str(gone / "names.json"))  # its directory does not exist
    with pytest.raises(StoreError, match="cannot write"):
        pins.check("a", 1, Peer(1).key)
    assert pins.pinned("a") is None
