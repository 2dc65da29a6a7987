"""Coverage-guided fuzzing of the control-socket request parser (SPEC 13) with atheris.

Each input is one request line for ``parse_request`` (inputs starting with 0x01 become a
request object with a real command and fuzzed JSON arguments). Invariants (a violation
raises; atheris saves the input as ``crash-*``): only the parser's ``RequestError``
escapes; an accepted request names a known command with well-typed arguments (``timeout``
a float in 0..WAIT_MAX_TIMEOUT); every error response can be encoded for the wire.

Run (see fuzz/README.md): ``.venv/bin/python fuzz/fuzz_control.py -max_total_time=120``
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from pilothandshake.constants import WAIT_MAX_TIMEOUT
    from pilothandshake.control_commands import (
        COMMANDS,
        RequestError,
        encode_response,
        error_response,
        parse_request,
    )

ARGS = ["node_id", "justification", "reason", "timeout", "follow"]


def TestOneInput(data: bytes) -> None:
    if data[:1] == b"\x01" and len(data) > 2:
        command = sorted(COMMANDS)[data[1] % len(COMMANDS)]
        arg = ARGS[len(data) % len(ARGS)]
        value = data[2:].decode("utf-8", "replace")
        data = f'{{"command": "{command}", "{arg}": {value}}}'.encode()
    try:
        command, args = parse_request(data)
    except RequestError as exc:
        encode_response(error_response(exc.code, exc.message))
        return
    if command not in COMMANDS:
        raise AssertionError(f"accepted unknown command {command!r}")
    timeout = args.get("timeout", 0.0)
    if not (isinstance(timeout, float) and 0 <= timeout <= WAIT_MAX_TIMEOUT):
        raise AssertionError(f"accepted timeout {timeout!r}")
    if "node_id" in args and type(args["node_id"]) is not int:
        raise AssertionError(f"accepted node_id {args['node_id']!r}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
