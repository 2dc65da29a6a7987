"""What the trust store's tests share: the Go fixture, keys and times, a store opened on a
path, and journals written and replayed the way the store does."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from pilothandshake.store import (
    PENDING,
    TRUSTED,
    Change,
    PendingHandshake,
    TrustRecord,
    TrustState,
    TrustStore,
)
from pilothandshake.store.codec import Fragments
from pilothandshake.store.journal import (
    Journal,
    digest,
    encode_line,
    replay,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "go_trust.json"
KEY_A = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
KEY_B = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def open_store(
    path: Path, on_commit: Callable[[list[Change]], None] | None = None
) -> tuple[TrustStore, threading.RLock]:
    lock = threading.RLock()
    opened = TrustStore(str(path), lock, on_commit or (lambda changes: None))
    return opened, lock


def leftovers(directory: Path) -> list[str]:
    """Files in ``directory`` other than the trust file, its journal and its lock file."""
    expected = {"trust.json", "trust.json.journal", "trust.json.lock"}
    return sorted(name for name in os.listdir(directory) if name not in expected)


def count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    counter = [0]
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return counter


# The journal


def journal_path(trust: Path) -> Path:
    """The journal of the trust file ``trust``."""
    return trust.with_name("trust.json.journal")


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


BASE = TrustState(trusted={1: TrustRecord(1, KEY_A, T0)})
# Three writes: trust 2 and queue 3; trust 3 and drop 1; drop the pending request of 3.
WRITES = [
    [
        Change(TRUSTED, 2, TrustRecord(2, KEY_A, T0, mutual=True, network=4)),
        Change(PENDING, 3, PendingHandshake(3, KEY_A, "why", T0, bound=True, source="relay")),
    ],
    [Change(TRUSTED, 3, TrustRecord(3, KEY_A, T0)), Change(TRUSTED, 1, None)],
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
