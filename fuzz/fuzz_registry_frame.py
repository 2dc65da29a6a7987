"""Coverage-guided fuzzing of the registry frame decoder and request handler (SPEC 11).

Each input goes through ``read_frame`` over a socketpair (as both the client and the
embedded server read frames), and a decoded object goes to the embedded server's request
handler (``Registry.handle``, in process) with two registered nodes.

Invariants (a violation raises; atheris saves the input as ``crash-*``): ``read_frame``
returns a dict or None or raises ``RegistryError`` (no other exception); the handler
answers with ``error`` / ``*_ok``, which ``encode_frame`` can send, and never logs an
internal error; a trust pair appears or disappears only for a request that carries the
node's valid signature over the matching challenge.

Run (see fuzz/README.md): ``.venv/bin/python fuzz/fuzz_registry_frame.py -max_total_time=120``
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from pilothandshake.errors import RegistryError
    from pilothandshake.identity import Identity, b64encode, decode_signature, verify
    from pilothandshake.registry.challenges import (
        report_trust_challenge,
        respond_challenge,
        revoke_trust_challenge,
    )
    from pilothandshake.registry.client import encode_frame, read_frame
    from pilothandshake.registry.inbox import Inboxes
    from pilothandshake.registry.state import Registry

A, B = Identity.generate(), Identity.generate()


class InternalErrors(logging.Handler):
    """Any ERROR from the registry server is an internal failure: crash the run."""

    def emit(self, record: logging.LogRecord) -> None:
        raise AssertionError(f"registry logged an error: {record.getMessage()}")


REGISTRY = Registry()
A_ID = REGISTRY.handle(
    {"type": "register", "listen_addr": ":1", "public_key": A.public_key_b64}, "127.0.0.1"
)["node_id"]
B_ID = REGISTRY.handle(
    {"type": "register", "listen_addr": ":2", "public_key": B.public_key_b64}, "127.0.0.1"
)["node_id"]
KEYS = {A_ID: A.public_key, B_ID: B.public_key}
CHALLENGES = {
    "report_trust": report_trust_challenge,
    "revoke_trust": revoke_trust_challenge,
    "respond_handshake": respond_challenge,
}
SEEDS = [
    {
        "type": "report_trust",
        "node_id": A_ID,
        "peer_id": B_ID,
        "signature": b64encode(A.sign(report_trust_challenge(A_ID, B_ID))),
    },
    {
        "type": "revoke_trust",
        "node_id": A_ID,
        "peer_id": B_ID,
        "signature": b64encode(A.sign(revoke_trust_challenge(A_ID, B_ID))),
    },
    {
        "type": "respond_handshake",
        "node_id": B_ID,
        "peer_id": A_ID,
        "accept": True,
        "signature": b64encode(B.sign(respond_challenge(B_ID, A_ID))),
    },
    {"type": "lookup", "node_id": A_ID},
    {"type": "register", "listen_addr": "0.0.0.0:444", "public_key": A.public_key_b64},
]


def signed_change(request: dict[str, Any]) -> bool:
    kind, node, peer = request.get("type"), request.get("node_id"), request.get("peer_id")
    challenge = CHALLENGES.get(kind) if isinstance(kind, str) else None
    if challenge is None or type(node) is not int or type(peer) is not int or node not in KEYS:
        return False
    signature = decode_signature(request.get("signature"))
    return signature is not None and verify(KEYS[node], challenge(node, peer), signature)


def TestOneInput(data: bytes) -> None:
    if data[:1] == b"\x01" and len(data) > 1:
        # Structured: one of the seed requests with one field replaced by fuzzed JSON text.
        seed = dict(SEEDS[data[1] % len(SEEDS)])
        with contextlib.suppress(ValueError, RecursionError):
            seed[["type", "node_id", "peer_id", "signature", "accept"][len(data) % 5]] = json.loads(
                data[2:]
            )
        body = json.dumps(seed).encode()
        data = struct.pack(">I", len(body)) + body
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(data[:200000])
        ours.shutdown(socket.SHUT_WR)
        try:
            request = read_frame(theirs, 64 * 1024, 1.0, 1.0)
        except RegistryError:
            return
    if request is None:
        return
    if not isinstance(request, dict):
        raise AssertionError(f"read_frame returned {type(request).__name__}")
    with REGISTRY._lock:
        before = set(REGISTRY._state.vouches)
    answer = REGISTRY.handle(request, "127.0.0.1")
    encode_frame(answer)
    kind = answer.get("type")
    if not (kind == "error" or (isinstance(kind, str) and kind.endswith("_ok"))):
        raise AssertionError(f"unexpected answer {answer!r}")
    with REGISTRY._lock:
        after = set(REGISTRY._state.vouches)
    if after != before and not signed_change(request):
        raise AssertionError(f"trust pairs changed by an unsigned request: {request!r}")
    # Keep the inboxes from growing across millions of inputs.
    with REGISTRY._lock:
        REGISTRY._inboxes = Inboxes()


def write_seeds(argv: list[str]) -> None:
    """Put the well-formed seed frames into an empty corpus directory given on the command
    line: random bytes rarely form a length header followed by a JSON object."""
    for arg in argv[1:]:
        if arg.startswith("-") or not os.path.isdir(arg) or os.listdir(arg):
            continue
        for index, seed in enumerate(SEEDS):
            with open(os.path.join(arg, f"seed-{index}"), "wb") as out:
                out.write(encode_frame(seed))
            with open(os.path.join(arg, f"seed-field-{index}"), "wb") as out:
                out.write(b"\x01" + bytes([index]) + b'"x"')


def main() -> None:
    write_seeds(sys.argv)
    logging.disable(logging.WARNING)  # refusals are INFO; errors still reach the handler
    logging.getLogger("pilothandshake.registry.server").addHandler(InternalErrors())
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
