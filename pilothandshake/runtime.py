"""The narrow ports between the Manager and the world: ``Runtime`` and ``RegistryClient``.

The Manager (the state machine) touches sockets, the registry and the event stream only
through these protocols (SPEC section 9), so it can be driven by a fake runtime in tests
and by ``DaemonRuntime`` in the daemon. They map the Go package's ``Runtime`` and
``RegistryClient`` interfaces one to one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Protocol


def is_own_node(node_id: int, own_node_id: int) -> bool:
    """Whether ``node_id`` is this node's own ID ``own_node_id`` (``Runtime.node_id()``);
    before that is known (0) no node is. The one check of "a node cannot ask, trust, untrust
    or hear from itself" (SPEC 5 step 1, 7, 13)."""
    return own_node_id != 0 and node_id == own_node_id


@dataclass(frozen=True)
class AllowlistEntry:
    """A trusted agent from config ``trust.allowlist``.

    ``public_key`` is standard base64 of the pinned Ed25519 key, or "" when not pinned.
    """

    node_id: int
    name: str
    public_key: str = ""


class Closeable(Protocol):
    """Something that stops when closed (a port listener)."""

    def close(self) -> None: ...


class RegistryClient(Protocol):
    """What the Manager asks of the registry. Each call returns the response dict or raises
    ``RegistryError``. The client signs ``report_trust``, ``revoke_trust`` and
    ``poll_handshakes`` itself; the two handshake calls take the caller's signature."""

    def lookup(self, node_id: int) -> dict[str, Any]: ...

    def report_trust(self, node_id: int, peer_id: int) -> dict[str, Any]: ...

    def revoke_trust(self, node_id: int, peer_id: int) -> dict[str, Any]: ...

    def request_handshake(
        self, from_node_id: int, to_node_id: int, justification: str, signature_b64: str
    ) -> dict[str, Any]: ...

    def respond_handshake(
        self, node_id: int, peer_id: int, accept: bool, signature_b64: str, reason: str = ""
    ) -> dict[str, Any]: ...

    def poll_handshakes(self, node_id: int) -> dict[str, Any]: ...


class Runtime(Protocol):
    """What the core needs from its host, nothing more (SPEC section 9).

    One more method is optional (the Manager looks it up with ``getattr``, so a runtime
    without it keeps working): ``can_dial(node_id) -> bool``, whether ``dial_and_send``
    may reach that node, answered without network I/O. When it says False the Manager
    neither builds nor signs a direct accept: it answers through the registry at once.
    """

    def node_id(self) -> int:
        """This node's ID; 0 until known (before registration)."""
        ...

    def public_key(self) -> bytes | None:
        """The raw 32-byte Ed25519 public key, or None without an identity."""
        ...

    def sign(self, msg: bytes) -> bytes | None:
        """The 64-byte Ed25519 signature of ``msg``, or None without an identity."""
        ...

    def identity_path(self) -> str:
        """Path of the identity file; "" means in-memory only (no trust.json)."""
        ...

    def trust_auto_approve(self) -> bool: ...

    def trusted_agent(self, node_id: int) -> AllowlistEntry | None: ...

    def trust_strict(self) -> bool: ...

    def trust_outgoing_ttl(self) -> float: ...

    def trust_pending_ttl(self) -> float:
        """Seconds a pending request is kept (config ``trust.pending_ttl``)."""
        ...

    def is_denied(self, node_id: int) -> bool: ...

    def publish_event(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish an event; never blocks."""
        ...

    def port_listener(self, port: int, handler: Callable[[socket.socket], None]) -> Closeable:
        """Bind ``port``; call ``handler(conn)`` on a worker thread per accepted connection.
        The handler reads the one message, processes it and closes ``conn``."""
        ...

    def dial_and_send(self, peer_node_id: int, port: int, data: bytes) -> None:
        """Deliver ``data`` to the peer's ``port``; raises ``SendError``."""
        ...

    def remove_tunnel_peer(self, node_id: int) -> None: ...

    def registry(self) -> RegistryClient | None: ...
