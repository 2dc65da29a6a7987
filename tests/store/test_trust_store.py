"""``store.trust_store``: loading, the directory lock, group commit and failed writes (SPEC 10)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import filelock
import pytest
from storetools import (
    FIXTURE,
    KEY_A,
    KEY_B,
    T0,
    count_calls,
    leftovers,
    open_store,
)

from pilothandshake.errors import StoreError
from pilothandshake.store import (
    OUTGOING,
    PENDING,
    TRUSTED,
    Change,
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
    TrustStore,
    codec,
    decode_state,
    encode_state,
    load_state,
    trust_store,
)


def test_go_fixture_round_trips_through_a_store(trust_path: Path) -> None:
    trust_path.parent.mkdir()
    shutil.copy(FIXTURE, trust_path)
    original = load_state(str(FIXTURE))
    opened, lock = open_store(trust_path)
    assert opened.visible == original
    with lock:
        seq = opened.change(Change(OUTGOING, 11, OutgoingRequest(11, T0)))
    opened.commit(seq)
    opened.close()

    reloaded = load_state(str(trust_path))
    assert reloaded.outgoing == {11: OutgoingRequest(11, T0)}
    # Only fractions of seconds are lost: the file holds whole seconds.
    for node, record in original.trusted.items():
        assert reloaded.trusted[node] == TrustRecord(
            record.node_id,
            record.public_key,
            record.approved_at.replace(microsecond=0),
            record.mutual,
            record.network,
        )
    assert reloaded.pending == original.pending
    # A second round trip is byte-identical.
    assert encode_state(decode_state(trust_path.read_bytes())) == trust_path.read_bytes()


# The directory lock


def test_second_store_on_one_directory_fails_in_the_same_process(trust_path: Path) -> None:
    first, _ = open_store(trust_path)
    with pytest.raises(StoreError, match="is in use by another pilot-handshake process"):
        open_store(trust_path)
    first.close()
    first.close()  # idempotent
    second, _ = open_store(trust_path)
    second.close()


def test_second_process_on_one_directory_fails_with_a_clear_message(trust_path: Path) -> None:
    first, _ = open_store(trust_path)
    code = (
        "import sys, threading\n"
        "from pilothandshake.store import TrustStore\n"
        "from pilothandshake.errors import StoreError\n"
        "try:\n"
        "    TrustStore(sys.argv[1], threading.RLock(), lambda c: None)\n"
        "except StoreError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(trust_path)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=Path(__file__).parents[2],
        check=False,
    )
    first.close()
    assert result.returncode == 3, result.stderr
    assert f"identity directory {trust_path.parent} is in use" in result.stdout
    assert str(trust_path.parent / "trust.json.lock") in result.stdout


# Commit


def test_change_is_visible_only_after_its_write(trust_path: Path) -> None:
    seen: list[list[Change]] = []
    opened, lock = open_store(trust_path, seen.append)
    record = TrustRecord(7, KEY_A, T0, mutual=True)
    with lock:
        seq = opened.change(Change(TRUSTED, record.node_id, record))
    assert opened.working.trusted == {7: record}
    assert opened.visible.trusted == {}
    assert not trust_path.exists()
    assert seen == []
    opened.commit(seq)
    assert opened.visible.trusted == {7: record}
    assert load_state(str(trust_path)).trusted == {7: record}
    assert seen == [[Change("trusted", 7, record)]]
    opened.commit(seq)  # already durable: returns at once, nothing new published
    assert len(seen) == 1
    with lock:
        dropped = opened.change(Change(TRUSTED, 7, None))
    opened.commit(dropped)
    assert opened.visible == TrustState() == load_state(str(trust_path))
    assert seen[-1] == [Change("trusted", 7, None)]
    opened.close()
    assert trust_path.read_bytes() == b'{\n  "trusted": []\n}\n'


def test_on_commit_runs_under_the_lock_with_changes_in_order(trust_path: Path) -> None:
    calls: list[tuple[list[Change], bool]] = []
    lock_holder: dict[str, threading.RLock] = {}

    def on_commit(changes: list[Change]) -> None:
        free = threading.Thread(target=lambda: calls.append((changes, try_lock())))
        free.start()
        free.join(5)

    def try_lock() -> bool:
        acquired = lock_holder["lock"].acquire(blocking=False)
        if acquired:
            lock_holder["lock"].release()
        return acquired

    opened, lock = open_store(trust_path, on_commit)
    lock_holder["lock"] = lock
    pending = PendingHandshake(9, KEY_B, "why", T0)
    with lock:
        opened.change(Change(PENDING, pending.node_id, pending))
        opened.change(Change(OUTGOING, 3, OutgoingRequest(3, T0)))
        last = opened.change(Change(PENDING, 9, None))
    opened.commit(last)
    assert calls == [
        (
            [
                Change("pending", 9, pending),
                Change("outgoing", 3, OutgoingRequest(3, T0)),
                Change("pending", 9, None),
            ],
            False,
        )
    ]
    opened.close()


def test_commit_of_an_unknown_sequence_number_is_an_error(trust_path: Path) -> None:
    opened, _ = open_store(trust_path)
    with pytest.raises(ValueError):
        opened.commit(1)
    opened.close()


def test_writer_bytes_equal_encode_state_and_file_mode_is_0600(trust_path: Path) -> None:
    opened, lock = open_store(trust_path)
    with lock:
        for node in range(50, 0, -1):
            opened.change(
                Change(TRUSTED, node, TrustRecord(node, KEY_A, T0, node % 2 == 0, node % 4))
            )
            opened.change(
                Change(
                    PENDING,
                    node + 1000,
                    PendingHandshake(node + 1000, "", f"n{node}", T0, node % 3 == 0),
                )
            )
        opened.change(Change(TRUSTED, 10, None))
        opened.change(Change(TRUSTED, 11, TrustRecord(11, KEY_B, T0)))
        opened.change(Change(PENDING, 1001, None))
        seq = opened.change(Change(OUTGOING, 77, OutgoingRequest(77, T0)))
    opened.commit(seq)
    assert trust_path.read_bytes() == encode_state(opened.visible)
    assert opened.visible == opened.working == load_state(str(trust_path))
    assert (trust_path.stat().st_mode & 0o777) == 0o600
    assert leftovers(trust_path.parent) == []
    opened.close()


def test_concurrent_commits_share_writes(trust_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = count_calls(monkeypatch, os, "fsync")
    published: list[Change] = []
    opened, lock = open_store(trust_path, published.extend)
    threads, per_thread = 8, 50
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for step in range(per_thread):
                node = index * 1000 + step
                with lock:
                    seq = opened.change(Change(TRUSTED, node, TrustRecord(node, KEY_A, T0)))
                    if step % 5 == 4:
                        seq = opened.change(Change(TRUSTED, node - 1, None))
                opened.commit(seq)
                assert node in opened.visible.trusted or step % 5 == 4
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not any(worker.is_alive() for worker in workers)
    assert errors == []
    changes = threads * (per_thread + per_thread // 5)
    assert len(published) == changes
    assert 0 < writes[0] < changes
    assert len(opened.visible.trusted) == threads * (per_thread - per_thread // 5)
    assert load_state(str(trust_path)) == opened.visible == opened.working
    opened.close()


def rewrite_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every write a checkpoint (a full rewrite of trust.json), never a journal append."""
    monkeypatch.setattr(trust_store, "JOURNAL_MIN_BYTES", 0)
    monkeypatch.setattr(trust_store, "JOURNAL_RATIO", 0.0)


