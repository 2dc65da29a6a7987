"""trust.json: trust records, pending and outgoing requests, trust history, and how they reach
disk (SPEC 10).

The file has the Go daemon's schema, so it moves between the two implementations. Two
copies of the state live in memory: ``working``, which decisions read and mutate under the
Manager's lock, and ``visible``, which holds only changes that are on disk. ``commit`` makes
changes durable with group commit: whichever caller finds no write in flight becomes the
leader and writes every change made so far; the others wait for that write or lead the next.

A write does not rewrite trust.json (SPEC 16: that costs time in proportion to the number of
peers). It appends one line holding that write's changes, as whole records, to
``trust.json.journal`` and fsyncs it. The journal's first line names the SHA-256 of the
trust.json it extends; loading reads trust.json, then replays the journal in order only when
that digest matches, so a journal left beside a file that was since replaced (by our own
compaction, a Go daemon, an operator moving a corrupt file aside) is never applied to it.
A last line without its newline, or a last line that does not parse, is a write that was cut
off: its commit never returned, so it is ignored. Any other bad line is an error.

Compaction rewrites trust.json exactly as SPEC 10 says (temporary file, fsync, rename,
directory fsync) and then empties the journal. The leader does it in place of an append,
which keeps it amortised without a second writer: on the first write after opening (which
also drops whatever a crash left in the journal and gives trust.json mode 0600), whenever the
journal would grow past ``max(JOURNAL_MIN_BYTES, JOURNAL_RATIO * size of trust.json)``, and
when an append failed and the journal could not be cut back. ``close`` compacts too, so after
a clean stop trust.json alone is current (Go reads only trust.json). A crash between the
rename and emptying the journal is safe twice over: the journal's digest no longer matches,
and replaying whole records in order onto a state that already holds them changes nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple, Union

import filelock

from . import fsutil
from .constants import MAX_NETWORK, MAX_NODE_ID
from .errors import StoreError
from .metrics import Metrics

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
JOURNAL_SUFFIX = ".journal"
# Compact when the journal would pass max(JOURNAL_MIN_BYTES, JOURNAL_RATIO * trust.json's size):
# a rewrite then costs about as much as the appends it saves replaying, and a startup replays at
# most about one file's worth of records.
JOURNAL_MIN_BYTES = 256 * 1024
JOURNAL_RATIO = 1.0
_JOURNAL_VERSION = 1
TRUSTED = "trusted"
PENDING = "pending"
OUTGOING = "outgoing"
HISTORY = "history"
TABLES = (TRUSTED, PENDING, OUTGOING, HISTORY)

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

    ``bound`` records that the registry vouched for the request (SPEC 6); ``source`` is where
    it came from ("relay", or the sender's address for a direct one; "" when unknown), for
    the pending queue's per-source quotas. Go ignores both.
    """

    node_id: int
    public_key: str
    justification: str
    received_at: datetime
    bound: bool = False
    source: str = ""


@dataclass(frozen=True)
class OutgoingRequest:
    """A handshake request we sent and still expect an answer to (SPEC 8; not in Go)."""

    node_id: int
    sent_at: datetime


@dataclass(frozen=True)
class FormerTrust:
    """A node we trusted once and no longer do, with the key it had and when trust ended:
    the trust history that protects its later requests in the pending queue (not in Go)."""

    node_id: int
    public_key: str
    ended_at: datetime


Record = Union[TrustRecord, PendingHandshake, OutgoingRequest, FormerTrust]


class Change(NamedTuple):
    """One mutation: ``value`` is the new record of ``node_id`` in ``table``, None if removed."""

    table: str
    node_id: int
    value: Record | None


@dataclass
class TrustState:
    """The tables of trust.json, each keyed by node ID."""

    trusted: dict[int, TrustRecord] = field(default_factory=dict)
    pending: dict[int, PendingHandshake] = field(default_factory=dict)
    outgoing: dict[int, OutgoingRequest] = field(default_factory=dict)
    history: dict[int, FormerTrust] = field(default_factory=dict)

    def copy(self) -> TrustState:
        """Return a state with copies of the dicts (the records are immutable)."""
        return TrustState(
            dict(self.trusted), dict(self.pending), dict(self.outgoing), dict(self.history)
        )

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
    if request.source:
        fields["source"] = _utf8_text(request.source)
    return json.dumps(fields, ensure_ascii=False)


