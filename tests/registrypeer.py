"""The embedded registry's side of the tests: ``RegistryPeer``, a registered identity that
sends ``Registry.handle`` the signed requests a node makes, and ``ROOMY``, limits that let a
test register and mutate from one address as often as it likes (the limits themselves are
tested on their own)."""

from __future__ import annotations

import time
from typing import Any

from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import (
    handshake_challenge,
    heartbeat_challenge,
    poll_challenge,
    register_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
    set_hostname_challenge,
)
from pilothandshake.registry.config import Limits
from pilothandshake.registry.state import Registry

ROOMY = Limits(
    register_per_minute=100_000,
    mutations_per_minute_per_node=100_000,
    mutations_per_minute_per_source=1_000_000,
)


class RegistryPeer:
    """An identity registered (unsigned, as a new key) at ``source:port``, asking from
    ``source``, and the signed requests it makes."""

    def __init__(self, registry: Registry, port: int = 4000, source: str = "127.0.0.1") -> None:
        self.registry = registry
        self.source = source
        self.identity = Identity.generate()
        self.addr = f"{source}:{port}"
        answer = registry.handle(
            {
                "type": "register",
                "listen_addr": self.addr,
                "public_key": self.identity.public_key_b64,
            },
            source,
        )
        assert answer["type"] == "register_ok", answer
        self.node_id: int = answer["node_id"]

    def sig(self, challenge: bytes) -> str:
        return b64encode(self.identity.sign(challenge))

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.registry.handle(request, self.source)

    def register(
        self, stamp: int | None = None, source: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A ``register`` of this node's key signed by it (SPEC 17), with ``fields``, from
        ``source`` (its own by default)."""
        stamp = int(time.time()) if stamp is None else stamp
        key = self.identity.public_key_b64
        request = {
            "type": "register",
            "listen_addr": self.addr,
            "public_key": key,
            "timestamp": stamp,
            "signature": self.sig(register_challenge(key, stamp)),
            **fields,
        }
        return self.registry.handle(request, self.source if source is None else source)

    def heartbeat(self) -> dict[str, Any]:
        return self._signed("heartbeat", heartbeat_challenge(self.node_id))

    def poll(self) -> dict[str, Any]:
        return self._signed("poll_handshakes", poll_challenge(self.node_id))

    def resolve(self, target: int) -> dict[str, Any]:
        return self.ask(
            {
                "type": "resolve",
                "node_id": target,
                "requester_id": self.node_id,
                "signature": self.sig(resolve_challenge(self.node_id, target)),
            }
        )

    def report_trust(self, peer: int) -> dict[str, Any]:
        challenge = report_trust_challenge(self.node_id, peer)
        return self._signed("report_trust", challenge, peer_id=peer)

    def revoke_trust(self, peer: int) -> dict[str, Any]:
        challenge = revoke_trust_challenge(self.node_id, peer)
        return self._signed("revoke_trust", challenge, peer_id=peer)

    def respond(self, peer: int, accept: bool = True, **fields: Any) -> dict[str, Any]:
        challenge = respond_challenge(self.node_id, peer)
        return self._signed("respond_handshake", challenge, peer_id=peer, accept=accept, **fields)

    def request(self, to: int, justification: str = "let me in") -> dict[str, Any]:
        return self.ask(
            {
                "type": "request_handshake",
                "from_node_id": self.node_id,
                "to_node_id": to,
                "justification": justification,
                "signature": self.sig(handshake_challenge(self.node_id, to)),
            }
        )

    def set_hostname(self, name: str) -> dict[str, Any]:
        challenge = set_hostname_challenge(self.node_id)
        return self._signed("set_hostname", challenge, hostname=name)

    def _signed(self, kind: str, challenge: bytes, **fields: Any) -> dict[str, Any]:
        """A request of ``kind`` by this node with ``fields``, signed over ``challenge``."""
        return self.ask(
            {"type": kind, "node_id": self.node_id, **fields, "signature": self.sig(challenge)}
        )
