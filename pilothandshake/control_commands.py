"""The control socket's commands (SPEC section 13): what each takes, how a request line is
checked, and what each does. The socket server (``control.py``) reads the lines and writes
the answers; nothing here touches a socket.

``COMMANDS`` lists every command with its required and optional arguments; a command ``x``
is carried out by ``ControlCommands._do_x`` (``wait`` by ``_wait``; ``events`` streams, so
the server answers it). ``execute`` never raises: every failure is an error response whose
``code`` says what went wrong, with ``pilotctl``'s codes (``error_codes.CODES``).

Answers have ``pilotctl --json``'s keys and types (SPEC 13): times are Unix seconds as
integers (``received_at``, ``approved_at``, ``sent_at``), each with an RFC 3339 copy under
the same name plus ``_text``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Callable, Protocol, TypeVar

from .constants import REGISTRY_CACHE_TTL, WAIT_DEFAULT_TIMEOUT, WAIT_MAX_TIMEOUT
from .error_codes import INTERNAL, INVALID_ARGUMENT, INVALID_STATE, NOT_FOUND, code_of
from .errors import HandshakeError, RegistryError
from .events import HOSTNAME_CHANGED
from .identity import decode_key, full_fingerprint
from .manager import Manager
from .manager.auth import key_changed
from .messages import MAX_NODE_ID
from .names import HostnameMoved, NamePins
from .runtime import is_own_node
from .store import REJECTED, format_time

__all__ = [
    "COMMANDS",
    "ControlCommands",
    "HostnameRegistry",
    "RequestError",
    "Response",
    "encode_response",
    "error_response",
    "ok_response",
    "parse_request",
]

log = logging.getLogger(__name__)

# command -> (required arguments, optional arguments)
COMMANDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "status": (frozenset(), frozenset()),
    "handshake": (frozenset({"node_id"}), frozenset({"justification"})),
    "pending": (frozenset(), frozenset()),
    "approve": (frozenset({"node_id"}), frozenset({"new_key"})),
    "reject": (frozenset({"node_id"}), frozenset({"reason"})),
    "trust": (frozenset(), frozenset()),
    "requests": (frozenset(), frozenset()),
    "untrust": (frozenset({"node_id"}), frozenset()),
    "is_trusted": (frozenset({"node_id"}), frozenset()),
    "wait": (frozenset({"node_id"}), frozenset({"timeout"})),
    "resolve": (frozenset({"hostname"}), frozenset()),
    "forget_name": (frozenset({"hostname"}), frozenset()),
    "events": (frozenset(), frozenset({"follow", "history"})),
    "metrics": (frozenset(), frozenset()),
    "reload": (frozenset(), frozenset()),
}

# Commands naming a node for which this node itself is a mistake (it trusts itself anyway).
_NOT_SELF = frozenset({"handshake", "untrust", "wait"})
# Commands that show or act on handshake state: the relay is polled first (SPEC 18).
_FRESH_VIEW = frozenset({"pending", "trust", "approve", "reject", "requests", "wait"})

_WAIT_SLICE = 1.0  # a `wait` checks this often whether its client is gone
_MAX_HOSTNAME = 253  # the longest DNS name; the registry applies its own stricter rules
# Registry lookups one command may make for hostnames: a listing of thousands of peers
# must not turn into thousands of registry calls (the rest show up on later listings).
_HOSTNAME_LOOKUPS = 32
_HOSTNAME_CACHE = 4096

Response = dict[str, Any]


class _Record(Protocol):
    """A row of a listing (pending, trusted, requests): it names a node."""

    @property
    def node_id(self) -> int: ...


_Row = TypeVar("_Row", bound=_Record)


class HostnameRegistry(Protocol):
    """What the control socket needs of the registry client for hostnames."""

    def lookup(self, node_id: int) -> dict[str, Any]:
        """The registry's ``lookup`` answer for ``node_id`` (``hostname`` when set)."""

    def resolve_hostname(self, hostname: str) -> dict[str, Any]:
        """``{"node_id", "public", "hostname"}`` for ``hostname``; ``RegistryError``."""


