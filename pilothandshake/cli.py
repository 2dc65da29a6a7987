"""``pilot-handshakectl``: the operator's command line (SPEC section 13), built on ``Client``.

It talks to a running ``pilot-handshaked`` over the control socket, found in this order:
``--socket PATH``, else ``--config FILE`` (the daemon's config: ``control.sock`` beside its
identity), else ``$PILOT_HANDSHAKE_SOCKET``, else beside the identity of the daemon's default
config ``/etc/pilot-handshake/config.yaml`` when that file is readable, else
``~/.pilot-handshake/control.sock`` (``control_socket.find_socket``).

Exit codes: 0 ok, 1 failed (one line on stderr), 2 usage. ``--json`` (before or after the
command) prints each response exactly as the daemon sent it (the ``pilotctl --json`` shape),
errors included. Every ``NODE`` is a node ID or a hostname the daemon's registry resolves.

Only what a command needs is imported: ``status`` loads neither YAML (unless ``--config``
or the default config is read) nor crypto nor any of the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ._version import __version__
from .client import Client, ControlError, raise_for_error
from .constants import CONTROL_TIMEOUT, DEFAULT_CONFIG_PATH, MAX_NODE_ID, WAIT_DEFAULT_TIMEOUT
from .control_socket import find_socket
from .errors import HandshakeError

TYPE_CHECKING = False  # not typing's: importing typing costs a short CLI run milliseconds
if TYPE_CHECKING:
    from datetime import datetime
    from typing import Any, Callable, NoReturn

__all__ = ["main_handshakectl"]

_JUSTIFICATION_WIDTH = 60
_STATUS_WAIT_DEFAULT = 30.0  # `status --wait` without --timeout
_STATUS_RETRY = 0.1  # how often `status --wait` tries again while the daemon starts

_EPILOG = f"""\
the control socket is found from --socket, else --config FILE (control.sock beside the
identity named there), else $PILOT_HANDSHAKE_SOCKET, else beside the identity of
{DEFAULT_CONFIG_PATH} when readable, else ~/.pilot-handshake/control.sock.
NODE is a node ID or a hostname (resolved by the daemon's registry).

exit codes: 0 ok, 1 failed (one line on stderr says why), 2 usage error."""


class _Failure(Exception):
    """A command that failed: the one line for stderr."""


def _node(text: str) -> int | str:
    if text.isascii() and text.isdigit():
        value = int(text, 10)
        if value > MAX_NODE_ID:
            raise argparse.ArgumentTypeError(f"node ID {text} is above {MAX_NODE_ID}")
        return value
    if not text or not text.isprintable() or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a node ID or a hostname, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until the daemon answers and, with a registry, has its node ID",
    )
    _timeout_argument(parser, _STATUS_WAIT_DEFAULT, "how long --wait waits")


def _timeout_argument(parser: argparse.ArgumentParser, default: float, what: str) -> None:
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=default,
        metavar="S",
        help=f"{what} (default {default:g})",
    )


def _node_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", type=_node, metavar="NODE")


def _handshake_arguments(parser: argparse.ArgumentParser) -> None:
    _node_argument(parser)
    parser.add_argument("justification", metavar="JUSTIFICATION")


def _reject_arguments(parser: argparse.ArgumentParser) -> None:
    _node_argument(parser)
    parser.add_argument("reason", nargs="?", default="", metavar="REASON")


def _wait_arguments(parser: argparse.ArgumentParser) -> None:
    _node_argument(parser)
    _timeout_argument(parser, WAIT_DEFAULT_TIMEOUT, "seconds to wait")


def _events_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow", action="store_true", help="keep printing new events")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


# Every command, in the order --help lists them: its summary, and what adds its arguments.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "status": ("node ID, hostname, listen address, registry, counts", _status_arguments),
    "handshake": ("ask a node for trust", _handshake_arguments),
    "pending": ("list pending requests", _no_arguments),
    "approve": ("approve a pending request", _node_argument),
    "reject": ("reject a pending request", _reject_arguments),
    "trust": ("list trusted peers (and conflicting records)", _no_arguments),
    "untrust": ("revoke trust in a node, or withdraw our request to it", _node_argument),
    "wait": ("wait until a node is trusted (exit 1 on timeout)", _wait_arguments),
    "events": ("show recent events", _events_arguments),
    "metrics": (
        "print the Prometheus metrics (what metrics.listen serves at /metrics)",
        _no_arguments,
    ),
}


class _FullParserNeeded(Exception):
    """What ``_OneCommandParser`` would print depends on the commands it lacks."""


class _OneCommandParser(argparse.ArgumentParser):
    """The top-level parser built with one command only (``_parse``). Its help and its
    errors would leave the other commands out (the list in --help, the choices in "invalid
    choice"), so it prints neither: ``_parse`` asks the full parser instead."""

    def format_help(self) -> str:
        """Never: the help lists every command."""
        raise _FullParserNeeded

    def error(self, message: str) -> NoReturn:
        """Never: the full parser says it, in its own words."""
        raise _FullParserNeeded


def _unsized(prog: str) -> argparse.HelpFormatter:
    """The formatter of a parser being built. argparse makes one for every argument added,
    only to check its metavar; sized to the terminal, as help is, the first one would import
    ``shutil`` (2 ms of a ``status`` run) for nothing. ``_parser`` swaps in the sized ones."""
    return argparse.HelpFormatter(prog, width=80)  # any width: nothing it formats is shown


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser with every command, or with the command ``only`` alone
    (a ``_OneCommandParser``, see ``_parse``)."""
    # --json is also accepted after the command; SUPPRESS keeps the subcommand's default
    # from overwriting a --json given before it.
    after = argparse.ArgumentParser(add_help=False, formatter_class=_unsized)
    after.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON responses"
    )
    parser = (argparse.ArgumentParser if only is None else _OneCommandParser)(
        prog="pilot-handshakectl",
        description="Operate a running pilot-handshaked over its control socket.",
        epilog=_EPILOG,
        formatter_class=_unsized,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the daemon's config: its socket is beside the identity "
        f"(default: {DEFAULT_CONFIG_PATH} when readable)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the daemon's JSON responses as sent"
    )
    # The commands' own parsers are plain ones: their help and errors are the same
    # whichever other commands exist.
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    commands.required = True
    for name, (summary, add_arguments) in _COMMANDS.items():
        if only is None or name == only:
            add_arguments(
                commands.add_parser(
                    name,
                    help=summary,
                    description=summary,
                    parents=[after],
                    formatter_class=_unsized,
                )
            )
    # Built: help and errors are formatted to the terminal's width, as argparse's default.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for command in commands.choices.values():
        command.formatter_class = argparse.HelpFormatter
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """``argv`` (default ``sys.argv[1:]``) parsed, building only the parser of the command
    that is run when that is possible: building all ten costs a short run milliseconds.

    The first word of ``argv`` that names a command is a guess that argparse checks: a
    parser with only that command parses ``argv``, and when it cannot answer exactly as the
    full parser would (the guess was an option's value, as in ``--socket status pending``;
    a usage error; the top-level --help), the full parser parses ``argv`` again."""
    args = sys.argv[1:] if argv is None else argv
    guess = next((arg for arg in args if arg in _COMMANDS), None)
    if guess is not None:
        try:
            return _parser(guess).parse_args(args)
        except _FullParserNeeded:
            pass
    return _parser().parse_args(args)


def _printable(text: str, width: int | None = None) -> str:
    """``text`` safe for a terminal: a peer's justification must not carry escape codes."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    if width is not None and len(clean) > width:
        clean = clean[: width - 3] + "..."
    return clean


def _label(node: Any, hostname: Any = "") -> str:
    """A node ID with its hostname beside it, when known."""
    return (
        f"{node} ({_printable(hostname)})" if isinstance(hostname, str) and hostname else str(node)
    )


def _age(time_text: str, now: datetime) -> str:
    from .store import parse_time

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
        if registry.get("loop", "running") != "running":
            state += f"; registry loop {_printable(str(registry['loop']))}"
        registry_text = f"{registry.get('address', '?')} ({state})"
    else:
        registry_text = "none" if registry is None else str(registry)
    rows = [
        ["node", _label(data.get("node_id", "?"), data.get("hostname"))],
        ["listen", str(data.get("listen", "?"))],
        ["registry", registry_text],
        ["trusted", str(data.get("trusted", "?"))],
        ["pending", str(data.get("pending", "?"))],
    ]
    if data.get("undelivered"):
        rows.append(["answers", f"{data['undelivered']} not delivered yet (retrying)"])
    if isinstance(registry, dict) and registry.get("hostname_error"):
        # The daemon runs without the name it was configured with: say so where it is seen.
        wanted = _printable(str(registry.get("hostname", "")))
        rows.insert(
            1, ["hostname", f"{wanted} not set: {_printable(str(registry['hostname_error']))}"]
        )
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def _show_handshake(data: dict[str, Any]) -> str:
    node, status = data["node_id"], data["status"]
    if status == "trusted":
        return f"already trusted {node}"
    if status == "relayed":
        return f"request relayed to {node} through the registry"
    return f"request sent to {node}"


def _show_pending(data: dict[str, Any]) -> str:
    from datetime import datetime, timezone

    from .identity import fingerprint  # only this table needs these

    pending = data["pending"]
    if not pending:
        return "no pending requests"
    now = datetime.now(timezone.utc)
    rows = [
        [
            _label(p["node_id"], p.get("hostname")),
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
            _label(r["node_id"], r.get("hostname")),
            "yes" if r["mutual"] else "no",
            str(r["network"]) if r["network"] else "-",
            r["approved_at"],
            "CONFLICT" if r.get("conflict") else "trusted",
        ]
        for r in trusted
    ]
    text = _table(["NODE", "MUTUAL", "NETWORK", "APPROVED AT", "STATE"], rows)
    if any(r.get("conflict") for r in trusted):
        text += (
            "\nCONFLICT: the registry now binds this node ID to another key; it is not "
            "trusted until you approve it again or untrust it"
        )
    return text


def _show_untrust(data: dict[str, Any]) -> str:
    if data.get("status") == "withdrawn":
        return f"request withdrawn from {data['node_id']} (it was not trusted yet)"
    return f"untrusted {data['node_id']}"


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
    "untrust": _show_untrust,
    "wait": _show_wait,
    "events": _show_event,
    "metrics": lambda data: str(data["text"]).rstrip("\n"),
}


def _request_args(client: Client, options: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if hasattr(options, "node"):
        args["node_id"] = client.resolve(options.node)
    if options.command == "handshake":
        args["justification"] = options.justification
    elif options.command == "reject":
        args["reason"] = options.reason
    elif options.command == "wait":
        args["timeout"] = options.timeout
    elif options.command == "events":
        args["follow"] = options.follow
    return args


def _status_when_ready(client: Client, timeout: float) -> dict[str, Any]:
    """The daemon's first ``status`` answer that has a node ID, waiting up to ``timeout``
    while it starts (its socket appears only once port 444 serves and it registered)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = client.request("status")
        except ControlError as exc:
            problem = str(exc)
        else:
            data = response.get("data")
            if response["status"] != "ok" or (isinstance(data, dict) and data.get("node_id")):
                return response
            problem = f"pilot-handshaked at {client.path} has no node ID yet (not registered)"
        if time.monotonic() >= deadline:
            raise _Failure(f"gave up after {timeout:g} s: {problem}")
        time.sleep(_STATUS_RETRY)


def _run(options: argparse.Namespace) -> None:
    client = Client(find_socket(options.socket, options.config), CONTROL_TIMEOUT)
    if options.command == "status" and options.wait:
        responses = iter([_status_when_ready(client, options.timeout)])
    elif options.command == "events":
        responses = client.stream("events", **_request_args(client, options))
    else:
        responses = iter([client.request(options.command, **_request_args(client, options))])
    for response in responses:
        if options.json:
            print(json.dumps(response), flush=True)
        try:
            data = raise_for_error(response)
        except HandshakeError as exc:
            raise _Failure(str(exc)) from None
        text = _SHOW[options.command](data)
        if not options.json:
            print(text, flush=True)


def main_handshakectl(argv: list[str] | None = None) -> int:
    """Run ``pilot-handshakectl`` with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    options = _parse(argv)
    try:
        _run(options)
    except (_Failure, HandshakeError) as exc:
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
