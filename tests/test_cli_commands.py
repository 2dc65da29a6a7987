"""``pilot-handshakectl``'s commands against a real control socket (SPEC 13): what status,
handshake, pending, approve, reject, trust, untrust, wait, events and requests print, as
tables and as ``--json``."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from datetime import datetime, timezone

import pytest
from controltools import FakeRegistry, Node, ctl, run, running_node
from fakeruntime import Peer

from pilothandshake import cli
from pilothandshake.identity import fingerprint
from pilothandshake.messages import HANDSHAKE_ACCEPT, HANDSHAKE_REJECT
from pilothandshake.store import TrustRecord


def test_status_prints_aligned_fields_and_json_as_sent(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(node, capsys, "status")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "node      1",
        "listen    127.0.0.1:444",
        "registry  none",
        "trusted   0",
        "pending   0",
    ]
    code, out, _ = run(node, capsys, "--json", "status")
    assert code == 0
    assert json.loads(out) == {
        "status": "ok",
        "data": {
            "node_id": 1,
            "hostname": "",
            "listen": "127.0.0.1:444",
            "registry": None,
            "trusted": 0,
            "pending": 0,
        },
    }


def test_handshake_reports_delivery(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(node, capsys, "handshake", "5", "nightly sync") == (
        0,
        "request sent to 5\n",
        "",
    )
    node.receive_request(Peer(6))
    node.manager.approve_handshake(6)
    code, out, _ = run(node, capsys, "handshake", "6", "again", "--json")
    assert (code, json.loads(out)["data"]) == (0, {"node_id": 6, "status": "trusted"})


def test_handshake_failure_exits_1_with_the_reason(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.runtime.dial_fails = True
    code, out, err = run(node, capsys, "handshake", "5", "sync")
    assert (code, out) == (1, "")
    assert err.startswith("pilot-handshakectl: cannot reach node 5")
    assert len(err.splitlines()) == 1


def test_pending_table_shows_fingerprint_justification_and_age(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(node, capsys, "pending") == (0, "no pending requests\n", "")
    peer = Peer(9)
    node.receive_request(peer, "sync\x1b[31m please")
    code, out, _ = run(node, capsys, "pending")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NODE", "KEY", "JUSTIFICATION", "AGE"]
    assert row.split()[0:2] == ["9", fingerprint(peer.key)]
    assert "sync?[31m please" in row  # the escape character never reaches the terminal
    assert row.split()[-1] in ("0s", "1s", "2s")
    assert header.index("KEY") == row.index(fingerprint(peer.key))
    code, out, _ = run(node, capsys, "--json", "pending")
    [item] = json.loads(out)["data"]["pending"]
    assert (item["node_id"], item["public_key"]) == (9, peer.key)


def test_approve_then_trust_table_then_untrust(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.receive_request(Peer(9))
    assert run(node, capsys, "approve", "9") == (0, "approved 9\n", "")
    code, out, _ = run(node, capsys, "trust")
    header, row = out.splitlines()
    assert header.split() == ["NODE", "MUTUAL", "NETWORK", "APPROVED", "AT", "WHY", "STATE"]
    assert row.split()[:3] == ["9", "no", "-"]
    assert row.split()[-2:] == ["approved", "trusted"]  # why: the operator approved it
    code, out, _ = run(node, capsys, "--json", "trust")
    assert [r["node_id"] for r in json.loads(out)["data"]["trusted"]] == [9]
    assert run(node, capsys, "untrust", "9") == (0, "untrusted 9\n", "")
    assert run(node, capsys, "trust") == (0, "no trusted peers\n", "")
    code, _, err = run(node, capsys, "untrust", "9")
    assert code == 1 and "node 9 is not trusted" in err


def test_approve_or_reject_with_nothing_pending_exits_1(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(node, capsys, "approve", "42") == (
        1,
        "",
        "pilot-handshakectl: nothing pending for node 42\n",
    )
    code, out, err = run(node, capsys, "--json", "reject", "42", "no")
    assert (code, out) == (1, "")  # as pilotctl: the envelope on stderr, stdout empty
    assert json.loads(err) == {
        "status": "error",
        "code": "not_found",
        "message": "nothing pending for node 42",
    }


def test_reject_passes_the_reason(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.receive_request(Peer(9))
    assert run(node, capsys, "reject", "9", "who are you") == (0, "rejected 9\n", "")
    assert node.runtime.wait_for_sent(1)
    assert node.runtime.sent_messages()[0][1].reason == "who are you"


def test_wait_exits_1_on_timeout_and_0_when_trust_arrives(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(node, capsys, "wait", "9", "--timeout", "0.2")
    assert (code, out) == (1, "")
    assert "timed out" in err
    node.receive_request(Peer(9))
    timer = threading.Timer(0.2, node.manager.approve_handshake, args=(9,))
    timer.start()
    try:
        code, out, err = run(node, capsys, "--json", "wait", "9", "--timeout", "10")
    finally:
        timer.join()
    assert (code, err) == (0, "")
    assert json.loads(out) == {"status": "ok", "data": {"node_id": 9, "trusted": True}}


def test_events_prints_recent_events(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.bus.publish("handshake.received", {"peer_node_id": 9, "justification": "hi"})
    node.bus.publish("handshake.pending", {"peer_node_id": 9})
    for _ in range(100):  # bounded: the dispatcher needs a moment
        if len(node.bus.recent()) >= 2:
            break
        threading.Event().wait(0.02)
    code, out, _ = run(node, capsys, "events")
    assert code == 0
    lines = out.splitlines()
    assert lines[-2].split()[1:] == ["handshake.received", "justification=hi", "peer_node_id=9"]
    assert lines[-1].split()[1] == "handshake.pending"
    code, out, _ = run(node, capsys, "--json", "events")
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["data"]["event"] == "handshake.pending"


def test_age_uses_the_largest_whole_unit() -> None:
    now = 1_800_000_000.0
    ages = [5, 3 * 60 + 59, 2 * 3600 + 1, 3 * 86400]
    assert [cli._ago(int(now) - s, now) for s in ages] == ["5s", "3m", "2h", "3d"]
    assert cli._ago("garbage", now) == "?"


@pytest.mark.parametrize("argv", [["handshake", "1", "me"], ["wait", "1"], ["untrust", "1"]])
def test_own_node_id_exits_1_naming_the_mistake(
    node: Node, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert run(node, capsys, *argv) == (
        1,
        "",
        "pilot-handshakectl: node 1 is this node itself; name the peer's node ID\n",
    )


def test_untrust_of_a_node_only_asked_says_request_withdrawn(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node.manager, "revoke_trust", lambda peer: "withdrawn")
    code, out, err = run(node, capsys, "untrust", "9")
    assert (code, err) == (0, "")
    assert out.startswith("request withdrawn from 9")


def test_trust_shows_hostnames_and_conflicting_records(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_node(FakeRegistry({1: "agent-a", 9: "agent-b"})) as started:
        for peer in (8, 9):
            started.receive_request(Peer(peer))
            started.manager.approve_handshake(peer)
        monkeypatch.setattr(started.manager, "conflicting_peers", lambda: [9])
        code, out, _ = run(started, capsys, "trust")
        lines = out.splitlines()
        assert lines[1].split()[0] == "8" and lines[1].split()[-1] == "trusted"
        assert lines[2].split()[:2] == ["9", "(agent-b)"] and lines[2].split()[-1] == "CONFLICT"
        assert lines[3].startswith("CONFLICT: the registry now binds")
        code, out, _ = run(started, capsys, "status")
        assert out.splitlines()[0] == "node      1 (agent-a)"
        started.receive_request(Peer(12))
        code, out, _ = run(started, capsys, "approve", "agent-b")
        assert (code, out) == (1, "")  # resolved to 9, which has nothing pending


def test_a_moved_hostname_fails_the_command_and_forget_name_drops_the_pin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 15 item 1 (SPEC 17): `handshake build-agent` after the name moved to another
    node does nothing and says how to accept the move."""
    registry = FakeRegistry({9: "build-agent"})
    with running_node(registry) as started:
        code, out, err = run(started, capsys, "handshake", "build-agent", "hello")
        assert (code, out, err) == (0, "request sent to 9\n", "")
        registry.names = {12: "build-agent"}
        registry.keys[12] = Peer(12).key
        sent = len(started.runtime.sent)
        code, out, err = run(started, capsys, "handshake", "build-agent", "hello")
        assert (code, out) == (1, "")
        assert err.strip() == (
            "pilot-handshakectl: hostname build-agent moved from node 9 to node 12; if that "
            "is expected: pilot-handshakectl forget-name build-agent"
        )
        assert len(started.runtime.sent) == sent  # the command did nothing
        assert run(started, capsys, "forget-name", "build-agent")[:2] == (
            0,
            "forgot hostname build-agent\n",
        )
        code, out, err = run(started, capsys, "forget-name", "build-agent")
        assert (code, err.strip()) == (1, "pilot-handshakectl: hostname build-agent is not pinned")


