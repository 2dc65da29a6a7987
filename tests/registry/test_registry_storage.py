"""The embedded registry's store (issue 15 item 2, issue 20 item 3): a change appends one
fsynced journal line and never rewrites the snapshot; a request that changes nothing writes
nothing; compaction runs in the background; old stores load; a torn last line is a crash's
leftover, damage elsewhere is an error naming the journal and the line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from registrytools import ROOMY, Peer

from pilothandshake.errors import StoreError
from pilothandshake.identity import Identity
from pilothandshake.registry import storage
from pilothandshake.registry.state import Registry
from pilothandshake.registry.storage import JOURNAL_SUFFIX, Store, read_state


def journal_lines(path: Path) -> list[bytes]:
    return (path.parent / (path.name + JOURNAL_SUFFIX)).read_bytes().splitlines()


def test_each_change_appends_one_journal_line_and_the_snapshot_is_never_rewritten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY)
    before = path.stat()
    peers = [Peer(registry, 4000 + i) for i in range(20)]
    for peer in peers[1:]:
        assert peer.report_trust(peers[0].node_id)["type"] == "report_trust_ok"
    assert peers[0].set_hostname("hub")["type"] == "set_hostname_ok"
    after = path.stat()
    # 20 registrations, 19 vouches, 1 hostname: 40 lines, and the snapshot untouched.
    assert len(journal_lines(path)) == 40
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    # What is on disk right now (snapshot + journal) is the whole state.
    state = read_state(str(path))
    assert sorted(state.nodes) == [p.node_id for p in peers]
    assert state.nodes[peers[0].node_id].hostname == "hub"
    assert len(state.vouches) == 19
    registry.close()


def test_a_request_that_changes_nothing_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY)
    a, b = Peer(registry), Peer(registry, 4001)
    a.set_hostname("alpha")
    a.set_visibility(True)
    a.report_trust(b.node_id)
    journal = path.parent / (path.name + JOURNAL_SUFFIX)
    size = journal.stat().st_size
    for _ in range(20):
        assert a.set_hostname("alpha")["type"] == "set_hostname_ok"
        assert a.set_visibility(True)["type"] == "set_visibility_ok"
        assert a.report_trust(b.node_id)["type"] == "report_trust_ok"
        assert a.register(hostname="alpha")["node_id"] == a.node_id  # same address and name
        assert b.poll()["requests"] == []  # nothing waiting: nothing drained
        unsigned = {
            "type": "register",
            "listen_addr": "127.0.0.9:9",
            "public_key": a.identity.public_key_b64,
        }
        assert a.ask(unsigned)["node_id"] == a.node_id
    assert journal.stat().st_size == size
    registry.close()


def test_compaction_cuts_the_journal_in_the_background_and_keeps_every_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path), compact_at=4096), limits=ROOMY)
    peers = [Peer(registry, 4000 + i) for i in range(60)]
    for peer in peers[1:]:
        peer.report_trust(peers[0].node_id)
        peer.request(peers[0].node_id)
    journal = path.parent / (path.name + JOURNAL_SUFFIX)
    deadline = time.monotonic() + 10
    while json.loads(path.read_bytes())["journal_seq"] == 0:
        assert time.monotonic() < deadline, "no compaction"
        time.sleep(0.02)
    # Appending goes on during and after compaction; the journal stays about as small as
    # the snapshot (compaction starts once it is larger than both it and 4 KiB).
    assert journal.stat().st_size < max(4096, path.stat().st_size) + 4096
    on_disk = read_state(str(path))
    with registry._lock:
        live = registry._state
        assert on_disk.nodes == live.nodes
        assert on_disk.vouches == live.vouches
        assert on_disk.requests == live.requests
    registry.close()
    restarted = Registry(Store(str(path)), limits=ROOMY)
    assert restarted.inbox_entries() == 59
    peers[0].registry = restarted
    assert len(peers[0].poll()["requests"]) == 59
    restarted.close()


def test_a_version_2_store_loads_and_its_changes_go_to_a_journal(tmp_path: Path) -> None:
    keys = [Identity.generate() for _ in range(2)]
    path = tmp_path / "registry.json"
    nodes = [
        {
            "node_id": i + 1,
            "public_key": k.public_key_b64,
            "real_addr": f"127.0.0.1:{i}",
            "public": False,
            "hostname": "h" if i == 0 else "",
        }
        for i, k in enumerate(keys)
    ]
    path.write_text(json.dumps({"version": 2, "next_id": 3, "nodes": nodes, "vouches": [[1, 2]]}))
    registry = Registry(Store(str(path)), limits=ROOMY)
    peer = Peer(registry)
    assert peer.node_id == 3
    registry.close()
    state = read_state(str(path))
    assert sorted(state.nodes) == [1, 2, 3]
    assert state.vouches == {(1, 2)}
    assert state.nodes[1].hostname == "h"
    assert json.loads(path.read_bytes())["version"] == 3


def crash_copy(path: Path, directory: Path) -> Path:
    """The store's files as a crash would leave them now (every acknowledged line is
    durable), copied into ``directory``: the running registry keeps the originals."""
    directory.mkdir()
    for name in (path.name, path.name + JOURNAL_SUFFIX):
        (directory / name).write_bytes((path.parent / name).read_bytes())
    return directory / path.name


def test_a_torn_last_line_is_dropped_and_damage_elsewhere_names_the_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY)
    for i in range(3):
        Peer(registry, 4000 + i)
    crashed = crash_copy(path, tmp_path / "crashed")
    registry.close()
    journal = crashed.parent / (crashed.name + JOURNAL_SUFFIX)
    whole = journal.read_bytes()
    # A crash in the middle of a write: the bytes after the last newline are dropped, the
    # journal is cut back to them, and the next change follows the good lines.
    with open(journal, "ab") as out:
        out.write(b'1234abcd [4,[["node",4')
    restarted = Registry(Store(str(crashed)), limits=ROOMY)
    assert journal.read_bytes() == whole
    assert Peer(restarted, 4009).node_id == 4
    restarted.close()
    assert sorted(read_state(str(crashed)).nodes) == [1, 2, 3, 4]
    # A flipped byte inside an earlier line fails its checksum: an error, not a half-load.
    lines = [b'1234abcd [1,[["vouch",1,2]]]', b'00000000 [2,[["vouch",2,1]]]']
    journal.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(StoreError, match=r"registry\.json\.journal line 1 is damaged"):
        Store(str(crashed)).load()


def test_a_journal_that_does_not_continue_the_snapshot_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY)
    for i in range(3):
        Peer(registry, 4000 + i)
    crashed = crash_copy(path, tmp_path / "crashed")
    registry.close()
    # The first line is missing: the journal starts after what the snapshot holds.
    journal = crashed.parent / (crashed.name + JOURNAL_SUFFIX)
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[1:]))
    with pytest.raises(StoreError, match="seq 2, expected 1: it does not continue"):
        Store(str(crashed)).load()


def test_a_second_registry_on_the_same_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY)
    with pytest.raises(StoreError, match=r"registry store .* is in use"):
        Store(str(path)).load()
    registry.close()
    Registry(Store(str(path)), limits=ROOMY).close()


def test_a_crash_between_the_new_snapshot_and_the_journal_cut_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.json"
    store = Store(str(path), compact_at=1 << 30)  # compaction only when the test says
    registry = Registry(store, limits=ROOMY)
    peers = [Peer(registry, 4000 + i) for i in range(5)]
    for peer in peers[1:]:
        peer.report_trust(peers[0].node_id)
        peer.request(peers[0].node_id)
    real_write = storage.fsutil.write_atomically

    def crash_at_the_journal(target: str, data: bytes) -> None:
        if target.endswith(JOURNAL_SUFFIX):
            raise OSError("killed here")
        real_write(target, data)

    monkeypatch.setattr(storage.fsutil, "write_atomically", crash_at_the_journal)
    with pytest.raises(OSError, match="killed here"):
        store.compact()
    crashed = crash_copy(path, tmp_path / "crashed")
    monkeypatch.undo()
    # The new snapshot holds every line, the old journal still holds them all too: the
    # lines the snapshot holds are skipped, nothing is applied twice or lost.
    assert json.loads(crashed.read_bytes())["journal_seq"] == 13
    on_disk = read_state(str(crashed))
    with registry._lock:
        assert on_disk.nodes == registry._state.nodes
        assert on_disk.vouches == registry._state.vouches
        assert on_disk.requests == registry._state.requests
    # And the registry that "survived" goes on appending after the failed compaction.
    Peer(registry, 4999)
    registry.close()
    assert len(read_state(str(path)).nodes) == 6


def test_a_journal_without_its_snapshot_is_set_aside_not_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.json"
    registry = Registry(Store(str(path)), limits=ROOMY)
    Peer(registry)
    crashed = crash_copy(path, tmp_path / "crashed")
    registry.close()
    crashed.unlink()  # an operator starting the registry afresh
    assert read_state(str(crashed)).nodes == {}
    with caplog.at_level("WARNING", logger="pilothandshake.registry"):
        fresh = Registry(Store(str(crashed)), limits=ROOMY)
    assert fresh.inbox_entries() == 0 and Peer(fresh).node_id == 1
    fresh.close()
    [aside] = list(crashed.parent.glob("registry.json.journal.orphan-*"))
    assert aside.stat().st_size > 0
    assert "is not applied, moved to" in caplog.text
