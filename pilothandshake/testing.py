"""Test doubles for code that drives a ``Manager``: ``MemoryRuntime``, a ``Runtime`` held in
memory that records every effect, and ``FakeClock``, a Manager clock that moves only when
told to.

The package's own tests, its benchmarks and its fuzz harness use these; so can an
application that embeds a ``Manager`` and wants to test its own code around it without
sockets, a registry or waiting::

    from pilothandshake.manager import Manager
    from pilothandshake.testing import FakeClock, MemoryRuntime

    clock = FakeClock()
    runtime = MemoryRuntime(7, "/tmp/node7")  # trust.json in /tmp/node7
    manager = Manager(runtime, clock=clock)
    ...
    clock.advance(3600)  # an hour later, for every cache, cooldown and window

Nothing here opens a socket or starts a thread.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable

from .constants import OUTGOING_TTL, PENDING_TTL
from .errors import SendError
from .identity import Identity
from .messages import HandshakeMsg
from .runtime import AllowlistEntry, RegistryClient

__all__ = ["FakeClock", "MemoryRuntime"]


class FakeClock:
    """A Manager clock (``Manager(..., clock=)``) that moves only when told to:
    ``advance(seconds)`` ages caches, cooldowns and windows. Wall time starts at the real
    time, so messages signed now are inside the timestamp window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall = time.time()
        self._monotonic = 1_000.0

    def monotonic(self) -> float:
        """Monotonic seconds: 1000 at the start, then moved by ``advance`` only."""
        with self._lock:
            return self._monotonic

    def time(self) -> float:
        """Wall seconds since the epoch: the real time at the start, then moved by
        ``advance`` only."""
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks ``seconds`` forward."""
        with self._lock:
            self._wall += seconds
            self._monotonic += seconds


class _Listener:
    """What ``MemoryRuntime.port_listener`` returns: remembers that it was closed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        """Mark it closed."""
        self.closed = True


class MemoryRuntime:
    """A ``Runtime`` whose settings are plain attributes and whose effects are recorded.

    ``directory`` ("" = memory only) holds identity.json's path, hence trust.json.
    ``sent`` records ``(peer, port, data)`` of every ``dial_and_send``; the send fails with
    ``SendError`` when ``dial_fails`` is True or holds the peer. ``dialable`` is what
    ``can_dial`` answers for every peer (False: replies go through the registry at once,
    as a daemon does for a peer it has no address for). ``deliver(peer, data)``, when set,
    is called for each successful send (to wire Managers together); ``on_dial`` is called
    first on every send (to provoke re-entrancy). ``events`` records ``(topic, payload)``;
    ``removed`` the ``remove_tunnel_peer`` calls; ``handler`` is what ``port_listener`` was
    given. ``changed`` is notified on every event and send.
    """

    def __init__(
        self,
        node_id: int = 1,
        directory: str = "",
        *,
        strict: bool = True,
        auto_approve: bool = False,
        registry: RegistryClient | None = None,
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
        self.dialable = True
        self.deliver: Callable[[int, bytes], None] | None = None
        self.on_dial: Callable[[int], None] | None = None
        self.handler: Callable[[socket.socket], None] | None = None
        self.listener: _Listener | None = None
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    # The Runtime protocol

    def node_id(self) -> int:
        """``node_id`` as given."""
        return self.own_id

    def public_key(self) -> bytes | None:
        """The identity's public key."""
        return self.identity.public_key

    def sign(self, msg: bytes) -> bytes | None:
        """Sign with the identity."""
        return self.identity.sign(msg)

    def identity_path(self) -> str:
        """``directory/identity.json``, or "" (memory only) without a directory."""
        return os.path.join(self.directory, "identity.json") if self.directory else ""

    def trust_auto_approve(self) -> bool:
        """The ``auto_approve`` attribute."""
        return self.auto_approve

    def trusted_agent(self, node_id: int) -> AllowlistEntry | None:
        """The entry of ``node_id`` in the ``allowlist`` attribute."""
        return self.allowlist.get(node_id)

    def trust_strict(self) -> bool:
        """The ``strict`` attribute."""
        return self.strict

    def trust_outgoing_ttl(self) -> float:
        """The ``outgoing_ttl`` attribute (default ``OUTGOING_TTL``)."""
        return self.outgoing_ttl

    def trust_pending_ttl(self) -> float:
        """The ``pending_ttl`` attribute (default ``PENDING_TTL``)."""
        return self.pending_ttl

    def is_denied(self, node_id: int) -> bool:
        """Whether ``node_id`` is in the ``deny`` attribute."""
        return node_id in self.deny

    def publish_event(self, topic: str, payload: dict[str, Any]) -> None:
        """Record ``(topic, payload)`` in ``events``."""
        with self._lock:
            self.events.append((topic, payload))
            self.changed.notify_all()

    def port_listener(self, port: int, handler: Callable[[socket.socket], None]) -> _Listener:
        """Keep ``handler`` (a test can hand it a socket); nothing is bound."""
        self.handler = handler
        self.listener = _Listener()
        return self.listener

    def can_dial(self, node_id: int) -> bool:
        """The ``dialable`` attribute, for every node."""
        return self.dialable

    def dial_and_send(self, peer_node_id: int, port: int, data: bytes) -> None:
        """Record the send in ``sent``; raise ``SendError`` as ``dial_fails`` says, else
        hand ``data`` to ``deliver``."""
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
        """Record ``node_id`` in ``removed``."""
        with self._lock:
            self.removed.append(node_id)

    def registry(self) -> RegistryClient | None:
        """The registry given (None: no registry)."""
        return self.registry_client

    # What a test reads

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
        """Wait until ``count`` sends were attempted; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.sent) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
        return True