def _outgoing_json(request: OutgoingRequest) -> str:
    return json.dumps({"node_id": request.node_id, "sent_at": format_time(request.sent_at)})


def _history_json(former: FormerTrust) -> str:
    return json.dumps(
        {
            "node_id": former.node_id,
            "public_key": _utf8_text(former.public_key),
            "ended_at": format_time(former.ended_at),
        },
        ensure_ascii=False,
    )


_ENCODERS: dict[str, Callable[[Any], str]] = {
    TRUSTED: _trusted_json,
    PENDING: _pending_json,
    OUTGOING: _outgoing_json,
    HISTORY: _history_json,
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

    def update(self, node: int, value: Record | None) -> str:
        """Put the record of ``node``, or remove it when ``value`` is None; returns the record's
        JSON text ("" for a removal), which the journal reuses."""
        index = bisect.bisect_right(self._lows, node) - 1
        chunk = self._chunks[index]
        text = ""
        if value is None:
            if self._text.pop(node, None) is None:
                return text
            chunk.remove(node)
            if not chunk and index > 0:
                del self._chunks[index], self._lows[index], self._joined[index]
                return text
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
        return text

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


def _decode_trusted(obj: dict[str, Any], where: str) -> TrustRecord:
    return TrustRecord(
        node_id=_int(obj, "node_id", where, MAX_NODE_ID),
        public_key=_str(obj, "public_key", where),
        approved_at=_time(obj, "approved_at", where),
        mutual=_bool(obj, "mutual", where),
        network=_int(obj, "network", where, MAX_NETWORK),
    )


def _decode_pending(obj: dict[str, Any], where: str) -> PendingHandshake:
    return PendingHandshake(
        node_id=_int(obj, "node_id", where, MAX_NODE_ID),
        public_key=_str(obj, "public_key", where),
        justification=_str(obj, "justification", where),
        received_at=_time(obj, "received_at", where),
        bound=_bool(obj, "bound", where),
        source=_str(obj, "source", where),
    )


def _decode_outgoing(obj: dict[str, Any], where: str) -> OutgoingRequest:
    return OutgoingRequest(
        node_id=_int(obj, "node_id", where, MAX_NODE_ID),
        sent_at=_time(obj, "sent_at", where),
    )


def _decode_history(obj: dict[str, Any], where: str) -> FormerTrust:
    return FormerTrust(
        node_id=_int(obj, "node_id", where, MAX_NODE_ID),
        public_key=_str(obj, "public_key", where),
        ended_at=_time(obj, "ended_at", where),
    )


_DECODERS: dict[str, Callable[[dict[str, Any], str], Record]] = {
    TRUSTED: _decode_trusted,
    PENDING: _decode_pending,
    OUTGOING: _decode_outgoing,
    HISTORY: _decode_history,
}


def decode_state(data: bytes) -> TrustState:
    """Parse trust.json bytes; raises ``ValueError`` (or ``RecursionError``) naming the field."""
    doc = json.loads(data.decode("utf-8"))
    state = TrustState()
    # A top-level null is what Go reads as an empty state.
    if doc is None:
        return state
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object at the top level")
    for name in TABLES:
        decode, table = _DECODERS[name], state.table(name)
        for where, obj in _objects(doc, name):
            record = decode(obj, where)
            table[record.node_id] = record
    return state


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
        if isinstance(exc.__cause__, OSError):
            return []
        # _load reads trust.json before its journal: name the file that failed.
        return [path] if str(exc).startswith(f"trust file {path} ") else [path + JOURNAL_SUFFIX]
    return []


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
        raise StoreError(f"cannot read {path}: {exc}") from exc
    state = TrustState()
    if data is not None:
        try:
            state = decode_state(data)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise StoreError(f"trust file {path} does not parse: {reason}") from exc
    digest = None if data is None else _digest(data)
    journal = _replay_journal(path + JOURNAL_SUFFIX, digest, state)
    return _Loaded(state, digest, 0 if data is None else len(data), journal)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _journal_header(digest: str) -> bytes:
    """The journal's first line: which trust.json (by content) the lines below extend."""
    return json.dumps({"journal": _JOURNAL_VERSION, "base": digest}).encode() + b"\n"


def _parse_line(line: bytes) -> Any:
    """JSON of one journal line; raises ``ValueError`` (a cut-off line does not parse)."""
    try:
        return json.loads(line.decode("utf-8"))
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _journal_changes(doc: Any, where: str) -> list[Change]:
    """The changes of one parsed journal line: ``[[table, node_id, record or null], ...]``."""
    if not isinstance(doc, list):
        raise ValueError(f"{where}: expected a list of changes")
    changes = []
    for index, item in enumerate(doc):
        at = f"{where}[{index}]"
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ValueError(f"{at}: expected [table, node_id, record or null]")
        table, node, value = item
        decode = _DECODERS.get(table)
        if decode is None:
            raise ValueError(f"{at}: unknown table {json.dumps(table)[:40]}")
        if type(node) is not int or not 0 <= node <= MAX_NODE_ID:
            raise ValueError(f"{at}: expected a node ID, got {json.dumps(node)[:40]}")
        record = None
        if value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{at}: expected a record, got {json.dumps(value)[:40]}")
            record = decode(value, at)
            if record.node_id != node:
                raise ValueError(f"{at}: record of node {record.node_id} filed under {node}")
        changes.append(Change(table, node, record))
    return changes


def _replay_journal(path: str, digest: str | None, state: TrustState) -> int:
    """Apply the journal at ``path`` to ``state``, read from a trust.json whose SHA-256 is
    ``digest`` (None: no trust.json). Returns the journal's size in bytes (0: absent)."""
    try:
        data = fsutil.read_file(path)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    lines = data.split(b"\n")
    # Bytes after the last newline: an append cut off by a crash; its commit never returned.
    torn = lines.pop()
    if torn:
        log.warning("ignoring %d bytes of an unfinished write at the end of %s", len(torn), path)
    docs = []
    for number, line in enumerate(lines, 1):
        try:
            docs.append(_parse_line(line))
        except ValueError as exc:
            if number == len(lines) and not torn:
                log.warning("ignoring the unfinished last line %d of %s", number, path)
                break
            raise StoreError(f"trust journal {path} line {number} does not parse: {exc}") from exc
    if not docs:
        return len(data)
    header = docs[0]
    if not (
        isinstance(header, dict)
        and header.get("journal") == _JOURNAL_VERSION
        and isinstance(header.get("base"), str)
    ):
        raise StoreError(f"trust journal {path} line 1 is not a journal header")
    if header["base"] != digest:
        # Written against another trust.json: a compaction cut short by a crash (the file
        # already holds these records), or a file replaced since. Never applied.
        log.warning("ignoring %s: it extends a trust.json that has since been replaced", path)
        return len(data)
    for number, doc in enumerate(docs[1:], 2):
        try:
            changes = _journal_changes(doc, f"line {number}")
        except ValueError as exc:
            raise StoreError(f"trust journal {path} does not parse: {exc}") from exc
        for change in changes:
            state.apply(change)
    return len(data)


class TrustStore:
    """trust.json and its journal with group commit, holding trust.json.lock (SPEC 10).

    The lock is taken once, at open, and released at close: it keeps any other process
    (a second daemon, a tool) from writing trust.json, and so is also the "one daemon per
    identity directory" lock. Writes never wait for it.

    ``path`` "" keeps everything in memory: ``commit`` makes changes visible at once.
    Mutations are made holding ``lock`` (the Manager's); ``commit`` is called without it.
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
        self._done = threading.Condition(lock)
        self._on_commit = on_commit
        self._metrics = metrics if metrics is not None else Metrics()
        self._directory = os.path.dirname(path) or "."
        # Held from open to close; None in memory (and once closed). One object, taken by
        # one thread: filelock gives no exclusion between threads sharing an object.
        self._file_lock: filelock.FileLock | None = None
        self._closed = False
        self._seq = 0  # the last sequence number handed out
        self._resolved = 0  # every change up to this one was written or rolled back
        self._failures: list[tuple[int, int, str]] = []  # (first, last, error) rolled back
        # Changes not yet written, each with its record's JSON text for the journal.
        self._log: deque[tuple[int, Change, str]] = deque()
        self._writing = False
        # Owned by the writer (the leader, or close): read and written only while _writing is
        # set, or by the caller about to set it.
        self._journal_path = path + JOURNAL_SUFFIX
        self._journal_fd: int | None = None
        self._journal_size: int | None = 0  # bytes in the journal file; None: unknown
        # True when the journal holds a header naming the current trust.json and then only
        # whole lines this store appended, so the next line may go at _journal_size.
        self._journal_ours = False
        self._base: str | None = None  # SHA-256 of trust.json as on disk
        self._trust_size = 0
        loaded = _Loaded(TrustState(), None, 0, 0)
        if path:
            try:
                os.makedirs(self._directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {self._directory}: {exc}") from exc
            self._file_lock = fsutil.hold_lock(
                path + LOCK_SUFFIX, f"identity directory {self._directory}"
            )
            fsutil.remove_stale_temporaries(path)
            try:
                loaded = _load(path)
            except StoreError:
                self._file_lock.release()
                raise
        state = loaded.state
        self._base, self._trust_size, self._journal_size = (
            loaded.digest,
            loaded.size,
            loaded.journal,
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

    def put_history(self, former: FormerTrust) -> int:
        """Remember that ``former.node_id`` was trusted; returns the change's sequence number."""
        return self._change(Change(HISTORY, former.node_id, former))

    def drop_history(self, node_id: int) -> int:
        """Forget the trust history of ``node_id``; returns the change's sequence number."""
        return self._change(Change(HISTORY, node_id, None))

    def _change(self, change: Change) -> int:
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

    def _journal_line(self) -> bytes:
        """One journal line holding every change in the log, in order (call holding the lock)."""
        items = [
            f'["{change.table}",{change.node_id},{text if change.value is not None else "null"}]'
            for _, change, text in self._log
        ]
        return ("[" + ",".join(items) + "]\n").encode("utf-8")

    def _compaction_due(self, line: int) -> bool:
        """Whether the next write rewrites trust.json instead of appending ``line`` bytes."""
        if not self._journal_ours or self._journal_size is None:
            return True
        limit = max(JOURNAL_MIN_BYTES, JOURNAL_RATIO * self._trust_size)
        return self._journal_size + line > limit

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
            line, snapshot = b"", None
            if self._file_lock is not None:
                line = self._journal_line()
                if self._compaction_due(len(line)):
                    line, snapshot = b"", self._render()
        self._lead(upto, line, snapshot)

    def _lead(self, upto: int, line: bytes, snapshot: dict[str, list[bytes]] | None) -> None:
        """Write every change up to ``upto`` (outside the lock), then publish or roll back:
        append ``line`` to the journal, or rewrite trust.json from ``snapshot``."""
        began = time.monotonic()
        replaced = False
        try:
            if self._closed:
                raise OSError("the trust store is closed")
            if self._file_lock is not None:
                if snapshot is not None:
                    data = _document(snapshot)
                    self._open_journal()
                    self._replace(data)
                    replaced = True
                    self._after_replace(data)
                else:
                    self._append(line)
        except OSError as exc:
            error = f"cannot write {self.path or 'the trust state'}: {exc}"
            with self._done:
                restore = self._roll_back(error)
            # Past the rename, or a journal that still holds the failed line (_append could
            # not cut it back): rewrite the rolled-back state so the disk does not keep
            # changes whose callers were told they failed.
            if replaced or (snapshot is None and self._journal_size is None):
                self._restore(restore)
            with self._done:
                self._writing = False
                self._done.notify_all()
            raise StoreError(error) from exc
        except BaseException:
            # Unexpected: nothing is resolved; a waiter leads the next attempt. The journal's
            # length is unknown, so the next write compacts and empties it.
            with self._done:
                self._journal_ours, self._journal_size = False, None
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
            self._metrics.store_commit(time.monotonic() - began, len(applied))
            try:
                self._on_commit(applied)
            except Exception:
                # The changes are durable; a failing observer must not undo or hide that.
                log.exception("on_commit failed after writing %s", self.path)

    def _open_journal(self) -> int:
        """The journal's descriptor, created (mode 0600) on first use; the caller fsyncs the
        directory after creating it (a compaction does, right after its rename)."""
        if self._journal_fd is None:
            fd = fsutil.open_nofollow(self._journal_path, os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_mode & 0o777 != 0o600:
                    os.fchmod(fd, 0o600)  # copied in from elsewhere
            except OSError:
                os.close(fd)
                raise
            self._journal_fd = fd
        return self._journal_fd

    def _append(self, line: bytes) -> None:
        """Append ``line`` (after a header when the journal is empty) and fsync it. On failure,
        cut the journal back to where it was; if that fails too, mark it unusable."""
        fd, start = self._open_journal(), self._journal_size
        assert start is not None and self._base is not None  # else _compaction_due said so
        data = _journal_header(self._base) + line if start == 0 else line
        try:
            view, written = memoryview(data), 0
            while written < len(data):
                written += os.pwrite(fd, view[written:], start + written)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError as exc:
                log.error("cannot cut %s back after a failed write: %s", self._journal_path, exc)
                self._journal_ours, self._journal_size = False, None
            raise
        self._journal_size = start + len(data)

    def _after_replace(self, data: bytes) -> None:
        """After renaming ``data`` over trust.json: fsync the directory, empty the journal."""
        self._base, self._trust_size = _digest(data), len(data)
        # The journal's header names the file just replaced: never append to it again.
        self._journal_ours = False
        fsutil.fsync_directory(self._directory)
        if self._journal_size != 0:
            fd = self._open_journal()
            try:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            except OSError as exc:
                # trust.json is durable and complete; load ignores the stale journal.
                log.warning("cannot empty %s after compaction: %s", self._journal_path, exc)
                self._journal_size = None
                return
        self._journal_size, self._journal_ours = 0, True

    def _rewrite(self, data: bytes) -> None:
        """Compact: replace trust.json with ``data`` and empty the journal."""
        self._open_journal()
        self._replace(data)
        self._after_replace(data)

    def _replace(self, data: bytes) -> None:
        # The rename only: _after_replace fsyncs the directory (which also makes a
        # just-created journal's entry durable), after _lead has noted that the disk changed.
        fsutil.replace_file(self.path, data)

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
        """Best effort after a failed write that reached the disk: compact the rolled-back
        state, so trust.json and an empty journal hold it."""
        if self._file_lock is None:
            return
        try:
            self._rewrite(_document(snapshot))
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
        """Wait for a write in flight, compact the journal into trust.json, release
        trust.json.lock; later commits fail. Changes not yet committed are rolled back.

        Idempotent. A failed compaction is logged: the journal still holds every change.
        """
        with self._done:
            self._closed = True
            while self._writing:
                self._done.wait()
            if self._file_lock is None:
                return
            error = f"cannot write {self.path}: the trust store is closed"
            if self._log:
                self._roll_back(error)  # never written: nothing on disk to undo
            snapshot = self._render() if self._journal_size != 0 else None
            self._writing = True  # commits wait, then find the store closed
        try:
            if snapshot is not None:
                try:
                    self._rewrite(_document(snapshot))
                except OSError as exc:
                    log.error("cannot compact %s into %s: %s", self._journal_path, self.path, exc)
        finally:
            with self._done:
                if self._journal_fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(self._journal_fd)
                    self._journal_fd = None
                if self._file_lock is not None:
                    self._file_lock.release()
                    self._file_lock = None
                self._writing = False
                self._done.notify_all()
