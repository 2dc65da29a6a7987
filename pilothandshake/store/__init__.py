"""trust.json: trust records, pending and outgoing requests, trust history, and how they reach
disk (SPEC 10). The file has the Go daemon's schema, so it moves between the two.

Modules: ``records`` (the dataclasses, ``Change``, ``TrustState``, the table names),
``codec`` (times; trust.json to and from bytes; the cached per-record fragments),
``journal`` (trust.json.journal: header, line format, replay, append), ``trust_store``
(``TrustStore``: working and visible state, group commit, rollback, checkpoints, the lock).

Invariants: a change is durable, and only then visible to readers and side effects, at one
of two commit points (like SQLite's WAL, where a transaction commits with the frame that
carries its commit marker):

1. **append**: the ``fsync`` of a newline-terminated line of trust.json.journal that holds
   it, appended to a journal whose header names the trust.json on disk;
2. **checkpoint**: the rename of a fsynced temporary file over trust.json, made durable by
   the ``fsync`` of the directory that follows it.

Nothing else commits: a journal line without its newline, a journal whose header names
another trust.json, and a temporary file never renamed are ignored (or removed) on load.
After a clean ``close`` trust.json alone is current.
"""

from __future__ import annotations

from ..errors import StoreError
from .codec import ZERO_TIME, decode_state, encode_state, format_time, parse_time
from .journal import JOURNAL_SUFFIX
from .records import (
    ACCEPTED,
    DIRECT,
    EXPIRED,
    HISTORY,
    OUTGOING,
    OUTGOING_STATES,
    PENDING,
    REJECTED,
    RELAY,
    TABLES,
    TRUSTED,
    WAITING,
    WITHDRAWN,
    Change,
    FormerTrust,
    OutgoingRequest,
    PendingHandshake,
    Record,
    TrustRecord,
    TrustState,
)
from .trust_store import (
    JOURNAL_MIN_BYTES,
    JOURNAL_RATIO,
    LOCK_SUFFIX,
    TrustStore,
    corrupt_files,
    load_state,
)

__all__ = [
    "ACCEPTED",
    "DIRECT",
    "EXPIRED",
    "HISTORY",
    "JOURNAL_MIN_BYTES",
    "JOURNAL_RATIO",
    "JOURNAL_SUFFIX",
    "LOCK_SUFFIX",
    "OUTGOING",
    "OUTGOING_STATES",
    "PENDING",
    "REJECTED",
    "RELAY",
    "TABLES",
    "TRUSTED",
    "WAITING",
    "WITHDRAWN",
    "ZERO_TIME",
    "Change",
    "FormerTrust",
    "OutgoingRequest",
    "PendingHandshake",
    "Record",
    "StoreError",
    "TrustRecord",
    "TrustState",
    "TrustStore",
    "corrupt_files",
    "decode_state",
    "encode_state",
    "format_time",
    "load_state",
    "parse_time",
]
