"""systemd's notify protocol (SPEC 13c), without a library.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``: an ``AF_UNIX`` datagram socket
(a path, or ``@name`` in the abstract namespace). Each notification is one datagram of
newline-separated ``NAME=value`` lines (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``STATUS=...``, ``WATCHDOG=1``). With ``WatchdogSec=`` systemd also passes ``$WATCHDOG_USEC``
(and ``$WATCHDOG_PID``) and restarts the service when no ``WATCHDOG=1`` arrives in time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Callable

__all__ = ["Notifier", "Watchdog", "monotonic_usec"]

log = logging.getLogger(__name__)

_STOP_WAIT = 1.0  # seconds Watchdog.stop() waits for a status check in progress


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the ``MONOTONIC_USEC=`` that systemd (since 253)
    expects beside ``RELOADING=1`` to tell this reload from an earlier one."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; without one every method does nothing, so
    the daemon calls it unconditionally. Sending never raises: a failure is logged once per
    kind of error, since the service must not die because its supervisor went away."""

    def __init__(self, address: str = "", watchdog_usec: int = 0) -> None:
        """``address`` as in ``$NOTIFY_SOCKET`` ("" = not under systemd); ``watchdog_usec``
        as in ``$WATCHDOG_USEC`` (0 = no watchdog)."""
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec if self._address else 0
        self._sock: socket.socket | None = None
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's environment asks for. ``$WATCHDOG_USEC`` counts only when
        ``$WATCHDOG_PID`` is unset or names this process (as ``sd_watchdog_enabled`` does);
        a ``$NOTIFY_SOCKET`` that is neither a path nor ``@name`` is logged and ignored."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is not a socket path or @name: not notifying", address)
            address = ""
        watchdog = 0
        pid = env.get("WATCHDOG_PID", "")
        if not pid or pid == str(os.getpid()):
            try:
                watchdog = max(int(env.get("WATCHDOG_USEC", "0")), 0)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog", env["WATCHDOG_USEC"])
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        """Send ``lines`` (``NAME=value`` each) as one datagram."""
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.sendto("\n".join(lines).encode("utf-8"), self._address)
            except OSError as exc:
                kind = type(exc).__name__
                if kind not in self._logged:
                    self._logged.add(kind)
                    log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc)

    def ready(self, status: str) -> None:
        """``READY=1``: the service serves (also ends a reload)."""
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """``RELOADING=1``: a reload has begun; ``ready()`` ends it."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self) -> None:
        """``STOPPING=1``: the service is shutting down."""
        self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        """Close the socket; later notifications do nothing."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """A thread that every ``interval`` seconds asks ``check`` for the status line and then
    sends ``STATUS=`` with it, plus ``WATCHDOG=1`` when the notifier has a watchdog and the
    daemon is healthy.

    ``check`` is what proves the daemon is alive (it asks the Manager for its counts, which
    takes the Manager's lock): when it raises, or takes longer than ``interval``, that round
    sends no ``WATCHDOG=1``; when it never returns, none is ever sent again, and systemd
    restarts the wedged service. ``problems`` names what is broken although the Manager
    answers (a background loop that stopped): while it names anything, no ``WATCHDOG=1`` is
    sent either, ``STATUS=`` says what, and one ERROR is logged per new problem.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        check: Callable[[], str],
        problems: Callable[[], list[str]] = list,
    ) -> None:
        """Nothing runs until ``start()``."""
        self._notifier = notifier
        self._interval = interval
        self._check = check
        self._problems = problems
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread: it sends nothing more once this returns, unless its ``check``
        hangs, which is not waited for beyond ``_STOP_WAIT`` (a daemon thread cannot keep
        the process alive)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(_STOP_WAIT)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._round()
            except Exception:
                log.exception("watchdog: the daemon did not answer its status check")

    def _round(self) -> None:
        began = time.monotonic()
        status = self._check()
        problems = self._problems()
        took = time.monotonic() - began
        if self._stop.is_set():
            return
        if took > self._interval:
            log.warning("watchdog: the status check took %.1f s; no ping this round", took)
            self._notifier.notify(f"STATUS={status}")
        elif problems:
            for problem in set(problems) - self._reported:
                log.error("watchdog: not reporting healthy to systemd: %s", problem)
            self._reported.update(problems)
            self._notifier.notify(f"STATUS={status}; unhealthy: {'; '.join(problems)}")
        elif self._notifier.watchdog_usec > 0:
            self._notifier.notify("WATCHDOG=1", f"STATUS={status}")
        else:
            self._notifier.notify(f"STATUS={status}")
