"""Everything before a decision, outside the lock: SPEC 5 steps 1-4 for port-444 messages,
the same checks for relayed input, and the registry answers a request decision needs.

``Intake`` reads the working state only under the Manager's lock, and briefly; registry
calls and signature checks happen without it (SPEC 16). What it hands on is an
``Inbound`` (and, for requests, a ``Context``); the decision re-checks the pin on the live
state.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..constants import MAX_CLOCK_SKEW, MAX_MESSAGE_AGE
from ..drops import Drop, DropKind
from ..errors import MessageError
from ..identity import decode_key
from ..messages import HANDSHAKE_REQUEST, HandshakeMsg, truncate_utf8
from ..metrics import Metrics
from ..runtime import RegistryClient, Runtime, is_own_node
from ..wire import Peer, peer_text
from .auth import Pin, PinKind, authenticate, pin_of, pin_problem
from .binding import SIDE_TABLE_LIMIT, Binding, answer_key, answer_networks
from .clock import Clock
from .decide import Context, Inbound
from .droplog import DropLog, quote
from .queue import RELAY, QueueLimits
from .replay import ReplaySet
from .state import State

if TYPE_CHECKING:
    # Intake and Reconcile share a floor (docs/DESIGN.md): the Manager hands Intake its own.
    from .reconcile import Reconcile

__all__ = ["RELAY", "Intake"]

log = logging.getLogger(__name__)

# A request arriving again by the other path (direct / relay) within this is a duplicate.
_DUPLICATE_WINDOW = MAX_MESSAGE_AGE


def _fingerprint(inbound: Inbound) -> tuple[int, bytes, bytes]:
    # A duplicate is the same node, key and text (SPEC 3; only requests are claimed, so the
    # type is the same too): an impostor's request with the real node's text must not make
    # the real node's request a duplicate.
    text = hashlib.sha256(inbound.text.encode("utf-8")).digest()
    return inbound.node_id, inbound.key or b"", text


class Intake:
    """Turns received input into ``Inbound``s, or drops it (logged by ``drops``).

    Shares the Manager's ``state`` (its lock and working state) and ``binding``; ``replay``
    is used under the lock. A lookup is checked against the node's trust record by
    ``reconcile``, which marks a record the registry contradicts.
    """

    def __init__(
        self,
        runtime: Runtime,
        clock: Clock,
        state: State,
        drops: DropLog,
        replay: ReplaySet,
        limits: QueueLimits,
        metrics: Metrics,
        binding: Binding,
        reconcile: Reconcile,
    ) -> None:
        """Gather for the Manager that owns these; received messages count in ``metrics``."""
        self._rt = runtime
        self._metrics = metrics
        self._clock = clock
        self._state = state
        self._lock = state.lock
        self._drops = drops
        self._replay = replay
        self._limits = limits
        self._binding = binding
        self._reconcile = reconcile
        # Requests decided lately: (node, key, SHA-256 of the text) -> (relayed, monotonic
        # time).
        self._recent: OrderedDict[tuple[int, bytes, bytes], tuple[bool, float]] = OrderedDict()

    def claim(self, inbound: Inbound) -> tuple[bool, float] | None:
        """Claim this request for deciding; None when it is a duplicate: decided lately after
        arriving by the other path (direct or relayed), so it changes nothing and publishes
        nothing again. Checked and claimed in one step: after a SIGSTOP both copies arrive
        at once. Returns the claim, for ``release``."""
        fingerprint = _fingerprint(inbound)
        mark = (inbound.relayed, self._clock.monotonic())
        with self._lock:
            seen = self._recent.get(fingerprint)
            other_path = seen is not None and seen[0] != inbound.relayed
            if other_path and seen is not None and mark[1] - seen[1] < _DUPLICATE_WINDOW:
                return None
            self._recent[fingerprint] = mark
            self._recent.move_to_end(fingerprint)
            while len(self._recent) > SIDE_TABLE_LIMIT:
                self._recent.popitem(last=False)
        return mark

    def release(self, inbound: Inbound, mark: tuple[bool, float]) -> None:
        """Give up the claim ``mark`` of a request that was dropped: a copy by the other path
        is then decided on its own."""
        fingerprint = _fingerprint(inbound)
        with self._lock:
            if self._recent.get(fingerprint) == mark:
                del self._recent[fingerprint]

    def message(self, data: bytes, peer: Peer) -> tuple[str, Inbound] | None:
        """SPEC 5 steps 1-4 for a port-444 message from ``peer``: its type and origin, or
        None when it was dropped."""
        remote = peer_text(peer)
        try:
            msg = HandshakeMsg.from_json(data)
        except MessageError as exc:
            self._drops.drop(None, remote, exc.drop)
            return None
        self._metrics.message(msg.type, "received")
        node = msg.node_id
        if self.refused(node, remote):
            return None
        now = self._clock.time()
        if not now - MAX_MESSAGE_AGE <= msg.timestamp <= now + MAX_CLOCK_SKEW:
            stale = f"timestamp {quote(msg.timestamp)} outside the window"
            self._drops.drop(node, remote, Drop(DropKind.STALE, stale))
            return None
        strict = self._rt.trust_strict()
        authenticated = authenticate(msg, self._rt.node_id(), strict)
        if isinstance(authenticated, Drop):
            self._drops.drop(node, remote, authenticated)
            return None
        key = authenticated.key
        pin = self.pin(node)
        registry = self._rt.registry()
        bound: bool | Drop = False
        answer: dict[str, Any] | None = None
        checked = False
        if pin_problem(pin, key, strict) and pin.kind is PinKind.TRUSTED and registry is not None:
            # The registry may now bind this node ID to this key: then the trust record is in
            # conflict (issue 11 item 7): its key still authenticates its peer, and this
            # registry-bound key may wait as KEY CHANGED (SPEC 17).
            answer, bound = self._bind(registry, node, key)
            checked = True
            pin = self.pin(node)
        problem = pin_problem(pin, key, strict)
        if problem:
            self._drops.drop(node, remote, problem)
            return None
        if registry is not None and not checked:
            if self._agent_pinned(node, key):
                bound = True  # the operator's pin stands in for the registry's binding
            else:
                answer, bound = self._bind(registry, node, key)
        if isinstance(bound, Drop) and pin.kind is not None and pin.kind.record and key == pin.key:
            # A trust record's own key always authenticates its peer, whatever key the
            # registry now binds to the node ID (SPEC 5 step 3, round 3): not bound, and the
            # record is in conflict, which the decision sees.
            bound = False
        if isinstance(bound, Drop):
            self._drops.drop(node, remote, bound)
            return None
        if authenticated.go_style and not bound:
            # The Go signature never changes between messages from S to R: only a key the
            # registry vouches for may use it (SPEC 8).
            go_style = "Go-style signature without a registry-bound key"
            self._drops.drop(node, remote, Drop(DropKind.SIGNATURE, go_style))
            return None
        problem = pin_problem(pin, key, strict, bound)
        if problem:
            self._drops.drop(node, remote, problem)
            return None
        text = msg.justification if msg.type == HANDSHAKE_REQUEST else msg.reason
        inbound = Inbound(
            node_id=node,
            key=key,
            bound=bound,
            pin=pin.matched_by(key),
            source=peer[0],
            remote=remote,
            text=truncate_utf8(text),
            registry_key=answer_key(answer),
            networks=answer_networks(answer),
        )
        digest = hashlib.sha256(authenticated.material).digest()
        expires = msg.timestamp + MAX_MESSAGE_AGE
        privileged = bound or inbound.pinned
        with self._lock:
            replayed = self._replay.add(digest, inbound.source, expires, now, privileged)
        if replayed is not None:
            self._drops.drop(node, remote, replayed)
            return None
        return msg.type, inbound

    def relayed(
        self, node: int, public_key: str = "", text: str = "", *, request: bool = False
    ) -> Inbound | None:
        """Relayed input from ``node`` (it counts as registry-bound: the registry checked its
        signature); None when dropped. A ``request`` carries ``public_key`` (maybe "") and
        is looked up at the registry; relayed answers carry no key."""
        if self.refused(node, RELAY):
            return None
        carried = decode_key(public_key) if public_key else None
        if public_key and carried is None:
            invalid = Drop(DropKind.SIGNATURE, "relayed public_key is not a valid key")
            self._drops.drop(node, RELAY, invalid)
            return None
        answer = None
        registry = self._rt.registry()
        if registry is not None and request:
            answer = self._reconcile.checked(registry, node, carried).answer
        registry_key = answer_key(answer)
        key = carried if carried is not None else registry_key
        pin = self.pin(node)
        problem = pin_problem(pin, key, self._rt.trust_strict(), bound=True)
        if problem:
            self._drops.drop(node, RELAY, problem)
            return None
        return Inbound(
            node_id=node,
            key=key,
            bound=True,
            pin=pin.matched_by(key),
            relayed=True,
            source=RELAY,
            remote=RELAY,
            text=truncate_utf8(text),
            registry_key=registry_key,
            networks=answer_networks(answer),
        )

    def _agent_pinned(self, node: int, key: bytes) -> bool:
        """Whether ``key`` is the key the allowlist pins for ``node``. The operator's key
        binds then, as the registry's would (SPEC 6 row 4 treats the two alike), so the
        registry is not asked: a hung registry must not hold back the message's receipt
        past the sender's grace (SPEC 3)."""
        agent = self._rt.trusted_agent(node)
        return agent is not None and bool(agent.public_key) and decode_key(agent.public_key) == key

    def refused(self, node: int, remote: str) -> bool:
        """SPEC 5 step 1: input claiming our own node ID, or from a denied node, is dropped."""
        if is_own_node(node, self._rt.node_id()):
            own = Drop(DropKind.OWN_NODE_ID, "message claims our own node ID")
            self._drops.drop(node, remote, own)
            return True
        if self._rt.is_denied(node):
            # The operator asked for this drop: not a warning sign.
            denied = Drop(DropKind.DENIED, "node is on the deny list")
            self._drops.drop(node, remote, denied, logging.INFO)
            return True
        return False

    def pin(self, node: int) -> Pin:
        """The pin of ``node`` in the working state now."""
        with self._lock:
            view = self._state.view()
            return pin_of(view.state.trusted, view.state.pending, view.conflicts, node)

    def _bind(
        self, registry: RegistryClient, node: int, key: bytes
    ) -> tuple[dict[str, Any] | None, bool | Drop]:
        """The lookup answer and whether ``key`` is registry-bound, or the drop."""
        checked = self._reconcile.checked(registry, node, key)
        return checked.answer, checked.bound(key)

    def request_context(self, inbound: Inbound) -> Context:
        """What a request decision needs from the runtime and the registry: the sender's
        allowlist entry as it is (row 4 is decided on it) and the first network we share."""
        registry = self._rt.registry()
        network = 0
        own = self._rt.node_id()
        if registry is not None and inbound.networks and own != 0:
            ours = answer_networks(self._binding.lookup(registry, own))
            shared = [n for n in ours if n in inbound.networks]
            network = shared[0] if shared else 0
        return Context(
            strict=self._rt.trust_strict(),
            has_registry=registry is not None,
            auto_approve=self._rt.trust_auto_approve(),
            agent=self._rt.trusted_agent(inbound.node_id),
            network=network,
            limits=self._limits,
        )

    def answer_context(self) -> Context:
        """What an accept, reject or revoke decision needs from the runtime."""
        return Context(
            strict=self._rt.trust_strict(),
            has_registry=self._rt.registry() is not None,
            limits=self._limits,
        )
