"""Test doubles for the Manager's ports: ``FakeRuntime`` (the ``Runtime`` protocol) and
``FakeRegistry`` (``RegistryClient``), both recording every call, plus ``Peer``, a remote
node that signs port-444 messages. Shared by every test that drives a Manager; also the
small helpers every kind of test uses (``TickClock``, ``wait_until``, ``respell``).
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from typing import Any, Callable

from pilothandshake.constants import OUTGOING_TTL, PENDING_TTL
from pilothandshake.errors import RegistryError, SendError
from pilothandshake.identity import Identity, b64encode
from pilothandshake.manager import Manager
from pilothandshake.messages import HandshakeMsg, handshake_challenge
from pilothandshake.runtime import AllowlistEntry
from pilothandshake.store import (
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
    encode_state,
)

_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class TickClock:
    """Seconds (a ``clock=`` callable) that move only when a test sets ``now``; by default
    from the real time, so what is signed now is fresh by it."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Return once ``condition()`` holds; fail the test when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what or 'the condition'}"
        time.sleep(0.005)


def respell(b64: str) -> str:
    """Another base64 spelling of the same bytes: an unused low bit of the last data
    character flipped (only padded base64 has one)."""
    body = b64.rstrip("=")
    padding = b64[len(body) :]
    assert padding, "only padded base64 has unused bits"
    respelled = body[:-1] + _B64_ALPHABET[_B64_ALPHABET.index(body[-1]) ^ 1] + padding
    assert respelled != b64 and base64.b64decode(respelled) == base64.b64decode(b64)
    return respelled


