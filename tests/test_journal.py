"""Recovery from trust.json.journal, driven through pilothandshake.store.journal on files.

No threads and no TrustStore: lines are appended with ``Journal`` (the store's own writer),
then the file is cut, damaged or paired with another trust.json and replayed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pilothandshake.constants import MAX_NODE_ID
from pilothandshake.errors import StoreError
from pilothandshake.store import (
    PENDING,
    TRUSTED,
    Change,
    PendingHandshake,
    TrustRecord,
    TrustState,
    encode_state,
    load_state,
)
from pilothandshake.store.codec import Fragments
from pilothandshake.store.journal import (
    Journal,
    decode_line,
    digest,
    encode_line,
    frame,
    replay,
    unframe,
)

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
BASE = TrustState(trusted={1: TrustRecord(1, KEY, T0)})
# Three writes: trust 2 and queue 3; trust 3 and drop 1; drop the pending request of 3.
WRITES = [
    [
        Change(TRUSTED, 2, TrustRecord(2, KEY, T0, mutual=True, network=4)),
        Change(PENDING, 3, PendingHandshake(3, KEY, "why", T0, bound=True, source="relay")),
    ],
    [Change(TRUSTED, 3, TrustRecord(3, KEY, T0)), Change(TRUSTED, 1, None)],
    [Change(PENDING, 3, None)],
]


def line(changes: list[Change]) -> bytes:
    """The journal line the store writes for ``changes`` (record text from its fragments)."""
    fragments = {name: Fragments(name, {}) for name in (TRUSTED, PENDING)}
    return encode_line(
        (change, fragments[change.table].update(change.node_id, change.value)) for change in changes
    )


def after(count: int) -> TrustState:
    """BASE with the first ``count`` writes applied."""
    state = BASE.copy()
    for changes in WRITES[:count]:
        for change in changes:
            state.apply(change)
    return state


@pytest.fixture
def trust(tmp_path: Path) -> Path:
    """trust.json holding BASE; its journal (not yet created) is trust.json.journal."""
    path = tmp_path / "trust.json"
    path.write_bytes(encode_state(BASE))
    return path


def journal_path(trust: Path) -> Path:
    return trust.with_name("trust.json.journal")


def write_journal(trust: Path, writes: list[list[Change]]) -> bytes:
    """Append ``writes`` as a checkpointed store would; returns the journal's bytes."""
    journal = Journal(str(journal_path(trust)), 0, None)
    journal.rebase(digest(trust.read_bytes()))  # what a checkpoint of trust.json does
    journal.empty()
    try:
        for changes in writes:
            journal.append(line(changes))
    finally:
        journal.close()
    data = journal_path(trust).read_bytes()
    assert journal.size == len(data)
    return data


def replayed(trust: Path) -> TrustState:
    state = BASE.copy()
    size = replay(str(journal_path(trust)), digest(trust.read_bytes()), state)
    assert size == journal_path(trust).stat().st_size
    return state


def test_every_appended_line_is_replayed_in_order(trust: Path) -> None:
    data = write_journal(trust, WRITES)
    assert data.count(b"\n") == 1 + len(WRITES)  # the header, then one line a write
    assert replayed(trust) == after(3)
    assert load_state(str(trust)) == after(3)


