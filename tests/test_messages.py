"""The message codec: strict decoding, encoding, challenges and helpers (SPEC 3, 4)."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
from fakeruntime import respell
from hypothesis import given, settings
from hypothesis import strategies as st

from pilothandshake.addresses import parse_address
from pilothandshake.constants import MAX_MESSAGE_SIZE
from pilothandshake.errors import MessageError
from pilothandshake.messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REQUEST,
    MAX_NODE_ID,
    MESSAGE_TYPES,
    HandshakeMsg,
    decode_b64,
    handshake_challenge,
    handshake_v2_challenge,
    truncate_utf8,
)
from pilothandshake.registry.challenges import (
    heartbeat_challenge,
    poll_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
    set_visibility_challenge,
)

KEY_B64 = base64.b64encode(bytes(range(32))).decode()
SIG_B64 = base64.b64encode(bytes(range(64))).decode()


def full_message() -> HandshakeMsg:
    return HandshakeMsg(
        type=HANDSHAKE_REQUEST,
        node_id=7,
        public_key=KEY_B64,
        justification="deploy ✓",
        signature=SIG_B64,
        reason="",
        timestamp=1_700_000_000,
        signature_v2=SIG_B64,
    )


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


def base(**fields: object) -> bytes:
    obj: dict[str, object] = {"type": HANDSHAKE_REQUEST, "node_id": 7, "timestamp": 1}
    obj.update(fields)
    return encode({k: v for k, v in obj.items() if v is not Ellipsis})


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (base(type=...), "missing field 'type'"),
        (base(type=None), "missing field 'type'"),
        (base(node_id=...), "missing field 'node_id'"),
        (base(timestamp=...), "missing field 'timestamp'"),
        (base(node_id=-1), "outside"),
        (base(node_id=MAX_NODE_ID + 1), "outside"),
        (base(node_id=True), "must be an integer, not bool"),
        (base(node_id=7.0), "must be an integer, not float"),
        (base(node_id="7"), "must be an integer, not str"),
        (base(timestamp=False), "must be an integer, not bool"),
        (base(timestamp=1.5), "must be an integer, not float"),
        (base(type="handshake_hello"), "unknown type"),
        (base(type=5), "'type' must be a string"),
        (base(justification=5), "'justification' must be a string"),
        (base(public_key=[]), "'public_key' must be a string"),
        (base(signature_v2={}), "'signature_v2' must be a string"),
        (base(reason=True), "'reason' must be a string"),
        (base(signature=1.0), "'signature' must be a string"),
        (base()[:-1] + b',"x":NaN}', "non-finite number NaN"),
        (base()[:-1] + b',"x":Infinity}', "non-finite number Infinity"),
        (base()[:-1] + b',"x":-Infinity}', "non-finite number -Infinity"),
        (base()[:-1] + b',"x":1e999}', "non-finite number 1e999"),
        (base()[:-1] + b',"justification":"\\ud800"}', "lone surrogate"),
        (base()[:-1] + b',"x":["a\\udfff"]}', "lone surrogate"),
        (base()[:-1] + b',"\\udc00":1}', "lone surrogate"),
        (base()[:-1] + b',"x":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deeply"),
        (base()[:-1] + b',"justification":"\xff"}', "invalid UTF-8"),
        (b"[1,2]", "not a JSON object"),
        (b'"handshake_request"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"", "invalid JSON"),
        (b'{"type":', "invalid JSON"),
        (base()[:-1] + b',"x":"' + b"a" * MAX_MESSAGE_SIZE + b'"}', "too large"),
    ],
)
def test_from_json_rejects_each_malformed_input_naming_the_problem(
    data: bytes, reason: str
) -> None:
    with pytest.raises(MessageError, match=re.escape(reason)):
        HandshakeMsg.from_json(data)


def test_from_json_rejects_str_input_holding_a_lone_surrogate() -> None:
    text = '{"type":"handshake_request","node_id":1,"timestamp":1,"reason":"\ud800"}'
    with pytest.raises(MessageError, match="lone surrogate"):
        HandshakeMsg.from_json(text)


def test_from_json_accepts_exactly_64_kib() -> None:
    head = base()[:-1] + b',"x":"'
    data = head + b"a" * (MAX_MESSAGE_SIZE - len(head) - 2) + b'"}'
    assert len(data) == MAX_MESSAGE_SIZE
    assert HandshakeMsg.from_json(data).node_id == 7


def test_from_json_defaults_missing_and_null_strings_and_ignores_unknown_fields() -> None:
    data = base(justification=None, reason="bye", extra={"nested": [1, 2.5, None]}, more=True)
    msg = HandshakeMsg.from_json(data)
    assert msg == HandshakeMsg(type=HANDSHAKE_REQUEST, node_id=7, reason="bye", timestamp=1)


def test_from_json_accepts_node_id_bounds_and_any_integer_timestamp() -> None:
    assert HandshakeMsg.from_json(base(node_id=0)).node_id == 0
    assert HandshakeMsg.from_json(base(node_id=MAX_NODE_ID)).node_id == MAX_NODE_ID
    assert HandshakeMsg.from_json(base(timestamp=-5)).timestamp == -5
    assert HandshakeMsg.from_json(base(timestamp=10**30)).timestamp == 10**30


def test_from_json_accepts_every_message_type_and_str_input() -> None:
    for msg_type in MESSAGE_TYPES:
        assert HandshakeMsg.from_json(base(type=msg_type).decode()).type == msg_type


def test_from_json_turns_an_integer_too_long_to_convert_into_message_error() -> None:
    data = base()[:-1] + b',"x":' + b"9" * 5000 + b"}"
    # Python >= 3.11 refuses such an int with ValueError; older versions parse it.
    try:
        assert HandshakeMsg.from_json(data).node_id == 7
    except MessageError as exc:
        assert "invalid JSON" in str(exc)


# --- encoding -------------------------------------------------------------------------------


def test_to_json_round_trips_and_is_compact_utf8() -> None:
    msg = full_message()
    data = msg.to_json()
    assert HandshakeMsg.from_json(data) == msg
    assert b" " not in data.replace("deploy ✓".encode(), b"")
    assert "✓".encode() in data


def test_to_json_writes_fields_in_spec_order() -> None:
    keys = list(json.loads(full_message().to_json()))
    assert keys == [
        "type",
        "node_id",
        "public_key",
        "justification",
        "signature",
        "reason",
        "timestamp",
        "signature_v2",
    ]


def test_to_json_omits_empty_signature_v2_but_keeps_other_empty_fields() -> None:
    msg = HandshakeMsg(type=HANDSHAKE_ACCEPT, node_id=3, timestamp=9)
    assert msg.to_json() == (
        b'{"type":"handshake_accept","node_id":3,"public_key":"","justification":"",'
        b'"signature":"","reason":"","timestamp":9}'
    )


def test_to_json_refuses_a_lone_surrogate_with_message_error() -> None:
    msg = HandshakeMsg(type=HANDSHAKE_REQUEST, node_id=1, justification="a\udc80")
    with pytest.raises(MessageError, match="lone surrogate"):
        msg.to_json()


def test_canonical_bytes_is_the_same_for_every_base64_spelling() -> None:
    msg = full_message()
    other_sig, other_key = respell(SIG_B64), respell(KEY_B64)
    assert other_sig != SIG_B64 and decode_b64(other_sig) == decode_b64(SIG_B64)
    assert other_key != KEY_B64 and decode_b64(other_key) == decode_b64(KEY_B64)
    respelled = HandshakeMsg(**{**vars(msg), "signature": other_sig, "public_key": other_key})
    assert respelled.to_json() != msg.to_json()
    assert respelled.canonical_bytes() == msg.canonical_bytes()


def test_canonical_bytes_drops_signature_v2_and_keeps_empty_fields_empty() -> None:
    msg = HandshakeMsg(type=HANDSHAKE_REQUEST, node_id=1, timestamp=2, signature_v2=SIG_B64)
    assert msg.canonical_bytes() == HandshakeMsg(HANDSHAKE_REQUEST, 1, timestamp=2).to_json()


@pytest.mark.parametrize("field", ["public_key", "signature"])
@pytest.mark.parametrize("bad", ["not base64!", "QQ", "QQ==\n"])
def test_canonical_bytes_is_none_for_invalid_base64(field: str, bad: str) -> None:
    msg = HandshakeMsg(**{**vars(full_message()), field: bad})
    assert msg.canonical_bytes() is None


# --- challenges -----------------------------------------------------------------------------


def test_v2_challenge_binds_every_field_as_spec_spells_it() -> None:
    msg = HandshakeMsg(HANDSHAKE_REQUEST, 7, KEY_B64, "why ✓", "", "because", 1234, "")
    expected = (
        f"handshake-v2:handshake_request:7:9:1234:{hashlib.sha256('why ✓'.encode()).hexdigest()}:"
        f"{hashlib.sha256(b'because').hexdigest()}:{KEY_B64}"
    ).encode()
    assert msg.v2_challenge(9) == expected
    assert expected == handshake_v2_challenge(
        HANDSHAKE_REQUEST, 7, 9, 1234, "why ✓", "because", KEY_B64
    )


def test_v2_challenge_changes_with_each_bound_field() -> None:
    msg = full_message()
    variants = [
        {"type": HANDSHAKE_ACCEPT},
        {"node_id": 8},
        {"timestamp": msg.timestamp + 1},
        {"justification": "other"},
        {"reason": "x"},
        {"public_key": respell(KEY_B64)},
    ]
    challenges = {HandshakeMsg(**{**vars(msg), **v}).v2_challenge(9) for v in variants}
    challenges.add(msg.v2_challenge(9))
    challenges.add(msg.v2_challenge(10))
    assert len(challenges) == len(variants) + 2


@pytest.mark.parametrize(
    ("challenge", "expected"),
    [
        (handshake_challenge(7, 9), b"handshake:7:9"),
        (respond_challenge(7, 9), b"respond:7:9"),
        (poll_challenge(7), b"poll_handshakes:7"),
        (heartbeat_challenge(7), b"heartbeat:7"),
        (report_trust_challenge(7, 9), b"report_trust:7:9"),
        (revoke_trust_challenge(7, 9), b"revoke_trust:7:9"),
        (resolve_challenge(7, 9), b"resolve:7:9"),
        (set_visibility_challenge(7), b"set_visibility:7"),
    ],
)
def test_registry_challenges_match_spec(challenge: bytes, expected: bytes) -> None:
    assert challenge == expected


# --- helpers --------------------------------------------------------------------------------


def test_truncate_utf8_never_splits_a_character() -> None:
    text = "aé€😀"  # 1 + 2 + 3 + 4 bytes
    assert [truncate_utf8(text, n) for n in range(11)] == [
        "",
        "a",
        "a",
        "aé",
        "aé",
        "aé",
        "aé€",
        "aé€",
        "aé€",
        "aé€",
        "aé€😀",
    ]


def test_truncate_utf8_defaults_to_1_kib_and_keeps_short_text() -> None:
    assert truncate_utf8("x" * 2000) == "x" * 1024
    assert truncate_utf8("short") == "short"


def test_truncate_utf8_replaces_lone_surrogates_so_the_text_is_sendable() -> None:
    assert truncate_utf8("a\udc80b") == "a\ufffdb"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:444", ("127.0.0.1", 444)),
        ("example.org:0", ("example.org", 0)),
        ("[::1]:444", ("::1", 444)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_address_accepts_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1", "expected host:port"),
        ("::1:444", "IPv6"),
        ("[::1]444", r"expected \[host\]:port"),
        (":444", "empty host"),
        ("host:", "port must be"),
        ("host:65536", "port must be"),
        ("host:-1", "port must be"),
        ("host:4x4", "port must be"),
        ("host:٤٤", "port must be"),
    ],
)
def test_parse_address_rejects_bad_input_with_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_address(text)


def test_decode_b64_is_strict() -> None:
    assert decode_b64("QQ==") == b"A"
    for bad in ["", "QQ", "Q Q==", "QQ==\n", "QQ=!", "é", None, 5, b"QQ=="]:
        assert decode_b64(bad) is None


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_from_json_raises_only_message_error_on_random_bytes(data: bytes) -> None:
    try:
        msg = HandshakeMsg.from_json(data)
    except MessageError:
        return
    assert msg.type in MESSAGE_TYPES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["type", "node_id", "public_key", "justification", "signature", "reason", "timestamp", "x"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(field_names, json_values | st.sampled_from(sorted(MESSAGE_TYPES))),
)
def test_from_json_on_json_shaped_input_yields_a_valid_message_or_message_error(
    obj: dict[str, object],
) -> None:
    try:
        data = json.dumps(obj).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    try:
        msg = HandshakeMsg.from_json(data)
    except MessageError:
        return
    assert type(msg.node_id) is int and 0 <= msg.node_id <= MAX_NODE_ID
    assert type(msg.timestamp) is int
    assert HandshakeMsg.from_json(msg.to_json()) == msg


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        HandshakeMsg,
        type=st.sampled_from(sorted(MESSAGE_TYPES)),
        node_id=st.integers(0, MAX_NODE_ID),
        public_key=st.text(max_size=50).map(truncate_utf8),
        justification=st.text(max_size=50).map(truncate_utf8),
        signature=st.text(max_size=50).map(truncate_utf8),
        reason=st.text(max_size=50).map(truncate_utf8),
        timestamp=st.integers(-(2**63), 2**63),
        signature_v2=st.text(max_size=50).map(truncate_utf8),
    )
)
def test_to_json_then_from_json_is_the_identity(msg: HandshakeMsg) -> None:
    assert HandshakeMsg.from_json(msg.to_json()) == msg
