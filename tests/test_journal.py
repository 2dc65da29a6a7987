"""Recovery from trust.json.journal, driven through pilothandshake.store.journal on files.

No threads and no TrustStore: lines are appended with ``Journal`` (the store's own writer),
then the file is cut, damaged or paired with another trust.json and replayed.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest

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
from pilothandshake.store.journal import Journal, decode_line, digest, encode_line, replay

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
    "garbage",
    [
        b"not json",
        b'{"trusted": []}',
        b'[["nowhere", 5, null]]',
        b'[["trusted", 5, {"node_id": 6}]]',
        b'[["trusted", true, null]]',
        b'[["pending", 5, {"node_id": 5, "received_at": "yesterday"}]]',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_a_damaged_line_before_the_last_fails_the_load_naming_journal_and_line(
    trust: Path, garbage: bytes
) -> None:
    data = write_journal(trust, WRITES)
    lines = data.split(b"\n")
    lines[2] = garbage  # the second write
    journal_path(trust).write_bytes(b"\n".join(lines))
    with pytest.raises(StoreError, match=r"trust journal .*trust\.json\.journal .*line 3"):
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
        assert decode_line(json.loads(line(changes)), "line 2") == changes


def test_a_damaged_line_followed_by_a_torn_write_is_damage_not_a_torn_write(trust: Path) -> None:
    data = write_journal(trust, WRITES[:1])
    journal_path(trust).write_bytes(data + b"not json\n" + line(WRITES[1])[:10])
    with pytest.raises(StoreError, match="line 3 does not parse"):
        replayed(trust)
