"""trust.json.journal: the changes written since trust.json, one fsynced line per write.

Format (version 2): UTF-8 lines, each ending in ``\\n``, each framed as ``<crc> <json>``:
``crc`` is the CRC-32 of the JSON bytes in 8 lowercase hex digits, so a line damaged on disk
is told from a whole one even when it still parses (SQLite's WAL frames carry a checksum for
the same reason). The first line is a header naming, by SHA-256, the trust.json the lines
below extend: ``{"journal": 2, "base": "<hex digest>"}``. Each other line is one write:
``[[table, node_id, record or null], ...]``, whole records in trust.json's own encoding,
applied in order. Version 1 journals (the same lines without the checksum, a header with
``"journal": 1``, written before round 3) are still read; a new journal is always version 2.

The commit point of a write is the fsync of its line *with* the newline: a line is applied
on replay only when it ends in ``\\n``. Bytes after the last newline, or a last line that
does not parse, are a write cut off by a crash (its commit never returned): ignored. A bad
line anywhere else is damage: an error naming the journal and the line. A journal whose
header names another trust.json (replaced by our own checkpoint, a Go daemon, an operator
moving a corrupt file aside) is never applied. Replay is idempotent: the lines hold whole
records, so replaying onto a state that already holds them changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable
from typing import Any

from .. import fsutil
from ..constants import MAX_NODE_ID
from ..errors import StoreError
from .codec import decode_record
from .records import TABLES, Change, TrustState

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
_VERSION = 2  # lines framed with a CRC-32; version 1 (no checksum) is still read
_UNFRAMED_VERSION = 1
_CRC = re.compile(rb"[0-9a-f]{8}")


def digest(data: bytes) -> str:
    """The SHA-256 (hex) of trust.json's bytes, by which a journal names its base."""
    return hashlib.sha256(data).hexdigest()


def frame(payload: bytes) -> bytes:
    """A journal line holding ``payload`` (JSON bytes): its CRC-32, a space, it, a newline."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def unframe(line: bytes) -> bytes:
    """The JSON bytes of a version-2 line (without its newline); ``ValueError`` when its
    checksum is missing or does not match (the line was damaged)."""
    if len(line) < 9 or line[8:9] != b" " or not _CRC.fullmatch(line[:8]):
        raise ValueError("no checksum")
    payload = line[9:]
    if zlib.crc32(payload) != int(line[:8], 16):
        raise ValueError("checksum mismatch (the line was damaged)")
    return payload


def header(base: str) -> bytes:
    """The journal's first line: which trust.json (by ``digest``) the lines below extend."""
    return frame(json.dumps({"journal": _VERSION, "base": base}).encode())


def encode_line(entries: Iterable[tuple[Change, str]]) -> bytes:
    """One journal line holding ``entries`` in order: each a change and its record's JSON text
    (from ``Fragments.update``; ignored for a removal)."""
    items = [
        f'["{change.table}",{change.node_id},{text if change.value is not None else "null"}]'
        for change, text in entries
    ]
    return frame(("[" + ",".join(items) + "]").encode("utf-8"))


def decode_line(doc: Any, where: str) -> list[Change]:
    """The changes of one parsed journal line; raises ``ValueError`` naming ``where``."""
    if not isinstance(doc, list):
        raise ValueError(f"{where}: expected a list of changes")
    changes = []
    for index, item in enumerate(doc):
        at = f"{where}[{index}]"
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ValueError(f"{at}: expected [table, node_id, record or null]")
        table, node, value = item
        if table not in TABLES:
            raise ValueError(f"{at}: unknown table {json.dumps(table)[:40]}")
        if type(node) is not int or not 0 <= node <= MAX_NODE_ID:
            raise ValueError(f"{at}: expected a node ID, got {json.dumps(node)[:40]}")
        record = None
        if value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{at}: expected a record, got {json.dumps(value)[:40]}")
            record = decode_record(table, value, at)
            if record.node_id != node:
                raise ValueError(f"{at}: record of node {record.node_id} filed under {node}")
        changes.append(Change(table, node, record))
    return changes


