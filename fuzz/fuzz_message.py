"""Coverage-guided fuzzing of the port-444 handler (SPEC 3, 5) with atheris.

Each input is either raw bytes for ``Manager.process_message`` (first byte even) or, first
byte odd, a recipe that picks a freshly signed message and mutates its fields, so that the
fuzzer gets past the signature check even though timestamps go stale within 5 minutes.

Invariants checked on every input (a violation raises, which atheris reports as a crash
and saves as ``crash-*``): ``HandshakeMsg.from_json`` raises only ``MessageError``;
``process_message`` never raises; trusted / pending / outgoing and the bytes of trust.json
are unchanged unless the input is validly signed by a key allowed to make that change.

Run (see fuzz/README.md): ``.venv/bin/python fuzz/fuzz_message.py -max_total_time=120``
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

with atheris.instrument_imports():
    from fakeruntime import Nodes, Peer, seed_trust, snapshot

    from pilothandshake.constants import MAX_CLOCK_SKEW, MAX_MESSAGE_AGE
    from pilothandshake.errors import MessageError
    from pilothandshake.identity import Identity, b64encode, decode_key, decode_signature, verify
    from pilothandshake.messages import MESSAGE_TYPES, HandshakeMsg
    from pilothandshake.store import OutgoingRequest, PendingHandshake, TrustRecord

OWN = 1
PEERS = [Peer(7), Peer(9), Peer(11), Peer(30)]
TRUSTED, PENDING, OUTGOING, STRANGER = PEERS
ATTACKER = Identity.generate()
PINS = {7: TRUSTED.identity.public_key, 9: PENDING.identity.public_key}
TYPES = sorted(MESSAGE_TYPES)
FIELDS = [f.name for f in dataclasses.fields(HandshakeMsg)] + ["extra"]


class Node:
    """A strict Manager over a seeded trust.json; rebuilt after a state-changing input."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="fuzz-message-")
        self.nodes = Nodes(self.root)
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        # stop() shuts the Manager's worker pool down: a Manager that was never started
        # keeps its reply workers forever (the first long run leaked threads that way).
        self.nodes.close()
        if self.generation:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.nodes = Nodes(self.root)
        self.generation += 1
        self.directory = os.path.join(self.root, f"g{self.generation}")
        now = datetime.now(timezone.utc).replace(microsecond=0)
        seed_trust(
            self.directory,
            trusted=(TrustRecord(7, TRUSTED.key, now, mutual=True),),
            pending=(PendingHandshake(9, PENDING.key, "hello", now, bound=True),),
            outgoing=(OutgoingRequest(11, now),),
        )
        self.manager, self.runtime = self.nodes.make(OWN, directory=self.directory)
        self.manager.start()

    def state(self) -> tuple[Any, ...]:
        with open(os.path.join(self.directory, "trust.json"), "rb") as handle:
            data = handle.read()
        return (snapshot(self.manager), data, len(self.runtime.events))


NODE: Node | None = None


def validly_signed(data: bytes) -> bool:
    try:
        msg = HandshakeMsg.from_json(data)
    except MessageError:
        return False
    now = time.time()
    if (
        msg.node_id == OWN
        or not now - MAX_MESSAGE_AGE - 5 <= msg.timestamp <= now + MAX_CLOCK_SKEW + 5
    ):
        return False
    key, sig = decode_key(msg.public_key), decode_signature(msg.signature_v2)
    if key is None or sig is None or not verify(key, msg.v2_challenge(OWN), sig):
        return False
    return PINS.get(msg.node_id, key) == key


def json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 40))
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if kind == 5:
        return fdp.PickValueInList([0, 7, 9, 11, 2**32 - 1, 2**32, int(time.time())])
    if kind == 6:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {
        fdp.ConsumeUnicode(8): json_value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 3))
    }


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    peer = fdp.PickValueInList(PEERS)
    msg = peer.message(fdp.PickValueInList(TYPES), OWN, justification="sync", reason="done")
    fields: dict[str, Any] = json.loads(msg.to_json())
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        op = fdp.ConsumeIntInRange(0, 7)
        name = fdp.PickValueInList(FIELDS)
        if op == 0:
            fields[name] = json_value(fdp)
        elif op == 1:
            fields.pop(name, None)
        elif op == 2:
            stamp = fields.get("timestamp")
            fields["timestamp"] = (stamp if type(stamp) is int else 0) + fdp.ConsumeIntInRange(
                -1000, 1000
            )
        elif op == 3:
            fields["public_key"] = ATTACKER.public_key_b64
        elif op == 4:
            forged = HandshakeMsg(
                str(fields.get("type")),
                fdp.PickValueInList([7, 9, 11, 30, 31]),
                ATTACKER.public_key_b64,
                timestamp=int(time.time()),
            )
            try:
                fields = json.loads(forged.to_json())
            except MessageError:  # a lone surrogate from an earlier mutation: not sendable
                continue
            fields["signature_v2"] = b64encode(ATTACKER.sign(forged.v2_challenge(OWN)))
        elif op == 5:
            text = str(fields.get(name, ""))
            cut = fdp.ConsumeIntInRange(0, len(text))
            fields[name] = text[:cut] + fdp.ConsumeUnicode(4) + text[cut:]
        elif op == 6:
            fields["signature"], fields["signature_v2"] = (
                fields.get("signature_v2"),
                fields.get("signature"),
            )
        else:
            fields["type"] = fdp.PickValueInList(TYPES)
    raw = json.dumps(fields, ensure_ascii=fdp.ConsumeBool()).encode("utf-8", "surrogatepass")
    tail = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
    return raw + tail if fdp.ConsumeBool() else raw[: max(len(raw) - len(tail), 0)]


def TestOneInput(data: bytes) -> None:
    assert NODE is not None
    if data[:1] and data[0] % 2:
        message = structured(atheris.FuzzedDataProvider(data[1:]))
    else:
        message = data[1:]
    with contextlib.suppress(MessageError):
        HandshakeMsg.from_json(message)
    before = NODE.state()
    NODE.manager.process_message(message, ("127.0.0.1", 4000))
    if validly_signed(message):
        NODE.reset()
    elif NODE.state() != before:
        raise AssertionError(f"state changed by an input not validly signed: {message!r}")


def main() -> None:
    global NODE
    logging.disable(logging.CRITICAL)  # drops are logged per input; keep the run readable
    NODE = Node()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
