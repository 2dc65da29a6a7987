"""The operator's control socket (SPEC section 13): the server in the daemon.

A Unix stream socket, ``control.sock`` beside the identity. Who may talk to it: root, the
daemon's own uid, and with ``control.group`` set the members of that group (the socket is
then mode 0660 and owned by the group, like the docker socket; else mode 0600). One JSON
request per line, ``{"command": ..., args}``, and one JSON response per line,
``{"status": "ok", "data": {...}}`` or ``{"status": "error", "code": ..., "message": ...}``
(the ``pilotctl --json`` shape). A connection may carry several requests.

Bounds: at most ``CONTROL_MAX_CONNECTIONS`` connections at once (a newcomer beyond gets a
``busy`` error line and is closed); a connection silent for ``CONTROL_IDLE_TIMEOUT`` is
closed; a ``wait`` ends as soon as its client goes away, so no thread waits for nobody.

``events`` answers with one ok line per event and then closes the connection: without
``follow`` the recent events the bus remembers (up to ``EVENT_HISTORY``); with ``follow``
(after those recent events unless ``history`` is false) every new one, for as long as the
client stays connected.

The client side (``ControlClient``, ``Client``) lives in ``client.py``, which imports nothing
of the daemon; ``ControlClient`` and ``ControlError`` are re-exported here for callers that
import them from this module.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import math
import os
import pwd
import select
import socket
import socketserver
import stat
import struct
import threading
import time
from typing import Any, Callable, Protocol

from .client import ControlClient, ControlError
from .constants import (
    CONTROL_IDLE_TIMEOUT,
    CONTROL_MAX_CONNECTIONS,
    CONTROL_MAX_LINE,
    REGISTRY_CACHE_TTL,
    WAIT_DEFAULT_TIMEOUT,
    WAIT_MAX_TIMEOUT,
)
from .errors import HandshakeError, NotTrustedError, RegistryError, SendError, StoreError
from .events import EventBus
from .manager import Manager
from .messages import MAX_NODE_ID
from .server import serve_until_closed, wake_acceptor
from .store import format_time

__all__ = ["COMMANDS", "ControlClient", "ControlError", "ControlServer", "HostnameRegistry"]

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
    "is_trusted": (frozenset({"node_id"}), frozenset()),
    "wait": (frozenset({"node_id"}), frozenset({"timeout"})),
    "resolve": (frozenset({"hostname"}), frozenset()),
    "events": (frozenset(), frozenset({"follow", "history"})),
    "metrics": (frozenset(), frozenset()),
}

# Commands naming a node for which this node itself is a mistake (it trusts itself anyway).
_NOT_SELF = frozenset({"handshake", "untrust", "wait"})

_FOLLOW_POLL = 0.5  # how often a following stream checks whether its client is gone
_WAIT_SLICE = 1.0  # a `wait` checks this often whether its client is gone
_MAX_HOSTNAME = 253  # the longest DNS name; the registry applies its own stricter rules
# Registry lookups one command may make for hostnames: a listing of thousands of peers
# must not turn into thousands of registry calls (the rest show up on later listings).
_HOSTNAME_LOOKUPS = 32
_HOSTNAME_CACHE = 4096

Response = dict[str, Any]


class HostnameRegistry(Protocol):
    """What the control socket needs of the registry client for hostnames."""

    def lookup(self, node_id: int) -> dict[str, Any]:
        """The registry's ``lookup`` answer for ``node_id`` (``hostname`` when set)."""

    def resolve_hostname(self, hostname: str) -> dict[str, Any]:
        """``{"node_id", "public", "hostname"}`` for ``hostname``; ``RegistryError``."""


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
    if name == "hostname":
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_HOSTNAME:
            raise _RequestError(
                "bad_request", f"hostname must be a string of 1..{_MAX_HOSTNAME} characters"
            )
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
    if not isinstance(value, bool):  # follow, history
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