def test_a_torn_last_line_is_ignored_at_every_truncation_point(
    trust: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_journal(trust, WRITES)
    last = data.rindex(b"\n", 0, len(data) - 1) + 1  # where the last line starts
    for cut in range(last, len(data)):
        journal_path(trust).write_bytes(data[:cut])
        # Up to and including the line without its newline: the write never committed.
        assert replayed(trust) == after(2), f"cut at byte {cut} of {len(data)}"
    journal_path(trust).write_bytes(data)
    assert replayed(trust) == after(3)  # the newline is the commit point
    assert "unfinished write" in caplog.text


def test_a_torn_header_leaves_trust_json_as_it_is(trust: Path) -> None:
    data = write_journal(trust, WRITES[:1])
    for cut in range(data.index(b"\n") + 1):
        journal_path(trust).write_bytes(data[:cut])
        assert replayed(trust) == BASE


def test_a_newline_terminated_last_line_that_does_not_parse_is_an_unfinished_write(
    trust: Path,
) -> None:
    data = write_journal(trust, WRITES[:2])
    journal_path(trust).write_bytes(data + b"\0\0\0\n")
    assert replayed(trust) == after(2)


@pytest.mark.parametrize(
    ("garbage", "why"),
    [
        # Damage the checksum catches: bytes that are no line, or a line changed on disk
        # that still parses as JSON (a flipped digit in a node ID).
        (b"not json", "line 3 does not parse: no checksum"),
        (b"zzzzzzzz [[]]", "line 3 does not parse: no checksum"),
        (b"00000000 [[]]", r"line 3 does not parse: checksum mismatch"),
        (line(WRITES[1])[:-1].replace(b'"trusted",3,', b'"trusted",4,'), "checksum mismatch"),
        # Lines whose checksum is right but whose content is not a write.
        (frame(b"not json")[:-1], "line 3 does not parse: Expecting value"),
        (frame(b"\xff\xfe[]")[:-1], "line 3 does not parse: 'utf-8' codec can't decode"),
        # Deeper than json parses on any Python (3.13's parses 5,000 levels; 3.9-3.12's not).
        (frame(b"[" * 100_000 + b"]" * 100_000)[:-1], "line 3 does not parse: nested too deeply"),
        (frame(b'{"trusted": []}')[:-1], "line 3: expected a list of changes"),
        (frame(b'[["nowhere", 5, null]]')[:-1], r'line 3\[0\]: unknown table "nowhere"'),
        (frame(b'[["trusted", 5, {"node_id": 6}]]')[:-1], "record of node 6 filed under 5"),
        (frame(b'[["trusted", true, null]]')[:-1], "expected a node ID, got true"),
        (
            frame(b'[["pending", 5, {"node_id": 5, "received_at": "yesterday"}]]')[:-1],
            r"line 3\[0\].received_at: not an RFC 3339 time",
        ),
    ],
)
def test_a_damaged_line_before_the_last_fails_the_load_naming_journal_line_and_cause(
    trust: Path, garbage: bytes, why: str
) -> None:
    data = write_journal(trust, WRITES)
    lines = data.split(b"\n")
    lines[2] = garbage  # the second write
    journal_path(trust).write_bytes(b"\n".join(lines))
    with pytest.raises(StoreError, match=r"trust journal .*trust\.json\.journal .*" + why):
        replayed(trust)
    with pytest.raises(StoreError, match=r"trust\.json\.journal"):
        load_state(str(trust))


def test_a_first_line_that_is_not_a_header_fails_the_load(trust: Path) -> None:
    journal_path(trust).write_bytes(line(WRITES[0]) + line(WRITES[1]))
    with pytest.raises(StoreError, match="line 1 is not a journal header"):
        replayed(trust)


def test_a_journal_is_never_replayed_onto_a_replaced_trust_json(
    trust: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_journal(trust, WRITES)
    # An operator (or a Go daemon) puts another trust.json in place: the journal extends
    # the old one, so none of its lines may be applied to this one.
    other = TrustState(trusted={9: TrustRecord(9, KEY, T0)})
    trust.write_bytes(encode_state(other))
    assert load_state(str(trust)) == other
    assert "has since been replaced" in caplog.text
    # Nor onto no trust.json at all.
    trust.unlink()
    assert load_state(str(trust)) == TrustState()


def test_a_checkpoint_cut_short_before_emptying_the_journal_loads_the_new_file_alone(
    trust: Path,
) -> None:
    write_journal(trust, WRITES)
    # The checkpoint renamed the complete state over trust.json, then the process died.
    trust.write_bytes(encode_state(after(3)))
    assert load_state(str(trust)) == after(3)


def test_an_empty_or_missing_journal_changes_nothing(trust: Path) -> None:
    state = BASE.copy()
    assert replay(str(journal_path(trust)), digest(trust.read_bytes()), state) == 0
    journal_path(trust).write_bytes(b"")
    assert replay(str(journal_path(trust)), digest(trust.read_bytes()), state) == 0
    assert state == BASE


def test_replaying_twice_changes_nothing_more(trust: Path) -> None:
    write_journal(trust, WRITES)
    once = replayed(trust)
    twice = once.copy()
    replay(str(journal_path(trust)), digest(trust.read_bytes()), twice)
    assert twice == once == after(3)


def test_emptying_after_a_checkpoint_starts_a_journal_for_the_new_file(
    trust: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_journal(trust, WRITES[:2])
    trust.write_bytes(encode_state(after(2)))  # the checkpoint's rename
    journal = Journal(str(journal_path(trust)), journal_path(trust).stat().st_size, None)
    assert not journal.appendable  # what a crash left is never appended to
    journal.rebase(digest(trust.read_bytes()))
    assert not journal.appendable  # until the old lines are gone
    journal.empty()
    journal.append(line(WRITES[2]))
    journal.close()
    with caplog.at_level(logging.WARNING):
        assert load_state(str(trust)) == after(3)
    assert caplog.text == ""


def test_decode_line_reads_back_what_encode_line_wrote() -> None:
    for changes in WRITES:
        assert decode_line(json.loads(unframe(line(changes)[:-1])), "line 2") == changes


def test_a_damaged_line_followed_by_a_torn_write_is_damage_not_a_torn_write(trust: Path) -> None:
    data = write_journal(trust, WRITES[:1])
    journal_path(trust).write_bytes(data + frame(b"not json") + line(WRITES[1])[:10])
    with pytest.raises(StoreError, match="line 3 does not parse"):
        replayed(trust)


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ([5], "expected [table, node_id, record or null]"),
        ([["trusted", 5]], "expected [table, node_id, record or null]"),
        ([[5, 5, None]], "expected [table, node_id, record or null]"),
        ([["nowhere", 5, None]], 'unknown table "nowhere"'),
        ([["trusted", -1, None]], "expected a node ID, got -1"),
        ([["trusted", MAX_NODE_ID + 1, None]], f"expected a node ID, got {MAX_NODE_ID + 1}"),
        ([["trusted", True, None]], "expected a node ID, got true"),
        ([["trusted", 5, [1, 2]]], "expected a record, got [1, 2]"),
        # A hostile line is quoted in the error by its first 40 characters of JSON at most.
        ([["x" * 100, 5, None]], 'unknown table "' + "x" * 39),
        ([["trusted", "9" * 100, None]], 'expected a node ID, got "' + "9" * 39),
        ([["trusted", 5, "y" * 100]], 'expected a record, got "' + "y" * 39),
    ],
)
def test_decode_line_names_the_bad_change_and_quotes_at_most_40_characters_of_it(
    doc: list[Any], why: str
) -> None:
    with pytest.raises(ValueError) as raised:
        decode_line(doc, "line 7")
    assert str(raised.value) == f"line 7[0]: {why}"


def test_decode_line_takes_every_node_id_from_0_to_the_maximum() -> None:
    doc = [[TRUSTED, 0, None], [PENDING, MAX_NODE_ID, None]]
    assert decode_line(doc, "line 2") == [
        Change(TRUSTED, 0, None),
        Change(PENDING, MAX_NODE_ID, None),
    ]


@pytest.mark.parametrize(
    ("tail", "replaced", "message"),
    [
        (b'[["tru', False, "ignoring 6 bytes of an unfinished write at the end of {path}"),
        (b"\0\n", False, "ignoring the unfinished last line 4 of {path}"),
        (b"", True, "ignoring {path}: it extends a trust.json that has since been replaced"),
    ],
)
def test_what_replay_ignores_is_logged_naming_the_journal(
    trust: Path, caplog: pytest.LogCaptureFixture, tail: bytes, replaced: bool, message: str
) -> None:
    data = write_journal(trust, WRITES[:2])  # the header, then lines 2 and 3
    path = journal_path(trust)
    path.write_bytes(data + tail)
    if replaced:
        trust.write_bytes(encode_state(after(2)))
    replay(str(path), digest(trust.read_bytes()), BASE.copy())
    logged = [r.getMessage() for r in caplog.records if r.name == "pilothandshake.store.journal"]
    assert logged == [message.format(path=path)]


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


def test_a_version_1_journal_without_checksums_is_still_replayed(trust: Path) -> None:
    # What round 2 wrote: the same lines, no checksum, header version 1.
    head = json.dumps({"journal": 1, "base": digest(trust.read_bytes())}).encode() + b"\n"
    body = b"".join(unframe(line(changes)[:-1]) + b"\n" for changes in WRITES)
    journal_path(trust).write_bytes(head + body)
    assert replayed(trust) == after(3)


def test_every_line_written_now_carries_a_checksum_of_its_json(trust: Path) -> None:
    data = write_journal(trust, WRITES)
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 1 + len(WRITES)
    for written in lines:
        json.loads(unframe(written))  # raises unless the checksum matches
    assert json.loads(unframe(lines[0])) == {"journal": 2, "base": digest(trust.read_bytes())}


def test_a_damaged_header_fails_the_load_instead_of_dropping_the_journal(trust: Path) -> None:
    # A changed digit in the base digest still parses; without the checksum the journal
    # would be taken for one of another trust.json and its committed writes ignored.
    data = write_journal(trust, WRITES)
    head, rest = data.split(b"\n", 1)
    digit = head.index(b'"base": "') + len(b'"base": "')
    damaged = head[:digit] + (b"0" if head[digit : digit + 1] != b"0" else b"1") + head[digit + 1 :]
    journal_path(trust).write_bytes(damaged + b"\n" + rest)
    with pytest.raises(StoreError, match="line 1 does not parse: checksum mismatch"):
        replayed(trust)
