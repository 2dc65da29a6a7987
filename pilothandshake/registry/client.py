"""The registry client: the Pilot registry wire protocol of SPEC section 11.

A frame is a 4-byte big-endian length and that many bytes of a UTF-8 JSON object; request
and response alternate on one connection. ``RegistryConnection`` keeps a few idle
connections so that a slow call (a poll) never blocks another thread's lookup; no lock is
held during I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

from ..addresses import parse_address
from ..constants import MAX_REGISTRY_FRAME_CLIENT, REGISTRY_TIMEOUT
from ..errors import RegistryError
from ..identity import b64encode
from ..metrics import Metrics
from .challenges import (
    heartbeat_challenge,
    poll_challenge,
    register_challenge,
    report_trust_challenge,
    resolve_challenge,
    revoke_trust_challenge,
    set_hostname_challenge,
    set_visibility_challenge,
)

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
# Idle connections kept per client; more concurrent callers simply open (and then close)
# extra connections.
_MAX_IDLE = 4
# Characters of a registry's error text kept (the embedded registry's fit in far less).
_MAX_ERROR_TEXT = 300


class ConnectionBroken(RegistryError):
    """The connection failed or was closed by the peer; the request may be retried."""


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame: length header plus compact JSON (ASCII-escaped, so any str encodes)."""
    body = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return _HEADER.pack(len(body)) + body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Read exactly ``size`` bytes before ``deadline`` (monotonic); b"" on EOF before any."""
    buf = bytearray()
    while len(buf) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("frame did not arrive in time")
        sock.settimeout(remaining)
        chunk = sock.recv(min(size - len(buf), 65536))
        if not chunk:
            if not buf:
                return b""
            raise ConnectionBroken("connection closed in the middle of a frame")
        buf += chunk
    return bytes(buf)


def read_frame(
    sock: socket.socket, max_size: int, timeout: float, body_timeout: float
) -> dict[str, Any] | None:
    """Read one frame and decode its JSON object.

    Returns None when the peer closed the connection cleanly between frames. Raises
    ``ConnectionBroken`` on a close inside a frame, ``RegistryError`` for a frame over
    ``max_size`` or one that is not a JSON object, and ``OSError`` (``socket.timeout``)
    when the header does not arrive within ``timeout`` or the body within
    ``body_timeout`` after it.
    """
    header = _recv_exact(sock, _HEADER.size, time.monotonic() + timeout)
    if not header:
        return None
    (size,) = _HEADER.unpack(header)
    if size > max_size:
        raise RegistryError(f"frame of {size} bytes exceeds the limit of {max_size}")
    body = _recv_exact(sock, size, time.monotonic() + body_timeout)
    if len(body) < size:
        raise ConnectionBroken("connection closed in the middle of a frame")
    return decode_frame(body)


def decode_frame(body: bytes) -> dict[str, Any]:
    """The JSON object a frame's ``body`` holds; ``RegistryError`` when it is not valid
    UTF-8 JSON (no NaN or Infinity, bounded nesting) or not an object."""
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RegistryError(f"malformed frame: {exc}") from None
    if not isinstance(obj, dict):
        raise RegistryError("malformed frame: not a JSON object")
    return obj


def _printable(value: object) -> str:
    """A registry's error text made safe to show: control characters escaped, cut short."""
    text = value if isinstance(value, str) else ""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:_MAX_ERROR_TEXT])
    return shown + ("..." if len(text) > _MAX_ERROR_TEXT else "")


def normalize_fingerprint(text: str) -> str:
    """Lowercase hex without colons or spaces, for comparing SHA-256 fingerprints."""
    return text.replace(":", "").replace(" ", "").lower()


