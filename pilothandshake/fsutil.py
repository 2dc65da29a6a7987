"""State files on disk, written durably and opened safely: the one place for both.

Every state file (the identity, trust.json, its journal and lock, the registry's store) is
opened without following a symbolic link: a link planted in the state directory must not
make the daemon, often root, read, truncate or chmod the file it points to. The state
directory and the identity file must pass ``check_private``, the way OpenSSH's StrictModes
checks ``~/.ssh``: owned by this user (or root) and writable by nobody else, so nobody else
can plant anything there in the first place.

Replacing a file (``write_atomically``) is: a temporary file in the same directory, fsync,
rename over the file, fsync the directory. The fsync-error policy is the same everywhere: an
fsync that fails (of the file or of the directory) fails the write with its ``OSError``; a
caller never reports a write as durable that the kernel could not confirm.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile

import filelock

from .errors import StoreError

__all__ = [
    "check_private",
    "fsync_directory",
    "hold_lock",
    "open_nofollow",
    "read_file",
    "release_lock",
    "remove_stale_temporaries",
    "replace_file",
    "write_atomically",
]

log = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TEMPORARY_SUFFIX = ".tmp"


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open(path, flags, mode)`` refusing a symbolic link as the last component.

    Raises ``OSError`` (ELOOP with a message that says why) for a link, like any other
    failure to open.
    """
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP, "is a symbolic link; state files are never followed: remove it", path
            ) from None
        raise


def read_file(path: str) -> bytes:
    """The bytes of the regular file at ``path``, opened without following a link.

    Raises ``FileNotFoundError`` when it is missing, another ``OSError`` otherwise.
    """
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def fsync_directory(directory: str) -> None:
    """Make the directory's entries (a rename, a new file) durable; raises ``OSError``."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_prefix(path: str) -> str:
    """How the names of ``path``'s temporary files begin (they end in ``.tmp``)."""
    return f".{os.path.basename(path)}."


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``, mode 0600: temporary file in the same directory,
    fsync, rename, directory fsync. Raises ``OSError``; the temporary file never stays."""
    replace_file(path, data)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def replace_file(path: str, data: bytes) -> None:
    """``write_atomically`` without the directory fsync, for a caller that must know whether
    the rename happened before it fsyncs the directory itself."""
    directory = os.path.dirname(os.path.abspath(path))
    # mkstemp creates with O_EXCL (never through a link) and mode 0600.
    fd, temporary = tempfile.mkstemp(
        prefix=_temporary_prefix(path), suffix=_TEMPORARY_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        # rename replaces a link at ``path`` itself, never the file it points to.
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files a killed writer of ``path`` left beside it.

    Call holding the lock that makes this process the only writer of ``path``: every such
    file is then litter, never state. Failures are logged; they do not stop a start.
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    try:
        names = os.listdir(directory)
    except OSError as exc:
        log.warning("cannot list %s for stale temporary files: %s", directory, exc)
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(_TEMPORARY_SUFFIX):
            stale = os.path.join(directory, name)
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove stale temporary file %s: %s", stale, exc)
            else:
                log.info("removed %s, left by an interrupted write", stale)


def hold_lock(path: str, holder: str) -> filelock.FileLock:
    """Take the lock file ``path`` without waiting and return it held.

    ``holder`` names what the lock guards in the error (for example "identity directory
    /var/lib/x"). Raises ``StoreError`` when another process (or another object in this
    one) holds it, or when ``path`` is a symbolic link or cannot be opened.
    """
    try:
        # filelock opens the path following links; create it here first so a planted link
        # is refused instead of being opened.
        os.close(open_nofollow(path, os.O_RDWR | os.O_CREAT))
    except OSError as exc:
        raise StoreError(f"cannot lock {path}: {exc.strerror or exc}", path=path) from exc
    # thread_local=False: the lock is released by whichever thread closes its owner.
    lock = filelock.FileLock(path, timeout=0, mode=0o600, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise StoreError(
            f"{holder} is in use by another pilot-handshake process (lock {path})", path=path
        ) from exc
    except OSError as exc:
        raise StoreError(f"cannot lock {path}: {exc}", path=path) from exc
    # A new time says "taken since you last looked": `status --wait` tells a daemon that
    # took the lock and exited from one that has not started yet (statelock.py).
    with contextlib.suppress(OSError):
        os.utime(path)
    return lock


def release_lock(lock: filelock.FileLock) -> None:
    """Let go of a lock ``hold_lock`` took, touching its time first: ``status --wait``
    started just after a daemon exited counts its few seconds from then (statelock.py), not
    from the daemon's start, which a loaded machine can make long ago."""
    with contextlib.suppress(OSError):
        os.utime(lock.lock_file)
    lock.release()


def check_private(path: str, what: str) -> None:
    """Refuse ``path`` unless it is owned by this user (or root) and not writable by group
    or others (like OpenSSH's StrictModes); a missing path passes.

    ``what`` names it in the error ("state directory", "identity file"). Raises
    ``StoreError`` naming the path and the command that fixes it.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot check {what} {path}: {exc.strerror or exc}", path=path) from exc
    if stat.S_ISLNK(info.st_mode):
        # A link's target is what gets used: check that, by its own owner and mode.
        target = os.path.realpath(path)
        if target != path:
            check_private(target, f"{what} (link target of {path})")
        return
    user = os.geteuid()
    if info.st_uid not in (user, 0):
        raise StoreError(
            f"{what} {path} is owned by uid {info.st_uid}, not by this user (uid {user}) or "
            f"root, so its owner could change this node's state; run: chown {user} {path}",
            path=path,
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}), so they could change this node's state; "
            f"run: chmod go-w {path}",
            path=path,
        )
