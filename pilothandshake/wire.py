"""One port-444 message over TCP (SPEC section 3): the bounded reader, the receipt, the
sender and the reset that refuses a connection. What the bytes mean is ``messages``' job;
whose key signed a receipt is the caller's (``receipt_challenge`` in ``messages``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import struct
import time
from typing import Callable, NoReturn

from .addresses import format_address
from .constants import DIAL_TIMEOUT, MAX_MESSAGE_SIZE, PORT_HANDSHAKE, READ_DEADLINE, SEND_GRACE
from .drops import Drop, DropKind
from .errors import MessageError, SendError

__all__ = [
    "Peer",
    "peer_of",
    "peer_text",
    "read_message",
    "reset_close",
    "send_message",
    "serve_message",
    "write_receipt",
]

log = logging.getLogger(__name__)

# The (host, port) a connection came from. A port of 0 marks a peer off TCP ("local", a Unix
# socket) or one the socket could no longer tell ("unknown").
Peer = tuple[str, int]

_MAX_RECEIPT = 1024  # a receipt line is under 120 bytes; more is not a receipt
_SIGNATURE_SIZE = 64


def _fail(reason: str) -> NoReturn:
    raise MessageError(Drop(DropKind.MALFORMED, reason))


_JSON_SPACE = b" \t\r\n"
# Outside a string only brackets and quotes change the scanner's state; inside, only a quote
# or a backslash. Multi-byte UTF-8 never contains these bytes, so scanning bytes is exact.
_OUTSIDE = re.compile(rb'[{}\[\]"]')
_INSIDE = re.compile(rb'["\\]')


class _ObjectScanner:
    """Finds the end of the first JSON object in a growing buffer, visiting each byte once."""

    def __init__(self) -> None:
        self.start = -1  # index of the opening brace once seen
        self.pos = 0  # next byte to examine (may pass the buffer end after a backslash)
        self.depth = 0
        self.in_string = False

    def feed(self, buf: bytearray) -> int:
        """Scan the bytes added since the last call; return the end index (exclusive) of the
        complete object, or -1. Raises ``MessageError`` if the data is not an object."""
        if self.start < 0:
            while self.pos < len(buf) and buf[self.pos] in _JSON_SPACE:
                self.pos += 1
            if self.pos == len(buf):
                return -1
            if buf[self.pos] != ord("{"):
                _fail("not a JSON object")
            self.start = self.pos
        while True:
            pattern = _INSIDE if self.in_string else _OUTSIDE
            found = pattern.search(buf, self.pos)
            if found is None:
                self.pos = max(self.pos, len(buf))
                return -1
            index = found.start()
            byte = buf[index]
            self.pos = index + 1
            if self.in_string:
                if byte == ord("\\"):
                    self.pos = index + 2  # skip the escaped byte, even if not yet received
                else:
                    self.in_string = False
            elif byte == ord('"'):
                self.in_string = True
            elif byte in b"{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return self.pos


def peer_of(conn: socket.socket) -> Peer:
    """The (host, port) of ``conn``'s peer."""
    try:
        peer = conn.getpeername()
    except OSError:
        return ("unknown", 0)
    if isinstance(peer, tuple) and len(peer) >= 2:
        return (str(peer[0]), int(peer[1]))
    return (str(peer) or "local", 0)


def peer_text(peer: Peer) -> str:
    """``peer`` for a log line: ``host:port`` (``[v6]:port``), or the host alone off TCP."""
    return format_address(peer) if peer[1] else peer[0]


def serve_message(
    conn: socket.socket,
    take: Callable[[bytes, Peer], bytes | None],
    unreadable: Callable[[Peer, MessageError], None],
) -> None:
    """Serve one port-444 connection (SPEC 3): read one message (``read_message``), hand it
    to ``take``, write the receipt with the signature ``take`` returns when it took the
    message (None: no receipt), close. A message that cannot be read goes to ``unreadable``
    with why. Never raises: an unexpected error is logged."""
    try:
        peer = peer_of(conn)
        try:
            data = read_message(conn)
        except MessageError as exc:
            unreadable(peer, exc)
            return
        signature = take(data, peer)
        if signature is not None:
            write_receipt(conn, signature)
    except Exception:
        log.error("unexpected error serving a port %d connection", PORT_HANDSHAKE, exc_info=True)
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def read_message(
    sock: socket.socket, max_size: int = MAX_MESSAGE_SIZE, deadline: float = READ_DEADLINE
) -> bytes:
    """Read one JSON object from ``sock`` (SPEC 3 receiving).

    Stops as soon as the bytes form one complete object (returned without surrounding
    whitespace or trailing bytes) or the peer closes (what was read is returned, for
    ``from_json`` to reject). Either way it then shuts down the read side of ``sock`` (the
    server's slot accounting sees the message is whole; nothing more is read). The write
    side stays open: the caller processes the message, writes the receipt when it took it
    (``write_receipt``) and closes ``sock``. Raises ``MessageError`` for "not a JSON
    object", "too large" (more than ``max_size`` bytes), "timed out" (``deadline`` seconds
    in total), or a receive error.
    """
    end_time = time.monotonic() + deadline
    buf = bytearray()
    scanner = _ObjectScanner()
    # A blocking socket (as accepted) first takes what has already arrived, without setting
    # a timeout: a sender writes its message right after connecting, so one recv() usually
    # holds it all, where a timed recv() costs two more system calls (ioctl, poll).
    ready_first = sock.gettimeout() is None
    while True:
        # Never read more than one byte past the limit: that byte proves "too large".
        limit = min(65536, max_size + 1 - len(buf))
        chunk = _receive_ready(sock, limit) if ready_first else None
        ready_first = False
        if chunk is None:
            remaining = end_time - time.monotonic()
            if remaining <= 0:
                _fail(f"timed out after {deadline:g} s")
            sock.settimeout(remaining)
            chunk = _receive(sock, limit, deadline)
        if not chunk:
            _shut(sock, socket.SHUT_RD)
            return bytes(buf)
        buf += chunk
        end = scanner.feed(buf)
        if end >= 0 and end <= max_size:
            _shut(sock, socket.SHUT_RD)
            return bytes(buf[scanner.start : end])
        if len(buf) > max_size:
            _fail(f"message too large (more than {max_size} bytes)")