def test_a_key_changed_request_is_marked_and_approve_passes_the_named_key(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 5 (SPEC 17): node 9 is trusted with one key and asks again with another
    (the decision itself is tested in test_manager_conflict)."""
    peer = Peer(9)
    node.receive_request(peer)
    trusted_with = Peer(9).key
    record = TrustRecord(9, trusted_with, datetime.now(timezone.utc))
    monkeypatch.setattr(node.manager, "trusted_peers", lambda: [record])
    code, out, _ = run(node, capsys, "pending")
    assert code == 0 and f"{fingerprint(peer.key)} KEY CHANGED" in out
    code, out, _ = run(node, capsys, "--json", "pending")
    (entry,) = json.loads(out)["data"]["pending"]
    full = hashlib.sha256(base64.b64decode(peer.key)).hexdigest()
    assert (entry["key_changed"], entry["fingerprint"]) == (True, full)
    asked: list[tuple[int, str | None]] = []

    def approve(peer_node_id: int, new_key: str | None = None) -> bool:
        asked.append((peer_node_id, new_key))
        return True

    monkeypatch.setattr(node.manager, "approve_handshake", approve)
    assert run(node, capsys, "approve", "9", "--new-key", full[:16])[:2] == (0, "approved 9\n")
    assert run(node, capsys, "approve", "9")[0] == 0
    assert asked == [(9, full[:16]), (9, None)]


def test_events_no_history_asks_the_daemon_for_new_events_only() -> None:
    follow = cli._parse(["--socket", "S", "events", "--follow", "--no-history"])
    assert cli._request_args(None, follow) == {"follow": True, "history": False}  # type: ignore[arg-type]
    recent = cli._parse(["--socket", "S", "events", "--follow"])
    assert cli._request_args(None, recent) == {"follow": True}  # type: ignore[arg-type]


# Issue 16: what became of our requests, and pilotctl's shapes


def _rejected_by(node: Node, peer: Peer, reason: str) -> None:
    node.manager.process_message(
        peer.data(HANDSHAKE_REJECT, node.runtime.node_id(), reason=reason), ("127.0.0.1", 40000)
    )


def test_wait_says_who_rejected_our_request_and_why(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = Peer(2)
    assert run(node, capsys, "handshake", "2")[0] == 0  # the justification is optional
    _rejected_by(node, peer, "not today")
    code, out, err = run(node, capsys, "wait", "2", "--timeout", "30")
    assert (code, out, err) == (
        1,
        "",
        "pilot-handshakectl: node 2 rejected our request: not today\n",
    )
    # --json: a result, not an error: the data on stdout, exit 1, stderr empty.
    code, out, err = run(node, capsys, "--json", "wait", "2", "--timeout", "30")
    assert (code, err) == (1, "")
    assert json.loads(out) == {
        "status": "ok",
        "data": {"node_id": 2, "trusted": False, "rejected": True, "reason": "not today"},
    }


def test_requests_lists_every_state_with_unix_times(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.runtime.dial_fails = True  # no registry either: the request cannot be sent ...
    assert run(node, capsys, "handshake", "5")[0] == 1
    node.runtime.dial_fails = False
    for peer in (2, 3, 4):
        assert run(node, capsys, "handshake", str(peer), "sync")[0] == 0
    _rejected_by(node, Peer(2), "not today")
    node.manager.process_message(
        Peer(3).data(HANDSHAKE_ACCEPT, node.runtime.node_id()), ("127.0.0.1", 40000)
    )
    assert (
        run(node, capsys, "untrust", "4")[1]
        == "request withdrawn from 4 (it was not trusted yet)\n"
    )
    _, out, _ = run(node, capsys, "requests")
    header, *rows = out.splitlines()
    assert header.split() == ["NODE", "PATH", "STATE", "SENT", "REASON"]
    assert [row.split()[:3] for row in rows] == [
        ["2", "direct", "rejected"],
        ["3", "direct", "accepted"],
        ["4", "direct", "withdrawn"],
    ]  # ... and is forgotten
    assert rows[0].endswith("not today")
    _, out, _ = run(node, capsys, "--json", "requests")
    requests = json.loads(out)["data"]["requests"]
    assert [set(r) >= {"node_id", "sent_at", "path", "state", "reason"} for r in requests] == [
        True
    ] * 3
    assert all(type(r["sent_at"]) is int for r in requests)
    assert (requests[0]["state"], requests[0]["reason"]) == ("rejected", "not today")


def test_a_pilot_address_names_its_node(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.receive_request(Peer(11))
    assert run(node, capsys, "approve", "0:0000.0000.000B") == (0, "approved 11\n", "")
    assert run(node, capsys, "untrust", "3:0003.0000.000b") == (0, "untrusted 11\n", "")


def test_an_unknown_hostname_is_not_found() -> None:
    with running_node(FakeRegistry({})) as started:
        result = ctl("--json", "--socket", started.path, "approve", "nobody-here")
    assert (result.returncode, result.stdout) == (1, "")
    assert json.loads(result.stderr)["code"] == "not_found"
