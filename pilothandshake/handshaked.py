"""``pilot-handshaked``: the daemon as a program (SPEC sections 12, 13c).

``main()`` parses the arguments, loads the config, sets up logging, runs a ``Daemon`` until
SIGTERM or SIGINT (SIGHUP reloads the policy), tells systemd each step when it runs under it,
and turns every start failure into one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from ._version import __version__
from .config import format_address, load_config
from .constants import DEFAULT_CONFIG_PATH, REGISTRY_TIMEOUT, SYSTEMD_STATUS_INTERVAL
from .daemon import Daemon
from .errors import HandshakeError
from .logsetup import configure_logging
from .sdnotify import Notifier, Watchdog
from .store import corrupt_files

log = logging.getLogger(__name__)

__all__ = ["main", "move_corrupt_aside"]


def move_corrupt_aside(path: str) -> list[str]:
    """Rename trust.json (at ``path``) and its journal, whichever does not parse, to
    ``<name>.corrupt-<timestamp>``; returns the new names (none when both load)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for name in corrupt_files(path):
        os.replace(name, f"{name}.corrupt-{stamp}")
        moved.append(f"{name}.corrupt-{stamp}")
    return moved


def _fail(message: str) -> int:
    print(f"pilot-handshaked: {message}", file=sys.stderr, flush=True)
    return 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pilot-handshaked",
        description="Serve the Pilot Protocol trust handshake (port 444).",
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the policy. Returns the exit
    code: 0 after a clean stop, 1 when it cannot start (one line on stderr says why).

    Under systemd (``$NOTIFY_SOCKET``) it tells the manager each step (SPEC 13c): ``READY=1``
    once port 444 and the control socket serve, ``RELOADING=1`` / ``READY=1`` around a
    reload, ``STOPPING=1``, and ``STATUS=`` / ``WATCHDOG=1`` from a ``Watchdog`` thread."""
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
    except HandshakeError as exc:
        return _fail(str(exc))
    configure_logging(config.log_level, config.log_format)
    if args.move_corrupt_aside:
        try:
            moved = move_corrupt_aside(config.trust_path)
        except OSError as exc:
            return _fail(f"cannot move {config.trust_path} aside: {exc}")
        for name in moved:
            log.warning("moved corrupt trust state aside to %s", name)

    signals: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
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
        return _fail(message)
    except OSError as exc:
        return _fail(str(exc))

    # Port 444 and the control socket serve already; the start line names the node ID
    # once the registry answered (or did not within its timeout), and a signal ends the
    # wait at once.
    deadline = time.monotonic() + REGISTRY_TIMEOUT
    while not signals and not daemon.wait_registration(0) and time.monotonic() < deadline:
        wake.wait(min(0.05, max(0.0, deadline - time.monotonic())))
    registry = config.registry.address if config.registry is not None else "none"
    metrics = daemon.metrics_address
    served = f", metrics http://{format_address(metrics)}/metrics" if metrics else ""
    print(
        f"pilot-handshaked: node {daemon.node_id} listening on "
        f"{format_address(daemon.listen_address)}, registry {registry}, "
        f"control {config.control_socket}{served}",
        flush=True,
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
                try:
                    daemon.reload()
                except HandshakeError as exc:
                    log.error("config reload failed, keeping the old config: %s", exc)
                else:
                    log.info("config reloaded: allowlist, deny list, peers, auto-approve")
                notifier.ready(daemon.status_line())
    finally:
        if watchdog is not None:
            watchdog.stop()  # first: no ping or status may follow STOPPING=1
        notifier.stopping()
        stopping = time.monotonic()
        daemon.stop()
        log.info("stopped in %.1f s", time.monotonic() - stopping)
        notifier.close()
