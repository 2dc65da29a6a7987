"""The operator's control socket (SPEC section 13): server in the daemon, client in the CLI.

A Unix stream socket (``control.sock`` beside the identity, mode 0600, only the daemon's own
uid may talk to it). One JSON request per line, ``{"command": ..., args}``, and one JSON
response per line, ``{"status": "ok", "data": {...}}`` or ``{"status": "error", "code": ...,
"message": ...}`` (the ``pilotctl --json`` shape). A connection may carry several requests.

``events`` answers with one ok line per event and then closes the connection: without
``follow`` the recent events the bus remembers (up to ``EVENT_HISTORY``); with ``follow`` the
same recent events and then every new one, for as long as the client stays connected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import socket
import socketserver
import stat
import struct
import threading
from collections.abc import Iterator
from typing import Any, Callable

from .constants import (
    CONTROL_IDLE_TIMEOUT,
    CONTROL_MAX_LINE,
    CONTROL_TIMEOUT,
    WAIT_DEFAULT_TIMEOUT,
    WAIT_MAX_TIMEOUT,
)
from .errors import HandshakeError, NotTrustedError, SendError, StoreError
from .events import EventBus
from .manager import Manager
from .messages import MAX_NODE_ID
from .store import format_time

__all__ = ["COMMANDS", "ControlClient", "ControlError", "ControlServer"]

log = logging.getLogger(__name__)

# command -> (required arguments, optional arguments)
COMMANDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "status": (frozenset(), frozenset()),
    "handshake": (frozenset({"node_id", "justification"}), frozenset()),
    "pending": (frozenset(), frozenset()),
    "approve": (frozenset({"node_id"}), frozenset()),
    "reject": (frozenset({"node_id"}), frozenset({"reason"})),
    "trust": (frozenset(), frozenset()),
    "untrust": (frozenset({"node_id"}), frozenset()),
    "wait": (frozenset({"node_id"}), frozenset({"timeout"})),
    "events": (frozenset(), frozenset({"follow"})),
    "metrics": (frozenset(), frozenset()),
}

_FOLLOW_POLL = 0.5  # how often a following stream checks whether its client is gone
_SHUTDOWN_POLL = 0.1  # how often the accept loop checks for stop(): stop() waits this long

Response = dict[str, Any]


class ControlError(HandshakeError):
    """The control socket cannot be used: the daemon is not running, the socket is taken,
    or the daemon's answer is unreadable."""


class _RequestError(Exception):
    """A request that gets an error response (``code``, ``message``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _ok(data: Any) -> Response:
    return {"status": "ok", "data": data}


def _error(code: str, message: str) -> Response:
    return {"status": "error", "code": code, "message": message}


def _encode(response: Response) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode("utf-8") + b"\n"


def _check_arg(name: str, value: Any) -> Any:
    """The argument ``name`` if well-typed; ``timeout`` is capped to ``WAIT_MAX_TIMEOUT``."""
    if name == "node_id":
        if type(value) is not int or not 0 <= value <= MAX_NODE_ID:
            raise _RequestError("bad_request", f"node_id must be an integer 0..{MAX_NODE_ID}")
        return value
    if name in ("justification", "reason"):
        if not isinstance(value, str):
            raise _RequestError("bad_request", f"{name} must be a string")
        return value
    if name == "timeout":
        # Never call float() or math.isfinite() on an int before capping it: a JSON integer
        # of 400 digits would raise OverflowError and close the connection unanswered.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
            or value < 0
        ):
            raise _RequestError("bad_request", "timeout must be a number of seconds >= 0")
        return float(min(value, WAIT_MAX_TIMEOUT))
    if not isinstance(value, bool):  # follow
        raise _RequestError("bad_request", f"{name} must be true or false")
    return value


def _parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _RequestError("bad_request", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _RequestError("bad_request", "request must be a JSON object")
    command = request.pop("command", None)
    if not isinstance(command, str):
        raise _RequestError("bad_request", 'request needs a "command" string')
    if command not in COMMANDS:
        raise _RequestError(
            "unknown_command", f"unknown command {command!r} (known: {', '.join(COMMANDS)})"
        )
    required, optional = COMMANDS[command]
    missing = sorted(required - request.keys())
    unknown = sorted(request.keys() - required - optional)
    if missing:
        raise _RequestError("bad_request", f"{command} needs {', '.join(missing)}")
    if unknown:
        raise _RequestError("bad_request", f"{command} does not take {', '.join(unknown)}")
    return command, {name: _check_arg(name, value) for name, value in request.items()}


def _peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end, where the platform tells (Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    size = struct.calcsize("3i")
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, size))
    return int(uid)


def _client_gone(conn: socket.socket) -> bool:
    """Whether the client closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Handler(socketserver.StreamRequestHandler):
    """One control connection: requests in, responses out, until the client closes."""

    server: ControlServer
    timeout = CONTROL_IDLE_TIMEOUT  # an idle client does not hold a thread forever

    def handle(self) -> None:
        try:
            uid = _peer_uid(self.connection)
            if uid is not None and uid != self.server.owner_uid:
                self._send(_error("forbidden", f"uid {uid} may not use this daemon's socket"))
                return
            while not self.server.stopping.is_set():
                line = self.rfile.readline(CONTROL_MAX_LINE + 1)
                if not line:
                    return
                if len(line) > CONTROL_MAX_LINE:
                    # The rest of the line cannot be told from the next request: close.
                    self._send(
                        _error("bad_request", f"request longer than {CONTROL_MAX_LINE} bytes")
                    )
                    return
                if line.strip() and not self._serve(line):
                    return
        except OSError:
            return  # the client went away or stayed idle too long: nothing to answer

    def _send(self, response: Response) -> None:
        self.wfile.write(_encode(response))

    def _serve(self, line: bytes) -> bool:
        """Answer one request line; False when the connection should close."""
        try:
            command, args = _parse_request(line)
        except _RequestError as exc:
            self._send(_error(exc.code, exc.message))
            return True
        if command == "events":
            self._stream_events(args.get("follow", False))
            return False
        self._send(self.server.execute(command, args))
        return True

    def _stream_events(self, follow: bool) -> None:
        if not follow:
            for event in self.server.events.recent():
                self._send(_ok(event))
            return
        subscription = self.server.events.subscribe(history=True)
        try:
            while not self.server.stopping.is_set():
                news = subscription.get(_FOLLOW_POLL)
                if news is not None:
                    self._send(_ok(news))
                elif _client_gone(self.connection):
                    return
        finally:
            subscription.close()


