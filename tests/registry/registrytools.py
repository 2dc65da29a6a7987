"""What the registry's tests share: limits roomy enough for many identities from 127.0.0.1,
a node registered over the real client, a settable clock and ``Peer``, a node that signs its
calls to a ``RegistryState``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

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


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Clock:
    """Seconds that only move when a test says so: the registry's monotonic and wall clock
    both (it starts at the real time, so signed registers made now are fresh)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class Peer:
    """A registered identity and the signed requests it can make."""

    def __init__(self, registry: Registry, port: int = 4000, source: str = "127.0.0.1") -> None:
        self.registry = registry
        self.identity = Identity.generate()
        answer = registry.handle(
            {
                "type": "register",
                "listen_addr": f"127.0.0.1:{port}",
                "public_key": self.identity.public_key_b64,
            },
            source,
        )
        assert answer["type"] == "register_ok", answer
        self.node_id: int = answer["node_id"]
        self.addr = f"127.0.0.1:{port}"

    def sig(self, challenge: bytes) -> str:
        return b64encode(self.identity.sign(challenge))

    def register(
        self, stamp: int | None = None, source: str = "127.0.0.1", **fields: Any
    ) -> dict[str, Any]:
        """A ``register`` of this node's key signed by it (SPEC 17), with ``fields``."""
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
        return self.registry.handle(request, source)

    def heartbeat(self) -> dict[str, Any]:
        return self.ask(
            {
                "type": "heartbeat",
                "node_id": self.node_id,
                "signature": self.sig(heartbeat_challenge(self.node_id)),
            }
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.registry.handle(request, "127.0.0.1")

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
        return self.ask(
            {
                "type": "report_trust",
                "node_id": self.node_id,
                "peer_id": peer,
                "signature": self.sig(report_trust_challenge(self.node_id, peer)),
            }
        )

    def revoke_trust(self, peer: int) -> dict[str, Any]:
        return self.ask(
            {
                "type": "revoke_trust",
                "node_id": self.node_id,
                "peer_id": peer,
                "signature": self.sig(revoke_trust_challenge(self.node_id, peer)),
            }
        )

    def respond(self, peer: int, accept: bool) -> dict[str, Any]:
        return self.ask(
            {
                "type": "respond_handshake",
                "node_id": self.node_id,
                "peer_id": peer,
                "accept": accept,
                "signature": self.sig(respond_challenge(self.node_id, peer)),
            }
        )

    def request(self, to: int, justification: str = "hi") -> dict[str, Any]:
        return self.ask(
            {
                "type": "request_handshake",
                "from_node_id": self.node_id,
                "to_node_id": to,
                "justification": justification,
                "signature": self.sig(handshake_challenge(self.node_id, to)),
            }
        )

    def poll(self) -> dict[str, Any]:
        return self.ask(
            {
                "type": "poll_handshakes",
                "node_id": self.node_id,
                "signature": self.sig(poll_challenge(self.node_id)),
            }
        )

    def set_hostname(self, name: str) -> dict[str, Any]:
        return self.ask(
            {
                "type": "set_hostname",
                "node_id": self.node_id,
                "hostname": name,
                "signature": self.sig(set_hostname_challenge(self.node_id)),
            }
        )


# Every test node registers from 127.0.0.1: the limits themselves are tested on their own.


def refused(answer: dict[str, Any], why: str = "") -> bool:
    return answer["type"] == "error" and why in answer["error"]


def lookup(registry: Registry, node_id: int) -> dict[str, Any]:
    return registry.handle({"type": "lookup", "node_id": node_id}, "10.9.9.9")
