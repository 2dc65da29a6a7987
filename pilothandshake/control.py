"""The operator's control socket (SPEC section 13): the server in the daemon.

A Unix stream socket, ``control.sock`` beside the identity. Who may talk to it: root, the
daemon's own uid, and with ``control.group`` set the members of that group (the socket is
then mode 0660 and owned by the group, like the docker socket; else mode 0600). One JSON
request per line, ``{"command": ..., args}``, and one JSON response per line,
``{"status": "ok", "data": {...}}`` or ``{"status": "error", "code": ..., "message": ...}``
(the ``pilotctl --json`` shape). A connection may carry several requests. The commands,
their arguments and what each does are in ``control_commands.py``.

Bounds: at most ``CONTROL_MAX_CONNECTIONS`` connections at once (a newcomer beyond gets a
``busy`` error line and is closed); a connection silent for ``CONTROL_IDLE_TIMEOUT`` is
closed; a ``wait`` ends as soon as its client goes away, so no thread waits for nobody.

``events`` answers with one ok line per event and then closes the connection: without
``follow`` the recent events the bus remembers (up to ``EVENT_HISTORY``); with ``follow``
(after those recent events unless ``history`` is false) every new one, for as long as the
client stays connected.

The client side (``ControlClient``, ``Client``) lives in ``client.py``, which imports nothing
of the daemon.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import select
import socket
import socketserver
import stat
import struct
import threading
from typing import Any, Callable

from .connection_slots import ConnectionSlots
from .constants import CONTROL_IDLE_TIMEOUT, CONTROL_MAX_CONNECTIONS, CONTROL_MAX_LINE
from .control_commands import (
    ControlCommands,
    HostnameRegistry,
    RequestError,
    Response,
    encode_response,
    error_response,
    ok_response,
    parse_request,
)
from .error_codes import BUSY, FORBIDDEN, INVALID_ARGUMENT
from .errors import ControlError
from .events import EventBus
from .manager import Manager
from .names import NamePins
from .override import override
from .server import serve_until_closed, wake_acceptor

__all__ = ["ControlServer"]

log = logging.getLogger(__name__)

_FOLLOW_POLL = 0.5  # how often a following stream checks whether its client is gone


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

    @override
    def handle(self) -> None:
        try:
            credentials = _peer_credentials(self.connection)
            if credentials is not None and not self.server.allowed(*credentials):
                self._send(
                    error_response(
                        FORBIDDEN,
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
                        error_response(
                            INVALID_ARGUMENT, f"request longer than {CONTROL_MAX_LINE} bytes"
                        )
                    )
                    return
                if line.strip() and not self._serve(line):
                    return
        except OSError:
            return  # the client went away or stayed idle too long: nothing to answer

    def _send(self, response: Response) -> None:
        self.wfile.write(encode_response(response))

    def _serve(self, line: bytes) -> bool:
        """Answer one request line; False when the connection should close."""
        try:
            command, args = parse_request(line)
        except RequestError as exc:
            self._send(error_response(exc.code, exc.message))
            return True
        if command == "events":
            self._stream_events(args.get("follow", False), args.get("history", True))
            return False
        if command == "wait":
            self._send(self.server.commands.execute(command, args, gone=self._gone))
            return not self._gone()
        self._send(self.server.commands.execute(command, args))
        return True

    def _gone(self) -> bool:
        return _client_gone(self.connection)

    def _stream_events(self, follow: bool, history: bool) -> None:
        if not follow:
            for event in self.server.events.recent():
                self._send(ok_response(event))
            return
        subscription = self.server.events.subscribe(history=history)
        try:
            while not self.server.stopping.is_set():
                news = subscription.get(_FOLLOW_POLL)
                if news is not None:
                    self._send(ok_response(news))
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
        names: NamePins | None = None,
    ) -> None:
        """Prepare the server; nothing is bound until ``start()``. ``names`` pins the
        hostnames resolved for commands (SPEC 17)."""
        super().__init__(path, _Handler, bind_and_activate=False)
        self.path = path
        self.events = events
        self.group = group
        self.owner_uid = os.getuid()
        self.group_gid: int | None = None
        self.stopping = threading.Event()
        self.commands = ControlCommands(
            manager, status, node_id, registry, self.stopping, names, events.publish
        )
        self._thread: threading.Thread | None = None
        self._inode: int | None = None
        self._lock = threading.Lock()
        self._slots: ConnectionSlots[Any] = ConnectionSlots(CONTROL_MAX_CONNECTIONS)

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

    @override
    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on its own thread, or refuse it at the connection cap."""
        if not self._slots.take(request).admitted:
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release(request)
            raise

    @override
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its place under the cap."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release(request)

    def _refuse_busy(self, request: socket.socket) -> None:
        # On the accept thread: never block on a client that does not read.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(
                encode_response(
                    error_response(
                        BUSY,
                        f"the control socket already serves {CONTROL_MAX_CONNECTIONS} "
                        "connections; try again later",
                    )
                )
            )
        self.shutdown_request(request)

    @override
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler failure through the daemon's logging (its format, JSON too)
        instead of socketserver's bare traceback on stderr."""
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
