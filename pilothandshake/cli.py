"""``pilot-handshakectl``: the operator's command line (SPEC section 13).

It talks to a running ``pilot-handshaked`` over the control socket. Exit codes: 0 ok,
1 failed (one line on stderr), 2 usage. ``--json`` prints each response exactly as the daemon
sent it (the ``pilotctl --json`` shape), errors included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any, Callable

from ._version import __version__
from .config import Config, load_config
from .control import ControlClient, ControlError
from .errors import ConfigError
from .identity import fingerprint
from .messages import MAX_NODE_ID
from .store import parse_time

__all__ = ["main_handshakectl"]

SOCKET_ENV = "PILOT_HANDSHAKE_SOCKET"
_JUSTIFICATION_WIDTH = 60


class _Failure(Exception):
    """A command that failed: the one line for stderr."""


def _node(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_NODE_ID:
        raise argparse.ArgumentTypeError(f"expected a node ID 0..{MAX_NODE_ID}, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilot-handshakectl",
        description="Operate a running pilot-handshaked over its control socket.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
    parser.add_argument(
        "--config", metavar="FILE", help="the daemon's config (its socket is beside the identity)"
    )
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON responses")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser("status", help="node ID, listen address, registry, counts")
    handshake = commands.add_parser("handshake", help="ask a node for trust")
    handshake.add_argument("node", type=_node, metavar="NODE")
    handshake.add_argument("justification", metavar="JUSTIFICATION")
    commands.add_parser("pending", help="list pending requests")
    approve = commands.add_parser("approve", help="approve a pending request")
    approve.add_argument("node", type=_node, metavar="NODE")
    reject = commands.add_parser("reject", help="reject a pending request")
    reject.add_argument("node", type=_node, metavar="NODE")
    reject.add_argument("reason", nargs="?", default="", metavar="REASON")
    commands.add_parser("trust", help="list trusted peers")
    untrust = commands.add_parser("untrust", help="revoke trust in a node")
    untrust.add_argument("node", type=_node, metavar="NODE")
    wait = commands.add_parser("wait", help="wait until a node is trusted (exit 1 on timeout)")
    wait.add_argument("node", type=_node, metavar="NODE")
    wait.add_argument("--timeout", type=_seconds, default=None, metavar="S")
    events = commands.add_parser("events", help="show recent events")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    return parser


def _socket_path(options: argparse.Namespace) -> str:
    if options.socket:
        return str(options.socket)
    if options.config:
        return load_config(options.config).control_socket
    from_env = os.environ.get(SOCKET_ENV)
    if from_env:
        return from_env
    return Config().control_socket


def _request_args(options: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if hasattr(options, "node"):
        args["node_id"] = options.node
    if options.command == "handshake":
        args["justification"] = options.justification
    elif options.command == "reject":
        args["reason"] = options.reason
    elif options.command == "wait" and options.timeout is not None:
        args["timeout"] = options.timeout
    elif options.command == "events":
        args["follow"] = options.follow
    return args


def _printable(text: str, width: int | None = None) -> str:
    """``text`` safe for a terminal: a peer's justification must not carry escape codes."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    if width is not None and len(clean) > width:
        clean = clean[: width - 3] + "..."
    return clean


def _age(time_text: str, now: datetime) -> str:
    try:
        seconds = int((now - parse_time(time_text)).total_seconds())
    except ValueError:
        return "?"
    seconds = max(0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    )


def _show_status(data: dict[str, Any]) -> str:
    registry = data.get("registry")
    if isinstance(registry, dict):
        state = "reachable" if registry.get("reachable") else "unreachable"
        registry_text = f"{registry.get('address', '?')} ({state})"
    else:
        registry_text = "none" if registry is None else str(registry)
    rows = [
        ["node", str(data.get("node_id", "?"))],
        ["listen", str(data.get("listen", "?"))],
        ["registry", registry_text],
        ["trusted", str(data.get("trusted", "?"))],
        ["pending", str(data.get("pending", "?"))],
    ]
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def _show_handshake(data: dict[str, Any]) -> str:
    node, status = data["node_id"], data["status"]
    if status == "trusted":
        return f"already trusted {node}"
    if status == "relayed":
        return f"request relayed to {node} through the registry"
    return f"request sent to {node}"


def _show_pending(data: dict[str, Any]) -> str:
    pending = data["pending"]
    if not pending:
        return "no pending requests"
    now = datetime.now(timezone.utc)
    rows = [
        [
            str(p["node_id"]),
            fingerprint(p["public_key"]) or "-",
            _printable(p["justification"], _JUSTIFICATION_WIDTH),
            _age(p["received_at"], now),
        ]
        for p in pending
    ]
    return _table(["NODE", "KEY", "JUSTIFICATION", "AGE"], rows)


def _show_trust(data: dict[str, Any]) -> str:
    trusted = data["trusted"]
    if not trusted:
        return "no trusted peers"
    rows = [
        [
            str(r["node_id"]),
            "yes" if r["mutual"] else "no",
            str(r["network"]) if r["network"] else "-",
            r["approved_at"],
        ]
        for r in trusted
    ]
    return _table(["NODE", "MUTUAL", "NETWORK", "APPROVED AT"], rows)


def _show_wait(data: dict[str, Any]) -> str:
    if data["trusted"]:
        return f"trusted {data['node_id']}"
    raise _Failure(f"timed out waiting for trust with {data['node_id']}")


def _show_event(data: dict[str, Any]) -> str:
    details = " ".join(
        f"{key}={_printable(json.dumps(value) if not isinstance(value, str) else value)}"
        for key, value in sorted(data.get("data", {}).items())
    )
    return _printable(f"{data.get('timestamp', '?')} {data.get('event', '?')} {details}").rstrip()


_SHOW: dict[str, Callable[[dict[str, Any]], str]] = {
    "status": _show_status,
    "handshake": _show_handshake,
    "pending": _show_pending,
    "approve": lambda data: f"approved {data['node_id']}",
    "reject": lambda data: f"rejected {data['node_id']}",
    "trust": _show_trust,
    "untrust": lambda data: f"untrusted {data['node_id']}",
    "wait": _show_wait,
    "events": _show_event,
}


def _run(options: argparse.Namespace) -> None:
    client = ControlClient(_socket_path(options))
    args = _request_args(options)
    if options.command == "events":
        responses = client.stream("events", **args)
    else:
        responses = iter([client.request(options.command, **args)])
    for response in responses:
        if options.json:
            print(json.dumps(response), flush=True)
        if response["status"] != "ok":
            raise _Failure(str(response.get("message", "failed")))
        text = _SHOW[options.command](response["data"])
        if not options.json:
            print(text, flush=True)


def main_handshakectl(argv: list[str] | None = None) -> int:
    """Run ``pilot-handshakectl`` with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    options = _parser().parse_args(argv)
    try:
        _run(options)
    except (_Failure, ControlError, ConfigError) as exc:
        print(f"pilot-handshakectl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C is how `events --follow` normally ends.
        return 0 if options.command == "events" else 1
    except BrokenPipeError:
        # Output piped into a command that stopped reading (`... | head`): not a failure.
        # Pointing stdout at /dev/null keeps the interpreter's final flush from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0