class ControlServer(socketserver.ThreadingUnixStreamServer):
    """The daemon's control socket at ``path``, answering for ``manager``; ``status``
    builds the ``status`` answer; ``events`` feeds the ``events`` command."""

    daemon_threads = True

    def __init__(
        self,
        path: str,
        manager: Manager,
        status: Callable[[], dict[str, Any]],
        events: EventBus,
    ) -> None:
        """Prepare the server; nothing is bound until ``start()``."""
        super().__init__(path, _Handler, bind_and_activate=False)
        self.path = path
        self.manager = manager
        self.status = status
        self.events = events
        self.owner_uid = os.getuid()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._inode: int | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind the socket (mode 0600) and serve in a background thread; idempotent.

        A stale socket file left by a crashed daemon is replaced; raises ``ControlError``
        when a live daemon answers on it, or the path cannot be bound.
        """
        with self._lock:
            if self._thread is not None or self.stopping.is_set():
                return
            self._remove_stale_socket()
            # The umask closes the window in which the fresh socket would be open to others.
            old_umask = os.umask(0o177)
            try:
                self.server_bind()
                os.chmod(self.path, 0o600)
                self._inode = os.stat(self.path).st_ino
                self.server_activate()
            except OSError as exc:
                self.socket.close()
                raise ControlError(f"cannot listen on {self.path}: {exc}") from exc
            finally:
                os.umask(old_umask)
            self._thread = threading.Thread(
                target=self.serve_forever,
                kwargs={"poll_interval": _SHUTDOWN_POLL},
                name="control-server",
            )
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and remove the socket file; idempotent, also before ``start()``."""
        with self._lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            thread = self._thread
        if thread is None:
            self.server_close()
            return
        self.shutdown()
        self.server_close()
        thread.join()
        # Remove the file only if it is still ours (not a successor daemon's socket).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler failure instead of printing a traceback to stderr."""
        log.exception("control connection failed")

    def _remove_stale_socket(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as exc:
            raise ControlError(f"cannot check the existing socket {self.path}: {exc}") from exc
        finally:
            probe.close()
        raise ControlError(f"another pilot-handshaked is already serving {self.path}")

    def execute(self, command: str, args: dict[str, Any]) -> Response:
        """The response to one validated request other than ``events``; never raises."""
        try:
            return _ok(getattr(self, f"_do_{command}")(**args))
        except _RequestError as exc:
            return _error(exc.code, exc.message)
        except NotTrustedError as exc:
            return _error("not_trusted", str(exc) or f"node {args.get('node_id')} is not trusted")
        except SendError as exc:
            return _error("send_failed", str(exc))
        except StoreError as exc:
            return _error("store_error", str(exc))
        except HandshakeError as exc:
            return _error("failed", str(exc))
        except Exception:
            log.exception("control command %s failed", command)
            return _error("internal_error", f"{command} failed; see the daemon's log")

    def _do_status(self) -> dict[str, Any]:
        return self.status()

    def _do_handshake(self, node_id: int, justification: str) -> dict[str, Any]:
        return {"node_id": node_id, "status": self.manager.send_request(node_id, justification)}

    def _do_pending(self) -> dict[str, Any]:
        return {
            "pending": [
                {
                    "node_id": p.node_id,
                    "public_key": p.public_key,
                    "justification": p.justification,
                    "received_at": format_time(p.received_at),
                }
                for p in self.manager.pending_requests()
            ]
        }

    def _do_approve(self, node_id: int) -> dict[str, Any]:
        if not self.manager.approve_handshake(node_id):
            raise _RequestError("not_found", f"nothing pending for node {node_id}")
        return {"node_id": node_id, "status": "approved"}

    def _do_reject(self, node_id: int, reason: str = "") -> dict[str, Any]:
        if not self.manager.reject_handshake(node_id, reason):
            raise _RequestError("not_found", f"nothing pending for node {node_id}")
        return {"node_id": node_id, "status": "rejected"}

    def _do_trust(self) -> dict[str, Any]:
        return {
            "trusted": [
                {
                    "node_id": r.node_id,
                    "public_key": r.public_key,
                    "mutual": r.mutual,
                    "network": r.network,
                    "approved_at": format_time(r.approved_at),
                }
                for r in self.manager.trusted_peers()
            ]
        }

    def _do_untrust(self, node_id: int) -> dict[str, Any]:
        self.manager.revoke_trust(node_id)
        return {"node_id": node_id}

    def _do_metrics(self) -> dict[str, Any]:
        # The Manager carries the daemon's metrics: every part's, in one registry.
        return {"text": self.manager.metrics.render()}

    def _do_wait(self, node_id: int, timeout: float = WAIT_DEFAULT_TIMEOUT) -> dict[str, Any]:
        return {"node_id": node_id, "trusted": self.manager.wait_for_trust(node_id, timeout)}


class ControlClient:
    """Talks to a running daemon's control socket at ``path``. ``timeout`` bounds the
    connect and the answer (``wait`` adds its own timeout; a following stream has none)."""

    def __init__(self, path: str, timeout: float = CONTROL_TIMEOUT) -> None:
        """Remember where the socket is; nothing is connected until a request."""
        self.path = path
        self.timeout = timeout

    def request(self, command: str, **args: Any) -> Response:
        """Send one request and return the parsed response (ok or error); raises
        ``ControlError`` when the daemon cannot be reached or answers nonsense."""
        answer_timeout = self.timeout
        if command == "wait":
            answer_timeout += min(
                float(args.get("timeout", WAIT_DEFAULT_TIMEOUT)), WAIT_MAX_TIMEOUT
            )
        with self._open(command, args, answer_timeout) as lines:
            for response in lines:
                return response
        raise ControlError(f"pilot-handshaked closed {self.path} without answering")

    def stream(self, command: str, **args: Any) -> Iterator[Response]:
        """Send one request and yield every response line until the daemon closes."""
        answer_timeout = None if args.get("follow") else self.timeout
        with self._open(command, args, answer_timeout) as lines:
            yield from lines

    @contextlib.contextmanager
    def _open(
        self, command: str, args: dict[str, Any], answer_timeout: float | None
    ) -> Iterator[Iterator[Response]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise ControlError(
                    f"pilot-handshaked is not running (no socket at {self.path})"
                ) from None
            except OSError as exc:
                raise ControlError(f"cannot connect to {self.path}: {exc}") from None
            try:
                sock.sendall(json.dumps({"command": command, **args}).encode("utf-8") + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                # The daemon may answer and close before reading (a refused uid): its answer
                # is still buffered, so read it rather than report the broken pipe.
                pass
            except OSError as exc:
                raise ControlError(f"cannot send to {self.path}: {exc}") from None
            sock.settimeout(answer_timeout)
            with sock.makefile("rb") as reader:
                yield self._responses(reader)
        finally:
            sock.close()

    def _responses(self, reader: Any) -> Iterator[Response]:
        while True:
            try:
                line = reader.readline()
            except socket.timeout:
                raise ControlError(f"no answer from pilot-handshaked at {self.path}") from None
            except OSError as exc:
                raise ControlError(f"lost the connection to {self.path}: {exc}") from None
            if not line:
                return
            try:
                response = json.loads(line)
            except ValueError:
                response = None
            if not isinstance(response, dict) or response.get("status") not in ("ok", "error"):
                raise ControlError(f"unreadable answer from pilot-handshaked at {self.path}")
            yield response
