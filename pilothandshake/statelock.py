"""Whether a daemon holds its state directory, seen from outside: for ``pilot-handshakectl
status --wait``, which should stop waiting for a daemon that already exited.

A running ``pilot-handshaked`` holds ``trust.json.lock`` (beside the identity, so beside the
control socket) with ``flock``, and touches the file's time once it has it and again as
it lets go (``fsutil.release_lock``). Linux lists every
``flock`` in ``/proc/locks`` by inode, so another process can see whether the lock is held
without taking it (taking it, even for a moment, could make a starting daemon fail). Where
``/proc/locks`` cannot be read, nothing is known (``probe`` returns None).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from .constants import TRUST_FILE

__all__ = ["LOCK_NAME", "LockState", "lock_path", "probe"]

# The store's lock (``TrustStore``: trust.json + LOCK_SUFFIX; tests/test_cli.py checks both agree).
LOCK_NAME = TRUST_FILE + ".lock"
_PROC_LOCKS = "/proc/locks"


class LockState(NamedTuple):
    """The lock file seen once: whether a process holds it, and ``stamp`` (inode and
    modification time, None when there is no file), which changes when a daemon takes it."""

    held: bool
    stamp: tuple[int, int] | None


def lock_path(socket_path: str) -> str:
    """The state lock of the daemon whose control socket is ``socket_path``."""
    return os.path.join(os.path.dirname(socket_path), LOCK_NAME)


def probe(path: str, locks: str = _PROC_LOCKS) -> LockState | None:
    """The state of the lock file ``path`` now; None when ``locks`` cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return LockState(False, None)
    try:
        with open(locks, encoding="ascii", errors="replace") as handle:
            table = handle.read()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2153923 0 EOF"; the device is not compared: on
    # overlay and btrfs it differs from stat's, and a false "held" only means waiting on.
    inode = f":{info.st_ino} "
    held = any(" FLOCK " in line and inode in line for line in table.splitlines())
    return LockState(held, (info.st_ino, info.st_mtime_ns))
