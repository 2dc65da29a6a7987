"""trust.json as bytes (SPEC 10): times, records and whole files, both ways; no I/O.

Encoding writes exactly what SPEC 10 says, one record a line, sorted by node ID. Each record
is serialised once, into a fragment that ``Fragments`` caches, so a write after a change
costs that record's encoding and a join, not the whole state's. Decoding is liberal in what
Go may have written (fractions of seconds, offsets, nulls, missing fields) and strict about
shapes: every error names the field.
"""

from __future__ import annotations

import bisect
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from ..constants import MAX_NETWORK, MAX_NODE_ID
from .records import (
    DIRECT,
    HISTORY,
    OUTGOING,
    OUTGOING_STATES,
    PENDING,
    RELAY,
    TABLES,
    TRUSTED,
    WAITING,
    FormerTrust,
    OutgoingRequest,
    PendingHandshake,
    Record,
    TrustRecord,
    TrustState,
)

# Go's zero time.Time: what Go reads for a missing time, and writes back.
ZERO_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)

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
    if record.reason:
        fields["reason"] = record.reason
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
    # A direct request still waiting is written as before round 3 (and as Go would).
    fields: dict[str, object] = {
        "node_id": request.node_id,
        "sent_at": format_time(request.sent_at),
    }
    if request.path != DIRECT:
        fields["path"] = request.path
    if request.state != WAITING:
        fields["state"] = request.state
    if request.reason:
        fields["reason"] = _utf8_text(request.reason)
    if request.ended_at is not None:
        fields["ended_at"] = format_time(request.ended_at)
    return json.dumps(fields, ensure_ascii=False)


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


class Fragments:
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


def document(sections: dict[str, list[bytes]]) -> bytes:
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
    return document({name: Fragments(name, state.table(name)).render() for name in TABLES})


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
        reason=_str(obj, "reason", where),
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


def _choice(obj: dict[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str | None:
    value = _value(obj, key, where, lambda v: v in choices, " or ".join(choices))
    return None if value is None else str(value)


def _decode_outgoing(obj: dict[str, Any], where: str) -> OutgoingRequest:
    ended_at = _time(obj, "ended_at", where) if obj.get("ended_at") is not None else None
    return OutgoingRequest(
        node_id=_int(obj, "node_id", where, MAX_NODE_ID),
        sent_at=_time(obj, "sent_at", where),
        path=_choice(obj, "path", where, (DIRECT, RELAY)) or DIRECT,
        state=_choice(obj, "state", where, OUTGOING_STATES) or WAITING,
        reason=_str(obj, "reason", where),
        ended_at=ended_at,
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


def decode_record(table: str, obj: dict[str, Any], where: str) -> Record:
    """The record of ``table`` (one of ``TABLES``) that ``obj`` holds; raises ``ValueError``
    naming ``where``."""
    return _DECODERS[table](obj, where)


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
