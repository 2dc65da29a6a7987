"""Why input is dropped (SPEC 5): a ``Drop`` is its ``kind``, one of a small fixed set that
the drop metric counts by, and its ``detail``, the text the drop's log line shows.

Every check that can drop input (the codec, the wire reader, ``manager/auth``, ``queue``,
``replay``, ``binding``, ``intake``, ``decide``) returns or raises one; no one reads the
kind back out of the text. Imports nothing of the package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Drop", "DropKind"]


class DropKind(enum.Enum):
    """The kinds of drop; each value is the ``reason`` label of
    ``pilot_handshake_drops_total``."""

    OWN_NODE_ID = "own_node_id"  # the input claims our own node ID
    DENIED = "denied"  # the sender is on the deny list (the operator asked for it)
    STALE = "stale"  # the timestamp is outside the window
    REPLAY = "replay"  # seen before, or the replay set has no room for it
    KEY_MISMATCH = "key_mismatch"  # the key differs from a pin, the registry's or the allowlist's
    # No valid key or signature, or an answer (or a Go-style signature) that neither the
    # registry nor a pin vouches for.
    SIGNATURE = "signature"
    QUEUE_FULL = "queue_full"  # the pending queue, or the source's quota in it, is full
    UNSOLICITED = "unsolicited"  # an accept we did not ask for, or within the revoke cooldown
    MALFORMED = "malformed"  # not a well-formed message: syntax, types, size, or too slow


@dataclass(frozen=True)
class Drop:
    """One reason to drop input: its ``kind`` and the ``detail`` its log line shows (it may
    quote what the peer sent, escaped)."""

    kind: DropKind
    detail: str