def _peer_credentials(conn: socket.socket) -> tuple[int, int] | None:
    """(uid, gid) of the process at the other end, where the platform tells (Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    size = struct.calcsize("3i")
    _pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, size))
    return int(uid), int(gid)


def _in_group(uid: int, gid: int, group: int) -> bool:
    """Whether a process of ``uid`` with primary ``gid`` belongs to ``group``."""
    if gid == group:
        return True
    try:
        user = pwd.getpwuid(uid)
        return user.pw_gid == group or user.pw_name in grp.getgrgid(group).gr_mem
    except KeyError:  # a uid or group without an entry: not a member we can prove
        return False


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
            credentials = _peer_credentials(self.connection)
            if credentials is not None and not self.server.allowed(*credentials):
                self._send(
                    _error(
                        "forbidden",
                        f"uid {credentials[0]} may not use this daemon's socket (allowed: "
                        "root, the daemon's user and the members of control.group)",
                    )
                )
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
            self._stream_events(args.get("follow", False), args.get("history", True))
            return False
        if command == "wait":
            self._send(self.server.execute(command, args, gone=self._gone))
            return not self._gone()
        self._send(self.server.execute(command, args))
        return True

    def _gone(self) -> bool:
        return _client_gone(self.connection)

    def _stream_events(self, follow: bool, history: bool) -> None:
        if not follow:
            for event in self.server.events.recent():
                self._send(_ok(event))
            return
        subscription = self.server.events.subscribe(history=history)
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
    builds the ``status`` answer, ``node_id`` tells this node's ID; ``events`` feeds the
    ``events`` command; ``registry`` (None without one) resolves and shows hostnames;
    ``group`` is config ``control.group`` ("" for none)."""

    daemon_threads = True
    # A burst of clients queues in the kernel rather than failing to connect (EAGAIN).
    request_queue_size = 128

    def __init__(
        self,
        path: str,
        manager: Manager,
        status: Callable[[], dict[str, Any]],
        events: EventBus,
        node_id: Callable[[], int],
        registry: HostnameRegistry | None = None,
        group: str = "",
    ) -> None:
        """Prepare the server; nothing is bound until ``start()``."""
        super().__init__(path, _Handler, bind_and_activate=False)
        self.path = path
        self.manager = manager
        self.status = status
        self.events = events
        self.node_id = node_id
        self.registry = registry
        self.group = group
        self.owner_uid = os.getuid()
        self.group_gid: int | None = None
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._inode: int | None = None
        self._lock = threading.Lock()
        self._connections = 0
        self._hostname_cache: dict[int, tuple[float, str]] = {}

    def allowed(self, uid: int, gid: int) -> bool:
        """Whether a peer process of ``uid`` / ``gid`` may use the socket."""
        if uid in (0, self.owner_uid):
            return True
        return self.group_gid is not None and _in_group(uid, gid, self.group_gid)

    def start(self) -> None:
        """Bind the socket (mode 0600, or 0660 owned by ``group``) and serve in a background
        thread; idempotent.

        A stale socket file left by a crashed daemon is replaced; raises ``ControlError``
        when a live daemon answers on it, the path cannot be bound, or ``group`` does not
        exist or cannot be given the socket.
        """
        with self._lock:
            if self._thread is not None or self.stopping.is_set():
                return
            if self.group:
                try:
                    self.group_gid = grp.getgrnam(self.group).gr_gid
                except KeyError:
                    raise ControlError(
                        f"control.group: no group named {self.group!r} on this host"
                    ) from None
            self._remove_stale_socket()
            # The umask closes the window in which the fresh socket would be open to others.
            old_umask = os.umask(0o177)
            try:
                self.server_bind()
                if self.group_gid is not None:
                    self._give_to_group(self.group_gid)
                else:
                    os.chmod(self.path, 0o600)
                self._inode = os.stat(self.path).st_ino
                self.server_activate()
            except OSError as exc:
                self.socket.close()
                raise ControlError(f"cannot listen on {self.path}: {exc}") from exc
            except ControlError:
                self.socket.close()
                raise
            finally:
                os.umask(old_umask)
            self._thread = threading.Thread(
                target=serve_until_closed,
                args=(self, self.stopping.is_set),
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
        wake_acceptor(self)
        thread.join()
        self.server_close()
        # Remove the file only if it is still ours (not a successor daemon's socket).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _give_to_group(self, gid: int) -> None:
        try:
            os.chown(self.path, -1, gid)
        except OSError as exc:
            raise ControlError(
                f"control.group: cannot give {self.path} to group {self.group!r}: {exc} "
                "(the daemon's user must be a member of it)"
            ) from None
        os.chmod(self.path, 0o660)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on its own thread, or refuse it at the connection cap."""
        with self._lock:
            full = self._connections >= CONTROL_MAX_CONNECTIONS
            if not full:
                self._connections += 1
        if full:
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its place under the cap."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._connections -= 1

    def _refuse_busy(self, request: socket.socket) -> None:
        # On the accept thread: never block on a client that does not read.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(
                _encode(
                    _error(
                        "busy",
                        f"the control socket already serves {CONTROL_MAX_CONNECTIONS} "
                        "connections; try again later",
                    )
                )
            )
        self.shutdown_request(request)

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

    def execute(
        self, command: str, args: dict[str, Any], gone: Callable[[], bool] | None = None
    ) -> Response:
        """The response to one validated request other than ``events``; never raises.
        ``gone`` (for ``wait``) tells when the client went away."""
        try:
            if command in _NOT_SELF and args["node_id"] == self.node_id() != 0:
                raise _RequestError(
                    "own_node",
                    f"node {args['node_id']} is this node itself; name the peer's node ID",
                )
            if command == "wait":
                return _ok(self._wait(gone=gone, **args))
            return _ok(getattr(self, f"_do_{command}")(**args))
        except _RequestError as exc:
            return _error(exc.code, exc.message)
        except NotTrustedError as exc:
            return _error("not_trusted", str(exc) or f"node {args.get('node_id')} is not trusted")
        except SendError as exc:
            return _error("send_failed", str(exc))
        except StoreError as exc:
            return _error("store_error", str(exc))
        except RegistryError as exc:
            return _error("registry_error", str(exc))
        except HandshakeError as exc:
            return _error("failed", str(exc))
        except Exception:
            log.exception("control command %s failed", command)
            return _error("internal_error", f"{command} failed; see the daemon's log")

    def _hostnames(self, node_ids: list[int]) -> dict[int, str]:
        """The registry's hostname of each node ("" unknown), from a cache refreshed at
        most ``_HOSTNAME_LOOKUPS`` nodes per call; the first registry failure ends the
        lookups of this call, so a registry that is down does not stall the answer."""
        names: dict[int, str] = {}
        if self.registry is None:
            return names
        now = time.monotonic()
        lookups = _HOSTNAME_LOOKUPS
        for node in node_ids:
            cached = self._hostname_cache.get(node)
            if cached is not None and now - cached[0] < REGISTRY_CACHE_TTL:
                names[node] = cached[1]
                continue
            if lookups <= 0:
                continue
            lookups -= 1
            try:
                hostname = self.registry.lookup(node).get("hostname")
            except (HandshakeError, OSError):
                lookups = 0
                continue
            name = hostname if isinstance(hostname, str) else ""
            if len(self._hostname_cache) >= _HOSTNAME_CACHE:
                self._hostname_cache.clear()
            self._hostname_cache[node] = (now, name)
            names[node] = name
        return names

    def _do_status(self) -> dict[str, Any]:
        status = self.status()
        own = status.get("node_id")
        if isinstance(own, int) and own:
            status["hostname"] = self._hostnames([own]).get(own, "")
        return status

    def _do_resolve(self, hostname: str) -> dict[str, Any]:
        if self.registry is None:
            raise _RequestError(
                "no_registry", f"cannot resolve {hostname!r}: this daemon has no registry"
            )
        answer = self.registry.resolve_hostname(hostname)
        node_id = answer.get("node_id")
        if type(node_id) is not int:
            raise _RequestError("registry_error", f"the registry did not resolve {hostname!r}")
        return {
            "node_id": node_id,
            "hostname": answer.get("hostname", hostname),
            "public": bool(answer.get("public")),
        }

    def _do_handshake(self, node_id: int, justification: str) -> dict[str, Any]:
        return {"node_id": node_id, "status": self.manager.send_request(node_id, justification)}

    def _do_pending(self) -> dict[str, Any]:
        pending = self.manager.pending_requests()
        names = self._hostnames([p.node_id for p in pending])
        return {
            "pending": [
                {
                    "node_id": p.node_id,
                    "hostname": names.get(p.node_id, ""),
                    "public_key": p.public_key,
                    "justification": p.justification,
                    "received_at": format_time(p.received_at),
                }
                for p in pending
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
        records = self.manager.trusted_peers()
        conflicts = set(self.manager.conflicting_peers())
        names = self._hostnames([r.node_id for r in records])
        return {
            "trusted": [
                {
                    "node_id": r.node_id,
                    "hostname": names.get(r.node_id, ""),
                    "public_key": r.public_key,
                    "mutual": r.mutual,
                    "network": r.network,
                    "approved_at": format_time(r.approved_at),
                    "conflict": r.node_id in conflicts,
                }
                for r in records
            ]
        }

    def _do_untrust(self, node_id: int) -> dict[str, Any]:
        return {"node_id": node_id, "status": self.manager.revoke_trust(node_id)}

    def _do_metrics(self) -> dict[str, Any]:
        # The Manager carries the daemon's metrics: every part's, in one registry.
        return {"text": self.manager.metrics.render()}

    def _do_is_trusted(self, node_id: int) -> dict[str, Any]:
        return {"node_id": node_id, "trusted": self.manager.is_trusted(node_id)}

    def _wait(
        self,
        node_id: int,
        timeout: float = WAIT_DEFAULT_TIMEOUT,
        gone: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        # The Manager's condition cannot be told that the client left, so wait on it in
        # slices and stop when the client is gone: no thread keeps waiting for nobody.
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self.manager.wait_for_trust(node_id, max(0.0, min(left, _WAIT_SLICE))):
                return {"node_id": node_id, "trusted": True}
            if left <= _WAIT_SLICE or self.stopping.is_set() or (gone is not None and gone()):
                return {"node_id": node_id, "trusted": False}
