"""SPEC 5 step 3, local part: who signed a message, and whether its key may claim the node.

``authenticate`` checks the signature; ``pin_of`` finds the key pinned for a node and
``pin_problem`` is the one pin check, used for direct messages, for relayed requests and
again under the lock just before a decision (SPEC 16). ``key_changed`` and
``approval_problem`` are the KEY CHANGED rule of SPEC 17. Pure: no clock, socket or runtime.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass

from ..drops import Drop, DropKind
from ..identity import decode_key, decode_signature, full_fingerprint, verify
from ..messages import HandshakeMsg, handshake_challenge
from ..store import PendingHandshake, TrustRecord

__all__ = [
    "KEY_DIFFERS_FROM_PIN",
    "NO_PIN",
    "Authenticated",
    "Pin",
    "PinKind",
    "approval_problem",
    "authenticate",
    "key_changed",
    "pin_of",
    "pin_problem",
]

KEY_DIFFERS_FROM_PIN = Drop(DropKind.KEY_MISMATCH, "public key differs from the pinned key")


class PinKind(enum.Enum):
    """Where a pinned key comes from (SPEC 5 step 3, SPEC 8)."""

    TRUSTED = "trusted"  # the node's trust record
    # A trust record the registry contradicts (SPEC 17): its key still authenticates the
    # peer, but a registry-bound request with the registry's key may wait as KEY CHANGED.
    CONFLICT = "conflict"
    BOUND = "bound"  # a pending request that was registry-bound or relayed
    WEAK = "weak"  # any other pending request: a later bound request replaces it

    @property
    def strong(self) -> bool:
        """Whether a message with another key is dropped whatever the registry says."""
        return self in (PinKind.TRUSTED, PinKind.BOUND)

    @property
    def record(self) -> bool:
        """Whether the pinned key is a trust record's (in conflict or not)."""
        return self in (PinKind.TRUSTED, PinKind.CONFLICT)


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


def authenticate(msg: HandshakeMsg, own: int, strict: bool) -> Authenticated | Drop:
    """SPEC 5 step 3, local part, the same in every mode for the key; or the drop.

    Legacy mode also takes the Go-style ``signature`` over ``handshake:<S>:<R>``; the caller
    then requires the key to be registry-bound (SPEC 8)."""
    key = decode_key(msg.public_key)
    if key is None:
        return Drop(DropKind.SIGNATURE, "public_key is not base64 of a 32-byte key")
    challenge = msg.v2_challenge(own)
    signature_v2 = decode_signature(msg.signature_v2)
    if signature_v2 is not None and verify(key, challenge, signature_v2):
        return Authenticated(key, challenge, go_style=False)
    if strict:
        return Drop(DropKind.SIGNATURE, "signature_v2 missing or invalid")
    signature = decode_signature(msg.signature)
    canonical = msg.canonical_bytes()
    if (
        signature is not None
        and canonical is not None
        and verify(key, handshake_challenge(msg.node_id, own), signature)
    ):
        return Authenticated(key, canonical, go_style=True)
    return Drop(DropKind.SIGNATURE, "no valid signature")


def pin_of(
    trusted: Mapping[int, TrustRecord],
    pending: Mapping[int, PendingHandshake],
    conflicts: Container[int],
    node: int,
) -> Pin:
    """The pin of ``node``: its trust record's key (kind CONFLICT while the registry binds
    the node ID to another key), else its pending request's. A pending request never
    overrides a trust record's pin (SPEC 17: a KEY CHANGED request pins nothing). A stored
    key that is not a valid key pins nothing (SPEC 8)."""
    record = trusted.get(node)
    if record is not None:
        key = decode_key(record.public_key)
        if key is not None:
            return Pin(key, PinKind.CONFLICT if node in conflicts else PinKind.TRUSTED)
    request = pending.get(node)
    if request is not None:
        key = decode_key(request.public_key)
        if key is not None:
            return Pin(key, PinKind.BOUND if request.bound else PinKind.WEAK)
    return NO_PIN


def pin_problem(
    pin: Pin, key: bytes | None, strict: bool, bound: bool | None = None
) -> Drop | None:
    """The pin check of SPEC 5 step 3 (strict mode only): None, or the drop of a message
    claiming the pinned node with ``key`` (None: the message brought no key).

    A strong pin refuses any other key. A weak pin, or a trust record in conflict, refuses
    another key unless the message is registry-bound; ``bound`` None means that is not
    known yet, so only strong pins apply."""
    if not strict or pin.kind is None or key is None or key == pin.key:
        return None
    if pin.kind.strong or (bound is False and pin.kind is PinKind.CONFLICT):
        return KEY_DIFFERS_FROM_PIN
    if bound is False:
        return Drop(DropKind.KEY_MISMATCH, "public key differs from the pending request's key")
    return None


def key_changed(record: TrustRecord | None, request: PendingHandshake) -> bool:
    """Whether ``request`` is KEY CHANGED (SPEC 17): its node has a trust record with a valid
    key, and the request carries another one."""
    record_key = decode_key(record.public_key) if record is not None else None
    return record_key is not None and decode_key(request.public_key) != record_key


_HEX = re.compile(r"[0-9a-f]+")
_MIN_PREFIX = 16  # hex digits of a fingerprint prefix that --new-key accepts


def approval_problem(
    record: TrustRecord | None, request: PendingHandshake, new_key: str | None
) -> str:
    """Why ``approve`` (SPEC 17) must refuse ``request``: "" when it may go ahead.

    A KEY CHANGED request is approved only when ``new_key`` names its key: the full hex
    SHA-256 fingerprint of the raw key, a prefix of it of at least 16 hex digits, or the
    base64 key. ``new_key`` given for a request that is not KEY CHANGED must name its key
    too (the operator meant a specific key)."""
    node = request.node_id
    key = decode_key(request.public_key)
    shown = full_fingerprint(request.public_key)
    if new_key is None:
        if not key_changed(record, request):
            return ""
        return (
            f"KEY CHANGED: the pending request of node {node} carries key {shown}, not the "
            f"key node {node} was trusted with; if the node really has a new key: approve "
            f"{node} --new-key {shown[:_MIN_PREFIX]}; else reject {node}"
        )
    named = new_key.strip()
    named_key = decode_key(named)
    if named_key is not None:
        matches = named_key == key
    elif _HEX.fullmatch(named.lower()) and _MIN_PREFIX <= len(named) <= 64:
        matches = bool(shown) and shown.startswith(named.lower())
    else:
        return (
            f"--new-key {new_key!r}: expected the key's fingerprint (64 hex digits, or a prefix "
            f"of at least {_MIN_PREFIX}) or the base64 key"
        )
    if not matches:
        return (
            f"--new-key {new_key} does not name the key of node {node}'s pending request "
            f"({shown or 'none'}); nothing approved"
        )
    return ""
