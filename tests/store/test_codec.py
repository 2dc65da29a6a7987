"""``store.codec``: trust.json's times and schema, read and written as Go does (SPEC 10)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from storetools import (
    FIXTURE,
    KEY_A,
    KEY_B,
    T0,
    open_store,
)

from pilothandshake import store
from pilothandshake.errors import StoreError
from pilothandshake.store import (
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
    decode_state,
    encode_state,
    format_time,
    load_state,
    parse_time,
)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=timezone.utc)


# Times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T10:00:00Z", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25t10:00:00z", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25T12:00:00+02:00", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25T04:30:00-05:30", utc(2026, 11, 25, 10, 0, 0)),
        ("2026-11-25T10:00:00.123456789Z", utc(2026, 11, 25, 10, 0, 0, 123456)),
        ("2026-11-25T10:00:00.5+00:00", utc(2026, 11, 25, 10, 0, 0, 500000)),
        ("0001-01-01T00:00:00Z", utc(1, 1, 1)),
    ],
)
def test_parse_time_accepts_rfc3339_with_z_offsets_and_fractions(
    text: str, expected: datetime
) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-11-25",
        "2026-11-25T10:00:00",  # no zone
        "2026-11-25 10:00:00Z",
        "2026-13-25T10:00:00Z",
        "2026-11-25T10:00:00+24:00",
        "2026-11-25T10:00:00.Z",
        "\uff12\uff10\uff12\uff16-11-25T10:00:00Z",  # non-ASCII digits
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    ],
)
def test_parse_time_rejects_malformed_times(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_format_time_writes_utc_seconds_with_z() -> None:
    east = timezone(timedelta(hours=2))
    assert format_time(datetime(2026, 11, 25, 12, 0, 0, 999999, tzinfo=east)) == (
        "2026-11-25T10:00:00Z"
    )
    assert format_time(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
    assert format_time(store.ZERO_TIME) == "0001-01-01T00:00:00Z"


# Encoding


def test_encode_state_formats_exactly_as_spec() -> None:
    state = TrustState(
        trusted={
            9: TrustRecord(9, KEY_B, T0, mutual=False),
            7: TrustRecord(7, KEY_A, T0, mutual=True, network=3),
        },
        pending={
            5: PendingHandshake(5, "", "", T0 + timedelta(minutes=1)),
            4: PendingHandshake(4, KEY_A, 'say "hi" é', T0, bound=True),
        },
        outgoing={11: OutgoingRequest(11, T0 + timedelta(seconds=2, microseconds=7))},
    )
    assert (
        encode_state(state)
        == (
            "{\n"
            '  "trusted": [\n'
            f'    {{"node_id": 7, "public_key": "{KEY_A}", "approved_at": "2026-11-25T10:00:00Z",'
            ' "mutual": true, "network": 3},\n'
            f'    {{"node_id": 9, "public_key": "{KEY_B}", "approved_at": "2026-11-25T10:00:00Z",'
            ' "mutual": false}\n'
            "  ],\n"
            '  "pending": [\n'
            f'    {{"node_id": 4, "public_key": "{KEY_A}", "justification": "say \\"hi\\" é",'
            ' "received_at": "2026-11-25T10:00:00Z", "bound": true},\n'
            '    {"node_id": 5, "received_at": "2026-11-25T10:01:00Z"}\n'
            "  ],\n"
            '  "outgoing": [\n'
            '    {"node_id": 11, "sent_at": "2026-11-25T10:00:02Z"}\n'
            "  ]\n"
            "}\n"
        ).encode()
    )


def test_encode_empty_state_writes_an_empty_trusted_list_only() -> None:
    assert encode_state(TrustState()) == b'{\n  "trusted": []\n}\n'


def test_lone_surrogates_are_replaced_so_the_file_stays_writable(trust_path: Path) -> None:
    trust_path.parent.mkdir()
    trust_path.write_bytes(
        b'{"pending": [{"node_id": 3, "justification": "a\\ud800b",'
        b' "received_at": "2026-11-25T10:00:00Z"}]}'
    )
    assert load_state(str(trust_path)).pending[3].justification == "a\ufffdb"
    written = encode_state(TrustState(trusted={1: TrustRecord(1, "x\udc00", T0)}))
    assert decode_state(written).trusted[1].public_key == "x\ufffd"


# Loading


def test_go_fixture_loads_with_every_field(tmp_path: Path) -> None:
    state = load_state(str(FIXTURE))
    assert sorted(state.trusted) == [7, 12, 4294967295]
    assert state.trusted[7] == TrustRecord(7, KEY_A, T0, mutual=True, network=3)
    assert state.trusted[12] == TrustRecord(
        12, "not base64 at all!", utc(2026, 11, 25, 10, 30, 15, 123456), mutual=False
    )
    assert state.trusted[4294967295] == TrustRecord(
        4294967295, "", utc(2026, 11, 25, 5, 29, 59, 500000)
    )
    assert state.pending == {
        9: PendingHandshake(9, "", "please let me in", utc(2026, 11, 25, 10, 1)),
        10: PendingHandshake(10, KEY_B, "", utc(2026, 11, 25, 10, 2), bound=True),
    }
    assert state.outgoing == {}


def test_missing_file_and_null_lists_are_empty(tmp_path: Path) -> None:
    assert load_state(str(tmp_path / "absent.json")) == TrustState()
    for text in (b"null", b"{}", b'{"trusted": null, "pending": null, "outgoing": null}'):
        (tmp_path / "t.json").write_bytes(text)
        assert load_state(str(tmp_path / "t.json")) == TrustState()


def test_missing_optional_fields_take_go_zero_values(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_bytes(
        b'{"trusted": [{"node_id": 5}], "outgoing": [{"node_id": 6, "sent_at": null}]}'
    )
    state = load_state(str(tmp_path / "t.json"))
    assert state.trusted[5] == TrustRecord(5, "", store.ZERO_TIME, False, 0)
    assert state.outgoing[6] == OutgoingRequest(6, store.ZERO_TIME)


CORRUPT = [
    (b"{not json", "Expecting"),
    (b"", "Expecting value"),
    (b"[]", "top level"),
    (b'{"trusted": "7"}', "trusted: expected a list"),
    (b'{"trusted": [7]}', "trusted[0]: expected an object"),
    (b'{"trusted": [{"node_id": "7"}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": true}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": 7.0}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": -1}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": 4294967296}]}', "trusted[0].node_id"),
    (b'{"trusted": [{"node_id": 1, "network": 65536}]}', "trusted[0].network"),
    (b'{"trusted": [{"node_id": 1, "mutual": 1}]}', "trusted[0].mutual"),
    (b'{"trusted": [{"node_id": 1, "approved_at": "yesterday"}]}', "trusted[0].approved_at"),
    (b'{"pending": [{"node_id": 1, "justification": 5}]}', "pending[0].justification"),
    (b'{"outgoing": {"node_id": 1}}', "outgoing: expected a list"),
    (b"\xff\xfe{}", "utf-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
]


@pytest.mark.parametrize(("data", "reason"), CORRUPT)
def test_unparsable_file_raises_naming_path_and_is_never_replaced(
    trust_path: Path, data: bytes, reason: str
) -> None:
    trust_path.parent.mkdir()
    trust_path.write_bytes(data)
    with pytest.raises(StoreError) as raised:
        open_store(trust_path)
    assert str(trust_path) in str(raised.value)
    assert reason in str(raised.value)
    assert trust_path.read_bytes() == data
    # The failed open released the directory lock: a fixed file opens.
    trust_path.write_bytes(b"{}")
    opened, _ = open_store(trust_path)
    opened.close()


# Issue 16: our requests' states and the reason a peer is trusted, as extra keys


def test_outgoing_states_and_trust_reasons_round_trip_and_old_entries_read_as_waiting() -> None:
    t0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
    state = TrustState(
        trusted={5: TrustRecord(5, "", t0, True, 0, "mutual")},
        outgoing={
            6: OutgoingRequest(6, t0),
            7: OutgoingRequest(7, t0, "relay", "rejected", "not today", t0 + timedelta(hours=1)),
        },
    )
    data = encode_state(state)
    assert b'{"node_id": 6, "sent_at": "2026-11-25T10:00:00Z"}' in data  # as before round 3
    assert b'"reason": "mutual"' in data
    assert decode_state(data) == state
    old = b'{"trusted": [{"node_id": 5}], "outgoing": [{"node_id": 6, "sent_at": null}]}'
    request = decode_state(old).outgoing[6]
    assert (request.path, request.state, request.reason, request.ended_at) == (
        "direct",
        "waiting",
        "",
        None,
    )
    assert decode_state(old).trusted[5].reason == ""


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (b'{"node_id": 6, "state": "lost"}', "outgoing[0].state: expected waiting or"),
        (b'{"node_id": 6, "path": 3}', "outgoing[0].path: expected direct or relay"),
        (b'{"node_id": 6, "ended_at": "soon"}', "outgoing[0].ended_at"),
    ],
)
def test_a_bad_outgoing_state_names_its_field(entry: bytes, error: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_state(b'{"outgoing": [' + entry + b"]}")
    assert str(info.value).startswith(error)
