"""The port-444 message codec (SPEC sections 3 and 4), without any I/O.

``HandshakeMsg`` is the one JSON object a connection carries; ``from_json`` is the strict
decoder every received byte goes through, ``to_json`` the encoder every sent message goes
through. The challenge functions spell each signed string of a port-444 message (SPEC
section 4) once; the registry's own signed strings are in ``registry.challenges``. Moving a
message over a socket is ``wire``'s job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from .constants import MAX_MESSAGE_SIZE, MAX_NODE_ID, MAX_TEXT_BYTES, PORT_HANDSHAKE
from .drops import Drop, DropKind
from .errors import MessageError

__all__ = [
    "HANDSHAKE_ACCEPT",
    "HANDSHAKE_REJECT",
    "HANDSHAKE_REQUEST",
    "HANDSHAKE_REVOKE",
    "MAX_NODE_ID",
    "MESSAGE_TYPES",
    "PORT_HANDSHAKE",
    "WITHDRAWN",
    "HandshakeMsg",
    "decode_b64",
    "handshake_challenge",
    "handshake_v2_challenge",
    "receipt_challenge",
    "truncate_utf8",
]

HANDSHAKE_REQUEST = "handshake_request"
HANDSHAKE_ACCEPT = "handshake_accept"
HANDSHAKE_REJECT = "handshake_reject"
HANDSHAKE_REVOKE = "handshake_revoke"
MESSAGE_TYPES = frozenset({HANDSHAKE_REQUEST, HANDSHAKE_ACCEPT, HANDSHAKE_REJECT, HANDSHAKE_REVOKE})
# The reason of the revoke a requester sends when it cancels its own request (SPEC 8).
WITHDRAWN = "request withdrawn"


_STRING_FIELDS = ("public_key", "justification", "signature", "reason", "signature_v2")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fail(reason: str) -> NoReturn:
    raise MessageError(Drop(DropKind.MALFORMED, reason))


def _reject_constant(name: str) -> NoReturn:
    _fail(f"non-finite number {name}")


def _parse_float(text: str) -> float:
    # 1e999 is valid JSON syntax but decodes to infinity, which the spec forbids like NaN.
    value = float(text)
    if not math.isfinite(value):
        _fail(f"non-finite number {text}")
    return value


def _check_unicode(value: Any) -> None:
    """Reject any string (key or value, at any depth) that cannot be written as UTF-8.

    Iterative, because the parsed value may be nested almost as deep as the recursion limit.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                _fail("string is not valid Unicode (lone surrogate)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _int_field(obj: dict[str, Any], name: str) -> int:
    if name not in obj or obj[name] is None:
        _fail(f"missing field {name!r}")
    value = obj[name]
    # bool is a subclass of int; a JSON true must not pass as node 1.
    if type(value) is not int:
        _fail(f"field {name!r} must be an integer, not {type(value).__name__}")
    return value


def _str_field(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        _fail(f"field {name!r} must be a string, not {type(value).__name__}")
    return value


def decode_b64(text: object) -> bytes | None:
    """Decode strict standard padded base64; None for anything else (non-str, "", bad alphabet,
    bad padding). ``identity.decode_key`` / ``decode_signature`` add the length rule."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _sha256hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def handshake_challenge(sender: int, recipient: int) -> bytes:
    """``handshake:<S>:<R>``: the Go-style port-444 signature and registry ``request_handshake``."""
    return f"handshake:{sender}:{recipient}".encode()


def handshake_v2_challenge(
    msg_type: str,
    sender: int,
    recipient: int,
    timestamp: int,
    justification: str,
    reason: str,
    public_key: str,
) -> bytes:
    """The ``signature_v2`` challenge (SPEC 4): binds type, timestamp, both texts and the key.

    ``public_key`` is taken as sent (its spelling matters); texts are hashed as UTF-8.
    """
    text = (
        f"handshake-v2:{msg_type}:{sender}:{recipient}:{timestamp}:"
        f"{_sha256hex(justification)}:{_sha256hex(reason)}:{public_key}"
    )
    return text.encode("utf-8", "surrogatepass")


def receipt_challenge(receiver: int, sender: int, data: bytes) -> bytes:
    """``handshake-receipt:<R>:<S>:<sha256hex(data)>``: the receipt that R took the message
    ``data`` (its bytes as sent) from S (SPEC 3)."""
    return f"handshake-receipt:{receiver}:{sender}:{hashlib.sha256(data).hexdigest()}".encode()


def truncate_utf8(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes without splitting a character.

    Lone surrogates (which UTF-8 cannot hold, e.g. from ``surrogateescape`` argv) become
    U+FFFD first, so the result can always be sent and persisted.
    """
    text = _SURROGATE.sub("\ufffd", text)
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    cut = max(limit, 0)
    # Back off over continuation bytes (10xxxxxx) to the start of the cut character.
    while cut > 0 and encoded[cut] & 0xC0 == 0x80:
        cut -= 1
    return encoded[:cut].decode("utf-8")


@dataclass
class HandshakeMsg:
    """One port-444 message (SPEC 3); fields in wire order."""

    type: str
    node_id: int
    public_key: str = ""
    justification: str = ""
    signature: str = ""
    reason: str = ""
    timestamp: int = 0
    signature_v2: str = ""

    def _fields(self, public_key: str, signature: str) -> dict[str, Any]:
        return {
            "type": self.type,
            "node_id": self.node_id,
            "public_key": public_key,
            "justification": self.justification,
            "signature": signature,
            "reason": self.reason,
            "timestamp": self.timestamp,
        }

    @staticmethod
    def _encode(fields: dict[str, Any]) -> bytes:
        try:
            return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            _fail("string is not valid Unicode (lone surrogate)")

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON in SPEC 3 field order; ``signature_v2`` omitted when "".

        Raises ``MessageError`` if a text field holds a lone surrogate.
        """
        fields = self._fields(self.public_key, self.signature)
        if self.signature_v2:
            fields["signature_v2"] = self.signature_v2
        return self._encode(fields)

    def canonical_bytes(self) -> bytes | None:
        """Legacy-mode replay material (SPEC 5 step 4): ``to_json()`` without ``signature_v2``,
        with ``public_key`` and ``signature`` re-encoded from their decoded bytes, so every
        base64 spelling of the same key and signature gives the same bytes.

        None if a non-empty ``public_key`` or ``signature`` is not valid base64.
        """
        respelled = []
        for text in (self.public_key, self.signature):
            if not text:
                respelled.append("")
                continue
            raw = decode_b64(text)
            if raw is None:
                return None
            respelled.append(base64.b64encode(raw).decode("ascii"))
        return self._encode(self._fields(respelled[0], respelled[1]))

    def v2_challenge(self, recipient: int) -> bytes:
        """The ``signature_v2`` challenge of this message sent to ``recipient``."""
        return handshake_v2_challenge(
            self.type,
            self.node_id,
            recipient,
            self.timestamp,
            self.justification,
            self.reason,
            self.public_key,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> HandshakeMsg:
        """Decode one message, checking syntax and types only (SPEC 3).

        Raises ``MessageError`` naming the problem; never anything else.
        """
        if isinstance(data, str):
            try:
                data = data.encode("utf-8")
            except UnicodeEncodeError:
                _fail("string is not valid Unicode (lone surrogate)")
        if len(data) > MAX_MESSAGE_SIZE:
            _fail(f"message too large ({len(data)} bytes > {MAX_MESSAGE_SIZE})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"invalid UTF-8 at byte {exc.start}")
        try:
            obj = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
        except RecursionError:
            _fail("JSON nested too deeply")
        except json.JSONDecodeError as exc:
            _fail(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        except ValueError as exc:
            # e.g. an integer longer than Python's int-string conversion limit.
            _fail(f"invalid JSON: {exc}")
        if not isinstance(obj, dict):
            _fail(f"not a JSON object ({type(obj).__name__})")
        # Valid UTF-8 never decodes to a surrogate: only a \u escape can make one, so the
        # walk over every string is needed only when the bytes hold one.
        if b"\\u" in data:
            _check_unicode(obj)
        if "type" not in obj or obj["type"] is None:
            _fail("missing field 'type'")
        msg_type = obj["type"]
        if not isinstance(msg_type, str):
            _fail(f"field 'type' must be a string, not {type(msg_type).__name__}")
        if msg_type not in MESSAGE_TYPES:
            _fail(f"unknown type {truncate_utf8(msg_type, 64)!r}")
        node_id = _int_field(obj, "node_id")
        if not 0 <= node_id <= MAX_NODE_ID:
            _fail(f"node_id {node_id} outside 0..{MAX_NODE_ID}")
        timestamp = _int_field(obj, "timestamp")
        strings = {name: _str_field(obj, name) for name in _STRING_FIELDS}
        return cls(type=msg_type, node_id=node_id, timestamp=timestamp, **strings)
