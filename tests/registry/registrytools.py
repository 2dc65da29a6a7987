"""What the registry's tests share: limits roomy enough for many identities from 127.0.0.1,
a node registered over the real client, and ``Peer``, a node that signs its calls to a
``Registry`` in process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.challenges import (
    heartbeat_challenge,
    poll_challenge,
    register_challenge,
    report_trust_challenge,
    resolve_challenge,
    respond_challenge,
    revoke_trust_challenge,
    set_hostname_challenge,
    set_visibility_challenge,
)
from pilothandshake.registry.client import RegistryConnection
from pilothandshake.registry.config import RegistryLimits
from pilothandshake.registry.server import RegistryServer
from pilothandshake.registry.state import Registry

ROOT = Path(__file__).resolve().parents[2]
REGISTRYD = str(ROOT / "bin" / "pilot-registryd")
# Tests register many identities from 127.0.0.1: the limits are tested on their own.
ROOMY = RegistryLimits(
    register_per_minute=100_000,
    mutations_per_minute_per_node=100_000,
    mutations_per_minute_per_source=1_000_000,
)


class Node:
    """A registered node: its identity, a client signing as it, and its ID."""

    def __init__(self, server: RegistryServer, listen_addr: str = "127.0.0.1:4000") -> None:
        self.identity = Identity.generate()
        host, port = server.address
        self.client = RegistryConnection(f"{host}:{port}", self.identity.sign, timeout=2.0)
        self.node_id: int = self.client.register(listen_addr, self.identity.public_key_b64)[
            "node_id"
        ]

    def sig(self, challenge: bytes) -> str:
        return b64encode(self.identity.sign(challenge))


class Peer:
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

    def signed(self, kind: str, challenge: bytes, **fields: Any) -> dict[str, Any]:
        """A request of ``kind`` by this node with ``fields``, signed over ``challenge``."""
        return self.ask(
            {"type": kind, "node_id": self.node_id, **fields, "signature": self.sig(challenge)}
        )

    def heartbeat(self) -> dict[str, Any]:
        return self.signed("heartbeat", heartbeat_challenge(self.node_id))

    def poll(self) -> dict[str, Any]:
        return self.signed("poll_handshakes", poll_challenge(self.node_id))

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
        return self.signed("report_trust", challenge, peer_id=peer)

    def revoke_trust(self, peer: int) -> dict[str, Any]:
        challenge = revoke_trust_challenge(self.node_id, peer)
        return self.signed("revoke_trust", challenge, peer_id=peer)

    def respond(self, peer: int, accept: bool = True, **fields: Any) -> dict[str, Any]:
        challenge = respond_challenge(self.node_id, peer)
        return self.signed("respond_handshake", challenge, peer_id=peer, accept=accept, **fields)

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
        return self.signed("set_hostname", set_hostname_challenge(self.node_id), hostname=name)

    def set_visibility(self, public: bool) -> dict[str, Any]:
        return self.signed("set_visibility", set_visibility_challenge(self.node_id), public=public)


def refused(answer: dict[str, Any], why: str = "") -> bool:
    return answer["type"] == "error" and why in answer["error"]


def lookup(registry: Registry, node_id: int) -> dict[str, Any]:
    return registry.handle({"type": "lookup", "node_id": node_id}, "10.9.9.9")
