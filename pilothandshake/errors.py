"""The error hierarchy: every error this package raises derives from HandshakeError."""

from __future__ import annotations

# typing.TYPE_CHECKING without importing typing (the client loads this module and keeps its
# imports light); mypy takes it as that. Nothing of the package is imported when run: this
# is the ground floor.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .drops import Drop


class HandshakeError(Exception):
    """Base class of every pilothandshake error."""


class MessageError(HandshakeError):
    """A port-444 message is malformed (bad JSON, wrong type, too large, too slow): ``drop``
    is the drop of the received message it rejects, its detail the error's message."""

    def __init__(self, drop: Drop) -> None:
        """The error of ``drop`` (made by the codec or the wire reader)."""
        super().__init__(drop.detail)
        self.drop = drop


class NotTrustedError(HandshakeError):
    """The operation needs a trusted peer and the peer is not trusted."""


class RegistryError(HandshakeError):
    """The registry answered with an error, or could not be reached."""


class ConfigError(HandshakeError):
    """The configuration is invalid; the message names the file, the key and what was expected."""


class SendError(HandshakeError):
    """A message could not be delivered (dial failed, reset, or relay failed)."""


class StoreError(HandshakeError):
    """Trust state or the identity could not be read or written; names the file and the OS
    error. ``path`` is that file, for callers that act on it (``""``: the state in memory,
    or not known, as for an ``internal`` error the control socket reports)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        """``message`` for people, ``path`` the file it is about."""
        super().__init__(message)
        self.path = path


class ControlError(HandshakeError):
    """The control socket cannot be used: the daemon is not running or does not answer in
    time, the socket is not safe to talk to, or the daemon's answer is unreadable. ``code``
    is the ``pilotctl`` error code that says which (``not_running``, ``timeout``,
    ``connection_failed``)."""

    def __init__(self, message: str, code: str = "connection_failed") -> None:
        """``message`` for people, ``code`` for programs."""
        super().__init__(message)
        self.code = code
