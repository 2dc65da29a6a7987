"""trust.json codec, directory lock and group commit of pilothandshake.store (SPEC 10)."""

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
from typing import Any, Callable

import filelock
import pytest

from pilothandshake import store
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
    format_time,
    load_state,
    parse_time,
    trust_store,
)
from pilothandshake.store.journal import frame

FIXTURE = Path(__file__).parent / "fixtures" / "go_trust.json"
KEY_A = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
KEY_B = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=timezone.utc)


def open_store(
    path: Path, on_commit: Callable[[list[Change]], None] | None = None
) -> tuple[TrustStore, threading.RLock]:
    lock = threading.RLock()
    opened = TrustStore(str(path), lock, on_commit or (lambda changes: None))
    return opened, lock


@pytest.fixture
def trust_path(tmp_path: Path) -> Path:
    return tmp_path / "identity" / "trust.json"


def leftovers(directory: Path) -> list[str]:
    """Files in ``directory`` other than the trust file, its journal and its lock file."""
    expected = {"trust.json", "trust.json.journal", "trust.json.lock"}
    return sorted(name for name in os.listdir(directory) if name not in expected)


# Times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T10:00:00Z", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25t10:00:00z", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25T12:00:00+02:00", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25T04:30:00-05:30", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25T10:00:00.123456789Z", utc(2026, 11, 25, 10, 0, 0, 123456)),
        ("2026-11-25T10:00:00.5+00:00", utc(2026, 11, 25, 10, 0, 0, 500000)),
        ("0001-01-01T00:00:00Z", utc(1, 1, 1)),
    ],
)
def test_parse_time_accepts_rfc3339_with_z_offsets_and_fractions(
    text: str, expected: datetime
) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-11-25",
        "2026-11-25T10:00:00",  # no zone
        "2026-11-25 10:00:00Z",
        "2026-13-25T10:00:00Z",
        "2026-11-25T10:00:00+24:00",
        "2026-11-25T10:00:00.Z",
        "\uff12\uff10\uff12\uff16-11-25T10:00:00Z",  # non-ASCII digits
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    ],
)
def test_parse_time_rejects_malformed_times(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_format_time_writes_utc_seconds_with_z() -> None:
    east = timezone(timedelta(hours=2))
    assert format_time(datetime(2026, 11, 25, 12, 0, 0, 999999, tzinfo=east)) == (
        "2026-11-25T10:00:00Z"
    )
    assert format_time(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
    assert format_time(store.ZERO_TIME) == "0001-01-01T00:00:00Z"


# Encoding


def test_encode_state_formats_exactly_as_spec() -> None:
    state = TrustState(
        trusted={
            9: TrustRecord(9, KEY_B, T0, mutual=False),
            7: TrustRecord(7, KEY_A, T0, mutual=True, network=3),
        },
        pending={
            5: PendingHandshake(5, "", "", T0 + timedelta(minutes=1)),
            4: PendingHandshake(4, KEY_A, 'say "hi" é', T0, bound=True),
        },
        outgoing={11: OutgoingRequest(11, T0 + timedelta(seconds=2, microseconds=7))},
    )
    assert (
        encode_state(state)
        == (
            "{\n"
            '  "trusted": [\n'
            f'    {{"node_id": 7, "public_key": "{KEY_A}", "approved_at": "2026-11-25T10:00:00Z",'
            ' "mutual": true, "network": 3},\n'
            f'    {{"node_id": 9, "public_key": "{KEY_B}", "approved_at": "2026-11-25T10:00:00Z",'
            ' "mutual": false}\n'
            "  ],\n"
            '  "pending": [\n'
            f'    {{"node_id": 4, "public_key": "{KEY_A}", "justification": "say \\"hi\\" é",'
            ' "received_at": "2026-11-25T10:00:00Z", "bound": true},\n'
            '    {"node_id": 5, "received_at": "2026-11-25T10:01:00Z"}\n'
            "  ],\n"
            '  "outgoing": [\n'
            '    {"node_id": 11, "sent_at": "2026-11-25T10:00:02Z"}\n'
            "  ]\n"
            "}\n"
        ).encode()
    )


def test_encode_empty_state_writes_an_empty_trusted_list_only() -> None:
    assert encode_state(TrustState()) == b'{\n  "trusted": []\n}\n'


def test_lone_surrogates_are_replaced_so_the_file_stays_writable(trust_path: Path) -> None:
    trust_path.parent.mkdir()
    trust_path.write_bytes(
        b'{"pending": [{"node_id": 3, "justification": "a\\ud800b",'
        b' "received_at": "2026-11-25T10:00:00Z"}]}'
    )
    assert load_state(str(trust_path)).pending[3].justification == "a\ufffdb"
    written = encode_state(TrustState(trusted={1: TrustRecord(1, "x\udc00", T0)}))
    assert decode_state(written).trusted[1].public_key == "x\ufffd"


# Loading


def test_go_fixture_loads_with_every_field(tmp_path: Path) -> None:
    state = load_state(str(FIXTURE))
    assert sorted(state.trusted) == [7, 12, 4294967295]
    assert state.trusted[7] == TrustRecord(7, KEY_A, T0, mutual=True, network=3)
    assert state.trusted[12] == TrustRecord(
        12, "not base64 at all!", utc(2026, 11, 25, 10, 30, 15, 123456), mutual=False
    )
    assert state.trusted[4294967295] == TrustRecord(
        4294967295, "", utc(2026, 11, 25, 5, 29, 59, 500000)
    )
    assert state.pending == {
        9: PendingHandshake(9, "", "please let me in", utc(2026, 11, 25, 10, 1)),
        10: PendingHandshake(10, KEY_B, "", utc(2026, 11, 25, 10, 2), bound=True),
    }
    assert state.outgoing == {}


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


def test_missing_file_and_null_lists_are_empty(tmp_path: Path) -> None:
    assert load_state(str(tmp_path / "absent.json")) == TrustState()
    for text in (b"null", b"{}", b'{"trusted": null, "pending": null, "outgoing": null}'):
        (tmp_path / "t.json").write_bytes(text)
        assert load_state(str(tmp_path / "t.json")) == TrustState()


def test_missing_optional_fields_take_go_zero_values(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_bytes(
        b'{"trusted": [{"node_id": 5}], "outgoing": [{"node_id": 6, "sent_at": null}]}'
    )
    state = load_state(str(tmp_path / "t.json"))
    assert state.trusted[5] == TrustRecord(5, "", store.ZERO_TIME, False, 0)
    assert state.outgoing[6] == OutgoingRequest(6, store.ZERO_TIME)


CORRUPT = [
    (b"{not json", "Expecting"),
    (b"", "Expecting value"),
    (b"[]", "top level"),
    (b'{"trusted": "7"}', "trusted: expected a list"),
    (b'{"trusted": [7]}', "trusted[0]: expected an object"),
    (b'{"trusted": [{"node_id": "7"}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": true}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": 7.0}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": -1}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": 4294967296}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": 1, "network": 65536}]}', "trusted[0].network"),
    (b'{"trusted": [{"node_id": 1, "mutual": 1}]}', "trusted[0].mutual"),
    (b'{"trusted": [{"node_id": 1, "approved_at": "yesterday"}]}', "trusted[0].approved_at"),
    (b'{"pending": [{"node_id": 1, "justification": 5}]}', "pending[0].justification"),
    (b'{"outgoing": {"node_id": 1}}', "outgoing: expected a list"),
    (b"\xff\xfe{}", "utf-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
]


@pytest.mark.parametrize(("data", "reason"), CORRUPT)
def test_unparsable_file_raises_naming_path_and_is_never_replaced(
    trust_path: Path, data: bytes, reason: str
) -> None:
    trust_path.parent.mkdir()
    trust_path.write_bytes(data)
    with pytest.raises(StoreError) as raised:
        open_store(trust_path)
    assert str(trust_path) in str(raised.value)
    assert reason in str(raised.value)
    assert trust_path.read_bytes() == data
    # The failed open released the directory lock: a fixed file opens.
    trust_path.write_bytes(b"{}")
    opened, _ = open_store(trust_path)
    opened.close()


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
        cwd=Path(__file__).parent.parent,
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


def count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    counter = [0]
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return counter


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


# The journal


def journal_of(trust_path: Path) -> Path:
    return trust_path.with_name("trust.json.journal")


def store_with_journal(trust_path: Path) -> tuple[TrustStore, threading.RLock]:
    """An open store whose first write checkpointed and whose next three writes were appended."""
    opened, lock = open_store(trust_path)
    with lock:
        seq = opened.change(Change(TRUSTED, 1, TrustRecord(1, KEY_A, T0)))
    opened.commit(seq)  # the first write after opening rewrites trust.json
    for node in (2, 3, 4):
        with lock:
            opened.change(Change(TRUSTED, node, TrustRecord(node, KEY_B, T0, mutual=True)))
            seq = (
                opened.change(Change(TRUSTED, node - 1, None))
                if node == 3
                else opened.change(
                    Change(
                        PENDING,
                        node + 10,
                        PendingHandshake(node + 10, KEY_A, "why", T0, bound=True),
                    )
                )
            )
        opened.commit(seq)
    return opened, lock


def test_commits_after_the_first_append_to_the_journal_and_leave_trust_json_alone(
    trust_path: Path,
) -> None:
    opened, _ = store_with_journal(trust_path)
    assert sorted(decode_state(trust_path.read_bytes()).trusted) == [1]
    assert len(journal_of(trust_path).read_bytes().splitlines()) == 4  # header + 3 writes
    assert (journal_of(trust_path).stat().st_mode & 0o777) == 0o600
    assert load_state(str(trust_path)) == opened.visible == opened.working
    assert sorted(opened.visible.trusted) == [1, 3, 4]
    opened.close()


def test_journal_is_replayed_after_a_crash(trust_path: Path, tmp_path: Path) -> None:
    opened, _ = store_with_journal(trust_path)
    # The files as a crash would leave them: copied while the store is still open.
    crashed = tmp_path / "crashed" / "trust.json"
    crashed.parent.mkdir()
    shutil.copy(trust_path, crashed)
    shutil.copy(journal_of(trust_path), journal_of(crashed))
    expected = opened.visible.copy()
    opened.close()
    assert sorted(decode_state(crashed.read_bytes()).trusted) == [1]
    reopened, lock = open_store(crashed)
    assert reopened.visible == expected == load_state(str(crashed))
    with lock:
        seq = reopened.change(Change(OUTGOING, 9, OutgoingRequest(9, T0)))
    reopened.commit(
        seq
    )  # checkpoints: the journal left by the crash goes into trust.json and is emptied
    assert journal_of(crashed).read_bytes() == b""
    assert decode_state(crashed.read_bytes()) == reopened.visible
    assert reopened.visible.trusted == expected.trusted
    reopened.close()


def test_close_checkpoints_the_journal_into_a_complete_trust_json(trust_path: Path) -> None:
    opened, _ = store_with_journal(trust_path)
    state = opened.visible.copy()
    opened.close()
    assert journal_of(trust_path).read_bytes() == b""
    assert trust_path.read_bytes() == encode_state(state)
    assert (trust_path.stat().st_mode & 0o777) == 0o600
    assert leftovers(trust_path.parent) == []


@pytest.mark.parametrize(
    "tail",
    [
        b'[["trusted",9,{"node_id": 9, "public_key": "',  # cut off before its newline
        b'[["trusted",9,{"node_id": 9, "public_k\n',  # newline reached the disk, text did not
        b"\x00\x00\x00\x00\n",  # the file grew but its data never reached the disk
    ],
    ids=["no-newline", "unparsable", "zeros"],
)
def test_a_torn_last_journal_line_is_ignored_and_dropped_by_the_next_write(
    trust_path: Path, tail: bytes
) -> None:
    opened, _ = store_with_journal(trust_path)
    expected = opened.visible.copy()
    journal = journal_of(trust_path).read_bytes()
    opened.close()
    journal_of(trust_path).write_bytes(journal)  # as before the clean stop, plus a torn write
    # Put back the trust.json the journal extends.
    trust_path.write_bytes(encode_state(TrustState(trusted={1: TrustRecord(1, KEY_A, T0)})))
    with journal_of(trust_path).open("ab") as out:
        out.write(tail)
    assert load_state(str(trust_path)) == expected
    reopened, lock = open_store(trust_path)
    assert reopened.visible == expected
    with lock:
        seq = reopened.change(Change(TRUSTED, 20, TrustRecord(20, KEY_A, T0)))
    reopened.commit(seq)
    with lock:
        seq = reopened.change(Change(TRUSTED, 21, TrustRecord(21, KEY_A, T0)))
    reopened.commit(seq)  # appended after the checkpoint, not after the torn bytes
    assert load_state(str(trust_path)) == reopened.visible
    assert tail not in journal_of(trust_path).read_bytes()
    reopened.close()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{garbage\n", "line 3 does not parse: no checksum"),
        (frame(b"{garbage"), "line 3 does not parse"),
        (frame(b'[["trusted",5,{"node_id": 6}]]'), "node 6 filed under 5"),
        (frame(b'[["nobody",5,null]]'), "unknown table"),
        (frame(b'[["trusted",5,{"node_id": 5, "mutual": 1}]]'), "line 3[0].mutual"),
    ],
)
def test_a_corrupt_journal_line_before_the_last_fails_the_load_naming_the_journal(
    trust_path: Path, line: bytes, reason: str
) -> None:
    opened, _ = store_with_journal(trust_path)
    journal = journal_of(trust_path).read_bytes()
    lines = journal.splitlines(keepends=True)
    corrupt = b"".join(lines[:2]) + line + b"".join(lines[2:])
    opened.close()
    trust_path.write_bytes(encode_state(TrustState(trusted={1: TrustRecord(1, KEY_A, T0)})))
    journal_of(trust_path).write_bytes(corrupt)
    with pytest.raises(StoreError) as raised:
        open_store(trust_path)
    assert str(journal_of(trust_path)) in str(raised.value)
    assert reason in str(raised.value)
    assert journal_of(trust_path).read_bytes() == corrupt  # never replaced
    with pytest.raises(StoreError):
        load_state(str(trust_path))


def test_a_journal_for_a_replaced_trust_json_is_never_applied(trust_path: Path) -> None:
    opened, _ = store_with_journal(trust_path)
    journal = journal_of(trust_path).read_bytes()
    opened.close()
    # A checkpoint cut short after its rename, or a file put there since (Go, an operator).
    journal_of(trust_path).write_bytes(journal)
    assert load_state(str(trust_path)) == decode_state(trust_path.read_bytes())
    other = TrustState(trusted={50: TrustRecord(50, KEY_B, T0)})
    trust_path.write_bytes(encode_state(other))
    assert load_state(str(trust_path)) == other
    trust_path.unlink()  # moved aside: the journal alone is not a state
    assert load_state(str(trust_path)) == TrustState()


def test_journal_is_checkpointed_when_it_outgrows_the_threshold(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trust_store, "JOURNAL_MIN_BYTES", 4096)
    rewrites = count_calls(monkeypatch, os, "replace")
    opened, lock = open_store(trust_path)
    largest = 0
    for node in range(300):
        with lock:
            seq = opened.change(Change(TRUSTED, node, TrustRecord(node, KEY_A, T0)))
        opened.commit(seq)
        size = journal_of(trust_path).stat().st_size
        largest = max(largest, size)
        assert size <= max(4096, trust_path.stat().st_size)
    assert load_state(str(trust_path)) == opened.visible
    # 300 records of about 110 bytes: trust.json ends near 33 KB and the journal checkpoints each
    # time it passes the file's size, a handful of times in all, not once per write.
    assert 3 <= rewrites[0] <= 20
    assert largest > 4096
    opened.close()


def fail_pwrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next os.pwrite write half its data, then raise ENOSPC on the rest."""
    real = os.pwrite
    calls = [0]

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return real(fd, bytes(data[: len(data) // 2]), offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)


def test_enospc_during_an_append_rolls_back_and_cuts_the_journal_back(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened, lock = store_with_journal(trust_path)
    before = opened.visible.copy()
    journal = journal_of(trust_path).read_bytes()
    fail_pwrite(monkeypatch)
    with lock:
        seq = opened.change(Change(TRUSTED, 40, TrustRecord(40, KEY_A, T0)))
    with pytest.raises(StoreError, match=f"cannot write {trust_path}: .*No space left"):
        opened.commit(seq)
    assert journal_of(trust_path).read_bytes() == journal
    assert opened.visible == opened.working == before == load_state(str(trust_path))
    monkeypatch.undo()
    with lock:
        seq = opened.change(Change(TRUSTED, 41, TrustRecord(41, KEY_A, T0)))
    opened.commit(seq)
    assert load_state(str(trust_path)) == opened.visible
    assert 40 not in opened.visible.trusted and 41 in opened.visible.trusted
    opened.close()


def test_an_append_that_cannot_be_cut_back_falls_back_to_a_full_rewrite(
    trust_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened, lock = store_with_journal(trust_path)
    before = opened.visible.copy()
    fail_pwrite(monkeypatch)
    real_ftruncate = os.ftruncate
    failed = [False]

    def ftruncate(fd: int, length: int) -> None:
        if not failed[0]:
            failed[0] = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with lock:
        seq = opened.change(Change(TRUSTED, 40, TrustRecord(40, KEY_A, T0)))
    with pytest.raises(StoreError, match="No space left"):
        opened.commit(seq)
    assert failed[0]
    # The half-written line is gone with the journal: trust.json alone holds the state.
    assert journal_of(trust_path).read_bytes() == b""
    assert trust_path.read_bytes() == encode_state(before)
    assert opened.visible == opened.working == before == load_state(str(trust_path))
    monkeypatch.undo()
    with lock:
        seq = opened.change(Change(TRUSTED, 41, TrustRecord(41, KEY_A, T0)))
    opened.commit(seq)
    assert load_state(str(trust_path)) == opened.visible
    opened.close()


def test_close_rolls_back_changes_never_committed(trust_path: Path) -> None:
    opened, lock = store_with_journal(trust_path)
    before = opened.visible.copy()
    with lock:
        seq = opened.change(Change(TRUSTED, 60, TrustRecord(60, KEY_A, T0)))
    opened.close()
    with pytest.raises(StoreError, match="closed"):
        opened.commit(seq)
    assert opened.working == before == load_state(str(trust_path))
    assert trust_path.read_bytes() == encode_state(before)


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


# Issue 16: our requests' states and the reason a peer is trusted, as extra keys


def test_outgoing_states_and_trust_reasons_round_trip_and_old_entries_read_as_waiting() -> None:
    t0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
    state = TrustState(
        trusted={5: TrustRecord(5, "", t0, True, 0, "mutual")},
        outgoing={
            6: OutgoingRequest(6, t0),
            7: OutgoingRequest(7, t0, "relay", "rejected", "not today", t0 + timedelta(hours=1)),
        },
    )
    data = encode_state(state)
    assert b'{"node_id": 6, "sent_at": "2026-11-25T10:00:00Z"}' in data  # as before round 3
    assert b'"reason": "mutual"' in data
    assert decode_state(data) == state
    old = b'{"trusted": [{"node_id": 5}], "outgoing": [{"node_id": 6, "sent_at": null}]}'
    request = decode_state(old).outgoing[6]
    assert (request.path, request.state, request.reason, request.ended_at) == (
        "direct",
        "waiting",
        "",
        None,
    )
    assert decode_state(old).trusted[5].reason == ""


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (b'{"node_id": 6, "state": "lost"}', "outgoing[0].state: expected waiting or"),
        (b'{"node_id": 6, "path": 3}', "outgoing[0].path: expected direct or relay"),
        (b'{"node_id": 6, "ended_at": "soon"}', "outgoing[0].ended_at"),
    ],
)
def test_a_bad_outgoing_state_names_its_field(entry: bytes, error: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_state(b'{"outgoing": [' + entry + b"]}")
    assert str(info.value).startswith(error)
