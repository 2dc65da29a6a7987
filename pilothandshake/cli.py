"""``pilot-handshakectl``: the operator's command line (SPEC section 13), built on ``Client``.

It talks to a running ``pilot-handshaked`` over the control socket, found in this order:
``--socket PATH``, else ``--config FILE`` (the daemon's config: ``control.sock`` beside its
identity), else ``$PILOT_HANDSHAKE_SOCKET``, else beside the identity of the daemon's default
config ``/etc/pilot-handshake/config.yaml`` when that file is readable, else
``~/.pilot-handshake/control.sock`` (``control_socket.find_socket``).

Exit codes: 0 ok, 1 failed (one line on stderr), 2 usage. ``--json`` (before or after the
command) prints each ok response exactly as the daemon sent it (the ``pilotctl --json``
shape) on stdout; every error, the daemon's and the CLI's own (no daemon, bad config,
unknown hostname, usage), is one envelope ``{"status": "error", "code", "message"}`` on
stderr with stdout empty, as ``pilotctl`` does (codes: ``error_codes.CODES``). A
``wait`` that ends untrusted is a result: its data on stdout, exit 1. Every ``NODE`` is a
node ID, a Pilot address ``N:XXXX.XXXX.XXXX`` (its node part) or a hostname the daemon's
registry resolves.

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
from .client import Client, ControlError, node_of_address
from .constants import CONTROL_TIMEOUT, DEFAULT_CONFIG_PATH, MAX_NODE_ID, WAIT_DEFAULT_TIMEOUT
from .control_socket import find_socket
from .error_codes import INTERNAL, INVALID_ARGUMENT, INVALID_STATE, TIMEOUT
from .errors import ConfigError, HandshakeError

TYPE_CHECKING = False  # not typing's: importing typing costs a short CLI run milliseconds
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn

__all__ = ["main_handshakectl"]

_JUSTIFICATION_WIDTH = 60
_STATUS_WAIT_DEFAULT = 30.0  # `status --wait` without --timeout
_STATUS_RETRY = 0.1  # how often `status --wait` tries again while the daemon starts
# A state lock taken this recently before `status --wait` began, and free since, was taken
# by a daemon that has exited; one started again takes it within this long (see
# _daemon_exited).
_RECENT_LOCK = 5.0

_EPILOG = f"""\
the control socket is found from --socket, else --config FILE (control.sock beside the
identity named there), else $PILOT_HANDSHAKE_SOCKET, else beside the identity of
{DEFAULT_CONFIG_PATH} when readable, else ~/.pilot-handshake/control.sock.
NODE is a node ID, a Pilot address N:XXXX.XXXX.XXXX (its node part) or a hostname
(resolved by the daemon's registry).

exit codes: 0 ok, 1 failed (one line on stderr says why), 2 usage error. With --json every
error is {{"status": "error", "code": ..., "message": ...}} on stderr."""


class _Failure(Exception):
    """A command that failed: the one line for stderr, and its error ``code``."""

    def __init__(self, message: str, code: str = INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class _Untrusted(_Failure):
    """A ``wait`` that ended untrusted: a result, not an error (with --json its data is
    already on stdout and nothing goes to stderr)."""


class _UsageError(Exception):
    """The command line does not parse: ``message``, and the ``usage`` line to show."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are raised (``_UsageError``), not printed, so
    ``main_handshakectl`` can print them as --json asks."""

    def error(self, message: str) -> NoReturn:
        """Raise the usage error instead of printing it and exiting."""
        raise _UsageError(message, self.format_usage())


def _node(text: str) -> int | str:
    if text.isascii() and text.isdigit():
        value = int(text, 10)
        if value > MAX_NODE_ID:
            raise argparse.ArgumentTypeError(f"node ID {text} is above {MAX_NODE_ID}")
        return value
    address = node_of_address(text)
    if address is not None:
        return address
    if not text or not text.isprintable() or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a node ID, an address N:XXXX.XXXX.XXXX or a hostname, got {text!r}"
        )
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
    parser.add_argument(
        "node",
        type=_node,
        metavar="NODE",
        help="the peer: a node ID, a Pilot address N:XXXX.XXXX.XXXX, or a hostname the "
        "daemon's registry resolves",
    )


def _node_and_text(name: str, what: str) -> Callable[[argparse.ArgumentParser], None]:
    """The arguments of a command that takes NODE and an optional free text ``name``, which
    says ``what``."""

    def add(parser: argparse.ArgumentParser) -> None:
        _node_argument(parser)
        parser.add_argument(name, nargs="?", default="", metavar=name.upper(), help=what)

    return add


def _approve_arguments(parser: argparse.ArgumentParser) -> None:
    _node_argument(parser)
    parser.add_argument(
        "--new-key",
        metavar="FPR",
        help="approve a KEY CHANGED request: its key's fingerprint (hex, or a prefix of at "
        "least 16 digits) or base64 key",
    )


def _wait_arguments(parser: argparse.ArgumentParser) -> None:
    _node_argument(parser)
    _timeout_argument(parser, WAIT_DEFAULT_TIMEOUT, "seconds to wait")


def _events_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow", action="store_true", help="keep printing new events")
    parser.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="with --follow: only events from now on, not the recent ones first",
    )


def _completion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _name_argument(parser: argparse.ArgumentParser) -> None:
    # Not a NODE: the name is not resolved (a moved name would refuse to resolve).
    parser.add_argument("name", metavar="NAME")


# Every command, in the order --help lists them: its summary, and what adds its arguments.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "status": ("node ID, hostname, listen address, registry, counts", _status_arguments),
    "handshake": (
        "ask a node for trust",
        _node_and_text(
            "justification",
            "why this node asks, shown to the peer's operator in `pending` (optional; 1 KiB kept)",
        ),
    ),
    "pending": ("list pending requests", _no_arguments),
    "approve": ("approve a pending request", _approve_arguments),
    "reject": (
        "reject a pending request",
        _node_and_text("reason", "why, sent to the node that asked (default: none)"),
    ),
    "trust": ("list trusted peers (and conflicting records)", _no_arguments),
    "requests": ("list our requests and what became of each", _no_arguments),
    "untrust": ("revoke trust in a node, or withdraw our request to it", _node_argument),
    "wait": ("wait until a node is trusted (exit 1 on timeout)", _wait_arguments),
    "events": ("show recent events", _events_arguments),
    "metrics": (
        "print the Prometheus metrics (what metrics.listen serves at /metrics)",
        _no_arguments,
    ),
    "forget-name": (
        "forget a hostname's pinned node and key (after it moved on purpose)",
        _name_argument,
    ),
    "reload": (
        "reload the daemon's config, as SIGHUP does, and say what needs a restart",
        _no_arguments,
    ),
    "completion": (
        "print the shell completion script for bash or zsh (needs no daemon)",
        _completion_arguments,
    ),
}

_EXIT_OK_FAILED = "exit codes: 0 ok, 1 failed (one line on stderr says why), 2 usage error."
# Each command's --help ends with its exit codes; the ones not listed use _EXIT_OK_FAILED.
_EXIT_CODES = {
    "status": "exit codes: 0 ok, 1 failed (not running; with --wait: gave up, or the daemon "
    "exited), 2 usage error.",
    "approve": "exit codes: 0 approved, 1 nothing pending for NODE (or failed), 2 usage error.",
    "reject": "exit codes: 0 rejected, 1 nothing pending for NODE (or failed), 2 usage error.",
    "wait": "exit codes: 0 trusted, 1 timed out (or failed), 2 usage error.",
    "events": "exit codes: 0 ok (also when --follow ends with Ctrl-C), 1 failed, 2 usage error.",
    "reload": "exit codes: 0 reloaded, 1 the file is invalid (the daemon keeps its config; "
    "the message says why) or failed, 2 usage error.",
    "completion": "exit codes: 0 printed, 2 usage error. For bash, save the script as "
    "/etc/bash_completion.d/pilot-handshakectl (or eval it in ~/.bashrc); for zsh, as "
    "_pilot-handshakectl in a directory of $fpath.",
}


class _FullParserNeeded(Exception):
    """What ``_OneCommandParser`` would print depends on the commands it lacks."""


class _OneCommandParser(_Parser):
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
    after = _Parser(add_help=False, formatter_class=_unsized)
    after.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON responses"
    )
    parser = (_Parser if only is None else _OneCommandParser)(
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for name, (summary, add_arguments) in _COMMANDS.items():
        if only is None or name == only:
            add_arguments(
                commands.add_parser(
                    name,
                    help=summary,
                    description=summary,
                    epilog=_EXIT_CODES.get(name, _EXIT_OK_FAILED),
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
        rows.insert(1, ["hostname", _printable(str(registry["hostname_error"]))])
    if data.get("public_key"):
        rows.append(["key", f"{data.get('fingerprint') or '-'}  {data['public_key']}"])
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def _show_handshake(data: dict[str, Any]) -> str:
    node, status = data["node_id"], data["status"]
    if status == "trusted":
        return f"already trusted {node}"
    if status == "relayed":
        return f"request relayed to {node} through the registry"
    return f"request sent to {node}"


def _ago(seconds: Any, now: float) -> str:
    """How long ago the Unix time ``seconds`` was, as ``3d``, ``5h``, ``2m`` or ``9s``."""
    if type(seconds) is not int:
        return "?"
    left = max(0, int(now) - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            return f"{left // size}{unit}"
    return f"{left}s"


def _listing(
    items: list[dict[str, Any]],
    empty: str,
    header: list[str],
    row: Callable[[dict[str, Any]], list[str]],
) -> str:
    """A table of ``items``, a line each (``row``) after the ``NODE`` column; ``empty`` when
    there are none."""
    if not items:
        return empty
    rows = [[_label(item["node_id"], item.get("hostname")), *row(item)] for item in items]
    return _table(["NODE", *header], rows)


def _show_pending(data: dict[str, Any]) -> str:
    from .identity import fingerprint  # only this table needs it

    now = time.time()
    return _listing(
        data["pending"],
        "no pending requests",
        ["KEY", "JUSTIFICATION", "AGE"],
        lambda p: [
            (fingerprint(p["public_key"]) or "-")
            + (" KEY CHANGED" if p.get("key_changed") else ""),
            _printable(p["justification"], _JUSTIFICATION_WIDTH),
            _ago(p["received_at"], now),
        ],
    )


def _show_trust(data: dict[str, Any]) -> str:
    trusted = data["trusted"]
    text = _listing(
        trusted,
        "no trusted peers",
        ["MUTUAL", "NETWORK", "APPROVED AT", "WHY", "STATE"],
        lambda r: [
            "yes" if r["mutual"] else "no",
            str(r["network"]) if r["network"] else "-",
            str(r.get("approved_at_text", r["approved_at"])),
            _printable(str(r.get("reason") or "-")),
            "CONFLICT" if r.get("conflict") else "trusted",
        ],
    )
    if any(r.get("conflict") for r in trusted):
        text += (
            "\nCONFLICT: the registry now binds this node ID to another key; it is not "
            "trusted until you approve it again or untrust it"
        )
    return text


def _show_requests(data: dict[str, Any]) -> str:
    now = time.time()
    return _listing(
        data["requests"],
        "no requests sent",
        ["PATH", "STATE", "SENT", "REASON"],
        lambda r: [
            str(r["path"]),
            str(r["state"]),
            _ago(r["sent_at"], now),
            _printable(str(r["reason"]), _JUSTIFICATION_WIDTH) or "-",
        ],
    )


def _show_untrust(data: dict[str, Any]) -> str:
    if data.get("status") == "withdrawn":
        return f"request withdrawn from {data['node_id']} (it was not trusted yet)"
    return f"untrusted {data['node_id']}"


def _show_wait(data: dict[str, Any]) -> str:
    node = data["node_id"]
    if data["trusted"]:
        return f"trusted {node}"
    if data.get("rejected"):
        reason = _printable(str(data.get("reason") or "")) or "no reason given"
        raise _Untrusted(f"node {node} rejected our request: {reason}", INVALID_STATE)
    raise _Untrusted(f"timed out waiting for trust with {node}", TIMEOUT)


def _show_event(data: dict[str, Any]) -> str:
    details = " ".join(
        f"{key}={_printable(json.dumps(value) if not isinstance(value, str) else value)}"
        for key, value in sorted(data.get("data", {}).items())
    )
    return _printable(f"{data.get('timestamp', '?')} {data.get('event', '?')} {details}").rstrip()


def _show_reload(data: dict[str, Any]) -> str:
    restart = data.get("restart_needed") or []
    text = f"reloaded {data.get('config', 'the config')}: allowlist, deny list, peers, auto-approve"
    if restart:
        text += f"\nchanged but needs a restart: {', '.join(map(str, restart))}"
    return text


_SHOW: dict[str, Callable[[dict[str, Any]], str]] = {
    "status": _show_status,
    "handshake": _show_handshake,
    "pending": _show_pending,
    "approve": lambda data: f"approved {data['node_id']}",
    "reject": lambda data: f"rejected {data['node_id']}",
    "trust": _show_trust,
    "requests": _show_requests,
    "untrust": _show_untrust,
    "wait": _show_wait,
    "events": _show_event,
    "metrics": lambda data: str(data["text"]).rstrip("\n"),
    "forget-name": lambda data: f"forgot hostname {_printable(data['hostname'])}",
    "reload": _show_reload,
}


def _resolve(client: Client, node: int | str) -> int:
    """The node ID of ``node``; a hostname is resolved by the daemon, whose error (code
    included) is the command's."""
    if isinstance(node, int):
        return node
    data = _data(client.request("resolve", hostname=node))
    return int(data["node_id"])


def _data(response: dict[str, Any]) -> Any:
    """The ``data`` of an ok response; an error response is the command's ``_Failure``."""
    if response["status"] != "ok":
        message = str(response.get("message") or response.get("code") or "failed")
        raise _Failure(message, str(response.get("code") or INTERNAL))
    return response.get("data")


def _request_args(client: Client, options: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if hasattr(options, "node"):
        args["node_id"] = _resolve(client, options.node)
    if options.command == "handshake":
        args["justification"] = options.justification
    elif options.command == "approve" and options.new_key is not None:
        args["new_key"] = options.new_key
    elif options.command == "reject":
        args["reason"] = options.reason
    elif options.command == "wait":
        args["timeout"] = options.timeout
    elif options.command == "events":
        args["follow"] = options.follow
        if not options.history:
            args["history"] = False
    elif options.command == "forget-name":
        args["hostname"] = options.name
    return args


def _registered(status: dict[str, Any]) -> bool:
    """Whether ``status`` shows a node ID from the registry (before the registry answers,
    ``node_id`` may be the one remembered from last time: ``registry.registered`` says)."""
    registry = status.get("registry")
    if isinstance(registry, dict):
        return bool(registry.get("registered"))
    return bool(status.get("node_id"))


def _status_when_ready(client: Client, timeout: float) -> dict[str, Any]:
    """The daemon's first ``status`` answer that has a node ID, waiting up to ``timeout``
    while it starts (its socket appears only once port 444 serves and it registered).
    Stops at once when no daemon holds the state directory any more (``_daemon_exited``)."""
    deadline = time.monotonic() + timeout
    exited = _daemon_exited(client.path)
    while True:
        try:
            response = client.request("status")
        except ControlError as exc:
            problem = str(exc)
        else:
            data = response.get("data")
            if response["status"] != "ok" or (isinstance(data, dict) and _registered(data)):
                return response
            problem = f"pilot-handshaked at {client.path} is not registered yet"
        gone = exited()
        if gone:
            raise _Failure(gone)
        if time.monotonic() >= deadline:
            raise _Failure(f"gave up after {timeout:g} s: {problem}", TIMEOUT)
        time.sleep(_STATUS_RETRY)


def _daemon_exited(socket_path: str) -> Callable[[], str]:
    """A check, called once per try of ``status --wait``: why no daemon will answer at
    ``socket_path`` ("" while one may still). The state lock tells, as a daemon takes it
    (and touches it) at start: free on two tries in a row after it was held, or taken,
    during the wait, it belonged to a daemon that has exited, such as one that died at start
    on "address already in use". Taken less than ``_RECENT_LOCK`` seconds before the wait
    began and free since, it belonged to one that exited just before; that is said after
    ``_RECENT_LOCK`` seconds more, the time a daemon started again (the port freed) has to
    take the lock. A lock free since long before the wait says nothing (a daemon may be
    starting): the wait goes on until its timeout."""
    from .statelock import lock_path, probe

    path = lock_path(socket_path)
    began = time.monotonic()
    first = previous = probe(path)
    recent = (
        first is not None
        and first.stamp is not None
        and (time.time() - first.stamp[1] / 1e9 < _RECENT_LOCK)
    )
    held = False

    def exited() -> str:
        nonlocal previous, held
        now, before = probe(path), previous
        previous = now
        if first is None or now is None:
            return ""  # no /proc/locks: wait as before
        held = held or now.held
        during = held or now.stamp != first.stamp
        before_wait = recent and time.monotonic() - began >= _RECENT_LOCK
        if now.held or before != now or not (during or before_wait):
            return ""
        return (
            f"no pilot-handshaked holds {os.path.dirname(path)} (its lock {path} is free "
            "again): it exited; its log says why (its stderr, or journalctl -u "
            "pilot-handshaked under systemd)"
        )

    return exited


def _run(options: argparse.Namespace) -> None:
    client = Client(find_socket(options.socket, options.config), CONTROL_TIMEOUT)
    if options.command == "status" and options.wait:
        responses = iter([_status_when_ready(client, options.timeout)])
    elif options.command == "events":
        responses = client.stream("events", **_request_args(client, options))
    else:
        command = options.command.replace("-", "_")  # forget-name: the socket's forget_name
        responses = iter([client.request(command, **_request_args(client, options))])
    for response in responses:
        data = _data(response)
        if options.json:
            print(json.dumps(response), flush=True)
        text = _SHOW[options.command](data)
        if not options.json:
            print(text, flush=True)


def _fail(message: str, code: str, as_json: bool) -> None:
    """Say why on stderr: the ``pilotctl --json`` envelope, or one line."""
    if as_json:
        envelope = {"status": "error", "code": code, "message": message}
        print(json.dumps(envelope), file=sys.stderr, flush=True)
    else:
        print(f"pilot-handshakectl: {message}", file=sys.stderr, flush=True)


def main_handshakectl(argv: list[str] | None = None) -> int:
    """Run ``pilot-handshakectl`` with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        options = _parse(args)
    except _UsageError as exc:
        # Known before parsing: --json asks for the envelope even when nothing else parses.
        if "--json" in args:
            _fail(str(exc), INVALID_ARGUMENT, True)
        else:
            sys.stderr.write(exc.usage)
            print(f"pilot-handshakectl: error: {exc}", file=sys.stderr)
        return 2
    if options.command == "completion":
        from .completion import script

        print(script(options.shell, _parser()), end="")
        return 0
    try:
        _run(options)
    except _Untrusted as exc:
        if not options.json:  # with --json the data on stdout says it
            _fail(str(exc), exc.code, False)
        return 1
    except _Failure as exc:
        _fail(str(exc), exc.code, options.json)
        return 1
    except ControlError as exc:
        _fail(str(exc), exc.code, options.json)
        return 1
    except ConfigError as exc:
        _fail(str(exc), INVALID_ARGUMENT, options.json)
        return 1
    except HandshakeError as exc:
        _fail(str(exc), INTERNAL, options.json)
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