class RequestError(Exception):
    """A request that gets an error response (``code``, ``message``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def ok_response(data: Any) -> Response:
    """An ok response carrying ``data``."""
    return {"status": "ok", "data": data}


def error_response(code: str, message: str) -> Response:
    """An error response: ``code`` for programs, ``message`` for people."""
    return {"status": "error", "code": code, "message": message}


def encode_response(response: Response) -> bytes:
    """One response as a line on the wire."""
    return json.dumps(response, separators=(",", ":")).encode("utf-8") + b"\n"


def _check_arg(name: str, value: Any) -> Any:
    """The argument ``name`` if well-typed; ``timeout`` is capped to ``WAIT_MAX_TIMEOUT``."""
    if name == "node_id":
        if type(value) is not int or not 0 <= value <= MAX_NODE_ID:
            raise RequestError(INVALID_ARGUMENT, f"node_id must be an integer 0..{MAX_NODE_ID}")
        return value
    if name in ("justification", "reason", "new_key"):
        if not isinstance(value, str):
            raise RequestError(INVALID_ARGUMENT, f"{name} must be a string")
        return value
    if name == "hostname":
        if not isinstance(value, str) or not 0 < len(value) <= _MAX_HOSTNAME:
            raise RequestError(
                INVALID_ARGUMENT, f"hostname must be a string of 1..{_MAX_HOSTNAME} characters"
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
            raise RequestError(INVALID_ARGUMENT, "timeout must be a number of seconds >= 0")
        return float(min(value, WAIT_MAX_TIMEOUT))
    if not isinstance(value, bool):  # follow, history
        raise RequestError(INVALID_ARGUMENT, f"{name} must be true or false")
    return value


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """The command and its checked arguments of one request line; ``RequestError`` says
    why a line is not a valid request."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise RequestError(INVALID_ARGUMENT, f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError(INVALID_ARGUMENT, "request must be a JSON object")
    command = request.pop("command", None)
    if not isinstance(command, str):
        raise RequestError(INVALID_ARGUMENT, 'request needs a "command" string')
    if command not in COMMANDS:
        raise RequestError(
            INVALID_ARGUMENT, f"unknown command {command!r} (known: {', '.join(COMMANDS)})"
        )
    required, optional = COMMANDS[command]
    missing = sorted(required - request.keys())
    unknown = sorted(request.keys() - required - optional)
    if missing:
        raise RequestError(INVALID_ARGUMENT, f"{command} needs {', '.join(missing)}")
    if unknown:
        raise RequestError(INVALID_ARGUMENT, f"{command} does not take {', '.join(unknown)}")
    return command, {name: _check_arg(name, value) for name, value in request.items()}


