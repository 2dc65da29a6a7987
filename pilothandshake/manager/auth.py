"""SPEC 5 step 3, local part: who signed a message, and whether its key may claim the node.

``authenticate`` checks the signature; ``pin_of`` finds the key pinned for a node and
``pin_problem`` is the one pin check, used for direct messages, for relayed requests and
again under the lock just before a decision (SPEC 16). Pure: no clock, socket or runtime.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Mapping
from dataclasses import dataclass

from ..identity import decode_key, decode_signature, verify
from ..messages import HandshakeMsg, handshake_challenge
from ..store import PendingHandshake, TrustRecord

__all__ = [
    "KEY_DIFFERS_FROM_PIN",
    "NO_PIN",
    "Authenticated",
    "Pin",
    "PinKind",
    "authenticate",
    "pin_of",
    "pin_problem",
]

KEY_DIFFERS_FROM_PIN = "public key differs from the pinned key"


class PinKind(enum.Enum):
    """Where a pinned key comes from (SPEC 5 step 3, SPEC 8)."""

    TRUSTED = "trusted"  # the node's trust record
    BOUND = "bound"  # a pending request that was registry-bound or relayed
    WEAK = "weak"  # any other pending request: a later bound request replaces it

    @property
    def strong(self) -> bool:
        """Whether a message with another key is dropped whatever the registry says."""
        return self is not PinKind.WEAK


@dataclass(frozen=True)
class Pin:
    """The key pinned for a node and where it comes from; ``kind`` None: nothing pinned."""

    key: bytes | None
    kind: PinKind | None

    def matched_by(self, key: bytes | None) -> PinKind | None:
        """The kind of this pin when ``key`` equals it, else None."""
        return self.kind if key is not None and key == self.key else None


NO_PIN = Pin(None, None)


@dataclass(frozen=True)
class Authenticated:
    """A message whose signature verified: the sender's key, the replay material (what the
    verified signature covered) and whether only the Go-style signature verified."""

    key: bytes
    material: bytes
    go_style: bool


def authenticate(msg: HandshakeMsg, own: int, strict: bool) -> Authenticated | str:
    """SPEC 5 step 3, local part, the same in every mode for the key; or the reason to drop.

    Legacy mode also takes the Go-style ``signature`` over ``handshake:<S>:<R>``; the caller
    then requires the key to be registry-bound (SPEC 8)."""
    key = decode_key(msg.public_key)
    if key is None:
        return "public_key is not base64 of a 32-byte key"
    challenge = msg.v2_challenge(own)
    signature_v2 = decode_signature(msg.signature_v2)
    if signature_v2 is not None and verify(key, challenge, signature_v2):
        return Authenticated(key, challenge, go_style=False)
    if strict:
        return "signature_v2 missing or invalid"
    signature = decode_signature(msg.signature)
    canonical = msg.canonical_bytes()
    if (
        signature is not None
        and canonical is not None
        and verify(key, handshake_challenge(msg.node_id, own), signature)
    ):
        return Authenticated(key, canonical, go_style=True)
    return "no valid signature"


def pin_of(
    trusted: Mapping[int, TrustRecord],
    pending: Mapping[int, PendingHandshake],
    conflicts: Container[int],
    node: int,
) -> Pin:
    """The pin of ``node``: its trust record's key, else its pending request's. A stored key
    that is not a valid key pins nothing (SPEC 8), nor does a record in conflict with the
    registry."""
    record = trusted.get(node)
    if record is not None and node not in conflicts:
        key = decode_key(record.public_key)
        if key is not None:
            return Pin(key, PinKind.TRUSTED)
    request = pending.get(node)
    if request is not None:
        key = decode_key(request.public_key)
        if key is not None:
            return Pin(key, PinKind.BOUND if request.bound else PinKind.WEAK)
    return NO_PIN


def pin_problem(pin: Pin, key: bytes | None, strict: bool, bound: bool | None = None) -> str:
    """The pin check of SPEC 5 step 3 (strict mode only): "" or the reason to drop a message
    claiming the pinned node with ``key`` (None: the message brought no key).

    A strong pin refuses any other key. A weak pin refuses another key unless the message is
    registry-bound; ``bound`` None means that is not known yet, so only strong pins apply."""
    if not strict or pin.kind is None or key is None or key == pin.key:
        return ""
    if pin.kind.strong:
        return KEY_DIFFERS_FROM_PIN
    if bound is False:
        return "public key differs from the pending request's key"
    return ""
