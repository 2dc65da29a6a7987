"""What a decision wants done outside the lock, as data, and the one place that does it.

A decision returns effects (``ReplyAccept``, ``ReportTrust``, ``Respond``, ``Send``,
``RevokeAtRegistry``, ``Backfill``, ``RemoveTunnelPeer``) instead of calling out, so tests
assert on them directly. ``Effects.run`` carries one out: it signs messages, dials peers and
calls the registry through the ``Runtime``. The Manager runs them only after the decision's
changes are durable, never under its lock (SPEC 16).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from ..constants import PORT_HANDSHAKE, RELAY_RECENT
from ..errors import HandshakeError, RegistryError, SendError
from ..identity import b64encode
from ..messages import (
    HANDSHAKE_ACCEPT,
    HANDSHAKE_REJECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_REVOKE,
    WITHDRAWN,
    HandshakeMsg,
    handshake_challenge,
)
from ..metrics import Metrics
from ..registry.challenges import respond_challenge
from .outbox import ACCEPT, KINDS, REJECT, REVOKE, WITHDRAW

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .clock import Clock

__all__ = [
    "Backfill",
    "Effect",
    "Effects",
    "RemoveTunnelPeer",
    "ReplyAccept",
    "ReportTrust",
    "Respond",
    "RevokeAtRegistry",
    "Send",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyAccept:
    """Accept a request (SPEC 6): dial an accept back, else (or when the request was relayed)
    ``respond_handshake(accept=True)`` through the registry."""

    peer: int
    relayed: bool


@dataclass(frozen=True)
class ReportTrust:
    """``report_trust(self, peer)`` at the registry, after a trust grant."""

    peer: int


@dataclass(frozen=True)
class Respond:
    """``respond_handshake(self, peer, accept)`` at the registry (the relayed answer), with a
    rejection's ``reason``."""

    peer: int
    accept: bool
    reason: str = ""


@dataclass(frozen=True)
class Send:
    """Send a signed ``msg_type`` with ``reason`` directly to ``peer``, best effort: a failure
    is logged, never relayed."""

    peer: int
    msg_type: str
    reason: str = ""


@dataclass(frozen=True)
class RevokeAtRegistry:
    """``revoke_trust(self, peer)`` at the registry."""

    peer: int


@dataclass(frozen=True)
class Backfill:
    """Fill in the key of ``peer``'s trust record from the registry (SPEC 6)."""

    peer: int


@dataclass(frozen=True)
class RemoveTunnelPeer:
    """``runtime.remove_tunnel_peer(peer)``: the embedding application's hook."""

    peer: int


Effect = Union[
    ReplyAccept, ReportTrust, Respond, Send, RevokeAtRegistry, Backfill, RemoveTunnelPeer
]


# answered(peer, kinds, delivered): an answer effect to ``peer`` ran; see ``answer_kinds``.
Answered = Callable[[int, "tuple[str, ...]", bool], None]


def answer_kinds(effect: Effect) -> tuple[str, ...]:
    """Which answers (``outbox`` kinds) ``effect`` can deliver to its peer; () when none."""
    if isinstance(effect, Send):
        if effect.msg_type == HANDSHAKE_REVOKE:
            return (WITHDRAW,) if effect.reason == WITHDRAWN else (REVOKE,)
        return {HANDSHAKE_ACCEPT: (ACCEPT,), HANDSHAKE_REJECT: (REJECT,)}.get(effect.msg_type, ())
    if isinstance(effect, ReplyAccept):
        return (ACCEPT,)
    if isinstance(effect, Respond):
        return (ACCEPT,) if effect.accept else (REJECT, WITHDRAW)
    if isinstance(effect, RevokeAtRegistry):
        return (REVOKE,)
    return ()