class RegistryConnection:
    """A thread-safe client of the registry (SPEC section 11).

    ``address`` is ``"host:port"``. ``signer(challenge) -> signature`` signs the requests
    that need it (heartbeat, resolve, set_visibility, set_hostname, report_trust,
    revoke_trust, poll_handshakes); ``request_handshake`` and ``respond_handshake`` take
    the caller's signature instead. With ``tls`` and a ``fingerprint`` (hex SHA-256 of the
    server's DER certificate, colons allowed) the certificate is pinned instead of verified
    against the system CAs. Every method returns the response dict or raises ``RegistryError``.
    Every request is counted and timed into ``metrics`` (its own when not given).
    """

    on_relayed: Callable[[int, str], None] | None = None

    def __init__(
        self,
        address: str,
        signer: Callable[[bytes], bytes] | None = None,
        *,
        tls: bool = False,
        fingerprint: str = "",
        timeout: float = REGISTRY_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        try:
            self._host, self._port = parse_address(address)
        except ValueError as exc:
            raise RegistryError(f"registry address: {exc}") from None
        self.address = address
        self._signer = signer
        self._timeout = timeout
        self._metrics = metrics if metrics is not None else Metrics()
        self._fingerprint = normalize_fingerprint(fingerprint)
        self._tls: ssl.SSLContext | None = None
        if tls:
            self._tls = ssl.create_default_context()
            if self._fingerprint:
                # The pin replaces CA verification; it is checked after the TLS handshake.
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._busy: set[socket.socket] = set()  # connections with a call in flight
        self._closed = False

    # -- connections ---------------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except (OSError, ValueError) as exc:  # ValueError: a host the idna codec refuses
            raise RegistryError(f"cannot connect to registry {self.address}: {exc}") from None
        if self._tls is None:
            return sock
        try:
            tls_sock = self._tls.wrap_socket(sock, server_hostname=self._host)
        except (OSError, ValueError) as exc:
            sock.close()
            raise RegistryError(f"TLS handshake with registry {self.address}: {exc}") from None
        if self._fingerprint:
            der = tls_sock.getpeercert(binary_form=True) or b""
            actual = hashlib.sha256(der).hexdigest()
            if actual != self._fingerprint:
                tls_sock.close()
                raise RegistryError(
                    f"registry {self.address} certificate fingerprint {actual} does not match "
                    f"the pinned {self._fingerprint}"
                )
        return tls_sock

    def _checkout(self, fresh: bool = False) -> socket.socket:
        """An idle connection (unless ``fresh``), or a new one; marked busy, so that
        ``close()`` can abort the call made on it."""
        sock = None
        with self._lock:
            if self._closed:
                raise RegistryError("registry client is closed")
            if self._idle and not fresh:
                sock = self._idle.pop()
                self._busy.add(sock)
        if sock is not None:
            return sock
        sock = self._connect()
        with self._lock:
            if not self._closed:
                self._busy.add(sock)
                return sock
        sock.close()
        raise RegistryError("registry client is closed")

    def _checkin(self, sock: socket.socket, keep: bool) -> None:
        with self._lock:
            self._busy.discard(sock)
            if keep and not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(sock)
                return
        sock.close()

    def _exchange(
        self, sock: socket.socket, request: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        try:
            sock.settimeout(self._timeout)
            sock.sendall(encode_frame(request))
            response = read_frame(sock, MAX_REGISTRY_FRAME_CLIENT, timeout, self._timeout)
        except socket.timeout:
            raise RegistryError(
                f"registry {self.address} did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectionBroken(f"registry {self.address}: {exc}") from None
        if response is None:
            raise ConnectionBroken(f"registry {self.address} closed the connection")
        return response

    def _attempt(self, fresh: bool, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One exchange; the connection is kept for reuse only if it succeeded."""
        sock = self._checkout(fresh)
        try:
            response = self._exchange(sock, request, timeout)
        except BaseException:
            self._checkin(sock, keep=False)
            raise
        self._checkin(sock, keep=True)
        return response

    def call(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its ``<type>_ok`` response; ``timeout`` (default: the
        client's) bounds the wait for the answer, e.g. of a held poll.

        A broken connection is reopened and the request retried once; an error response,
        a timeout, a failed connect or a malformed or oversized frame is not retried.
        """
        kind = str(request.get("type"))
        wait = self._timeout if timeout is None else timeout
        began = time.monotonic()
        outcome = "unreachable"  # no answer: connect, send or receive failed
        try:
            try:
                response = self._attempt(False, request, wait)
            except ConnectionBroken as exc:
                log.debug("registry %s: %s; retrying %s once", self.address, exc, kind)
                response = self._attempt(True, request, wait)
            outcome = "error"
            checked = self._check(kind, response)
            outcome = "ok"
            return checked
        finally:
            self._metrics.registry_request(kind, outcome, time.monotonic() - began)

    def _check(self, kind: str, response: dict[str, Any]) -> dict[str, Any]:
        rtype = response.get("type")
        if rtype == "error":
            # The registry's own words reach the user (the embedded registry says why), but
            # never raw: a hostile registry must not inject lines into logs or terminals.
            raise RegistryError(_printable(response.get("error")) or "request failed")
        if rtype != f"{kind}_ok":
            raise RegistryError(
                f"registry {self.address} answered {kind} with unexpected type {rtype!r}"
            )
        return response

    def _sign(self, challenge: bytes) -> str:
        if self._signer is None:
            raise RegistryError("registry request needs a signature but no identity is set")
        return b64encode(self._signer(challenge))

    def close(self) -> None:
        """Close the idle connections and abort the calls in flight (their connections are
        shut down, so they raise ``RegistryError`` at once, however long they would have
        waited); later calls raise ``RegistryError``."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for sock in idle:
            sock.close()
        for sock in busy:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- the messages of SPEC section 11 ---------------------------------------------

    def register(
        self, listen_addr: str, public_key_b64: str, owner: str = "", hostname: str = ""
    ) -> dict[str, Any]:
        """Register (or re-register) a node; the response carries ``node_id``.

        With ``hostname`` the name is set in the same step unless it is taken or invalid:
        the response then has no ``hostname`` (SPEC 11; the registry may add why in
        ``hostname_error``). With a signer the request is signed (SPEC 17: ``timestamp``,
        Unix seconds, and ``signature`` over ``register:<public_key>:<timestamp>``), so that
        ``pilot-registryd`` lets it change a known key's record; the production registry
        ignores both fields. ``pilot-registryd`` advertises what more it can do in
        ``features`` (``wait_poll``, SPEC 18).
        """
        request: dict[str, Any] = {
            "type": "register",
            "listen_addr": listen_addr,
            "public_key": public_key_b64,
        }
        if owner:
            request["owner"] = owner
        if hostname:
            request["hostname"] = hostname
        if self._signer is not None:
            timestamp = int(time.time())
            request["timestamp"] = timestamp
            request["signature"] = self._sign(register_challenge(public_key_b64, timestamp))
        return self.call(request)

    def heartbeat(self, node_id: int) -> dict[str, Any]:
        """Keep ``node_id`` online (signed ``heartbeat:<N>``)."""
        return self.call(
            {
                "type": "heartbeat",
                "node_id": node_id,
                "signature": self._sign(heartbeat_challenge(node_id)),
            }
        )

    def lookup(self, node_id: int) -> dict[str, Any]:
        """``node_id``, ``public_key``, ``networks``, ``public`` (and ``real_addr`` when
        public, ``hostname`` when set), as the registry answered."""
        return self.call({"type": "lookup", "node_id": node_id})

    def resolve(self, node_id: int, requester_id: int) -> dict[str, Any]:
        """The ``real_addr`` of ``node_id``, asked by ``requester_id`` (signed)."""
        return self.call(
            {
                "type": "resolve",
                "node_id": node_id,
                "requester_id": requester_id,
                "signature": self._sign(resolve_challenge(requester_id, node_id)),
            }
        )

    def set_visibility(self, node_id: int, public: bool) -> dict[str, Any]:
        """Make ``node_id`` resolvable by anyone (``public``) or not (signed)."""
        return self.call(
            {
                "type": "set_visibility",
                "node_id": node_id,
                "public": public,
                "signature": self._sign(set_visibility_challenge(node_id)),
            }
        )

    def report_trust(self, node_id: int, peer_id: int) -> dict[str, Any]:
        """Record the trust pair ``node_id``-``peer_id`` (signed)."""
        return self.call(
            {
                "type": "report_trust",
                "node_id": node_id,
                "peer_id": peer_id,
                "signature": self._sign(report_trust_challenge(node_id, peer_id)),
            }
        )

    def revoke_trust(self, node_id: int, peer_id: int) -> dict[str, Any]:
        """Remove the trust pair ``node_id``-``peer_id`` (signed; fails if absent)."""
        return self.call(
            {
                "type": "revoke_trust",
                "node_id": node_id,
                "peer_id": peer_id,
                "signature": self._sign(revoke_trust_challenge(node_id, peer_id)),
            }
        )

    def request_handshake(
        self, from_node_id: int, to_node_id: int, justification: str, signature_b64: str
    ) -> dict[str, Any]:
        """Queue a relayed request; ``signature_b64`` signs ``handshake:<from>:<to>``. Once
        the registry took it, ``on_relayed(to_node_id, justification)`` runs (when set: the
        daemon's registry loop remembers what to send again after an outage)."""
        response = self.call(
            {
                "type": "request_handshake",
                "from_node_id": from_node_id,
                "to_node_id": to_node_id,
                "justification": justification,
                "signature": signature_b64,
            }
        )
        if self.on_relayed is not None:
            self.on_relayed(to_node_id, justification)
        return response

    def respond_handshake(
        self, node_id: int, peer_id: int, accept: bool, signature_b64: str, reason: str = ""
    ) -> dict[str, Any]:
        """Answer ``peer_id``'s relayed request; ``signature_b64`` signs ``respond:<N>:<P>``.
        A rejection's ``reason`` is sent when not empty (pilot-registryd passes it on; the
        production registry ignores it)."""
        request: dict[str, Any] = {
            "type": "respond_handshake",
            "node_id": node_id,
            "peer_id": peer_id,
            "accept": accept,
            "signature": signature_b64,
        }
        if reason:
            request["reason"] = reason
        return self.call(request)

    def poll_handshakes(self, node_id: int, wait: float = 0.0) -> dict[str, Any]:
        """Drain ``node_id``'s relay inboxes: ``requests`` and ``responses`` (signed). With
        ``wait`` (seconds, a registry advertising ``wait_poll``; SPEC 18) the registry may
        hold the poll that long until something arrives: the answer is awaited that long
        plus the client's timeout."""
        request: dict[str, Any] = {
            "type": "poll_handshakes",
            "node_id": node_id,
            "signature": self._sign(poll_challenge(node_id)),
        }
        if wait > 0:
            request["wait"] = wait
        return self.call(request, self._timeout + wait if wait > 0 else None)

    def set_hostname(self, node_id: int, hostname: str) -> dict[str, Any]:
        """Name ``node_id`` (signed ``set_hostname:<N>``); "" clears. The response carries
        ``node_id`` and ``hostname``; a taken or invalid name raises ``RegistryError``."""
        return self.call(
            {
                "type": "set_hostname",
                "node_id": node_id,
                "hostname": hostname,
                "signature": self._sign(set_hostname_challenge(node_id)),
            }
        )

    def resolve_hostname(self, hostname: str) -> dict[str, Any]:
        """The node named ``hostname``: ``node_id``, ``public``, ``hostname`` (unsigned)."""
        return self.call({"type": "resolve_hostname", "hostname": hostname})