class ControlCommands:
    """Carries out the commands for ``manager``: ``status`` builds the ``status`` answer,
    ``node_id`` tells this node's ID, ``registry`` (None without one) resolves and shows
    hostnames; ``stopping`` is set when the server stops, which ends every ``wait``.
    ``names`` pins each hostname resolved for a command (SPEC 17; a memory-only pin set
    when not given); ``publish`` announces ``hostname.changed``. ``refresh`` (set by the
    daemon) polls the relay before the commands that show or act on handshake state, so an
    operator never looks at a stale view (SPEC 18)."""

    refresh: Callable[[], None] | None = None

    def __init__(
        self,
        manager: Manager,
        status: Callable[[], dict[str, Any]],
        node_id: Callable[[], int],
        registry: HostnameRegistry | None,
        stopping: threading.Event,
        names: NamePins | None = None,
        publish: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.manager = manager
        self.status = status
        self.node_id = node_id
        self.registry = registry
        self.stopping = stopping
        self.names = names if names is not None else NamePins("")
        self.publish = publish
        # The daemon's config reload (what SIGHUP does); None: this server cannot reload.
        self.reload: Callable[[], dict[str, Any]] | None = None
        self._hostname_cache: dict[int, tuple[float, str]] = {}

    def execute(
        self, command: str, args: dict[str, Any], gone: Callable[[], bool] | None = None
    ) -> Response:
        """The response to one validated request other than ``events``; never raises.
        ``gone`` (for ``wait``) tells when the client went away."""
        try:
            if command in _NOT_SELF and is_own_node(args["node_id"], self.node_id()):
                raise RequestError(
                    INVALID_ARGUMENT,
                    f"node {args['node_id']} is this node itself; name the peer's node ID",
                )
            if command in _FRESH_VIEW and self.refresh is not None:
                self.refresh()
            if command == "wait":
                return ok_response(self._wait(gone=gone, **args))
            return ok_response(getattr(self, f"_do_{command}")(**args))
        except RequestError as exc:
            return error_response(exc.code, exc.message)
        except HandshakeError as exc:
            return error_response(code_of(exc), str(exc))
        except Exception:
            log.exception("control command %s failed", command)
            return error_response(INTERNAL, f"{command} failed; see the daemon's log")

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
        """The node a hostname names, for a command's NODE argument: the registry's answer,
        checked against the name's pin (SPEC 17). The first resolve pins ``name -> (node ID,
        key)``; one that maps the name elsewhere fails naming both, publishes
        ``hostname.changed``, and the command that asked does nothing."""
        if self.registry is None:
            raise RequestError(
                INVALID_STATE, f"cannot resolve {hostname!r}: this daemon has no registry"
            )
        try:
            answer = self.registry.resolve_hostname(hostname)
        except RegistryError as exc:
            # The production registry answers "request failed" for an unknown name and for
            # a fault alike (SPEC 11): an unknown name is the likely case.
            raise RequestError(NOT_FOUND, f"cannot resolve {hostname!r}: {exc}") from None
        node_id = answer.get("node_id")
        if type(node_id) is not int:
            raise RequestError(NOT_FOUND, f"the registry did not resolve {hostname!r}")
        key = self.registry.lookup(node_id).get("public_key")
        if not isinstance(key, str) or decode_key(key) is None:
            raise RequestError(
                NOT_FOUND, f"the registry gave no key for node {node_id} ({hostname!r})"
            )
        try:
            self.names.check(hostname, node_id, key)
        except HostnameMoved as exc:
            log.error("%s", exc)
            if self.publish is not None:
                self.publish(HOSTNAME_CHANGED, exc.payload())
            raise RequestError(INVALID_STATE, str(exc)) from None
        return {
            "node_id": node_id,
            "hostname": answer.get("hostname", hostname),
            "public": bool(answer.get("public")),
        }

    def _do_forget_name(self, hostname: str) -> dict[str, Any]:
        if not self.names.forget(hostname):
            raise RequestError(NOT_FOUND, f"hostname {hostname} is not pinned")
        return {"hostname": hostname, "status": "forgotten"}

    def _do_handshake(self, node_id: int, justification: str = "") -> dict[str, Any]:
        return {"node_id": node_id, "status": self.manager.send_request(node_id, justification)}

    def _listing(
        self, key: str, items: Sequence[_Row], row: Callable[[_Row], dict[str, Any]]
    ) -> dict[str, Any]:
        """``{key: [...]}``, an entry per item: its node ID and registry hostname, then
        ``row(item)``."""
        names = self._hostnames([item.node_id for item in items])
        return {
            key: [
                {"node_id": item.node_id, "hostname": names.get(item.node_id, ""), **row(item)}
                for item in items
            ]
        }

    def _do_pending(self) -> dict[str, Any]:
        records = {r.node_id: r for r in self.manager.trusted_peers()}
        return self._listing(
            "pending",
            self.manager.pending_requests(),
            lambda p: {
                "public_key": p.public_key,
                "fingerprint": full_fingerprint(p.public_key),
                "key_changed": key_changed(records.get(p.node_id), p),
                "justification": p.justification,
                **_time("received_at", p.received_at),
            },
        )

    def _do_approve(self, node_id: int, new_key: str | None = None) -> dict[str, Any]:
        return _answered(
            node_id, self.manager.approve_handshake(node_id, new_key=new_key), "approved"
        )

    def _do_reject(self, node_id: int, reason: str = "") -> dict[str, Any]:
        return _answered(node_id, self.manager.reject_handshake(node_id, reason), "rejected")

    def _do_trust(self) -> dict[str, Any]:
        conflicts = set(self.manager.conflicting_peers())
        return self._listing(
            "trusted",
            self.manager.trusted_peers(),
            lambda r: {
                "public_key": r.public_key,
                "mutual": r.mutual,
                "network": r.network,
                **_time("approved_at", r.approved_at),
                "reason": r.reason,
                "conflict": r.node_id in conflicts,
            },
        )

    def _do_requests(self) -> dict[str, Any]:
        return self._listing(
            "requests",
            self.manager.outgoing_requests(),
            lambda r: {
                **_time("sent_at", r.sent_at),
                "path": r.path,
                "state": r.state,
                "reason": r.reason,
            },
        )

    def _do_untrust(self, node_id: int) -> dict[str, Any]:
        return {"node_id": node_id, "status": self.manager.revoke_trust(node_id)}

    def _do_metrics(self) -> dict[str, Any]:
        # The Manager carries the daemon's metrics: every part's, in one registry.
        return {"text": self.manager.metrics.render()}

    def _do_reload(self) -> dict[str, Any]:
        # The SIGHUP path: a bad file keeps the old config and is an error answer here.
        if self.reload is None:
            raise HandshakeError("this daemon has no config file to reload")
        return self.reload()

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
            rejection = self._rejection(node_id)
            if rejection is not None:
                return {"node_id": node_id, "trusted": False, "rejected": True, "reason": rejection}
            if left <= _WAIT_SLICE or self.stopping.is_set() or (gone is not None and gone()):
                return {"node_id": node_id, "trusted": False}

    def _rejection(self, node_id: int) -> str | None:
        """The peer's reason when our latest request to ``node_id`` was rejected, else None."""
        for request in self.manager.outgoing_requests():
            if request.node_id == node_id and request.state == REJECTED:
                return request.reason
        return None


def _answered(node_id: int, done: bool, status: str) -> dict[str, Any]:
    """The answer to an approve or reject of ``node_id`` that ended as ``status``, or
    not_found when ``done`` says nothing was pending."""
    if not done:
        raise RequestError(NOT_FOUND, f"nothing pending for node {node_id}")
    return {"node_id": node_id, "status": status}


def _time(key: str, moment: datetime) -> dict[str, Any]:
    """``key`` as Unix seconds (an integer, as ``pilotctl --json`` prints it) and
    ``key_text`` as RFC 3339."""
    return {key: int(moment.timestamp()), f"{key}_text": format_time(moment)}