class Effects:
    """Carries out effects through ``runtime``; ``backfill`` is the Manager's (it writes the
    trust store). Message timestamps come from ``clock``. ``answered`` hears whether each
    answer effect delivered its answer (the Manager's outbox keeps the undelivered)."""

    def __init__(
        self,
        runtime: Runtime,
        clock: Clock,
        backfill: Callable[[int], None],
        metrics: Metrics,
        answered: Answered | None = None,
    ) -> None:
        """Run effects for ``runtime``; messages sent count in ``metrics``."""
        self._rt = runtime
        self._answered = answered
        self._metrics = metrics
        # Optional in the Runtime protocol: without it every peer is worth a dial.
        self._can_dial: Callable[[int], bool] = getattr(runtime, "can_dial", _always)
        self._clock = clock
        self._backfill = backfill
        self._lock = threading.Lock()
        self._relayed_at: dict[int, float] = {}  # node -> monotonic time of our relayed request

    def needed(self, effect: Effect) -> bool:
        """Whether ``run(effect)`` would do anything: not when all it does is call the
        registry and there is none, nor for a reply to a peer we cannot dial with no
        registry to relay it. The Manager hands the pool only effects that are needed: a
        hand-off to a worker thread costs more than the rest of such an effect."""
        if isinstance(effect, (Send, RemoveTunnelPeer)):
            return True
        if self._rt.registry() is not None:
            return True
        return isinstance(effect, ReplyAccept) and self._direct(effect)

    def run(self, effect: Effect) -> None:
        """Carry out ``effect``. Registry calls raise ``RegistryError``; signing without an
        identity raises ``HandshakeError``."""
        kinds = answer_kinds(effect) if self._answered is not None else ()
        try:
            delivered = self._run(effect)
        except BaseException:
            if kinds and self._answered is not None:
                self._answered(effect.peer, kinds, False)
            raise
        if kinds and self._answered is not None:
            self._answered(effect.peer, kinds, delivered)

    def _run(self, effect: Effect) -> bool:
        """``run``; whether the effect got through (what it delivered, for answers)."""
        registry = self._rt.registry()
        own = self._rt.node_id()
        if not own and not isinstance(effect, (RemoveTunnelPeer, Backfill)):
            # Restarted while the registry is down: nothing can be signed as this node yet
            # (``message``); an answer stays in the outbox until it can.
            log.info("node %d not told yet: this node has no node ID yet", effect.peer)
            return False
        if isinstance(effect, ReplyAccept):
            return self._reply_accept(effect)
        if isinstance(effect, Send):
            return self.send_best_effort(effect.peer, effect.msg_type, effect.reason)
        if isinstance(effect, RemoveTunnelPeer):
            self._rt.remove_tunnel_peer(effect.peer)
        elif isinstance(effect, Backfill):
            self._backfill(effect.peer)
        elif registry is None:
            return False  # the rest talk to the registry
        elif isinstance(effect, ReportTrust):
            registry.report_trust(own, effect.peer)
        elif isinstance(effect, RevokeAtRegistry):
            registry.revoke_trust(own, effect.peer)
        else:
            return self._respond(effect.peer, effect.accept, effect.reason)
        return True

    def deliver_answer(self, peer: int, kind: str, reason: str) -> bool:
        """One more try at an answer that did not arrive (the outbox's retries): directly,
        else through the registry (a rejection with its ``reason``). Whether it got
        through."""
        if not self._rt.node_id():
            return False  # not before this node has an ID (``message``)
        if self._can_dial(peer):
            try:
                self._dial(peer, self.message(KINDS[kind], peer, reason=reason))
                return True
            except SendError as exc:
                log.debug("retrying our %s to node %d directly: %s", kind, peer, exc)
        registry = self._rt.registry()
        if registry is None:
            return False
        try:
            if kind == REVOKE:
                registry.revoke_trust(self._rt.node_id(), peer)
                return True
            accept = kind == ACCEPT
            return self._respond(peer, accept, "" if accept else reason)
        except RegistryError as exc:
            log.debug("retrying our %s to node %d through the registry: %s", kind, peer, exc)
            return False

    def message(
        self, msg_type: str, peer: int, *, justification: str = "", reason: str = ""
    ) -> HandshakeMsg:
        """A signed message to ``peer``: ``signature_v2`` only (SPEC 4). Not before this
        node has an ID (a restart while the registry is down): a message from node 0 names
        nobody, and its receiver can only drop it; an answer is kept for later instead."""
        public_key = self._rt.public_key()
        if public_key is None:
            raise HandshakeError("this node has no identity: cannot sign")
        own = self._rt.node_id()
        if not own:
            raise HandshakeError("this node has no node ID yet (the registry was not reached)")
        message = HandshakeMsg(
            type=msg_type,
            node_id=own,
            public_key=b64encode(public_key),
            justification=justification,
            reason=reason,
            timestamp=int(self._clock.time()),
        )
        message.signature_v2 = self.signature(message.v2_challenge(peer))
        return message

    def signature(self, challenge: bytes) -> str:
        """Our signature of ``challenge``, base64 (messages and registry credentials)."""
        signature = self._rt.sign(challenge)
        if signature is None:
            raise HandshakeError("this node has no identity: cannot sign")
        return b64encode(signature)

    def send_best_effort(self, peer: int, msg_type: str, reason: str) -> bool:
        """Send a signed ``msg_type`` to ``peer`` directly; a failure is logged. Whether it
        was delivered."""
        try:
            self._dial(peer, self.message(msg_type, peer, reason=reason))
        except HandshakeError as exc:
            log.info("could not send %s to node %d: %s", msg_type, peer, exc)
            return False
        return True

    def _direct(self, reply: ReplyAccept) -> bool:
        """Whether ``reply`` is worth a dial: the request came directly and the runtime may
        reach the peer. Otherwise the accept is neither built nor signed."""
        return not reply.relayed and self._can_dial(reply.peer)

    def _reply_accept(self, reply: ReplyAccept) -> bool:
        peer = reply.peer
        if self._direct(reply):
            message = self.message(HANDSHAKE_ACCEPT, peer)
            try:
                self._dial(peer, message)
                return True
            except SendError as exc:
                log.info("direct accept to node %d failed (%s); relaying", peer, exc)
        return self._respond(peer, True)

    def _respond(self, peer: int, accept: bool, reason: str = "") -> bool:
        """``respond_handshake`` through the registry, with a rejection's ``reason``; False
        without a registry."""
        registry = self._rt.registry()
        if registry is None:
            return False
        own = self._rt.node_id()
        signature = self.signature(respond_challenge(own, peer))
        registry.respond_handshake(own, peer, accept, signature, reason)
        self._metrics.relay(HANDSHAKE_ACCEPT if accept else HANDSHAKE_REJECT, "out")
        return True

    def _dial(self, peer: int, message: HandshakeMsg, *, last_try: bool = True) -> None:
        """Deliver ``message`` to the peer's port 444, counted by result; ``SendError``.
        Not ``last_try`` (the relay comes next): a failure is counted by the caller."""
        try:
            self._rt.dial_and_send(peer, PORT_HANDSHAKE, message.to_json())
        except SendError:
            if last_try:
                self._metrics.message(message.type, "failed")
            raise
        self._metrics.message(message.type, "sent")

    def deliver_request(self, peer: int, message: HandshakeMsg) -> str:
        """Send our request ``message`` to ``peer`` (SPEC 7): "sent" when delivered directly,
        "relayed" through the registry; ``SendError`` giving both reasons when both fail."""
        try:
            self._dial(peer, message, last_try=False)
            return "sent"
        except SendError as exc:
            direct = str(exc)
        relay = self._relay_request(peer, message.justification)
        if not relay:
            return "relayed"
        self._metrics.message(message.type, "failed")  # both ways
        raise SendError(f"cannot reach node {peer}: direct: {direct}; relay: {relay}")

    def _relay_request(self, peer: int, justification: str) -> str:
        """Send a request through the registry; "" on success, else why it failed."""
        registry = self._rt.registry()
        if registry is None:
            return "no registry configured"
        own = self._rt.node_id()
        signature = self.signature(handshake_challenge(own, peer))
        now = self._clock.monotonic()
        with self._lock:
            previous = self._relayed_at.get(peer)
        try:
            registry.request_handshake(own, peer, justification, signature)
            self._metrics.relay(HANDSHAKE_REQUEST, "out")
        except RegistryError as exc:
            if previous is not None and now - previous < RELAY_RECENT:
                return f"{exc} (an earlier relayed request may still be waiting for node {peer})"
            return str(exc)
        with self._lock:
            self._relayed_at[peer] = now
        return ""

    def forget_relayed(self) -> None:
        """Forget relayed requests older than ``RELAY_RECENT`` (the reaper)."""
        now = self._clock.monotonic()
        with self._lock:
            self._relayed_at = {n: t for n, t in self._relayed_at.items() if now - t < RELAY_RECENT}


def _always(peer: int) -> bool:
    return True