def _receive_ready(sock: socket.socket, limit: int) -> bytes | None:
    """What has arrived on a blocking ``sock`` (b"" at its end), or None if nothing yet."""
    try:
        return sock.recv(limit, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        _fail(f"receive failed: {exc}")


def _receive(sock: socket.socket, limit: int, deadline: float) -> bytes:
    """Wait for bytes on ``sock`` (timeout already set); ``deadline`` is for the message."""
    try:
        return sock.recv(limit)
    except socket.timeout:
        _fail(f"timed out after {deadline:g} s")
    except OSError as exc:
        _fail(f"receive failed: {exc}")


def _shut(sock: socket.socket, how: int) -> None:
    # A peer that has already gone away cannot be told; its sender will not be waiting.
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def write_receipt(sock: socket.socket, signature: bytes, timeout: float = SEND_GRACE) -> None:
    """Write the receipt ``{"receipt": "<b64 signature>"}`` and a newline, then the end of
    stream (SPEC 3). Best effort within ``timeout``: a sender that is gone or stopped
    reading gets nothing, and relays the message (its copy is then a duplicate)."""
    line = b'{"receipt": "' + base64.b64encode(signature) + b'"}\n'
    with contextlib.suppress(OSError):
        sock.settimeout(timeout)
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)


def send_message(
    address: tuple[str, int],
    data: bytes,
    timeout: float = DIAL_TIMEOUT,
    grace: float = SEND_GRACE,
) -> bytes | None:
    """Send one message (SPEC 3 sending): connect, write, half-close, then wait up to
    ``grace`` seconds for the receiver's receipt and end of stream.

    Returns the receipt's signature (64 bytes, not yet checked: whose key must have signed
    it is the caller's to know), or None when the peer closed without a well-formed receipt
    (it answered, but proved nothing: a round-2 node, a receiver that dropped the message,
    or an address that someone else holds). Raises ``SendError`` with the reason for a
    failure to connect or write, a reset, or no end of stream within the grace (a peer that
    is hung, stopped or swamped), so the caller can try the relay."""
    host, port = address
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError) as exc:
        # ValueError: a host the idna codec refuses ("a..b", a 64-byte label) or with a NUL.
        raise SendError(f"connect to {where} failed: {exc}") from exc
    with sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise SendError(f"send to {where} failed: {exc}") from exc
        answer = bytearray()
        end_time = time.monotonic() + grace
        while b"\n" not in answer and len(answer) <= _MAX_RECEIPT:
            remaining = end_time - time.monotonic()
            if remaining <= 0:
                raise SendError(f"{where} did not confirm the message within {grace:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(_MAX_RECEIPT + 1)
            except socket.timeout:
                raise SendError(
                    f"{where} did not confirm the message within {grace:g} s (peer hung?)"
                ) from None
            except OSError as exc:
                raise SendError(f"{where} reset the connection: {exc}") from exc
            if not chunk:
                break
            answer += chunk
        return _receipt(bytes(answer))


def _receipt(answer: bytes) -> bytes | None:
    """The signature of a receipt line, or None when ``answer`` is not one."""
    line = answer.partition(b"\n")[0]
    try:
        receipt = json.loads(line)
        signature = base64.b64decode(receipt["receipt"], validate=True)
    except (ValueError, TypeError, KeyError, binascii.Error):
        return None
    return signature if len(signature) == _SIGNATURE_SIZE else None


def reset_close(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (``SO_LINGER`` 0) instead of a normal close; never raises."""
    # A socket that is already dead cannot take the option; a plain close is all that is left.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
