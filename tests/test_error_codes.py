"""``error_codes``: the one table the daemon answers failed commands by and the client maps
the answers back by (SPEC 13)."""

from __future__ import annotations

import pytest

from pilothandshake.client import raise_for_error
from pilothandshake.error_codes import (
    CODES,
    CONNECTION_FAILED,
    INTERNAL,
    INVALID_STATE,
    NOT_FOUND,
    code_of,
    error_for,
)
from pilothandshake.errors import (
    ControlError,
    HandshakeError,
    NotTrustedError,
    RegistryError,
    SendError,
    StoreError,
)


@pytest.mark.parametrize(
    ("command", "error", "code"),
    [
        ("untrust", NotTrustedError("node 7 is not trusted"), NOT_FOUND),
        ("handshake", SendError("cannot reach node 7"), CONNECTION_FAILED),
        ("status", RegistryError("registry down"), CONNECTION_FAILED),
        ("approve", StoreError("trust.json: disk full"), INTERNAL),
        ("handshake", HandshakeError("no node ID yet"), INVALID_STATE),
    ],
)
def test_what_the_daemon_raised_is_what_the_client_raises(
    command: str, error: HandshakeError, code: str
) -> None:
    assert code_of(error) == code
    answer = {"status": "error", "code": code_of(error), "message": str(error)}
    with pytest.raises(HandshakeError, match=str(error)) as raised:
        raise_for_error(answer, command)
    assert type(raised.value) is type(error)


def test_a_code_means_what_the_command_makes_of_it() -> None:
    assert error_for("untrust", NOT_FOUND) is NotTrustedError
    assert error_for("resolve", NOT_FOUND) is RegistryError  # a name that does not resolve
    assert error_for("approve", NOT_FOUND) is HandshakeError
    assert error_for("handshake", CONNECTION_FAILED) is SendError
    assert error_for("resolve", CONNECTION_FAILED) is RegistryError


def test_every_exception_the_daemon_answers_for_has_a_listed_code() -> None:
    for error in (
        NotTrustedError(),
        SendError(),
        RegistryError(),
        StoreError("x"),
        ControlError("x"),
    ):
        assert code_of(error) in CODES
    assert error_for("status", "no such code") is HandshakeError
