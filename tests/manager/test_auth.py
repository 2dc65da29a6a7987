"""manager/auth.py: the signature check and the one pin check (SPEC 5 step 3, SPEC 8)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from pilothandshake.drops import Drop, DropKind
from pilothandshake.identity import Identity, b64encode
from pilothandshake.manager.auth import (
    KEY_DIFFERS_FROM_PIN,
    NO_PIN,
    Authenticated,
    Pin,
    PinKind,
    authenticate,
    pin_of,
    pin_problem,
)
from pilothandshake.messages import HANDSHAKE_REQUEST, HandshakeMsg, handshake_challenge
from pilothandshake.store import PendingHandshake, TrustRecord

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
A, B = b"A" * 32, b"B" * 32
OWN = 1
NO_V2 = Drop(DropKind.SIGNATURE, "signature_v2 missing or invalid")
WEAK_MISMATCH = Drop(DropKind.KEY_MISMATCH, "public key differs from the pending request's key")


def signed(identity: Identity, *, v2: bool = True, go: bool = False) -> HandshakeMsg:
    msg = HandshakeMsg(HANDSHAKE_REQUEST, 7, identity.public_key_b64, timestamp=int(time.time()))
    if go:
        msg.signature = b64encode(identity.sign(handshake_challenge(7, OWN)))
    if v2:
        msg.signature_v2 = b64encode(identity.sign(msg.v2_challenge(OWN)))
    return msg


def test_signature_v2_authenticates_in_every_mode() -> None:
    identity = Identity.generate()
    msg = signed(identity)
    for strict in (True, False):
        assert authenticate(msg, OWN, strict) == Authenticated(
            identity.public_key, msg.v2_challenge(OWN), go_style=False
        )


def test_the_go_signature_is_taken_only_in_legacy_mode_with_the_canonical_bytes() -> None:
    msg = signed(Identity.generate(), v2=False, go=True)
    assert authenticate(msg, OWN, strict=True) == NO_V2
    result = authenticate(msg, OWN, strict=False)
    assert isinstance(result, Authenticated) and result.go_style
    assert result.material == msg.canonical_bytes()


def test_signatures_of_another_key_or_recipient_fail() -> None:
    msg = signed(Identity.generate(), go=True)
    msg.public_key = Identity.generate().public_key_b64
    assert authenticate(msg, OWN, strict=False) == Drop(DropKind.SIGNATURE, "no valid signature")
    assert authenticate(signed(Identity.generate()), 2, strict=True) == NO_V2
    msg.public_key = "not a key"
    assert authenticate(msg, OWN, strict=True) == Drop(
        DropKind.SIGNATURE, "public_key is not base64 of a 32-byte key"
    )


def test_pin_of_prefers_the_trust_record_and_ignores_invalid_keys_and_conflicts() -> None:
    record = {7: TrustRecord(7, b64encode(A), T0)}
    bound = {7: PendingHandshake(7, b64encode(B), "", T0, True)}
    weak = {7: PendingHandshake(7, b64encode(B), "", T0, False)}
    assert pin_of(record, bound, (), 7) == Pin(A, PinKind.TRUSTED)
    # Round 3 (SPEC 17): a record in conflict still pins its key, and a pending request
    # never overrides a trust record's pin (a KEY CHANGED request pins nothing).
    assert pin_of(record, bound, {7}, 7) == Pin(A, PinKind.CONFLICT)
    assert pin_of({8: TrustRecord(8, "", T0)}, {8: bound[7]}, (), 8) == Pin(B, PinKind.BOUND)
    assert pin_of({}, weak, (), 7) == Pin(B, PinKind.WEAK)
    assert pin_of({7: TrustRecord(7, "bad", T0)}, {}, (), 7) is NO_PIN
    assert pin_of({}, {7: PendingHandshake(7, "", "", T0, True)}, (), 7) is NO_PIN
    assert pin_of(record, {}, (), 8) is NO_PIN


@pytest.mark.parametrize(
    ("pin", "key", "strict", "bound", "problem"),
    [
        (Pin(A, PinKind.TRUSTED), B, True, None, KEY_DIFFERS_FROM_PIN),
        (Pin(A, PinKind.TRUSTED), B, True, True, KEY_DIFFERS_FROM_PIN),
        (Pin(A, PinKind.BOUND), B, True, False, KEY_DIFFERS_FROM_PIN),
        (Pin(A, PinKind.TRUSTED), A, True, None, None),
        (Pin(A, PinKind.TRUSTED), None, True, None, None),  # relayed, without a key
        (Pin(A, PinKind.TRUSTED), B, False, False, None),  # legacy mode pins nothing
        (Pin(A, PinKind.WEAK), B, True, None, None),  # bound not known yet
        (Pin(A, PinKind.WEAK), B, True, True, None),  # a bound request replaces a weak pin
        (Pin(A, PinKind.WEAK), B, True, False, WEAK_MISMATCH),
        (NO_PIN, B, True, False, None),
        # A record in conflict: its key authenticates; the registry's key may be pending.
        (Pin(A, PinKind.CONFLICT), A, True, False, None),
        (Pin(A, PinKind.CONFLICT), B, True, None, None),
        (Pin(A, PinKind.CONFLICT), B, True, True, None),
        (Pin(A, PinKind.CONFLICT), B, True, False, KEY_DIFFERS_FROM_PIN),
    ],
)
def test_the_one_pin_check(
    pin: Pin, key: bytes | None, strict: bool, bound: bool | None, problem: Drop | None
) -> None:
    assert pin_problem(pin, key, strict, bound) == problem


def test_a_pin_is_matched_only_by_its_own_key() -> None:
    assert Pin(A, PinKind.BOUND).matched_by(A) is PinKind.BOUND
    assert Pin(A, PinKind.BOUND).matched_by(B) is None
    assert Pin(A, PinKind.BOUND).matched_by(None) is None
    assert NO_PIN.matched_by(None) is None
    assert [kind.strong for kind in PinKind] == [True, False, True, False]
    assert [kind.record for kind in PinKind] == [True, True, False, False]