class FakeRegistry:
    """An in-memory registry: ``keys`` (node -> base64 key) and ``networks`` (node -> ids)
    answer ``lookup``; every call is appended to ``calls`` as ``(method, args...)``.

    ``fail`` holds method names that raise ``RegistryError``; ``lookup_errors`` node IDs whose
    lookup raises; ``lookup_answers`` per-node queues of keys to answer in turn (re-ask tests).
    """

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}
        self.networks: dict[int, list[int]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[str] = set()
        self.lookup_errors: set[int] = set()
        self.lookup_answers: dict[int, list[str]] = {}
        self.requests: list[dict[str, Any]] = []  # for poll_handshakes
        self.responses: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.called = threading.Condition(self._lock)

    def _record(self, method: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((method, *args))
            self.called.notify_all()
            failing = method in self.fail
        if failing:
            raise RegistryError("request failed")

    def calls_of(self, method: str) -> list[tuple[Any, ...]]:
        """The recorded calls of ``method`` (without the name)."""
        with self._lock:
            return [call[1:] for call in self.calls if call[0] == method]

    def wait_for_call(self, method: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``method`` was called ``count`` times."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(1 for call in self.calls if call[0] == method) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.called.wait(remaining)
        return True

    def lookup(self, node_id: int) -> dict[str, Any]:
        """``lookup_ok`` with the configured key and networks (always including 0)."""
        self._record("lookup", node_id)
        if node_id in self.lookup_errors:
            raise RegistryError("request failed")
        with self._lock:
            queued = self.lookup_answers.get(node_id)
            key = queued.pop(0) if queued else self.keys.get(node_id, "")
        return {
            "type": "lookup_ok",
            "node_id": node_id,
            "public_key": key,
            "networks": [0, *self.networks.get(node_id, [])],
            "public": False,
        }

    def report_trust(self, node_id: int, peer_id: int) -> dict[str, Any]:
        """Record; ``report_trust_ok``."""
        self._record("report_trust", node_id, peer_id)
        return {"type": "report_trust_ok"}

    def revoke_trust(self, node_id: int, peer_id: int) -> dict[str, Any]:
        """Record; ``revoke_trust_ok``."""
        self._record("revoke_trust", node_id, peer_id)
        return {"type": "revoke_trust_ok"}

    def request_handshake(
        self, from_node_id: int, to_node_id: int, justification: str, signature_b64: str
    ) -> dict[str, Any]:
        """Record; ``request_handshake_ok``."""
        self._record("request_handshake", from_node_id, to_node_id, justification, signature_b64)
        return {"type": "request_handshake_ok", "status": "pending"}

    def respond_handshake(
        self, node_id: int, peer_id: int, accept: bool, signature_b64: str, reason: str = ""
    ) -> dict[str, Any]:
        """Record (``reason`` only when not empty); ``respond_handshake_ok``."""
        extra = (reason,) if reason else ()
        self._record("respond_handshake", node_id, peer_id, accept, signature_b64, *extra)
        return {"type": "respond_handshake_ok"}

    def poll_handshakes(self, node_id: int) -> dict[str, Any]:
        """Record; drain ``requests`` and ``responses``."""
        self._record("poll_handshakes", node_id)
        with self._lock:
            requests, self.requests = self.requests, []
            responses, self.responses = self.responses, []
        return {"type": "poll_handshakes_ok", "requests": requests, "responses": responses}


class FakeClock:
    """A Manager clock (``clock=``) that moves only when told to: ``advance(seconds)`` ages
    caches, cooldowns and windows. Wall time starts at the real time, so messages signed now
    are inside the timestamp window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall = time.time()
        self._monotonic = 1_000.0

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def time(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks ``seconds`` forward."""
        with self._lock:
            self._wall += seconds
            self._monotonic += seconds


class _Listener:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeRuntime:
    """A ``Runtime`` whose settings are plain attributes and whose effects are recorded.

    ``directory`` ("" = memory only) holds identity.json's path, hence trust.json.
    ``sent`` records ``(peer, port, data)`` of every ``dial_and_send``; the send fails with
    ``SendError`` when ``dial_fails`` is True or holds the peer. ``deliver(peer, data)``, when
    set, is called for each successful send (to wire Managers together); ``on_dial`` is
    called first on every send (to provoke re-entrancy). ``events`` records
    ``(topic, payload)``; ``removed`` the ``remove_tunnel_peer`` calls; ``handler`` is what
    ``port_listener`` was given.
    """

    def __init__(
        self,
        node_id: int = 1,
        directory: str = "",
        *,
        strict: bool = True,
        auto_approve: bool = False,
        registry: FakeRegistry | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.own_id = node_id
        self.directory = directory
        self.identity = identity or Identity.generate()
        self.strict = strict
        self.auto_approve = auto_approve
        self.outgoing_ttl = OUTGOING_TTL
        self.pending_ttl = PENDING_TTL
        self.allowlist: dict[int, AllowlistEntry] = {}
        self.deny: set[int] = set()
        self.registry_client = registry
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[tuple[int, int, bytes]] = []
        self.removed: list[int] = []
        self.dial_fails: bool | set[int] = False
        self.deliver: Callable[[int, bytes], None] | None = None
        self.on_dial: Callable[[int], None] | None = None
        self.handler: Callable[[socket.socket], None] | None = None
        self.listener: _Listener | None = None
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    # Runtime protocol

    def node_id(self) -> int:
        return self.own_id

    def public_key(self) -> bytes | None:
        return self.identity.public_key

    def sign(self, msg: bytes) -> bytes | None:
        return self.identity.sign(msg)

    def identity_path(self) -> str:
        return os.path.join(self.directory, "identity.json") if self.directory else ""

    def trust_auto_approve(self) -> bool:
        return self.auto_approve

    def trusted_agent(self, node_id: int) -> AllowlistEntry | None:
        return self.allowlist.get(node_id)

    def trust_strict(self) -> bool:
        return self.strict

    def trust_outgoing_ttl(self) -> float:
        return self.outgoing_ttl

    def trust_pending_ttl(self) -> float:
        return self.pending_ttl

    def is_denied(self, node_id: int) -> bool:
        return node_id in self.deny

    def publish_event(self, topic: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((topic, payload))
            self.changed.notify_all()

    def port_listener(self, port: int, handler: Callable[[socket.socket], None]) -> _Listener:
        self.handler = handler
        self.listener = _Listener()
        return self.listener

    def dial_and_send(self, peer_node_id: int, port: int, data: bytes) -> None:
        if self.on_dial is not None:
            self.on_dial(peer_node_id)
        with self._lock:
            self.sent.append((peer_node_id, port, data))
            self.changed.notify_all()
            fails = self.dial_fails
        if fails is True or (isinstance(fails, set) and peer_node_id in fails):
            raise SendError(f"connect to node {peer_node_id} refused")
        if self.deliver is not None:
            self.deliver(peer_node_id, data)

    def remove_tunnel_peer(self, node_id: int) -> None:
        with self._lock:
            self.removed.append(node_id)

    def registry(self) -> FakeRegistry | None:
        return self.registry_client

    # Helpers for tests

    def topics(self) -> list[str]:
        """The topics published so far, in order."""
        with self._lock:
            return [topic for topic, _ in self.events]

    def sent_messages(self) -> list[tuple[int, HandshakeMsg]]:
        """Every sent message decoded, with its peer."""
        with self._lock:
            sent = list(self.sent)
        return [(peer, HandshakeMsg.from_json(data)) for peer, _, data in sent]

    def wait_for_sent(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` sends were attempted."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.sent) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
        return True


class Peer:
    """A remote node with its own identity that builds signed port-444 messages."""

    def __init__(self, node_id: int, identity: Identity | None = None) -> None:
        self.node_id = node_id
        self.identity = identity or Identity.generate()

    @property
    def key(self) -> str:
        """Its public key, base64."""
        return self.identity.public_key_b64

    def message(
        self,
        msg_type: str,
        to: int,
        *,
        justification: str = "",
        reason: str = "",
        timestamp: int | None = None,
        v2: bool = True,
        legacy: bool = False,
        public_key: str | None = None,
    ) -> HandshakeMsg:
        """A message from this peer to ``to``: ``signature_v2`` when ``v2``, the Go-style
        ``signature`` over ``handshake:<S>:<R>`` when ``legacy``."""
        msg = HandshakeMsg(
            type=msg_type,
            node_id=self.node_id,
            public_key=self.key if public_key is None else public_key,
            justification=justification,
            reason=reason,
            timestamp=int(time.time()) if timestamp is None else timestamp,
        )
        if legacy:
            msg.signature = b64encode(self.identity.sign(handshake_challenge(self.node_id, to)))
        if v2:
            msg.signature_v2 = b64encode(self.identity.sign(msg.v2_challenge(to)))
        return msg

    def data(self, msg_type: str, to: int, **kwargs: Any) -> bytes:
        """``message(...)`` encoded."""
        return self.message(msg_type, to, **kwargs).to_json()


def seed_trust(
    directory: str,
    *,
    trusted: tuple[TrustRecord, ...] = (),
    pending: tuple[PendingHandshake, ...] = (),
    outgoing: tuple[OutgoingRequest, ...] = (),
) -> None:
    """Write trust.json in ``directory`` before a Manager opens it."""
    state = TrustState(
        {r.node_id: r for r in trusted},
        {p.node_id: p for p in pending},
        {o.node_id: o for o in outgoing},
    )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "trust.json"), "wb") as out:
        out.write(encode_state(state))


def settle(manager: Manager, timeout: float = 5.0) -> None:
    """Wait until the Manager's background work (replies, registry calls) has run."""
    assert manager.drain(timeout), "background work did not finish"


def snapshot(manager: Manager) -> tuple[Any, ...]:
    """Everything a reader can see, to compare before and after a drop."""
    outgoing = {request.node_id: request for request in manager.outgoing_requests()}
    return (manager.trusted_peers(), manager.pending_requests(), outgoing)


class Nodes:
    """Builds Managers over FakeRuntimes, each in its own directory under ``root`` (so with a
    real trust.json), and stops them all at ``close()``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.managers: list[Manager] = []

    def make(
        self,
        node_id: int = 1,
        *,
        directory: str | None = None,
        registry: FakeRegistry | None = None,
        strict: bool = True,
        auto_approve: bool = False,
        identity: Identity | None = None,
        **manager_kwargs: Any,
    ) -> tuple[Manager, FakeRuntime]:
        """A Manager for ``node_id`` in ``directory`` (default ``root/n<node_id>``)."""
        if directory is None:
            directory = os.path.join(self.root, f"n{node_id}")
        runtime = FakeRuntime(
            node_id,
            directory,
            strict=strict,
            auto_approve=auto_approve,
            registry=registry,
            identity=identity,
        )
        manager = Manager(runtime, **manager_kwargs)
        self.managers.append(manager)
        return manager, runtime

    def close(self) -> None:
        """Stop and close every Manager made."""
        for manager in self.managers:
            manager.stop()
            manager.close()
