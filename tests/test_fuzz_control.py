"""Property tests of the control-socket request parser (SPEC 13) through a real
``ControlServer`` on a Unix socket: random lines and random request shapes.

Invariants: every non-blank line gets one JSON response line of the documented shape (an
``ok`` with data, or an ``error`` with a known code, never ``internal_error``); the
connection goes on after an error; the server keeps serving new clients.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from controltools import Node, running_node
from hypothesis import given
from hypothesis import strategies as st
from strategies import fuzz

from pilothandshake.control_commands import COMMANDS, parse_request
from pilothandshake.error_codes import CODES

ERROR_CODES = set(CODES)  # pilotctl's codes and our two (SPEC 13)
STATUS = b'{"command": "status"}\n'


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
ARGS = [
    "node_id",
    "justification",
    "reason",
    "timeout",
    "follow",
    "history",
    "hostname",
    "extra",
]
request_shapes = st.builds(
    lambda command, args: {"command": command, **args},
    st.sampled_from(sorted(COMMANDS)) | json_values,
    st.dictionaries(
        st.sampled_from(ARGS),
        json_values | st.sampled_from([0, 7, 2**32 - 1, 2**32, -1, 0.5, True, "x"]),
        max_size=4,
    ),
)


def quick(request: dict[str, Any]) -> dict[str, Any]:
    """Keep a request from blocking the test: ``wait`` gets no real timeout, ``events`` no
    ``follow`` (both are valid requests that would hold the connection on purpose)."""
    if request.get("command") == "wait" and "timeout" in request:
        timeout = request["timeout"]
        if type(timeout) in (int, float) and timeout == timeout and timeout > 0:
            request["timeout"] = 0
    elif request.get("command") == "wait":
        request["timeout"] = 0
    if request.get("follow") is True:
        request["follow"] = False
    return request


@pytest.fixture
def node() -> Iterator[Node]:
    with running_node() as started:
        yield started


def is_status_answer(response: dict[str, Any]) -> bool:
    data = response.get("data")
    return response.get("status") == "ok" and isinstance(data, dict) and "listen" in data


def exchange(path: str, line: bytes) -> list[dict[str, Any]]:
    """Send ``line`` and then a status request on one connection; read the responses until
    the status answer (so the connection went on) or until the server closes."""
    responses = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(path)
        sock.sendall(line + b"\n" + STATUS)
        with sock.makefile("rb") as reader:
            for _ in range(200):  # events may answer with up to EVENT_HISTORY lines
                raw = reader.readline()
                if not raw:
                    break
                responses.append(json.loads(raw))
                if is_status_answer(responses[-1]):
                    break
    return responses


def assert_documented(response: dict[str, Any]) -> None:
    assert response["status"] in ("ok", "error"), response
    if response["status"] == "error":
        assert response["code"] in ERROR_CODES, response
        assert isinstance(response["message"], str) and response["message"]
    else:
        assert "data" in response


def check_line(node: Node, line: bytes) -> None:
    responses = exchange(node.path, line)
    for response in responses:
        assert_documented(response)
    if b"events" not in line:  # an events request answers with a stream, then closes
        # One answer for the line (none for a blank one), then the status answer.
        assert responses and is_status_answer(responses[-1]), responses
        expected = 1 if not line.strip() or is_status_answer(responses[0]) else 2
        assert len(responses) == expected, responses
    assert node.client.request("status")["status"] == "ok"


def test_random_lines_get_documented_answers_and_the_server_keeps_serving(node: Node) -> None:
    @fuzz(200)
    @given(st.binary(max_size=512).map(lambda b: b.replace(b"\n", b" ")))
    def check(line: bytes) -> None:
        check_line(node, line)

    check()


def test_random_request_shapes_get_documented_answers(node: Node) -> None:
    @fuzz(250)
    @given(request_shapes.map(quick))
    def check(request: dict[str, Any]) -> None:
        line = json.dumps(request).encode()
        check_line(node, line)

    check()


def test_parser_raises_only_its_request_error() -> None:
    """Straight to the parser, faster than the socket: only ``RequestError`` may escape."""

    @fuzz(300)
    @given(
        st.binary(max_size=256)
        | request_shapes.map(lambda r: json.dumps(r).encode())
        | json_values.map(lambda v: json.dumps(v).encode())
    )
    def check(line: bytes) -> None:
        try:
            command, args = parse_request(line)
        except Exception as exc:
            assert type(exc).__name__ == "RequestError", repr(exc)
            return
        assert command in COMMANDS
        if "timeout" in args:
            assert isinstance(args["timeout"], float) and 0 <= args["timeout"] <= 3600

    check()


def test_huge_integer_timeout_is_a_bad_request_not_a_dropped_connection(node: Node) -> None:
    """Regression (found by the fuzzer): a 400-digit ``timeout`` raised OverflowError in the
    parser, so the connection closed with no answer. Now it is capped like any long wait."""
    line = b'{"command": "wait", "node_id": 1, "timeout": 1' + b"0" * 400 + b"}"
    command, args = parse_request(line)
    assert (command, args["timeout"]) == ("wait", 3600.0)
    [response, status] = exchange(node.path, b'{"command": "pending", "x": 1' + b"0" * 400 + b"}")
    assert response["code"] == "invalid_argument"
    assert status["status"] == "ok"
