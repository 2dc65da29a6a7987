"""Recovery from trust.json.journal: ``store.journal``'s line format and ``replay``, and the
trust store's recovery through it after a crash.

The first part appends lines with ``Journal`` (the store's own writer), then cuts, damages
or pairs the file with another trust.json and replays it; the second crashes a
``TrustStore``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from storetools import (
    BASE,
    KEY_A,
    KEY_B,
    T0,
    WRITES,
    after,
    journal_path,
    line,
    open_store,
    replayed,
    store_with_journal,
    write_journal,
)

from pilothandshake.constants import MAX_NODE_ID
from pilothandshake.errors import StoreError
from pilothandshake.store import (
    OUTGOING,
    PENDING,
    TRUSTED,
    Change,
    OutgoingRequest,
    TrustRecord,
    TrustState,
    decode_state,
    encode_state,
    load_state,
)
from pilothandshake.store.journal import (
    Journal,
    decode_line,
    digest,
    frame,
    replay,
    unframe,
)


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
    other = TrustState(trusted={9: TrustRecord(9, KEY_A, T0)})
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


def test_journal_is_replayed_after_a_crash(trust_path: Path, tmp_path: Path) -> None:
    opened, _ = store_with_journal(trust_path)
    # The files as a crash would leave them: copied while the store is still open.
    crashed = tmp_path / "crashed" / "trust.json"
    crashed.parent.mkdir()
    shutil.copy(trust_path, crashed)
    shutil.copy(journal_path(trust_path), journal_path(crashed))
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
    assert journal_path(crashed).read_bytes() == b""
    assert decode_state(crashed.read_bytes()) == reopened.visible
    assert reopened.visible.trusted == expected.trusted
    reopened.close()


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
    journal = journal_path(trust_path).read_bytes()
    opened.close()
    journal_path(trust_path).write_bytes(journal)  # as before the clean stop, plus a torn write
    # Put back the trust.json the journal extends.
    trust_path.write_bytes(encode_state(TrustState(trusted={1: TrustRecord(1, KEY_A, T0)})))
    with journal_path(trust_path).open("ab") as out:
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
    assert tail not in journal_path(trust_path).read_bytes()
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
    journal = journal_path(trust_path).read_bytes()
    lines = journal.splitlines(keepends=True)
    corrupt = b"".join(lines[:2]) + line + b"".join(lines[2:])
    opened.close()
    trust_path.write_bytes(encode_state(TrustState(trusted={1: TrustRecord(1, KEY_A, T0)})))
    journal_path(trust_path).write_bytes(corrupt)
    with pytest.raises(StoreError) as raised:
        open_store(trust_path)
    assert str(journal_path(trust_path)) in str(raised.value)
    assert reason in str(raised.value)
    assert journal_path(trust_path).read_bytes() == corrupt  # never replaced
    with pytest.raises(StoreError):
        load_state(str(trust_path))


def test_a_journal_for_a_replaced_trust_json_is_never_applied(trust_path: Path) -> None:
    opened, _ = store_with_journal(trust_path)
    journal = journal_path(trust_path).read_bytes()
    opened.close()
    # A checkpoint cut short after its rename, or a file put there since (Go, an operator).
    journal_path(trust_path).write_bytes(journal)
    assert load_state(str(trust_path)) == decode_state(trust_path.read_bytes())
    other = TrustState(trusted={50: TrustRecord(50, KEY_B, T0)})
    trust_path.write_bytes(encode_state(other))
    assert load_state(str(trust_path)) == other
    trust_path.unlink()  # moved aside: the journal alone is not a state
    assert load_state(str(trust_path)) == TrustState()
