"""The Manager's state: ``State.apply`` is its only writer (issue 17 item 1), and the side
tables it keeps beside the trust store.

The rule itself is enforced for every test of the suite by the ``only_apply_writes``
fixture (conftest.py); the first tests here show that the fixture catches each kind of
write outside ``apply``."""

from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fakeruntime import Nodes

from pilothandshake.errors import StoreError
from pilothandshake.manager.decide import Decision
from pilothandshake.manager.state import State
from pilothandshake.metrics import Metrics
from pilothandshake.store import TRUSTED, Change, TrustRecord
from pilothandshake.testing import MemoryRuntime

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
REGISTRY_KEY = b"B" * 32
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
OWN = 1


def test_a_store_write_from_anywhere_but_apply_is_caught(
    nodes: Nodes, only_apply_writes: list[str]
) -> None:
    manager, _ = nodes.make()
    state = manager._state
    with state.lock:
        state.store.change(Change(TRUSTED, 9, TrustRecord(9, KEY, T0)))
    assert len(only_apply_writes) == 1
    assert "not State.apply" in only_apply_writes[0]
    only_apply_writes.clear()


def test_a_side_table_changed_between_two_applies_is_caught(
    nodes: Nodes, only_apply_writes: list[str]
) -> None:
    manager, _ = nodes.make()
    with manager._state.lock:
        manager._state._revoked_at[9] = 0.0  # a side door, as a commit hook once was
    manager.reap()  # the next decision finds it
    assert only_apply_writes == ["side tables changed outside State.apply (before an apply)"]
    only_apply_writes.clear()


def test_the_working_state_edited_in_place_is_caught(
    nodes: Nodes, only_apply_writes: list[str]
) -> None:
    manager, _ = nodes.make()
    working = manager._state.store.working
    with manager._state.lock:
        working.trusted[9] = TrustRecord(9, KEY, T0)
    manager.reap()
    assert only_apply_writes == ["working state edited outside TrustStore.change (before an apply)"]
    with manager._state.lock:
        del working.trusted[9]
    only_apply_writes.clear()


# Conflicts with the registry: a conflict holds while its record is the node's record.


def conflicted(state: State) -> TrustRecord:
    """Node 7 trusted (durably) and then found in conflict with the registry."""
    record = TrustRecord(7, KEY, T0)
    with state.lock:
        seq = state.apply(Decision(changes=[Change(TRUSTED, 7, record)]))
        state.apply(Decision(conflicts={7: REGISTRY_KEY}))
    assert seq is not None
    state.store.commit(seq)
    return record


def test_a_conflict_noted_while_its_record_is_being_written_survives_the_write() -> None:
    state = State("", Metrics(), MemoryRuntime(OWN))
    conflicted(state)  # the conflict came before the grant's commit
    assert state.in_conflict() == [7]
    assert not state.trusted(7, OWN)


def test_a_new_record_ends_the_conflict_once_it_is_durable() -> None:
    state = State("", Metrics(), MemoryRuntime(OWN))
    record = conflicted(state)
    with state.lock:
        # Approved again with its own key: an equal record, but a new one.
        seq = state.apply(Decision(changes=[Change(TRUSTED, 7, TrustRecord(7, KEY, T0))]))
        assert state.trusts(7)  # decisions see the working state at once
        assert state.store.visible.trusted[7] is record
    assert seq is not None
    state.store.commit(seq)
    assert state.in_conflict() == [] and state.trusted(7, OWN)


def test_a_failed_write_brings_back_the_record_and_its_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = State(str(tmp_path / "trust.json"), Metrics(), MemoryRuntime(OWN))
    conflicted(state)
    with state.lock:
        seq = state.apply(Decision(changes=[Change(TRUSTED, 7, None)]))
        assert not state.trusts(7) and state.in_conflict() == [7]

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert seq is not None
    with monkeypatch.context() as patch, pytest.raises(StoreError):
        patch.setattr(os, "fsync", full)
        state.store.commit(seq)
    with state.lock:
        assert 7 in state.view().conflicts  # the record is back, in conflict still
    assert state.in_conflict() == [7] and not state.trusted(7, OWN)
    state.store.close()
