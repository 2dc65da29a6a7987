"""The trust store: working and visible state, group commit, checkpoints (SPEC 10, 16).

Two copies of the state live in memory: ``working``, which decisions read and mutate under
the Manager's lock, and ``visible``, which holds only changes that are on disk. Every change
gets a sequence number; ``commit(seq)`` returns once that change is durable and visible.

Group commit: a caller that finds no write in flight (or promised) writes itself, at once,
every change made so far: no hand-off, no wake-up. Callers that arrive during a write sleep
on one of two conditions: ``_current`` when their change is in the write in flight (all are
woken when it ends, and return), ``_next`` when it came later. When a write ends with callers
on ``_next``, the next write is promised to one of them (``_claimed``), which alone is woken
to write every change made by then, those of the others included; a caller arriving in
between joins that write instead of racing it. So a commit that waits is woken once.

A write is one of two things, and each has one commit point:

- **Append**: the changes, as one line, go to trust.json.journal (``journal.py``). A change
  is committed when the ``fsync`` of a journal line that holds it *and ends in a newline*
  returns. A line without its newline is never replayed.
- **Checkpoint**: the whole state goes to trust.json: a temporary file in the same directory,
  fsync, rename over trust.json, fsync of the directory. A change is committed when the
  directory fsync after that rename returns. The journal is then emptied; until it is, its
  header names the replaced file, so loading never applies it.

The writer checkpoints instead of appending on the first write after opening (which drops
whatever a crash left in the journal and gives trust.json mode 0600), whenever the journal
would grow past ``max(JOURNAL_MIN_BYTES, JOURNAL_RATIO * size of trust.json)``, and after an
append that failed and could not be cut back. ``close`` checkpoints too, so after a clean stop
trust.json alone is current (Go reads only trust.json).

A failed write rolls back every change since the last successful write and fails all their
callers; if it had already reached the disk (past the rename, or a journal line it could not
cut back), the rolled-back state is checkpointed so the disk does not keep changes whose
callers were told they failed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable, NamedTuple

import filelock

from .. import fsutil
from ..errors import StoreError
from ..metrics import Metrics
from .codec import Fragments, decode_state, document
from .journal import JOURNAL_SUFFIX, Journal, digest, encode_line, replay
from .records import TABLES, Change, TrustState

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# Checkpoint when the journal would pass max(JOURNAL_MIN_BYTES, JOURNAL_RATIO * trust.json's
# size): a rewrite then costs about as much as the appends it saves replaying, and a startup
# replays at most about one file's worth of records.
JOURNAL_MIN_BYTES = 256 * 1024
JOURNAL_RATIO = 1.0


class _Loaded(NamedTuple):
    state: TrustState
    digest: str | None  # SHA-256 of trust.json's bytes, None when it is missing
    size: int  # bytes in trust.json
    journal: int  # bytes in the journal file


def _load(path: str) -> _Loaded:
    try:
        data: bytes | None = fsutil.read_file(path)
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}", path=path) from exc
    state = TrustState()
    if data is not None:
        try:
            state = decode_state(data)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise StoreError(f"trust file {path} does not parse: {reason}", path=path) from exc
    base = None if data is None else digest(data)
    journal = replay(path + JOURNAL_SUFFIX, base, state)
    return _Loaded(state, base, 0 if data is None else len(data), journal)


def load_state(path: str) -> TrustState:
    """Read trust.json at ``path`` and replay its journal: what a store opening ``path`` reads.

    A missing file is an empty state; a file or journal that cannot be read or does not parse
    raises ``StoreError`` naming the file and the error.
    """
    return _load(path).state


def corrupt_files(path: str) -> list[str]:
    """Which of trust.json at ``path`` and its journal exist but do not parse (the daemon's
    ``--move-corrupt-aside``); a file that cannot be read is not called corrupt."""
    try:
        _load(path)
    except StoreError as exc:
        return [] if isinstance(exc.__cause__, OSError) else [exc.path]
    return []


class TrustStore:
    """trust.json and its journal with group commit, holding trust.json.lock (SPEC 10).

    The lock is taken once, at open, and released at close: it keeps any other process
    (a second daemon, a tool) from writing trust.json, and so is also the "one daemon per
    identity directory" lock. Writes never wait for it.

    ``path`` "" keeps everything in memory: ``commit`` makes changes visible at once.
    ``change`` is called holding ``lock`` (the Manager's); ``commit`` without it.
    ``on_commit(changes)`` runs under ``lock`` after each successful write with the changes
    it made durable, in order. Each write is timed and counted into ``metrics``.
    """

    def __init__(
        self,
        path: str,
        lock: threading.RLock,
        on_commit: Callable[[list[Change]], None],
        metrics: Metrics | None = None,
    ) -> None:
        """Open the store: create the directory, take trust.json.lock, load ``path`` and its
        journal.

        Writes nothing. Raises ``StoreError`` when the directory is in use or a file does not
        parse.
        """
        self.path = path
        self._lock = lock
        # Waiters whose change is in the write in flight, and those whose change came later.
        self._current = threading.Condition(lock)
        self._next = threading.Condition(lock)
        self._on_commit = on_commit
        self._metrics = metrics if metrics is not None else Metrics()
        self._directory = os.path.dirname(path) or "."
        # Held from open to close; None in memory (and once closed). One object, taken by
        # one thread: filelock gives no exclusion between threads sharing an object.
        self._file_lock: filelock.FileLock | None = None
        self._closed = False
        self._seq = 0  # the last sequence number handed out
        self._resolved = 0  # every change up to this one was written or rolled back
        self._upto = 0  # the last change the write in flight carries
        self._failures: list[tuple[int, int, str]] = []  # (first, last, error) rolled back
        # Changes not yet written, each with its record's JSON text for the journal.
        self._log: deque[tuple[int, Change, str]] = deque()
        self._writing = False
        # The next write is promised to a caller woken from _next (and it is not yet running).
        self._claimed = False
        self._queued = 0  # callers asleep on _next (reset when a write takes them on)
        loaded = _Loaded(TrustState(), None, 0, 0)
        if path:
            try:
                os.makedirs(self._directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create {self._directory}: {exc}", path=self._directory
                ) from exc
            self._file_lock = fsutil.hold_lock(
                path + LOCK_SUFFIX, f"identity directory {self._directory}"
            )
            fsutil.remove_stale_temporaries(path)
            try:
                loaded = _load(path)
            except StoreError:
                fsutil.release_lock(self._file_lock)
                raise
        # Used only by the writer (the leader, or close).
        self._journal = Journal(path + JOURNAL_SUFFIX, loaded.journal, loaded.digest)
        self._trust_size = loaded.size
        state = loaded.state
        self._fragments = {name: Fragments(name, state.table(name)) for name in TABLES}
        self.visible = state
        self.working = state.copy()

    # Mutations: call holding the lock.

    def change(self, change: Change) -> int:
        """Make ``change`` in ``working`` (put or remove one record) and queue it for the next
        write; returns its sequence number, for ``commit``. The only way the state changes:
        the Manager calls it from ``State.apply`` alone."""
        # Serialise first: a record that cannot be written fails here and changes nothing.
        text = self._refresh_fragment(change)
        self.working.apply(change)
        self._seq += 1
        self._log.append((self._seq, change, text))
        return self._seq

    def _refresh_fragment(self, change: Change) -> str:
        if self.path:
            return self._fragments[change.table].update(change.node_id, change.value)
        return ""

    def _render(self) -> dict[str, list[bytes]]:
        """Snapshot the file's text (call holding the lock; cheap: joins changed chunks)."""
        return {name: self._fragments[name].render() for name in TABLES}

    def _checkpoint_due(self, line: int) -> bool:
        """Whether the next write checkpoints instead of appending ``line`` bytes."""
        size = self._journal.size
        if not self._journal.appendable or size is None:
            return True
        return size + line > max(JOURNAL_MIN_BYTES, JOURNAL_RATIO * self._trust_size)

    # Durability: call without the lock.

    def commit(self, seq: int) -> None:
        """Return once change ``seq`` is on disk and visible.

        Raises ``StoreError`` naming the file and the OS error when the write that should have
        carried it failed; by then ``working`` is rolled back to ``visible``.
        """
        with self._lock:
            if seq > self._seq:
                raise ValueError(f"change {seq} was never made (last is {self._seq})")
            while seq > self._resolved and (self._writing or self._claimed):
                if self._writing and seq <= self._upto:
                    self._current.wait()
                    continue
                self._queued += 1
                self._next.wait()
                if self._claimed and not self._writing:
                    break  # woken to write the next batch
            if seq <= self._resolved:
                error = self._failure(seq)
                if error:
                    raise StoreError(error, path=self.path)
                return
            line, snapshot = self._start_write()
            upto = self._upto
        self._lead(upto, line, snapshot)

    def _start_write(self) -> tuple[bytes, dict[str, list[bytes]] | None]:
        """Become the writer of every change made so far: returns the journal line to append,
        or "" and the snapshot to checkpoint. Call holding the lock, with no write in flight."""
        self._writing, self._claimed = True, False
        self._upto = self._seq
        # Whoever waits for a later change now waits for this write; _current is empty (its
        # waiters were all woken when the last write ended).
        self._current, self._next = self._next, self._current
        self._queued = 0
        if self._file_lock is None:
            return b"", None
        line = encode_line((change, text) for _, change, text in self._log)
        if self._checkpoint_due(len(line)):
            return b"", self._render()
        return line, None

    def _end_write(self, failed: bool = False) -> None:
        """Wake the callers of the write that ended, and promise the next write to one caller
        waiting for a later change (the others join that write); wake them all instead when
        every change made so far has ``failed``. Call holding the lock."""
        self._writing = False
        self._current.notify_all()
        if failed:
            self._claimed, self._queued = False, 0
            self._next.notify_all()
        elif self._queued and not self._claimed:
            self._claimed = True
            self._queued -= 1
            self._next.notify()

    def _lead(self, upto: int, line: bytes, snapshot: dict[str, list[bytes]] | None) -> None:
        """Write every change up to ``upto`` (outside the lock), then publish or roll back:
        append ``line`` to the journal, or checkpoint ``snapshot`` into trust.json."""
        began = time.monotonic()
        replaced = False
        try:
            if self._closed:
                raise OSError("the trust store is closed")
            if self._file_lock is not None:
                if snapshot is not None:
                    data = document(snapshot)
                    self._journal.open()  # created before the directory fsync that follows
                    fsutil.replace_file(self.path, data)
                    replaced = True
                    self._after_replace(data)
                else:
                    self._journal.append(line)
        except OSError as exc:
            error = f"cannot write {self.path or 'the trust state'}: {exc}"
            with self._lock:
                restore = self._roll_back(error)
            # Past the rename, or a journal that still holds the failed line (append could
            # not cut it back): checkpoint the rolled-back state.
            if replaced or (snapshot is None and self._journal.size is None):
                self._restore(restore)
            with self._lock:
                self._end_write(failed=True)
            raise StoreError(error, path=self.path) from exc
        except BaseException:
            # Unexpected: nothing is resolved; a waiter leads the next attempt. The journal's
            # length is unknown, so the next write checkpoints and empties it.
            with self._lock:
                self._journal.forget()
                self._end_write()
            raise
        with self._lock:
            applied = []
            while self._log and self._log[0][0] <= upto:
                change = self._log.popleft()[1]
                self.visible.apply(change)
                applied.append(change)
            self._resolved = upto
            self._end_write()
            self._metrics.store_commit(time.monotonic() - began, len(applied))
            try:
                self._on_commit(applied)
            except Exception:
                # The changes are durable; a failing observer must not undo or hide that.
                log.exception("on_commit failed after writing %s", self.path)

    def _after_replace(self, data: bytes) -> None:
        """After renaming ``data`` over trust.json: fsync the directory (the checkpoint's
        commit point), then empty the journal."""
        self._trust_size = len(data)
        self._journal.rebase(digest(data))
        fsutil.fsync_directory(self._directory)
        self._journal.empty()

    def _checkpoint(self, data: bytes) -> None:
        """Replace trust.json with ``data`` and empty the journal (outside a commit)."""
        self._journal.open()
        fsutil.replace_file(self.path, data)
        self._after_replace(data)

    def _roll_back(self, error: str) -> dict[str, list[bytes]]:
        """Undo every change since the last successful write and fail all of them.

        Returns the fragments of the restored state. Call holding the lock.
        """
        for _, change, _text in self._log:
            original = self.visible.table(change.table).get(change.node_id)
            restored = Change(change.table, change.node_id, original)
            self.working.apply(restored)
            self._refresh_fragment(restored)
        self._log.clear()
        self._failures.append((self._resolved + 1, self._seq, error))
        self._resolved = self._seq
        return self._render()

    def _restore(self, snapshot: dict[str, list[bytes]]) -> None:
        """Best effort after a failed write that reached the disk: checkpoint the rolled-back
        state, so trust.json and an empty journal hold it."""
        if self._file_lock is None:
            return
        try:
            self._checkpoint(document(snapshot))
        except OSError as exc:
            log.error("cannot restore %s after a failed write: %s", self.path, exc)

    def _failure(self, seq: int) -> str:
        """The error of the write that rolled back change ``seq``, "" if it was written."""
        # Ranges are disjoint and ascending, and a caller asks about a recent change.
        for first, last, error in reversed(self._failures):
            if last < seq:
                break
            if first <= seq:
                return error
        return ""

    def close(self) -> None:
        """Wait for a write in flight, checkpoint the journal into trust.json, release
        trust.json.lock; later commits fail. Changes not yet committed are rolled back.

        Idempotent. A failed checkpoint is logged: the journal still holds every change.
        """
        with self._lock:
            self._closed = True
            while self._writing:
                self._current.wait()
            if self._file_lock is None:
                return
            error = f"cannot write {self.path}: the trust store is closed"
            if self._log:
                self._roll_back(error)  # never written: nothing on disk to undo
            snapshot = self._render() if self._journal.size != 0 else None
            self._writing = True  # commits wait, then find the store closed
            self._upto = self._seq
        try:
            if snapshot is not None:
                try:
                    self._checkpoint(document(snapshot))
                except OSError as exc:
                    log.error(
                        "cannot checkpoint %s into %s: %s", self._journal.path, self.path, exc
                    )
        finally:
            with self._lock:
                self._journal.close()
                if self._file_lock is not None:
                    fsutil.release_lock(self._file_lock)
                    self._file_lock = None
                self._end_write(failed=True)  # later changes fail: the store is closed
