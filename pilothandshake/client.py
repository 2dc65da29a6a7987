"""``Client``: the blocking Python API of a running ``pilot-handshaked`` (SPEC section 13a).

Legacy code on a host where the daemon already runs talks to it through its control socket
instead of embedding a second node. ``Client`` has the names and types of ``Manager``
(SPEC section 9), so code moves between the two unchanged::

    from pilothandshake import Client
    with Client.connect() as node:              # or socket=PATH, or config=FILE
        node.send_request(42, "nightly sync")   # "sent" | "relayed" | "trusted"
        if node.wait_for_trust(42, timeout=30):
            ...

Where the socket is and the safety check before each connection are ``control_socket.py``'s
(``find_socket``, ``check_socket``; ``pilot-handshakectl`` uses the same).

Each call uses its own short connection: calls from several threads never wait for each
other, and a daemon restarted between two calls is simply reached again. This module imports
nothing heavy (no YAML unless a config file is read, no crypto, no daemon), so a short-lived
``pilot-handshakectl`` starts fast.
"""

from __future__ import annotations

import _thread
import json
import socket
import time
from collections.abc import Iterator

from .constants import CONTROL_TIMEOUT, WAIT_DEFAULT_TIMEOUT, WAIT_MAX_TIMEOUT
from .control_socket import check_socket, find_socket
from .error_codes import NOT_FOUND, NOT_RUNNING, TIMEOUT, error_for
from .errors import ControlError

# Not `typing.TYPE_CHECKING`: importing typing alone costs a short CLI run milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, TypeVar

    from .store import OutgoingRequest, PendingHandshake, TrustRecord

    Response = dict[str, Any]
    _Self = TypeVar("_Self", bound="_Closing")

__all__ = [
    "Client",
    "ControlClient",
    "ControlError",
    "EventStream",
    "node_of_address",
    "raise_for_error",
]


def raise_for_error(response: Response, command: str = "") -> Any:
    """The ``data`` of an ok response to ``command``; an error response raises the package's
    exception for its code (``NotTrustedError`` for an ``untrust`` of a node not trusted,
    ``SendError`` for a ``handshake`` that reached nobody, ``RegistryError`` for a hostname
    that does not resolve or a registry out of reach, ``StoreError`` for ``internal``, else
    ``HandshakeError``) with the daemon's message."""
    if response["status"] == "ok":
        return response.get("data")
    error = error_for(command, str(response.get("code")))
    raise error(str(response.get("message") or response.get("code") or "failed"))


def node_of_address(text: str) -> int | None:
    """The node part of a Pilot address ``N:XXXX.XXXX.XXXX`` (the network in decimal, then
    its four hex digits again, then the node ID's eight, as ``pilotctl`` accepts it); None
    when ``text`` is not one."""
    network, colon, groups = text.partition(":")
    parts = groups.split(".")
    if not (colon and network.isascii() and network.isdigit() and len(parts) == 3):
        return None
    if not all(len(p) == 4 and p.isascii() and _is_hex(p) for p in parts):
        return None
    if int(network) != int(parts[0], 16):
        return None
    return int(parts[1] + parts[2], 16)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


