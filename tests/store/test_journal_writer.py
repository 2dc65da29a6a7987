"""``store.journal.Journal``, the journal's writer: modes, append, cut-back, empty and close
on real files; and the trust store's appends and checkpoints through it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from storetools import (
    KEY_A,
    T0,
    WRITES,
    after,
    count_calls,
    journal_path,
    leftovers,
    line,
    open_store,
    replayed,
    store_with_journal,
    write_journal,
)

from pilothandshake.errors import StoreError
from pilothandshake.store import (
    TRUSTED,
    Change,
    TrustRecord,
    decode_state,
    encode_state,
    load_state,
    trust_store,
)
from pilothandshake.store.journal import (
    Journal,
    digest,
)

# The writer: Journal on the file


def ready(trust: Path) -> Journal:
    """The journal of ``trust`` right after a checkpoint of it: empty and appendable."""
    journal = Journal(str(journal_path(trust)), 0, None)
    journal.rebase(digest(trust.read_bytes()))
    journal.empty()
    assert journal.appendable
    return journal


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_open_creates_the_journal_with_mode_0600(trust: Path) -> None:
    journal = Journal(str(journal_path(trust)), 0, None)
    journal.open()
    journal.close()
    assert journal_path(trust).read_bytes() == b""
    assert mode(journal_path(trust)) == 0o600


@pytest.mark.parametrize("copied", [0o644, 0o640, 0o601])
def test_open_makes_a_journal_copied_in_with_another_mode_0600(trust: Path, copied: int) -> None:
    data = write_journal(trust, WRITES)
    journal_path(trust).chmod(copied)  # an operator copied it in with another mode
    journal = Journal(str(journal_path(trust)), len(data), digest(trust.read_bytes()))
    journal.open()
    journal.close()
    assert mode(journal_path(trust)) == 0o600
    assert journal_path(trust).read_bytes() == data


def test_open_closes_the_descriptor_and_raises_when_the_journal_cannot_be_made_private(
    trust: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_path(trust).write_bytes(b"")
    journal_path(trust).chmod(0o644)
    tried = []

    def fchmod(fd: int, mode: int) -> None:
        tried.append(fd)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "fchmod", fchmod)
    journal = Journal(str(journal_path(trust)), 0, None)
    with pytest.raises(OSError, match="not permitted"):
        journal.open()
    assert len(tried) == 1
    with pytest.raises(OSError) as closed:  # no descriptor leaked
        os.fstat(tried[0])
    assert closed.value.errno == errno.EBADF


def test_open_refuses_a_planted_symlink_naming_the_journal(trust: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    journal_path(trust).symlink_to(victim)
    journal = ready(trust)  # emptying an absent (size 0) journal opens nothing
    with pytest.raises(OSError, match="symbolic link") as raised:
        journal.append(line(WRITES[0]))
    assert str(journal_path(trust)) in str(raised.value)
    assert victim.read_bytes() == b"someone else's file"


def test_a_journal_loaded_empty_appends_under_the_trust_json_it_was_given(trust: Path) -> None:
    journal = Journal(str(journal_path(trust)), 0, digest(trust.read_bytes()))
    journal.empty()
    journal.append(line(WRITES[0]))
    journal.close()
    assert replayed(trust) == after(1)


@pytest.mark.parametrize("rebased", [False, True])
def test_append_refuses_a_journal_until_it_is_emptied(trust: Path, rebased: bool) -> None:
    # What loading found (perhaps torn), or a journal whose header names the trust.json a
    # checkpoint just replaced: a line appended to it would be lost or misapplied.
    data = write_journal(trust, WRITES[:1])
    journal = Journal(str(journal_path(trust)), len(data), digest(trust.read_bytes()))
    if rebased:
        journal.rebase(digest(b"{}"))
    with pytest.raises(RuntimeError, match="not appendable"):
        journal.append(line(WRITES[1]))
    journal.close()
    assert journal_path(trust).read_bytes() == data


def test_append_fsyncs_the_whole_line_before_it_returns(
    trust: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = ready(trust)
    real = os.fsync
    synced = []

    def fsync(fd: int) -> None:
        real(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    for count, changes in enumerate(WRITES, 1):
        journal.append(line(changes))
        assert synced[-1] == journal.size == journal_path(trust).stat().st_size, f"write {count}"
    journal.close()
    assert replayed(trust) == after(3)


def test_append_finishes_a_line_the_kernel_wrote_in_pieces(
    trust: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = ready(trust)
    journal.append(line(WRITES[0]))
    real = os.pwrite
    calls = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append(len(data))
        if len(calls) > 100:  # a writer that never finishes fails instead of hanging
            raise OSError(errno.EIO, "pwrite called again and again")
        return real(fd, bytes(data[:7]), offset)  # a short write, as on a full pipe or NFS

    monkeypatch.setattr(os, "pwrite", pwrite)
    journal.append(line(WRITES[1]))
    journal.append(line(WRITES[2]))
    journal.close()
    assert len(calls) > 2
    assert replayed(trust) == after(3)


def failing_once(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> list[OSError]:
    """Make the next ``os.<name>`` fail with ``code`` (after the real call, for fsync: the
    kernel may have written and still report an error). Returns the raised error, once raised."""
    real = getattr(os, name)
    raised: list[OSError] = []

    def fail(*args: Any) -> Any:
        if raised:
            return real(*args)
        raised.append(OSError(code, os.strerror(code)))
        if name == "fsync":
            real(*args)
        raise raised[0]

    monkeypatch.setattr(os, name, fail)
    return raised


@pytest.mark.parametrize("failing", ["pwrite", "fsync"])
def test_a_failed_append_cuts_the_journal_back_and_stays_appendable(
    trust: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    journal = ready(trust)
    journal.append(line(WRITES[0]))
    before = journal_path(trust).read_bytes()
    raised = failing_once(monkeypatch, failing, errno.ENOSPC)
    with pytest.raises(OSError) as append:
        journal.append(line(WRITES[1]))
    assert append.value is raised[0]
    assert journal_path(trust).read_bytes() == before
    assert journal.size == len(before) and journal.appendable
    journal.append(line(WRITES[2]))
    journal.close()
    expected = after(1)
    for change in WRITES[2]:
        expected.apply(change)
    assert replayed(trust) == expected  # the failed line left nothing behind


def test_an_append_that_cannot_be_cut_back_forgets_the_size_and_logs_the_journal(
    trust: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    journal = ready(trust)
    journal.append(line(WRITES[0]))
    written = failing_once(monkeypatch, "fsync", errno.EIO)
    cut = failing_once(monkeypatch, "ftruncate", errno.EIO)
    with pytest.raises(OSError) as append:
        journal.append(line(WRITES[1]))
    assert append.value is written[0]  # the caller hears why the write failed
    path = journal_path(trust)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot cut {path} back after a failed write: {cut[0]}"
    ]
    # The file may hold part of the line: nothing more is appended until a checkpoint.
    assert journal.size is None and not journal.appendable
    journal.rebase(digest(trust.read_bytes()))
    journal.empty()
    assert path.read_bytes() == b"" and journal.appendable


@pytest.mark.parametrize("torn", [False, True])
def test_empty_truncates_whatever_the_journal_held(trust: Path, torn: bool) -> None:
    data = write_journal(trust, WRITES)
    if torn:
        data = data[:1]  # a crash left one byte of a header
        journal_path(trust).write_bytes(data)
    journal = Journal(str(journal_path(trust)), len(data), digest(trust.read_bytes()))
    journal.rebase(digest(trust.read_bytes()))
    journal.empty()
    journal.close()
    assert journal_path(trust).read_bytes() == b""
    assert journal.size == 0 and journal.appendable


def test_a_journal_that_cannot_be_emptied_is_logged_and_left_to_the_next_checkpoint(
    trust: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_journal(trust, WRITES)
    journal = Journal(str(journal_path(trust)), len(data), digest(trust.read_bytes()))
    journal.rebase(digest(b"{}"))  # a checkpoint replaced trust.json
    cut = failing_once(monkeypatch, "ftruncate", errno.EIO)
    journal.empty()  # trust.json is complete: a checkpoint does not fail for this
    journal.close()
    path = journal_path(trust)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot empty {path} after a checkpoint: {cut[0]}"
    ]
    assert journal.size is None and not journal.appendable
    assert path.read_bytes() == data


def test_close_closes_the_descriptor_once_and_never_raises(
    trust: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = ready(trust)
    journal.append(line(WRITES[0]))
    real = os.close
    closed = []

    def close(fd: int) -> None:
        closed.append(fd)
        real(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # as NFS reports a lost write

    monkeypatch.setattr(os, "close", close)
    journal.close()
    # Closing again must not close whatever file has since been given that number.
    journal.close()
    assert len(closed) == 1
    with pytest.raises(OSError) as gone:
        os.fstat(closed[0])
    assert gone.value.errno == errno.EBADF
    monkeypatch.undo()
    journal.append(line(WRITES[1]))  # reopens
    journal.close()
    assert replayed(trust) == after(2)


def test_commits_after_the_first_append_to_the_journal_and_leave_trust_json_alone(
    trust_path: Path,
) -> None:
    opened, _ = store_with_journal(trust_path)
    assert sorted(decode_state(trust_path.read_bytes()).trusted) == [1]
    assert len(journal_path(trust_path).read_bytes().splitlines()) == 4  # header + 3 writes
    assert (journal_path(trust_path).stat().st_mode & 0o777) == 0o600
    assert load_state(str(trust_path)) == opened.visible == opened.working
    assert sorted(opened.visible.trusted) == [1, 3, 4]
    opened.close()


def test_close_checkpoints_the_journal_into_a_complete_trust_json(trust_path: Path) -> None:
    opened, _ = store_with_journal(trust_path)
    state = opened.visible.copy()
    opened.close()
    assert journal_path(trust_path).read_bytes() == b""
    assert trust_path.read_bytes() == encode_state(state)
    assert (trust_path.stat().st_mode & 0o777) == 0o600
    assert leftovers(trust_path.parent) == []


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
        size = journal_path(trust_path).stat().st_size
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
    journal = journal_path(trust_path).read_bytes()
    fail_pwrite(monkeypatch)
    with lock:
        seq = opened.change(Change(TRUSTED, 40, TrustRecord(40, KEY_A, T0)))
    with pytest.raises(StoreError, match=f"cannot write {trust_path}: .*No space left"):
        opened.commit(seq)
    assert journal_path(trust_path).read_bytes() == journal
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
    assert journal_path(trust_path).read_bytes() == b""
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