def fail_fsync(
    monkeypatch: pytest.MonkeyPatch, call: int, before: Callable[[], None] = lambda: None
) -> None:
    """Make the ``call``-th os.fsync from now raise ENOSPC, running ``before`` first."""
    real = os.fsync
    count = [0]

    def fsync(fd: int) -> None:
        count[0] += 1
        if count[0] == call:
            before()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_failed_write_rolls_back_fails_callers_and_a_later_commit_succeeds(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[Change] = []
    opened, lock = open_store(trust_path, published.extend)
    kept = TrustRecord(1, KEY_A, T0)
    with lock:
        seq = opened.change(Change(TRUSTED, kept.node_id, kept))
    opened.commit(seq)
    before = trust_path.read_bytes()

    late: list[int] = []

    def concurrent_change() -> None:
        # A change made while the failing write is in flight is rolled back with it.
        with lock:
            late.append(opened.change(Change(PENDING, 5, PendingHandshake(5, "", "late", T0))))

    fail_fsync(monkeypatch, 1, concurrent_change)
    with lock:
        opened.change(Change(TRUSTED, 1, None))
        seq = opened.change(Change(OUTGOING, 2, OutgoingRequest(2, T0)))
    with pytest.raises(StoreError) as raised:
        opened.commit(seq)
    assert f"cannot write {trust_path}" in str(raised.value)
    assert "No space left on device" in str(raised.value)
    with pytest.raises(StoreError, match="No space left"):
        opened.commit(late[0])
    assert trust_path.read_bytes() == before
    assert opened.working == opened.visible == load_state(str(trust_path))
    assert opened.visible.trusted == {1: kept}
    assert published == [Change("trusted", 1, kept)]
    assert leftovers(trust_path.parent) == []

    with lock:
        seq = opened.change(Change(OUTGOING, 3, OutgoingRequest(3, T0)))
    opened.commit(seq)
    assert load_state(str(trust_path)) == opened.visible == opened.working
    assert opened.visible.outgoing == {3: OutgoingRequest(3, T0)}
    assert opened.visible.trusted == {1: kept}
    opened.close()


def test_failure_after_the_rename_restores_the_durable_state(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrite_every_write(monkeypatch)
    opened, lock = open_store(trust_path)
    with lock:
        seq = opened.change(Change(TRUSTED, 1, TrustRecord(1, KEY_A, T0)))
    opened.commit(seq)
    fail_fsync(monkeypatch, 2)  # the first fsync is the file's, the second the directory's
    with lock:
        seq = opened.change(Change(TRUSTED, 2, TrustRecord(2, KEY_A, T0)))
    with pytest.raises(StoreError, match="No space left"):
        opened.commit(seq)
    assert load_state(str(trust_path)) == opened.visible == opened.working
    assert sorted(opened.visible.trusted) == [1]
    assert leftovers(trust_path.parent) == []
    opened.close()


def try_lock_in_another_process(path: Path) -> bool:
    """Whether another process can take the file lock ``path`` right now."""
    code = (
        "import sys, filelock\n"
        "try:\n"
        "    filelock.FileLock(sys.argv[1], timeout=0).acquire()\n"
        "except filelock.Timeout:\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, timeout=20, check=False
    )
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 0


def test_trust_lock_is_held_from_open_to_close_not_per_write(trust_path: Path) -> None:
    lock_path = trust_path.with_name("trust.json.lock")
    opened, lock = open_store(trust_path)
    assert not try_lock_in_another_process(lock_path)  # before any write
    with lock:
        seq = opened.change(Change(TRUSTED, 1, TrustRecord(1, KEY_A, T0)))
    opened.commit(seq)
    assert not try_lock_in_another_process(lock_path)  # between writes
    opened.close()
    assert try_lock_in_another_process(lock_path)


def test_trust_lock_held_by_another_process_refuses_to_open_naming_the_directory(
    trust_path: Path,
) -> None:
    trust_path.parent.mkdir(mode=0o700)
    in_use = f"identity directory {trust_path.parent} is in use"
    with (
        filelock.FileLock(str(trust_path) + ".lock", timeout=0),
        pytest.raises(StoreError, match=in_use),
    ):
        open_store(trust_path)
    opened, _ = open_store(trust_path)
    opened.close()


def test_commit_after_close_fails_and_rolls_back(trust_path: Path) -> None:
    opened, lock = open_store(trust_path)
    opened.close()
    with lock:
        seq = opened.change(Change(TRUSTED, 1, TrustRecord(1, KEY_A, T0)))
    with pytest.raises(StoreError, match="closed"):
        opened.commit(seq)
    assert opened.working == TrustState()
    assert not trust_path.exists()


def test_memory_only_store_commits_without_touching_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    published: list[Change] = []
    lock = threading.RLock()
    opened = TrustStore("", lock, published.extend)
    record = TrustRecord(4, KEY_A, T0)
    with lock:
        seq = opened.change(Change(TRUSTED, record.node_id, record))
    assert opened.visible.trusted == {}
    opened.commit(seq)
    assert opened.visible.trusted == {4: record} == opened.working.trusted
    assert published == [Change("trusted", 4, record)]
    opened.close()
    assert os.listdir(tmp_path) == []


def test_writes_stay_sorted_and_equal_encode_state_through_chunk_splits_and_merges(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrite_every_write(monkeypatch)
    rng = random.Random(7)
    opened, lock = open_store(trust_path)
    everyone = list(range(2000))
    rng.shuffle(everyone)
    with lock:
        for node in everyone:
            opened.change(Change(TRUSTED, node, TrustRecord(node, KEY_A, T0)))
    for round_ in range(6):
        with lock:
            for _ in range(400):
                node = rng.randrange(2000)
                if rng.random() < 0.35 + round_ * 0.1:
                    seq = opened.change(Change(TRUSTED, node, None))
                else:
                    seq = opened.change(
                        Change(TRUSTED, node, TrustRecord(node, KEY_A, T0, network=round_))
                    )
        opened.commit(seq)
        data = trust_path.read_bytes()
        assert data == encode_state(opened.visible)
        nodes = [int(line.split(b",")[0].split(b": ")[1]) for line in data.splitlines()[2:-2]]
        assert nodes == sorted(opened.visible.trusted)
    # Emptying whole chunks in the middle, then touching one record of a later chunk.
    with lock:
        for node in range(300, 1200):
            seq = opened.change(Change(TRUSTED, node, None))
    opened.commit(seq)
    assert trust_path.read_bytes() == encode_state(opened.visible)
    with lock:
        seq = opened.change(Change(TRUSTED, 1900, TrustRecord(1900, KEY_B, T0)))
    opened.commit(seq)
    assert trust_path.read_bytes() == encode_state(opened.visible)
    with lock:
        for node in list(opened.working.trusted):
            seq = opened.change(Change(TRUSTED, node, None))
    opened.commit(seq)
    assert trust_path.read_bytes() == b'{\n  "trusted": []\n}\n'
    opened.close()


def test_a_write_serialises_only_the_changed_record(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust_path.parent.mkdir()
    many = TrustState(trusted={node: TrustRecord(node, KEY_A, T0) for node in range(1, 3001)})
    trust_path.write_bytes(encode_state(many))
    opened, lock = open_store(trust_path)
    formatted = count_calls(monkeypatch, codec, "format_time")
    with lock:
        seq = opened.change(Change(TRUSTED, 1500, TrustRecord(1500, KEY_B, T0, mutual=True)))
    opened.commit(seq)
    assert formatted[0] == 1
    assert load_state(str(trust_path)).trusted[1500].public_key == KEY_B
    assert len(load_state(str(trust_path)).trusted) == 3000
    opened.close()


def test_a_record_that_cannot_be_serialised_changes_nothing(trust_path: Path) -> None:
    opened, lock = open_store(trust_path)
    too_early = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))  # before year 1 in UTC
    with lock, pytest.raises((ValueError, OverflowError)):
        opened.change(Change(TRUSTED, 1, TrustRecord(1, KEY_A, too_early)))
    assert opened.working == TrustState()
    with lock:
        seq = opened.change(Change(TRUSTED, 2, TrustRecord(2, KEY_A, T0)))
    opened.commit(seq)
    assert sorted(load_state(str(trust_path)).trusted) == [2]
    opened.close()


def test_a_failing_on_commit_is_logged_and_the_write_stands(
    trust_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(changes: list[Change]) -> None:
        raise RuntimeError("observer bug")

    opened, lock = open_store(trust_path, broken)
    with lock:
        seq = opened.change(Change(TRUSTED, 2, TrustRecord(2, KEY_A, T0)))
    opened.commit(seq)
    assert sorted(opened.visible.trusted) == [2] == sorted(load_state(str(trust_path)).trusted)
    assert "on_commit failed" in caplog.text
    opened.close()


# Links planted in the state directory


@pytest.mark.parametrize("name", ["trust.json", "trust.json.journal"])
def test_planted_link_is_refused_and_its_target_never_truncated_or_chmodded(
    trust_path: Path, tmp_path: Path, name: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    victim.chmod(0o644)
    trust_path.parent.mkdir(mode=0o700)
    (trust_path.parent / name).symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        opened, lock = open_store(trust_path)
        # Old code opened it: make it write and checkpoint, as a daemon would.
        with lock:
            seq = opened.change(Change(TRUSTED, 7, TrustRecord(7, KEY_A, T0)))
        opened.commit(seq)
        opened.close()
    assert victim.read_bytes() == b"someone else's file"
    assert victim.stat().st_mode & 0o777 == 0o644
