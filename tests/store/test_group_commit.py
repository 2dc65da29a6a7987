"""Group commit of the trust store: who writes, who sleeps, how often a caller is woken."""

from __future__ import annotations

import errno
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
from fakeruntime import wait_until

from pilothandshake.errors import StoreError
from pilothandshake.store import TRUSTED, Change, TrustRecord, TrustStore, load_state

KEY_A = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
DEADLINE = 10.0

_Condition = threading.Condition


class Wakeups:
    """Counts how often each thread returned from a Condition.wait of the store."""

    def __init__(self) -> None:
        self.waiting = 0  # threads asleep right now
        self.per_thread: dict[str, int] = {}
        self._mutex = threading.Lock()

    def condition_class(self) -> type[threading.Condition]:
        counts = self

        class Counting(_Condition):
            def wait(self, timeout: float | None = None) -> bool:
                with counts._mutex:
                    counts.waiting += 1
                try:
                    return super().wait(timeout)
                finally:
                    name = threading.current_thread().name
                    with counts._mutex:
                        counts.waiting -= 1
                        counts.per_thread[name] = counts.per_thread.get(name, 0) + 1

        return Counting

    def total(self) -> int:
        return sum(self.per_thread.values())


def open_counted(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[TrustStore, threading.RLock, Wakeups]:
    """A store whose conditions count wake-ups, after its first write (a checkpoint)."""
    wakeups = Wakeups()
    lock = threading.RLock()
    with monkeypatch.context() as patch:
        patch.setattr(threading, "Condition", wakeups.condition_class())
        store = TrustStore(str(path), lock, lambda changes: None)
    commit(store, lock, 1)
    return store, lock, wakeups


def commit(store: TrustStore, lock: threading.RLock, node: int) -> None:
    with lock:
        seq = store.change(Change(TRUSTED, node, TrustRecord(node, KEY_A, T0)))
    store.commit(seq)


class HeldFsync:
    """Makes the next os.fsync block until released (then succeed, or fail with ENOSPC)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = False
        self.calls = 0
        real = os.fsync

        def fsync(fd: int) -> None:
            self.calls += 1
            if not self.entered.is_set():
                self.entered.set()
                assert self.release.wait(DEADLINE)
                if self.fail:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def run(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name)
    thread.start()
    return thread


def leader_and_followers(
    store: TrustStore,
    lock: threading.RLock,
    held: HeldFsync,
    wakeups: Wakeups,
    followers: tuple[int, ...],
) -> dict[int, str]:
    """Node 10's commit leads a write held in fsync while ``followers`` commit behind it and
    fall asleep; then the write goes on. Returns each node's outcome ("ok" or the error)."""
    outcomes: dict[int, str] = {}

    def commit_one(node: int) -> None:
        try:
            commit(store, lock, node)
            outcomes[node] = "ok"
        except StoreError as exc:
            outcomes[node] = str(exc)

    leader = run(commit_one, 10, name="leader")
    assert held.entered.wait(DEADLINE)
    threads = [run(commit_one, node, name=f"follower-{node}") for node in followers]
    wait_until(lambda: wakeups.waiting == len(followers), DEADLINE, "the followers sleep")
    held.release.set()
    for thread in [leader, *threads]:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    return outcomes


def test_an_uncontended_commit_writes_itself_and_never_sleeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, lock, wakeups = open_counted(tmp_path / "trust.json", monkeypatch)
    for node in range(2, 22):
        commit(store, lock, node)
    assert wakeups.total() == 0
    assert len(load_state(store.path).trusted) == 21
    store.close()


def test_callers_behind_a_write_are_woken_once_and_share_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, lock, wakeups = open_counted(tmp_path / "trust.json", monkeypatch)
    held = HeldFsync(monkeypatch)
    outcomes = leader_and_followers(store, lock, held, wakeups, (11, 12, 13))
    assert outcomes == {10: "ok", 11: "ok", 12: "ok", 13: "ok"}
    # The leader wrote without sleeping; one follower wrote all three later changes in one
    # append (one fsync); each follower was woken exactly once (the old code woke every
    # sleeper at the end of each write, so two of them were woken twice).
    assert held.calls == 2
    assert wakeups.per_thread == {f"follower-{node}": 1 for node in (11, 12, 13)}
    assert set(load_state(store.path).trusted) == {1, 10, 11, 12, 13}
    store.close()


def test_a_failed_write_fails_every_caller_since_the_last_successful_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, lock, wakeups = open_counted(tmp_path / "trust.json", monkeypatch)
    held = HeldFsync(monkeypatch)
    held.fail = True
    outcomes = leader_and_followers(store, lock, held, wakeups, (11, 12))
    # The followers' changes came after the failed write's snapshot, but since the last
    # successful write: rolled back and failed with the same error, never written.
    assert set(outcomes) == {10, 11, 12}
    assert all("No space left on device" in error for error in outcomes.values())
    assert set(store.visible.trusted) == set(store.working.trusted) == {1}
    assert set(load_state(store.path).trusted) == {1}  # the failed line was cut back
    commit(store, lock, 20)  # the next write succeeds
    assert set(load_state(store.path).trusted) == {1, 20}
    store.close()


def test_under_contention_no_commit_is_woken_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, lock, wakeups = open_counted(tmp_path / "trust.json", monkeypatch)
    threads, per_thread = 8, 40
    errors: list[BaseException] = []
    most = [0]

    def work(index: int) -> None:
        name = threading.current_thread().name
        try:
            for step in range(per_thread):
                before = wakeups.per_thread.get(name, 0)
                commit(store, lock, 1000 * (index + 1) + step)
                most[0] = max(most[0], wakeups.per_thread.get(name, 0) - before)
        except BaseException as exc:
            errors.append(exc)

    workers = [run(work, index, name=f"worker-{index}") for index in range(threads)]
    for worker in workers:
        worker.join(30)
        assert not worker.is_alive()
    assert errors == []
    assert most[0] <= 1
    assert wakeups.total() <= threads * per_thread
    assert len(load_state(store.path).trusted) == 1 + threads * per_thread
    store.close()