class ControlClient:
    """The control socket's line protocol at ``path``: one request per connection.
    ``timeout`` bounds the connect and the answer (``wait`` adds its own timeout)."""

    def __init__(self, path: str, timeout: float = CONTROL_TIMEOUT) -> None:
        """Remember where the socket is; nothing is connected until a request."""
        self.path = path
        self.timeout = timeout

    def request(self, command: str, **args: Any) -> Response:
        """Send one request and return the parsed response (ok or error); raises
        ``ControlError`` when the daemon cannot be reached, is not safe to talk to, or does
        not answer in time."""
        answer_timeout = self.timeout
        if command == "wait":
            answer_timeout += min(
                float(args.get("timeout", WAIT_DEFAULT_TIMEOUT)), WAIT_MAX_TIMEOUT
            )
        sock = self.open(command, args, answer_timeout)
        try:
            with sock.makefile("rb") as reader:
                for response in self.responses(reader):
                    return response
        finally:
            sock.close()
        raise ControlError(f"pilot-handshaked closed {self.path} without answering")

    def stream(self, command: str, **args: Any) -> Iterator[Response]:
        """Send one request and yield every response line until the daemon closes; a
        following stream (``follow``) waits for news without limit."""
        sock = self.open(command, args, None if args.get("follow") else self.timeout)
        try:
            with sock.makefile("rb") as reader:
                yield from self.responses(reader)
        finally:
            sock.close()

    def open(
        self, command: str, args: dict[str, Any], answer_timeout: float | None
    ) -> socket.socket:
        """A connection that has sent one request and reads with ``answer_timeout``."""
        check_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise ControlError(
                    f"pilot-handshaked is not running (no socket at {self.path})", NOT_RUNNING
                ) from None
            except socket.timeout:
                raise ControlError(
                    f"no answer from pilot-handshaked at {self.path}", TIMEOUT
                ) from None
            except OSError as exc:
                raise ControlError(f"cannot connect to {self.path}: {exc}") from None
            try:
                sock.sendall(json.dumps({"command": command, **args}).encode("utf-8") + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may answer and close before reading (a refused uid, a full
                # socket): its answer is still buffered, so read it rather than report this.
                pass
            except OSError as exc:
                raise ControlError(f"cannot send to {self.path}: {exc}") from None
            sock.settimeout(answer_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def responses(self, reader: Any) -> Iterator[Response]:
        """Parsed response lines from ``reader`` until the daemon closes."""
        while True:
            try:
                line = reader.readline()
            except socket.timeout:
                raise ControlError(
                    f"no answer from pilot-handshaked at {self.path}", TIMEOUT
                ) from None
            except OSError as exc:
                raise ControlError(f"lost the connection to {self.path}: {exc}") from None
            except ValueError:  # the stream was closed under the reader (EventStream.close)
                return
            if not line:
                return
            try:
                response = json.loads(line)
            except ValueError:
                response = None
            if not isinstance(response, dict) or response.get("status") not in ("ok", "error"):
                raise ControlError(f"unreadable answer from pilot-handshaked at {self.path}")
            yield response


class _Closing:
    """Something ``with`` closes at the end of the block."""

    def close(self) -> None:
        """Release what it holds; idempotent."""
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class EventStream(_Closing):
    """Events from the daemon as they happen (``Client.events``): iterate for the event
    dicts (``event``, ``node_id``, ``timestamp``, ``data``); ``close()`` ends it, also from
    another thread while an iteration waits."""

    def __init__(self, wire: ControlClient, history: bool, follow: bool) -> None:
        """Open the stream; raises ``ControlError`` when the daemon cannot be reached."""
        self._wire = wire
        self._sock = wire.open(
            "events", {"follow": follow, "history": history}, None if follow else wire.timeout
        )
        self._reader = self._sock.makefile("rb")
        self._responses = wire.responses(self._reader)
        # A plain flag, not a threading.Event: nothing waits on it, and importing threading
        # would cost every pilot-handshakectl run most of a millisecond.
        self._closed = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise StopIteration
        try:
            response = next(self._responses)
        except ControlError:
            if self._closed:
                raise StopIteration from None
            raise
        except StopIteration:
            self.close()
            raise
        data: dict[str, Any] = raise_for_error(response)
        return data

    def close(self) -> None:
        """Stop the stream and close its connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        import contextlib  # here: a stream's end pays for it, not every pilot-handshakectl run

        # shutdown() wakes a reader blocked in another thread; close() alone would not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class Client(_Closing):
    """A running daemon's Manager over its control socket at ``path`` (SPEC 13a).

    Every ``node`` argument is a node ID or a hostname the registry resolves. Errors are the
    package's own (``raise_for_error``); a daemon that is not running or does not answer
    within ``timeout`` raises ``ControlError`` (a ``HandshakeError``) naming the socket.
    Thread-safe: each call has its own connection."""

    def __init__(self, path: str, timeout: float = CONTROL_TIMEOUT) -> None:
        """A client of the socket at ``path``; nothing is checked until a call
        (``Client.connect`` checks at once)."""
        self._wire = ControlClient(path, timeout)
        self._streams: set[EventStream] = set()
        self._lock = _thread.allocate_lock()  # threading.Lock, without importing threading
        self._closed = False

    @classmethod
    def connect(
        cls, socket: str | None = None, config: str | None = None, timeout: float = CONTROL_TIMEOUT
    ) -> Client:
        """A client of the daemon whose socket ``find_socket(socket, config)`` names, after
        checking that it answers (``ControlError`` naming the socket when it does not)."""
        client = cls(find_socket(socket, config), timeout)
        client.status()
        return client

    @property
    def path(self) -> str:
        """The control socket this client talks to."""
        return self._wire.path

    def request(self, command: str, **args: Any) -> Response:
        """One control request as sent and its response as received (ok or error); the
        raw protocol of SPEC 13 that ``pilot-handshakectl --json`` prints."""
        self._check_open()
        return self._wire.request(command, **args)

    def stream(self, command: str, **args: Any) -> Iterator[Response]:
        """One control request and every response line as received until the daemon
        closes (``events``)."""
        self._check_open()
        return self._wire.stream(command, **args)

    def _check_open(self) -> None:
        if self._closed:
            raise ControlError(f"this client of {self.path} is closed")

    def call(self, command: str, **args: Any) -> Any:
        """One control request; its ``data``, or the package's exception for an error."""
        return raise_for_error(self.request(command, **args), command)

    def resolve(self, node: int | str) -> int:
        """The node ID of ``node``: an ID (int or decimal digits) as is, the node part of a
        Pilot address ``N:XXXX.XXXX.XXXX``, else a hostname the daemon resolves through its
        registry (``RegistryError`` when it cannot) and checks against its pin
        (``HandshakeError`` naming both when the name moved to another node or key: see
        ``forget_name``)."""
        if isinstance(node, bool) or not isinstance(node, (int, str)):
            raise TypeError(f"a node is a node ID, an address or a hostname, not {node!r}")
        if isinstance(node, int):
            return node
        if node.isascii() and node.isdigit():
            return int(node)
        address = node_of_address(node)
        if address is not None:
            return address
        return int(self.call("resolve", hostname=node)["node_id"])

    def forget_name(self, name: str) -> bool:
        """Drop the daemon's pin of hostname ``name`` (SPEC 17), after it moved to another
        node or key on purpose; False when it was not pinned."""
        response = self.request("forget_name", hostname=name)
        if response["status"] == "error" and response.get("code") == NOT_FOUND:
            return False
        raise_for_error(response)
        return True

    @property
    def node_id(self) -> int:
        """The daemon's node ID (0 until it has registered)."""
        return int(self.status()["node_id"])

    def status(self) -> dict[str, Any]:
        """What ``pilot-handshakectl status --json`` shows: ``node_id``, ``hostname``,
        ``listen``, ``registry``, ``trusted`` and ``pending`` counts."""
        data: dict[str, Any] = self.call("status")
        return data

    def send_request(self, peer_node_id: int | str, justification: str = "") -> str:
        """Ask ``peer_node_id`` for trust: "sent", "relayed" or "trusted" (``SendError``)."""
        node = self.resolve(peer_node_id)
        return str(self.call("handshake", node_id=node, justification=justification)["status"])

    def approve_handshake(self, peer_node_id: int | str, new_key: str | None = None) -> bool:
        """Approve the pending request of ``peer_node_id``; False when none is pending. A
        KEY CHANGED request (SPEC 17) is refused (``HandshakeError``) unless ``new_key``
        names its key: its hex fingerprint, a prefix of at least 16 hex digits, or the
        base64 key."""
        return self._answer(
            "approve", peer_node_id, {} if new_key is None else {"new_key": new_key}
        )

    def reject_handshake(self, peer_node_id: int | str, reason: str = "") -> bool:
        """Reject the pending request of ``peer_node_id``; False when none is pending."""
        return self._answer("reject", peer_node_id, {"reason": reason})

    def _answer(self, command: str, node: int | str, args: dict[str, Any]) -> bool:
        response = self.request(command, node_id=self.resolve(node), **args)
        if response["status"] == "error" and response.get("code") == NOT_FOUND:
            return False
        raise_for_error(response, command)
        return True

    def revoke_trust(self, peer_node_id: int | str) -> str:
        """Revoke trust in ``peer_node_id``: "revoked", or "withdrawn" when we had only
        asked it (our request is cancelled there too); ``NotTrustedError`` when neither."""
        node = self.resolve(peer_node_id)
        return str(self.call("untrust", node_id=node)["status"])

    def is_trusted(self, node_id: int | str) -> bool:
        """Whether ``node_id`` is trusted now."""
        return bool(self.call("is_trusted", node_id=self.resolve(node_id))["trusted"])

    def trusted_peers(self) -> list[TrustRecord]:
        """The trust records (with the ``reason`` each is trusted for), sorted by node ID."""
        from .store import TrustRecord, parse_time  # only callers that want records pay

        return [
            TrustRecord(
                node_id=r["node_id"],
                public_key=r["public_key"],
                approved_at=parse_time(r["approved_at_text"]),
                mutual=r["mutual"],
                network=r["network"],
                reason=r["reason"],
            )
            for r in self.call("trust")["trusted"]
        ]

    def pending_requests(self) -> list[PendingHandshake]:
        """The pending requests, sorted by node ID."""
        from .store import PendingHandshake, parse_time

        return [
            PendingHandshake(
                node_id=p["node_id"],
                public_key=p["public_key"],
                justification=p["justification"],
                received_at=parse_time(p["received_at_text"]),
            )
            for p in self.call("pending")["pending"]
        ]

    def outgoing_requests(self) -> list[OutgoingRequest]:
        """Our requests (SPEC 7), sorted by node ID: each ``waiting``, or ended
        (``accepted``, ``rejected`` with the peer's ``reason``, ``expired``,
        ``withdrawn``) and kept for ``outgoing_ttl`` after it ended."""
        from .store import OutgoingRequest, parse_time

        return [
            OutgoingRequest(
                node_id=r["node_id"],
                sent_at=parse_time(r["sent_at_text"]),
                path=r["path"],
                state=r["state"],
                reason=r["reason"],
            )
            for r in self.call("requests")["requests"]
        ]

    def pending_count(self) -> int:
        """How many requests are pending."""
        return int(self.status()["pending"])

    def wait_for_trust(self, node_id: int | str, timeout: float | None) -> bool:
        """Block until ``node_id`` is trusted (True), or ``timeout`` seconds pass or the
        peer rejects our request (False, at once; ``wait`` or ``outgoing_requests()`` says
        why). As ``Manager.wait_for_trust``."""
        return bool(self.wait(node_id, timeout)["trusted"])

    def wait(self, node_id: int | str, timeout: float | None) -> dict[str, Any]:
        """``wait_for_trust`` with the reason (what ``pilot-handshakectl wait --json``
        shows): ``{"node_id", "trusted"}``, plus ``"rejected": True`` and the peer's
        ``"reason"`` when our latest request to it was rejected.

        The daemon waits on its own condition (no polling). ``None`` waits without limit:
        the daemon caps one wait at an hour, so the client asks again on a fresh connection
        each time, which also notices a daemon that went away."""
        node = self.resolve(node_id)
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = WAIT_MAX_TIMEOUT
            if deadline is not None:
                left = min(left, max(0.0, deadline - time.monotonic()))
            answer: dict[str, Any] = self.call("wait", node_id=node, timeout=left)
            if answer["trusted"] or answer.get("rejected"):
                return answer
            if deadline is not None and time.monotonic() >= deadline:
                return answer

    def events(self, history: bool = False, follow: bool = True) -> EventStream:
        """The event stream: with ``history`` the recent events first; with ``follow``
        (default) new events as they happen until the stream or the client is closed,
        without it only the recent ones."""
        stream = EventStream(self._wire, history or not follow, follow)
        with self._lock:
            if self._closed:
                stream.close()
                raise ControlError(f"this client of {self.path} is closed")
            self._streams = {s for s in self._streams if not s._closed}
            self._streams.add(stream)
        return stream

    def close(self) -> None:
        """Close the client and every event stream it opened; idempotent."""
        with self._lock:
            self._closed = True
            streams, self._streams = self._streams, set()
        for stream in streams:
            stream.close()
