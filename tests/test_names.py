"""Hostnames pinned on first use (SPEC 17, issue 15 item 1): ``names.json`` in the state
directory, durable, checked by node ID and key bytes, forgotten on request."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from fakeruntime import Peer

from pilothandshake.errors import StoreError
from pilothandshake.events import EventBus
from pilothandshake.names import HostnameLearner, HostnameMoved, NamePins


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


def test_a_trusted_peers_hostname_is_pinned_when_first_learnt(tmp_path: Path) -> None:
    """Only for the key we trust: a registry that binds the peer's ID to another key does
    not get to name it."""
    peer, other = Peer(7), Peer(8)
    pins = NamePins(str(tmp_path / "names.json"))
    answers = {
        7: {"hostname": "build-agent", "public_key": peer.key},
        8: {"hostname": "db", "public_key": Peer(8).key},  # not the key we trusted
    }
    trusted = {7: peer.key, 8: other.key}
    bus = EventBus(lambda: 1)
    bus.start()
    learner = HostnameLearner(
        pins, bus, lambda node: answers[node], lambda node: base64.b64decode(trusted[node])
    )
    learner.start()
    try:
        bus.publish("trust.changed", {"peer_node_id": 8, "state": "granted"})
        bus.publish("trust.changed", {"peer_node_id": 7, "state": "revoked"})
        bus.publish("trust.changed", {"peer_node_id": 7, "state": "granted"})
        deadline = time.monotonic() + 10
        while pins.pinned("build-agent") is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        learner.stop(5)
        bus.stop(timeout=2)
    assert NamePins(str(tmp_path / "names.json")).pinned("build-agent") == (7, peer.key)
    assert pins.pinned("db") is None
