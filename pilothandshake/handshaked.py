"""``pilot-handshaked``: the daemon as a program.

``main()`` parses the arguments, loads the config, sets up logging, runs a ``Daemon`` until
SIGTERM or SIGINT (SIGHUP reloads the policy), tells systemd each step when it runs under it,
and turns every start failure into one line on stderr and exit code 1. ``--check-config``
validates a config without starting anything; ``--install-systemd`` installs the service's
files (``systemd.install``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from ._version import __version__
from .addresses import format_address
from .config import check_config, load_config
from .constants import DEFAULT_CONFIG_PATH, REGISTRY_TIMEOUT, SYSTEMD_STATUS_INTERVAL
from .daemon import Daemon
from .errors import HandshakeError
from .logsetup import announce, configure_logging
from .sdnotify import Notifier, Watchdog
from .store import corrupt_files

log = logging.getLogger(__name__)

__all__ = ["build_parser", "main", "move_corrupt_aside"]

_EPILOG = """\
exit codes:
  0  stopped by SIGTERM or SIGINT; --check-config: the config is valid;
     --install-systemd: the files are installed
  1  cannot start (one line on stderr says why); --check-config: problems found
     (one line each); --install-systemd: a file could not be written
  2  usage error

signals: SIGHUP reloads the allowlist, deny list, peers and auto-approve (also
pilot-handshakectl reload); SIGTERM and SIGINT stop it cleanly."""


def move_corrupt_aside(path: str) -> list[str]:
    """Rename trust.json (at ``path``) and its journal, whichever does not parse, to
    ``<name>.corrupt-<timestamp>``; returns the new names (none when both load)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for name in corrupt_files(path):
        os.replace(name, f"{name}.corrupt-{stamp}")
        moved.append(f"{name}.corrupt-{stamp}")
    return moved


def _fail(message: str, log_format: str = "text") -> int:
    announce(__name__, f"pilot-handshaked: {message}", log_format, sys.stderr, logging.ERROR)
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``pilot-handshaked`` (also the source of its man page)."""
    parser = argparse.ArgumentParser(
        prog="pilot-handshaked",
        description="Serve the Pilot Protocol trust handshake (port 444).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"YAML config file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--move-corrupt-aside",
        action="store_true",
        help="rename a trust.json that does not parse to trust.json.corrupt-<time> and "
        "start with empty trust state",
    )
    parser.add_argument(
        "--check-config",
        metavar="FILE",
        help="check the config FILE and print every problem found, one per line; binds no "
        "port, takes no lock, starts nothing",
    )
    parser.add_argument(
        "--install-systemd",
        action="store_true",
        help="install the systemd unit (running this installation's pilot-handshaked), the "
        "sysusers file and, when there is none, the example config, then exit",
    )
    parser.add_argument(
        "--prefix",
        default="/",
        metavar="DIR",
        help="with --install-systemd: install under DIR instead of / (default /)",
    )
    return parser


def _check(path: str) -> int:
    problems = check_config(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    for warning in load_config(path).security_warnings():
        print(f"{path}: warning: {warning}")
    print(f"{path}: OK")
    return 0


def _install(prefix: str) -> int:
    from .systemd import install  # only this option needs it

    try:
        done = install(prefix, bindir=os.path.dirname(os.path.abspath(sys.argv[0])))
    except OSError as exc:
        return _fail(f"cannot install the systemd files: {exc}")
    for line in done:
        print(line)
    if prefix == "/":
        print(
            "next: systemd-sysusers && systemctl daemon-reload; edit "
            f"{DEFAULT_CONFIG_PATH}; systemctl enable --now pilot-handshaked"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the policy. Returns the exit
    code: 0 after a clean stop, 1 when it cannot start (one line on stderr says why).

    Under systemd (``$NOTIFY_SOCKET``) it tells the manager each step (SPEC 13c): ``READY=1``
    once port 444 and the control socket serve, ``RELOADING=1`` / ``READY=1`` around a
    reload, ``STOPPING=1``, and ``STATUS=`` / ``WATCHDOG=1`` from a ``Watchdog`` thread."""
    args = build_parser().parse_args(argv)
    if args.check_config is not None:
        return _check(args.check_config)
    if args.install_systemd:
        return _install(args.prefix)
    try:
        config = load_config(args.config)
    except HandshakeError as exc:
        return _fail(str(exc))
    configure_logging(config.log_level, config.log_format)
    form = config.log_format
    if args.move_corrupt_aside:
        try:
            moved = move_corrupt_aside(config.trust_path)
        except OSError as exc:
            return _fail(f"cannot move {config.trust_path} aside: {exc}", form)
        for name in moved:
            log.warning("moved corrupt trust state aside to %s", name)

    signals: list[int] = []
    wake = threading.Event()
    stop_signalled: list[float] = []  # when SIGTERM or SIGINT came: "stopped in" counts from it

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGHUP and not stop_signalled:
            stop_signalled.append(time.monotonic())
        signals.append(signum)
        wake.set()

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, on_signal)

    try:
        daemon = Daemon(config)
        daemon.start(registration_wait=0)
    except HandshakeError as exc:
        message = str(exc)
        if corrupt_files(config.trust_path):
            message += "; start with --move-corrupt-aside to move it aside and start empty"
        return _fail(message, form)
    except OSError as exc:
        return _fail(str(exc), form)

    # Port 444 and the control socket serve already; the start line names the node ID
    # once the registry answered (or did not within its timeout), and a signal ends the
    # wait at once.
    deadline = time.monotonic() + REGISTRY_TIMEOUT
    while not signals and not daemon.wait_registration(0) and time.monotonic() < deadline:
        wake.wait(min(0.05, max(0.0, deadline - time.monotonic())))
    registry = config.registry.address if config.registry is not None else "none"
    metrics = daemon.metrics_address
    served = f", metrics http://{format_address(metrics)}/metrics" if metrics else ""
    announce(
        __name__,
        f"pilot-handshaked: node {daemon.node_id} listening on "
        f"{format_address(daemon.listen_address)}, registry {registry}, "
        f"control {config.control_socket}{served}",
        form,
        sys.stdout,
    )
    notifier = Notifier.from_environment()
    watchdog = None
    if notifier.enabled:
        notifier.ready(daemon.status_line())
        usec = notifier.watchdog_usec
        interval = usec / 2e6 if usec else SYSTEMD_STATUS_INTERVAL
        watchdog = Watchdog(notifier, interval, daemon.status_line, daemon.problems)
        watchdog.start()
    try:
        while True:
            wake.wait(1.0)
            wake.clear()
            while signals:
                signum = signals.pop(0)
                if signum != signal.SIGHUP:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    return 0
                notifier.reloading()
                with contextlib.suppress(HandshakeError):  # logged; the old config stays
                    daemon.apply_reload()
                notifier.ready(daemon.status_line())
    finally:
        if watchdog is not None:
            watchdog.stop()  # first: no ping or status may follow STOPPING=1
        notifier.stopping()
        daemon.stop()
        notifier.close()
        if stop_signalled:
            # From the signal, not from here: the time systemd and the operator wait.
            log.info("stopped in %.3f s", time.monotonic() - stop_signalled[0])
