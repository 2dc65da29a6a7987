"""Which control socket a client talks to (``find_socket``), and whether it is safe to
(``check_socket``); ``pilot-handshakectl`` and ``Client`` use both.

Where the socket is: the ``socket`` argument, else the ``config`` file's identity directory,
else ``$PILOT_HANDSHAKE_SOCKET``, else the identity directory of the daemon's default config
``/etc/pilot-handshake/config.yaml`` when that file is readable, else the default identity
directory ``~/.pilot-handshake``; the socket is ``control.sock`` in that directory.

Before connecting, the socket is checked like OpenSSH's StrictModes: it must be a socket
owned by the caller, by root, or by the owner of its directory (the daemon's state
directory); its directory must not be writable by group or others, and every directory above
it must be owned by root, the caller or that owner and not writable by group or others unless
it is sticky (like ``/tmp``). Otherwise another user could have put their own socket there
and would answer with forged data.

Like ``client.py``, this imports nothing heavy (YAML only when a config file is read).
"""

from __future__ import annotations

import os
import stat

from .constants import CONTROL_SOCKET_NAME, DEFAULT_CONFIG_PATH, DEFAULT_IDENTITY_PATH
from .errors import ControlError

# Not `typing.TYPE_CHECKING`: importing typing alone costs a short CLI run milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["SOCKET_ENV", "check_socket", "find_socket"]

SOCKET_ENV = "PILOT_HANDSHAKE_SOCKET"


def find_socket(socket_path: str | None = None, config: str | None = None) -> str:
    """The control socket to use: ``socket_path``, else ``config``'s identity directory,
    else ``$PILOT_HANDSHAKE_SOCKET``, else the identity directory of the daemon's default
    config when readable, else the default identity directory (module docstring).

    Raises ``ConfigError`` naming the file when a config file is read and its ``identity``
    (all that is read of it) is invalid."""
    if socket_path:
        return socket_path
    if config:
        return _config_socket(config)
    from_env = os.environ.get(SOCKET_ENV)
    if from_env:
        return from_env
    if os.access(DEFAULT_CONFIG_PATH, os.R_OK):
        return _config_socket(DEFAULT_CONFIG_PATH)
    identity = os.path.expanduser(DEFAULT_IDENTITY_PATH)
    return os.path.join(os.path.dirname(identity), CONTROL_SOCKET_NAME)


def _config_socket(path: str) -> str:
    # Imported here: YAML and the config's validation cost more than the rest of a CLI run.
    from .config import control_socket_of

    return control_socket_of(path)


def check_socket(path: str) -> None:
    """Refuse (``ControlError``) a socket another user could have put in place (module
    docstring); a missing path is left to ``connect`` to report. A symbolic link is judged
    both where it is and where it points."""
    real = os.path.realpath(path)
    try:
        info = os.lstat(real)
        owner = os.stat(os.path.dirname(real)).st_uid
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot check the control socket {path}: {exc}") from None
    trusted = {0, os.getuid(), owner}
    if not stat.S_ISSOCK(info.st_mode):
        _refuse(path, f"{real} is not a socket")
    if info.st_uid not in trusted:
        _refuse(path, f"{real} is owned by uid {info.st_uid}, not by the owner of its directory")
    for directory in {os.path.dirname(os.path.abspath(path)), os.path.dirname(real)}:
        _check_directories(path, directory, trusted)


def _check_directories(path: str, directory: str, trusted: set[int]) -> None:
    """``directory`` and those above it: owned by a ``trusted`` uid and not writable by
    group or others (above the first, sticky directories such as /tmp are fine)."""
    first = True
    while True:
        try:
            info = os.stat(directory)
        except OSError as exc:
            raise ControlError(f"cannot check the control socket {path}: {exc}") from None
        if info.st_uid not in trusted:
            _refuse(path, f"{directory} is owned by uid {info.st_uid}")
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (first or not info.st_mode & stat.S_ISVTX):
            _refuse(path, f"{directory} is writable by group or others")
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory, first = parent, False


def _refuse(path: str, reason: str) -> NoReturn:
    raise ControlError(
        f"refusing the control socket {path}: {reason}, so another user could have replaced "
        "it; keep the daemon's state directory owned by its user and not writable by others"
    )