def _parse(line: bytes, framed: bool) -> Any:
    """JSON of one journal line (``framed``: version 2); raises ``ValueError`` (a cut-off or
    damaged line does not parse)."""
    try:
        return json.loads((unframe(line) if framed else line).decode("utf-8"))
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def replay(path: str, base: str | None, state: TrustState) -> int:
    """Apply the journal at ``path`` to ``state``, read from a trust.json whose ``digest`` is
    ``base`` (None: there is no trust.json). Returns the journal's size in bytes (0: absent).

    Raises ``StoreError`` naming the journal when it cannot be read or is damaged.
    """
    try:
        data = fsutil.read_file(path)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}", path=path) from exc
    lines = data.split(b"\n")
    torn = lines.pop()
    if torn:
        log.warning("ignoring %d bytes of an unfinished write at the end of %s", len(torn), path)
    # A version-1 journal starts with its header's JSON; a version-2 line with a checksum.
    framed = not lines or not lines[0].startswith(b"{")
    docs = []
    for number, line in enumerate(lines, 1):
        try:
            docs.append(_parse(line, framed))
        except ValueError as exc:
            if number == len(lines) and not torn:
                log.warning("ignoring the unfinished last line %d of %s", number, path)
                break
            raise StoreError(
                f"trust journal {path} line {number} does not parse: {exc}", path=path
            ) from exc
    if not docs:
        return len(data)
    first = docs[0]
    if not (
        isinstance(first, dict)
        and first.get("journal") == (_VERSION if framed else _UNFRAMED_VERSION)
        and isinstance(first.get("base"), str)
    ):
        raise StoreError(f"trust journal {path} line 1 is not a journal header", path=path)
    if first["base"] != base:
        log.warning("ignoring %s: it extends a trust.json that has since been replaced", path)
        return len(data)
    for number, doc in enumerate(docs[1:], 2):
        try:
            changes = decode_line(doc, f"line {number}")
        except ValueError as exc:
            raise StoreError(f"trust journal {path} does not parse: {exc}", path=path) from exc
        for change in changes:
            state.apply(change)
    return len(data)


class Journal:
    """The journal file as its one writer sees it: it owns the descriptor.

    ``size`` is the journal's length in bytes (None: unknown, after a failure). Lines may be
    appended only while ``appendable``: the file then holds a header naming ``base`` (the
    trust.json on disk) and only whole lines this object appended. Not thread-safe: the
    store's one writer at a time calls it.
    """

    def __init__(self, path: str, size: int, base: str | None) -> None:
        """Describe the journal at ``path`` as loading found it (``size`` bytes, extending the
        trust.json whose digest is ``base``); opens nothing yet."""
        self.path = path
        self.size: int | None = size
        self.base = base
        # Not until a checkpoint: what a crash left may be torn or extend another trust.json.
        self._ours = False
        self._fd: int | None = None

    @property
    def appendable(self) -> bool:
        """Whether ``append`` may add a line (else the next write checkpoints)."""
        return self._ours and self.size is not None and self.base is not None

    def open(self) -> int:
        """Create the journal (mode 0600) or open it, once; its descriptor. A caller that
        may have created it fsyncs the directory (a checkpoint does, right after its
        rename)."""
        if self._fd is not None:
            return self._fd
        fd = fsutil.open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if os.fstat(fd).st_mode & 0o777 != 0o600:
                os.fchmod(fd, 0o600)  # copied in from elsewhere
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def append(self, line: bytes) -> None:
        """Append ``line`` (after a header when the journal is empty) and fsync it: the commit
        point. On failure, cut the journal back to where it was; if that fails too, the
        journal is no longer ``appendable`` and ``size`` is None. Raises ``OSError``."""
        start, base = self.size, self.base
        if not self._ours or start is None or base is None:  # what appendable says
            raise RuntimeError(f"{self.path} is not appendable: checkpoint first")
        fd = self.open()
        data = header(base) + line if start == 0 else line
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
                log.error("cannot cut %s back after a failed write: %s", self.path, exc)
                self.forget()
            raise
        self.size = start + len(data)

    def rebase(self, base: str) -> None:
        """trust.json was just replaced by a file whose digest is ``base``: the header on disk
        names the old one, so nothing is appended until ``empty`` succeeds."""
        self.base, self._ours = base, False

    def empty(self) -> None:
        """Truncate the journal after a checkpoint and make it ``appendable``. A failure is
        logged, not raised: trust.json is durable and complete, and loading ignores a
        journal whose header names the replaced file."""
        if self.size != 0:
            try:
                fd = self.open()
                os.ftruncate(fd, 0)
                os.fsync(fd)
            except OSError as exc:
                log.warning("cannot empty %s after a checkpoint: %s", self.path, exc)
                self.size = None
                return
        self.size, self._ours = 0, True

    def forget(self) -> None:
        """The file's length is unknown (a write failed midway): the next write checkpoints."""
        self.size, self._ours = None, False

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
