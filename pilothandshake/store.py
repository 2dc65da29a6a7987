"""trust.json: trust records, pending and outgoing requests, and how they reach disk (SPEC 10).

The file has the Go daemon's schema, so it moves between the two implementations. Two
copies of the state live in memory: ``working``, which decisions read and mutate under the
Manager's lock, and ``visible``, which holds only changes that are on disk. ``commit`` makes
changes durable with group commit: whichever caller finds no write in flight becomes the
leader and writes every change made so far; the others wait for that write or lead the next.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple, Union

import filelock

from .constants import TRUST_LOCK_TIMEOUT
from .errors import StoreError
from .messages import MAX_NODE_ID

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
DIRECTORY_LOCK = "handshake.lock"
TRUSTED = "trusted"
PENDING = "pending"
OUTGOING = "outgoing"
TABLES = (TRUSTED, PENDING, OUTGOING)

MAX_NETWORK = 2**16 - 1
# Go's zero time.Time: what Go reads for a missing time, and writes back.
ZERO_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class TrustRecord:
    """A trusted peer (Go ``TrustRecord``).

    ``public_key`` is standard base64 of the peer's Ed25519 key; files written by Go may hold
    "" or something that is not a key. ``mutual`` is true when both sides asked; ``network`` is
    the shared network that granted trust automatically (0: none).
    """

    node_id: int
    public_key: str
    approved_at: datetime
    mutual: bool = False
    network: int = 0


@dataclass(frozen=True)
class PendingHandshake:
    """A handshake request waiting for the operator (Go ``PendingHandshake``).

    ``bound`` records that the registry vouched for the request (SPEC 6); Go ignores it.
    """

    node_id: int
    public_key: str
    justification: str
    received_at: datetime
    bound: bool = False


@dataclass(frozen=True)
class OutgoingRequest:
    """A handshake request we sent and still expect an answer to (SPEC 8; not in Go)."""

    node_id: int
    sent_at: datetime


Record = Union[TrustRecord, PendingHandshake, OutgoingRequest]


class Change(NamedTuple):
    """One mutation: ``value`` is the new record of ``node_id`` in ``table``, None if removed."""

    table: str
    node_id: int
    value: Record | None


@dataclass
class TrustState:
    """The three tables of trust.json, each keyed by node ID."""

    trusted: dict[int, TrustRecord] = field(default_factory=dict)
    pending: dict[int, PendingHandshake] = field(default_factory=dict)
    outgoing: dict[int, OutgoingRequest] = field(default_factory=dict)

    def copy(self) -> TrustState:
        """Return a state with copies of the three dicts (the records are immutable)."""
        return TrustState(dict(self.trusted), dict(self.pending), dict(self.outgoing))

    def table(self, name: str) -> dict[int, Any]:
        """Return the dict of table ``name`` (one of ``TABLES``)."""
        table: dict[int, Any] = getattr(self, name)
        return table

    def apply(self, change: Change) -> None:
        """Put or remove the record ``change`` names."""
        table = self.table(change.table)
        if change.value is None:
            table.pop(change.node_id, None)
        else:
            table[change.node_id] = change.value


# Times


_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))\Z"
)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time (fraction of seconds optional, ``Z`` or ``+hh:mm``) to aware UTC.

    Written by hand because ``datetime.fromisoformat`` rejects ``Z`` before Python 3.11.
    Digits beyond microseconds are truncated. Raises ``ValueError``.
    """
    match = _TIME.match(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    microsecond = int((match.group(7) or "0")[:6].ljust(6, "0"))
    try:
        if match.group(8):
            zone = timezone.utc
        else:
            offset = timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
            zone = timezone(-offset if match.group(9) == "-" else offset)
        moment = datetime(year, month, day, hour, minute, second, microsecond, tzinfo=zone)
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid time: {text!r} ({exc})") from exc


def format_time(moment: datetime) -> str:
    """Format as ``YYYY-MM-DDTHH:MM:SSZ`` in UTC; a naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    utc = moment.astimezone(timezone.utc)
    # Formatted by hand: strftime("%Y") does not pad years before 1000 (Go's zero time is 0001).
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}Z"
    )


def _utf8_text(value: str) -> str:
    """Return ``value`` with lone surrogates replaced by U+FFFD.

    JSON escapes can carry lone surrogates that cannot be written as UTF-8; one of them in
    the state would make every later save fail. Go decodes them to U+FFFD too.
    """
    if value.isascii():
        return value
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# Encoding: each record is serialised once into a fragment; a file is a join of fragments.


def _trusted_json(record: TrustRecord) -> str:
    fields: dict[str, object] = {
        "node_id": record.node_id,
        "public_key": _utf8_text(record.public_key),
        "approved_at": format_time(record.approved_at),
        "mutual": bool(record.mutual),
    }
    if record.network:
        fields["network"] = record.network
    return json.dumps(fields, ensure_ascii=False)


def _pending_json(request: PendingHandshake) -> str:
    fields: dict[str, object] = {"node_id": request.node_id}
    if request.public_key:
        fields["public_key"] = _utf8_text(request.public_key)
    if request.justification:
        fields["justification"] = _utf8_text(request.justification)
    fields["received_at"] = format_time(request.received_at)
    if request.bound:
        fields["bound"] = True
    return json.dumps(fields, ensure_ascii=False)


def _outgoing_json(request: OutgoingRequest) -> str:
    return json.dumps({"node_id": request.node_id, "sent_at": format_time(request.sent_at)})


_ENCODERS: dict[str, Callable[[Any], str]] = {
    TRUSTED: _trusted_json,
    PENDING: _pending_json,
    OUTGOING: _outgoing_json,
}


class _Fragments:
    """The serialised records of one table, in node-ID order, for writing without
    re-serialising: consecutive node IDs form chunks that cache their joined text, so a
    change costs one record's encoding and a write joins about ``len / CHUNK`` strings."""

    CHUNK = 128

    def __init__(self, table: str, records: dict[int, Any]) -> None:
        self._encode = _ENCODERS[table]
        self._text = {node: self._encode(value) for node, value in records.items()}
        nodes = sorted(self._text)
        self._chunks = [nodes[i : i + self.CHUNK] for i in range(0, len(nodes), self.CHUNK)]
        if not self._chunks:
            self._chunks = [[]]
        # Chunk j holds the node IDs from _lows[j] up to _lows[j + 1]; the first starts at 0.
        self._lows = [0] + [chunk[0] for chunk in self._chunks[1:]]
        self._joined: list[bytes | None] = [None] * len(self._chunks)

    def update(self, node: int, value: Record | None) -> None:
        """Put the record of ``node``, or remove it when ``value`` is None."""
        index = bisect.bisect_right(self._lows, node) - 1
        chunk = self._chunks[index]
        if value is None:
            if self._text.pop(node, None) is None:
                return
            chunk.remove(node)
            if not chunk and index > 0:
                del self._chunks[index], self._lows[index], self._joined[index]
                return
        else:
            text = self._encode(value)
            if node not in self._text:
                bisect.insort(chunk, node)
            self._text[node] = text
            if len(chunk) > 2 * self.CHUNK:
                upper = chunk[self.CHUNK :]
                del chunk[self.CHUNK :]
                self._chunks.insert(index + 1, upper)
                self._lows.insert(index + 1, upper[0])
                self._joined.insert(index + 1, None)
        self._joined[index] = None

    def render(self) -> list[bytes]:
        """The joined UTF-8 text of each non-empty chunk, in order (joins changed chunks only)."""
        parts = []
        for index, chunk in enumerate(self._chunks):
            joined = self._joined[index]
            if joined is None:
                joined = self._joined[index] = _RECORD_SEPARATOR.join(
                    self._text[node] for node in chunk
                ).encode("utf-8")
            if joined:
                parts.append(joined)
        return parts


_RECORD_SEPARATOR = ",\n    "
_RECORD_SEPARATOR_BYTES = _RECORD_SEPARATOR.encode()


def _document(sections: dict[str, list[bytes]]) -> bytes:
    """Join rendered tables into the file: one record a line, sorted by node ID; ``trusted``
    is always written (``[]`` when empty), ``pending`` and ``outgoing`` only when not empty."""
    # One join of cached bytes: megabyte-sized intermediate strings cost more than the join.
    pieces: list[bytes] = []
    for name in TABLES:
        parts = sections[name]
        if not parts and name != TRUSTED:
            continue
        pieces.append(b",\n  " if pieces else b"{\n  ")
        if not parts:
            pieces.append(f'"{name}": []'.encode())
            continue
        records = [_RECORD_SEPARATOR_BYTES] * (2 * len(parts) - 1)
        records[::2] = parts
        pieces += [f'"{name}": [\n    '.encode(), *records, b"\n  ]"]
    pieces.append(b"\n}\n")
    return b"".join(pieces)


def encode_state(state: TrustState) -> bytes:
    """Serialise ``state`` as trust.json (SPEC 10); the same bytes ``TrustStore`` writes."""
    return _document({name: _Fragments(name, state.table(name)).render() for name in TABLES})


# Decoding: liberal in what Go may have written, strict about shapes.


def _value(obj: dict[str, Any], key: str, where: str, ok: Callable[[Any], bool], want: str) -> Any:
    value = obj.get(key)
    # Go leaves a field at its zero value when it is missing or null.
    if value is None:
        return None
    if not ok(value):
        raise ValueError(f"{where}.{key}: expected {want}, got {json.dumps(value)[:40]}")
    return value


def _int(obj: dict[str, Any], key: str, where: str, maximum: int) -> int:
    value = _value(
        obj, key, where, lambda v: type(v) is int and 0 <= v <= maximum, f"an integer 0..{maximum}"
    )
    return 0 if value is None else int(value)


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = _value(obj, key, where, lambda v: isinstance(v, str), "a string")
    return "" if value is None else _utf8_text(value)


def _bool(obj: dict[str, Any], key: str, where: str) -> bool:
    return _value(obj, key, where, lambda v: isinstance(v, bool), "true or false") is True


def _time(obj: dict[str, Any], key: str, where: str) -> datetime:
    value = _value(obj, key, where, lambda v: isinstance(v, str), "an RFC 3339 time")
    if value is None:
        return ZERO_TIME
    try:
        return parse_time(value)
    except ValueError as exc:
        raise ValueError(f"{where}.{key}: {exc}") from exc


def _objects(doc: dict[str, Any], name: str) -> list[tuple[str, dict[str, Any]]]:
    items = doc.get(name)
    if items is None:
        return []
    if not isinstance(items, list):
        raise ValueError(f"{name}: expected a list, got {json.dumps(items)[:40]}")
    found = []
    for index, item in enumerate(items):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {json.dumps(item)[:40]}")
        found.append((where, item))
    return found


def decode_state(data: bytes) -> TrustState:
    """Parse trust.json bytes; raises ``ValueError`` (or ``RecursionError``) naming the field."""
    doc = json.loads(data.decode("utf-8"))
    state = TrustState()
    # A top-level null is what Go reads as an empty state.
    if doc is None:
        return state
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object at the top level")
    for where, obj in _objects(doc, TRUSTED):
        record = TrustRecord(
            node_id=_int(obj, "node_id", where, MAX_NODE_ID),
            public_key=_str(obj, "public_key", where),
            approved_at=_time(obj, "approved_at", where),
            mutual=_bool(obj, "mutual", where),
            network=_int(obj, "network", where, MAX_NETWORK),
        )
        state.trusted[record.node_id] = record
    for where, obj in _objects(doc, PENDING):
        request = PendingHandshake(
            node_id=_int(obj, "node_id", where, MAX_NODE_ID),
            public_key=_str(obj, "public_key", where),
            justification=_str(obj, "justification", where),
            received_at=_time(obj, "received_at", where),
            bound=_bool(obj, "bound", where),
        )
        state.pending[request.node_id] = request
    for where, obj in _objects(doc, OUTGOING):
        outgoing = OutgoingRequest(
            node_id=_int(obj, "node_id", where, MAX_NODE_ID),
            sent_at=_time(obj, "sent_at", where),
        )
        state.outgoing[outgoing.node_id] = outgoing
    return state


def load_state(path: str) -> TrustState:
    """Read trust.json at ``path``: a missing file is an empty state; a file that cannot be
    read or does not parse raises ``StoreError`` naming the path and the error."""
    try:
        with open(path, "rb") as source:
            data = source.read()
    except FileNotFoundError:
        return TrustState()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    try:
        return decode_state(data)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise StoreError(f"trust file {path} does not parse: {reason}") from exc


def _lock_directory(directory: str) -> filelock.FileLock:
    """Take the identity directory's lock for the life of a store (SPEC 10: one daemon per
    identity). flock on its own open file, so a second store in this process fails too."""
    path = os.path.join(directory, DIRECTORY_LOCK)
    # thread_local=False: close() may run on another thread than the one that opened.
    lock = filelock.FileLock(path, timeout=0, mode=0o600, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise StoreError(
            f"identity directory {directory} is in use by another pilot-handshake process "
            f"(lock {path})"
        ) from exc
    except OSError as exc:
        raise StoreError(f"cannot lock {path}: {exc}") from exc
    return lock


def _temporary_prefix(path: str) -> str:
    """How the names of ``path``'s temporary files begin (they end in ``.tmp``)."""
    return f".{os.path.basename(path)}."


def _remove_stale_temporaries(path: str) -> None:
    """Delete temporary files a killed writer left beside ``path``.

    Call holding the directory lock: no other writer of ``path`` can be mid-write, so every
    such file is litter. They are never read as state; removing them keeps crashes from
    accumulating files in the identity directory.
    """
    directory = os.path.dirname(path) or "."
    prefix = _temporary_prefix(path)
    try:
        names = os.listdir(directory)
    except OSError as exc:
        log.warning("cannot list %s for stale temporary files: %s", directory, exc)
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            stale = os.path.join(directory, name)
            try:
                os.unlink(stale)
            except OSError as exc:
                log.warning("cannot remove stale temporary file %s: %s", stale, exc)
            else:
                log.info("removed %s, left by an interrupted write", stale)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrustStore:
    """trust.json with group commit and the identity directory lock (SPEC 10).

    ``path`` "" keeps everything in memory: ``commit`` makes changes visible at once.
    Mutations are made holding ``lock`` (the Manager's); ``commit`` is called without it.
    ``on_commit(changes)`` runs under ``lock`` after each successful write with the changes
    it made durable, in order.
    """

    def __init__(
        self,
        path: str,
        lock: threading.RLock,
        on_commit: Callable[[list[Change]], None],
    ) -> None:
        """Open the store: create the directory, take its lock, load ``path``.

        Raises ``StoreError`` when the directory is in use or the file does not parse.
        """
        self.path = path
        self._lock = lock
        self._done = threading.Condition(lock)
        self._on_commit = on_commit
        self._directory = os.path.dirname(path) or "."
        self._directory_lock: filelock.FileLock | None = None
        self._closed = False
        self._seq = 0  # the last sequence number handed out
        self._resolved = 0  # every change up to this one was written or rolled back
        self._failures: list[tuple[int, int, str]] = []  # (first, last, error) rolled back
        self._log: deque[tuple[int, Change]] = deque()  # changes not yet written
        self._writing = False
        state = TrustState()
        if path:
            try:
                os.makedirs(self._directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {self._directory}: {exc}") from exc
            self._directory_lock = _lock_directory(self._directory)
            _remove_stale_temporaries(path)
            try:
                state = load_state(path)
            except StoreError:
                self._directory_lock.release()
                raise
        # One lock object, used only by the leader: filelock gives no exclusion between
        # threads sharing an object, and two objects on one path in one thread deadlock.
        self._file_lock: filelock.FileLock | None = None
        if path:
            self._file_lock = filelock.FileLock(
                path + ".lock", timeout=TRUST_LOCK_TIMEOUT, mode=0o600
            )
        self._fragments = {name: _Fragments(name, state.table(name)) for name in TABLES}
        self.visible = state
        self.working = state.copy()

    # Mutations: call holding the lock.

    def put_trusted(self, record: TrustRecord) -> int:
        """Trust ``record.node_id`` (replacing its record); returns the change's sequence number."""
        return self._change(Change(TRUSTED, record.node_id, record))

    def drop_trusted(self, node_id: int) -> int:
        """Remove the trust record of ``node_id``; returns the change's sequence number."""
        return self._change(Change(TRUSTED, node_id, None))

    def put_pending(self, request: PendingHandshake) -> int:
        """Store a pending request (replacing one from the same node); returns its sequence."""
        return self._change(Change(PENDING, request.node_id, request))

    def drop_pending(self, node_id: int) -> int:
        """Remove the pending request of ``node_id``; returns the change's sequence number."""
        return self._change(Change(PENDING, node_id, None))

    def put_outgoing(self, request: OutgoingRequest) -> int:
        """Record an outgoing request; returns the change's sequence number."""
        return self._change(Change(OUTGOING, request.node_id, request))

    def drop_outgoing(self, node_id: int) -> int:
        """Forget the outgoing request to ``node_id``; returns the change's sequence number."""
        return self._change(Change(OUTGOING, node_id, None))

    def _change(self, change: Change) -> int:
        # Serialise first: a record that cannot be written fails here and changes nothing.
        self._refresh_fragment(change)
        self.working.apply(change)
        self._seq += 1
        self._log.append((self._seq, change))
        return self._seq

    def _refresh_fragment(self, change: Change) -> None:
        if self.path:
            self._fragments[change.table].update(change.node_id, change.value)

    def _render(self) -> dict[str, list[bytes]]:
        """Snapshot the file's text (call holding the lock; cheap: joins changed chunks)."""
        return {name: self._fragments[name].render() for name in TABLES}

    # Durability: call without the lock.

    def commit(self, seq: int) -> None:
        """Return once change ``seq`` is on disk and visible.

        Raises ``StoreError`` naming the file and the OS error when the write that should have
        carried it failed; by then ``working`` is rolled back to ``visible``.
        """
        with self._done:
            if seq > self._seq:
                raise ValueError(f"change {seq} was never made (last is {self._seq})")
            while seq > self._resolved and self._writing:
                self._done.wait()
            if seq <= self._resolved:
                error = self._failure(seq)
                if error:
                    raise StoreError(error)
                return
            self._writing = True
            upto = self._seq
            snapshot = self._render()
        self._lead(upto, snapshot)

    def _lead(self, upto: int, snapshot: dict[str, list[bytes]]) -> None:
        """Write every change up to ``upto`` (outside the lock), then publish or roll back."""
        replaced = False
        try:
            if self._closed:
                raise OSError("the trust store is closed")
            if self._file_lock is not None:
                data = _document(snapshot)
                with self._file_lock:
                    self._replace(data)
                    replaced = True
                    _fsync_directory(self._directory)
        except OSError as exc:
            error = f"cannot write {self.path or 'the trust state'}: {exc}"
            with self._done:
                restore = self._roll_back(error)
            if replaced:
                self._restore(restore)
            with self._done:
                self._writing = False
                self._done.notify_all()
            raise StoreError(error) from exc
        except BaseException:
            # Unexpected: nothing is resolved; a waiter leads the next attempt.
            with self._done:
                self._writing = False
                self._done.notify_all()
            raise
        with self._done:
            applied = []
            while self._log and self._log[0][0] <= upto:
                change = self._log.popleft()[1]
                self.visible.apply(change)
                applied.append(change)
            self._resolved = upto
            self._writing = False
            self._done.notify_all()
            try:
                self._on_commit(applied)
            except Exception:
                # The changes are durable; a failing observer must not undo or hide that.
                log.exception("on_commit failed after writing %s", self.path)

    def _replace(self, data: bytes) -> None:
        fd, temporary = tempfile.mkstemp(
            prefix=_temporary_prefix(self.path), suffix=".tmp", dir=self._directory
        )
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _roll_back(self, error: str) -> dict[str, list[bytes]]:
        """Undo every change since the last successful write and fail all of them.

        Returns the fragments of the restored state. Call holding the lock.
        """
        for _, change in self._log:
            original = self.visible.table(change.table).get(change.node_id)
            restored = Change(change.table, change.node_id, original)
            self.working.apply(restored)
            self._refresh_fragment(restored)
        self._log.clear()
        self._failures.append((self._resolved + 1, self._seq, error))
        self._resolved = self._seq
        return self._render()

    def _restore(self, snapshot: dict[str, list[bytes]]) -> None:
        """Best effort after a failure past the rename: put the rolled-back state on disk so
        the file does not keep changes whose callers were told they failed."""
        if self._file_lock is None:
            return
        try:
            with self._file_lock:
                self._replace(_document(snapshot))
                _fsync_directory(self._directory)
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
        """Wait for a write in flight, then release the directory lock; later commits fail.

        Idempotent."""
        with self._done:
            self._closed = True
            while self._writing:
                self._done.wait()
            if self._directory_lock is not None:
                self._directory_lock.release()
                self._directory_lock = None
