"""The control socket's error codes (SPEC 13) and the package's exception each stands for.

One table serves both ends: the daemon answers a failed command with the code of the
exception it raised (``code_of``), and ``Client`` raises the exception of the code it got
back (``error_for``). Imports nothing but ``errors``: ``pilot-handshakectl`` loads it on
every run.
"""

from __future__ import annotations

from .errors import HandshakeError, NotTrustedError, RegistryError, SendError, StoreError

__all__ = [
    "BUSY",
    "CODES",
    "CONNECTION_FAILED",
    "FORBIDDEN",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "INVALID_STATE",
    "NOT_FOUND",
    "NOT_RUNNING",
    "TIMEOUT",
    "code_of",
    "error_for",
]

# The error codes of answers: pilotctl's where one fits (SPEC 13), and what each means here.
INVALID_ARGUMENT = "invalid_argument"
NOT_FOUND = "not_found"
NOT_RUNNING = "not_running"
CONNECTION_FAILED = "connection_failed"
INVALID_STATE = "invalid_state"
TIMEOUT = "timeout"
INTERNAL = "internal"
FORBIDDEN = "forbidden"
BUSY = "busy"
CODES: dict[str, str] = {
    INVALID_ARGUMENT: "a malformed request or bad argument, or a usage error (do not retry)",
    NOT_FOUND: "no such node, hostname, pending request or trust record",
    NOT_RUNNING: "no daemon answers at the control socket",
    CONNECTION_FAILED: "a peer, the registry or the daemon could not be reached (may retry)",
    INVALID_STATE: "not possible in the node's state (no node ID yet, no registry)",
    TIMEOUT: "no answer in time (may retry)",
    INTERNAL: "trust.json could not be written, or an unexpected error (see the log)",
    FORBIDDEN: "this user may not use the daemon's control socket",
    BUSY: "the control socket serves as many connections as it may (retry later)",
}

# (code, exception, commands): the daemon answers ``code`` for an ``exception`` (the first
# row the exception is an instance of); the client raises ``exception`` for ``code`` in the
# answer to one of ``commands`` (to any command when empty). A ``resolve`` that fails
# answers not_found (the registry tells an unknown name from a fault no better, SPEC 11):
# for the client that is the registry's failure, so it raises RegistryError.
_TABLE: tuple[tuple[str, type[HandshakeError], frozenset[str]], ...] = (
    (NOT_FOUND, NotTrustedError, frozenset({"untrust"})),
    (CONNECTION_FAILED, SendError, frozenset({"handshake"})),
    (CONNECTION_FAILED, RegistryError, frozenset()),
    (NOT_FOUND, RegistryError, frozenset({"resolve"})),
    (INTERNAL, StoreError, frozenset()),
    (INVALID_STATE, HandshakeError, frozenset()),
)


def code_of(error: HandshakeError) -> str:
    """The code the daemon answers for ``error``."""
    return next(code for code, kind, _ in _TABLE if isinstance(error, kind))


def error_for(command: str, code: str) -> type[HandshakeError]:
    """The exception the client raises for ``code`` in the answer to ``command``:
    ``HandshakeError`` for a code no row gives it."""
    for row_code, kind, commands in _TABLE:
        if row_code == code and (not commands or command in commands):
            return kind
    return HandshakeError
