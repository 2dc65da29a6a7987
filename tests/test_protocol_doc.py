"""docs/PROTOCOL.md's worked example is true: recomputed from the document's own text.

Each ``<!-- example: NAME -->`` code block is parsed; keys, challenges, signatures and message
bytes are recomputed twice, once independently (hashlib, PyNaCl, json: what another
implementer would write from the prose) and once with the package's own wire functions, and
both must equal what the document prints. Editing a number in the document, or changing the
wire format in the code without updating the document, fails here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
from pathlib import Path

import nacl.signing
import pytest

from pilothandshake.identity import Identity, verify
from pilothandshake.messages import HandshakeMsg, handshake_challenge, receipt_challenge
from pilothandshake.registry.client import encode_frame
from pilothandshake.wire import write_receipt

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
_BLOCK = re.compile(r"<!-- example: ([\w-]+) -->\n```\w*\n(.*?)\n```", re.S)


def _blocks() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, body in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        assert name not in found, f"example block {name!r} appears twice"
        found[name] = body
    return found


BLOCKS = _blocks()


def _keys() -> dict[int, tuple[nacl.signing.SigningKey, str]]:
    """Node ID -> (signing key from the printed seed, the printed public_key)."""
    seeds: dict[int, str] = {}
    printed: dict[int, str] = {}
    for line in BLOCKS["keys"].splitlines():
        match = re.fullmatch(r"node (\d+)\s+(seed|public_key)\s+(\S+)", line)
        assert match, f"unexpected line in the keys block: {line!r}"
        node, what, value = match.groups()
        (seeds if what == "seed" else printed)[int(node)] = value
    assert seeds.keys() == printed.keys() == {7, 42}
    return {
        node: (nacl.signing.SigningKey(bytes.fromhex(seed)), printed[node])
        for node, seed in seeds.items()
    }


KEYS = _keys()


def _sha256hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _independent_challenge(message: dict[str, object], recipient: int) -> str:
    """The signature_v2 challenge spelt from the document's section 3, not from the package."""
    return ":".join(
        [
            "handshake-v2",
            str(message["type"]),
            str(message["node_id"]),
            str(recipient),
            str(message["timestamp"]),
            _sha256hex(str(message["justification"])),
            _sha256hex(str(message["reason"])),
            str(message["public_key"]),
        ]
    )


def test_every_example_block_is_present() -> None:
    assert set(BLOCKS) == {
        "keys",
        "identity-7",
        "request-challenge",
        "request-signature",
        "request-message",
        "receipt-challenge",
        "receipt-line",
        "reject-challenge",
        "reject-message",
        "go-challenge",
        "go-signature",
        "registry-frame",
    }


def test_printed_public_keys_derive_from_the_printed_seeds() -> None:
    for node, (signing_key, printed) in KEYS.items():
        assert base64.b64encode(bytes(signing_key.verify_key)).decode() == printed, node


def test_identity_file_is_seed_then_key_and_loads_as_that_identity(tmp_path: Path) -> None:
    signing_key, public_b64 = KEYS[7]
    document = json.loads(BLOCKS["identity-7"])
    assert document["public_key"] == public_b64
    private = base64.b64decode(document["private_key"], validate=True)
    assert private == bytes(signing_key) + bytes(signing_key.verify_key)
    path = tmp_path / "identity.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(BLOCKS["identity-7"])
    assert Identity.load_or_create(str(path)).public_key_b64 == public_b64


@pytest.mark.parametrize(("name", "sender", "recipient"), [("request", 7, 42), ("reject", 42, 7)])
def test_message_challenge_and_signature_recompute(name: str, sender: int, recipient: int) -> None:
    signing_key, public_b64 = KEYS[sender]
    wire = BLOCKS[f"{name}-message"].encode("utf-8")
    message = json.loads(wire)
    assert list(message) == [
        "type",
        "node_id",
        "public_key",
        "justification",
        "signature",
        "reason",
        "timestamp",
        "signature_v2",
    ]
    assert message["node_id"] == sender
    assert message["public_key"] == public_b64
    assert message["signature"] == ""

    challenge = BLOCKS[f"{name}-challenge"]
    assert _independent_challenge(message, recipient) == challenge
    decoded = HandshakeMsg.from_json(wire)
    assert decoded.v2_challenge(recipient) == challenge.encode("utf-8")

    signature = base64.b64encode(signing_key.sign(challenge.encode("utf-8")).signature).decode()
    assert message["signature_v2"] == signature
    if name == "request":
        assert BLOCKS["request-signature"] == signature
    assert verify(bytes(signing_key.verify_key), challenge.encode(), base64.b64decode(signature))
    # Encoded by the package, the decoded message is byte for byte what the document shows.
    assert decoded.to_json() == wire


def test_signature_v2_is_bound_to_the_recipient() -> None:
    signing_key, _ = KEYS[7]
    message = json.loads(BLOCKS["request-message"])
    other = _independent_challenge(message, 43).encode()
    assert not verify(
        bytes(signing_key.verify_key), other, base64.b64decode(message["signature_v2"])
    )


def test_go_style_signature_and_registry_frame_recompute() -> None:
    signing_key, _ = KEYS[7]
    challenge = BLOCKS["go-challenge"]
    assert challenge == "handshake:7:42"
    assert handshake_challenge(7, 42) == challenge.encode()
    signature = base64.b64encode(signing_key.sign(challenge.encode()).signature).decode()
    assert BLOCKS["go-signature"] == signature

    header_hex, body = BLOCKS["registry-frame"].split("\n")
    request = json.loads(body)
    assert request == {
        "type": "request_handshake",
        "from_node_id": 7,
        "to_node_id": 42,
        "justification": json.loads(BLOCKS["request-message"])["justification"],
        "signature": signature,
    }
    (length,) = struct.unpack(">I", bytes.fromhex(header_hex))
    assert length == len(body.encode("utf-8"))
    assert encode_frame(request) == bytes.fromhex(header_hex) + body.encode("utf-8")


def test_the_receipt_recomputes_and_the_wire_reads_it() -> None:
    """Issue 15 item 1 (SPEC 3): the receipt of the request, as section 1 spells it."""
    signing_key, public_key = KEYS[42]
    message = BLOCKS["request-message"].encode("utf-8")
    challenge = BLOCKS["receipt-challenge"]
    assert challenge == f"handshake-receipt:42:7:{hashlib.sha256(message).hexdigest()}"
    assert receipt_challenge(42, 7, message) == challenge.encode()
    signature = signing_key.sign(challenge.encode()).signature
    line = BLOCKS["receipt-line"]
    assert json.loads(line) == {"receipt": base64.b64encode(signature).decode()}
    assert verify(base64.b64decode(public_key), challenge.encode(), signature)
    left, right = socket.socketpair()
    with left, right:
        write_receipt(left, signature)
        assert right.recv(4096) == line.encode() + b"\n"
