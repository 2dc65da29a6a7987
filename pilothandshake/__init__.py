"""pilothandshake: the Pilot Protocol trust handshake (port 444) as a package and a daemon.

The public API is the one of SPEC section 9, in Python spelling of the Go package's names:
``Manager`` (the blocking, thread-safe state machine), the ``Runtime`` and ``RegistryClient``
protocols it is embedded through, ``Service`` (the plugin adapter), ``Daemon`` (a whole node
in-process), ``Client`` (a running daemon's Manager over its control socket, SPEC 13a), the
wire message ``HandshakeMsg`` and its type constants, the trust records, and the error
classes.

The names are exported lazily (PEP 562): ``import pilothandshake`` loads nothing, and
``from pilothandshake import Client`` loads the client alone, not the daemon, the store or
the crypto, so a short-lived script or ``pilot-handshakectl`` starts fast.
"""

from __future__ import annotations

from ._version import __version__ as __version__  # a constant: imports nothing

TYPE_CHECKING = False  # not typing's: importing typing alone costs a short script milliseconds
if TYPE_CHECKING:
    from typing import Any

    from .client import Client
    from .constants import PORT_HANDSHAKE
    from .daemon import Daemon
    from .errors import (
        ConfigError,
        ControlError,
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
    from .store import OutgoingRequest, PendingHandshake, TrustRecord

# Public name -> the module that defines it.
_EXPORTS = {
    "HANDSHAKE_ACCEPT": "messages",
    "HANDSHAKE_REJECT": "messages",
    "HANDSHAKE_REQUEST": "messages",
    "HANDSHAKE_REVOKE": "messages",
    "PORT_HANDSHAKE": "constants",
    "AllowlistEntry": "runtime",
    "Client": "client",
    "ConfigError": "errors",
    "ControlError": "errors",
    "Daemon": "daemon",
    "HandshakeError": "errors",
    "HandshakeMsg": "messages",
    "Manager": "manager",
    "MessageError": "errors",
    "NotTrustedError": "errors",
    "OutgoingRequest": "store",
    "PendingHandshake": "store",
    "RegistryClient": "runtime",
    "RegistryError": "errors",
    "Runtime": "runtime",
    "SendError": "errors",
    "Service": "service",
    "StoreError": "errors",
    "TrustRecord": "store",
}

__all__ = [
    "HANDSHAKE_ACCEPT",
    "HANDSHAKE_REJECT",
    "HANDSHAKE_REQUEST",
    "HANDSHAKE_REVOKE",
    "PORT_HANDSHAKE",
    "AllowlistEntry",
    "Client",
    "ConfigError",
    "ControlError",
    "Daemon",
    "HandshakeError",
    "HandshakeMsg",
    "Manager",
    "MessageError",
    "NotTrustedError",
    "OutgoingRequest",
    "PendingHandshake",
    "RegistryClient",
    "RegistryError",
    "Runtime",
    "SendError",
    "Service",
    "StoreError",
    "TrustRecord",
]


def __getattr__(name: str) -> Any:
    """Load an exported name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib  # here, not above: importing a submodule directly does not need it

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily exported ones included."""
    return sorted(set(globals()) | set(__all__))
