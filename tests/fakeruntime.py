"""What every test that drives a Manager shares, beside ``pilothandshake.testing``'s
``MemoryRuntime`` and ``FakeClock``: ``FakeRegistry`` (``RegistryClient``, recording every
call), ``Peer`` (a remote node that signs port-444 messages), ``Nodes`` (Managers in
temporary directories) and ``seed_trust``, ``settle``, ``snapshot``; and the small helpers
every kind of test uses: ``TickClock``, ``wait_until``, ``respell``.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from typing import Any, Callable

from pilothandshake.errors import RegistryError
from pilothandshake.identity import Identity, b64encode
from pilothandshake.manager import Manager
from pilothandshake.messages import HandshakeMsg, handshake_challenge
from pilothandshake.store import (
    OutgoingRequest,
    PendingHandshake,
    TrustRecord,
    TrustState,
    encode_state,
)
from pilothandshake.testing import MemoryRuntime

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


def in_threads(work: Callable[[], None], count: int, timeout: float = 60.0) -> None:
    """Run ``work`` on ``count`` threads at once and wait for them all (each within
    ``timeout``); fail the test when one is still running."""
    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"


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
    """Builds Managers over MemoryRuntimes, each in its own directory under ``root`` (so with a
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
    ) -> tuple[Manager, MemoryRuntime]:
        """A Manager for ``node_id`` in ``directory`` (default ``root/n<node_id>``)."""
        if directory is None:
            directory = os.path.join(self.root, f"n{node_id}")
        runtime = MemoryRuntime(
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
