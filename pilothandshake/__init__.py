"""pilothandshake: the Pilot Protocol trust handshake (port 444) as a package and a daemon.

The public API is the one of SPEC section 9, in Python spelling of the Go package's names:
``Manager`` (the blocking, thread-safe state machine), the ``Runtime`` and ``RegistryClient``
protocols it is embedded through, ``Service`` (the plugin adapter), ``Daemon`` (a whole node
in-process), the wire message ``HandshakeMsg`` and its type constants, the trust records,
and the error classes.
"""

from ._version import __version__ as __version__
from .constants import PORT_HANDSHAKE
from .daemon import Daemon
from .errors import (
    ConfigError,
    HandshakeError,
    MessageError,
    NotTrustedError,
    RegistryError,
    SendError,
    StoreError,
)
from .manager import Manager
from .messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    HandshakeMsg,
)
from .runtime import AllowlistEntry, RegistryClient, Runtime
from .service import Service
from .store import PendingHandshake, TrustRecord

__all__ = [
    "HANDSHAKE_ACCEPT",
    "HANDSHAKE_REJECT",
    "HANDSHAKE_REQUEST",
    "HANDSHAKE_REVOKE",
    "PORT_HANDSHAKE",
    "AllowlistEntry",
    "ConfigError",
    "Daemon",
    "HandshakeError",
    "HandshakeMsg",
    "Manager",
    "MessageError",
    "NotTrustedError",
    "PendingHandshake",
    "RegistryClient",
    "RegistryError",
    "Runtime",
    "SendError",
    "Service",
    "StoreError",
    "TrustRecord",
]
