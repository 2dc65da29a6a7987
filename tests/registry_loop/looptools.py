"""What the registry loop's tests share: a fake registry that records every call, and the
Manager side (``Target``) that records what the loop hands it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pytest

from pilothandshake.errors import RegistryError
from pilothandshake.store import OutgoingRequest

WAIT = 5.0


class FakeRegistry:
    """Records every call; ``down`` makes every call fail; ``inbox`` is drained by polls."""

    address = "127.0.0.1:9"

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[str, float]] = []
        self.down = False
        self.next_id = 5
        self.requests: list[Any] = []
        self.responses: list[Any] = []
        self.features: list[str] = []
        self.registered: list[dict[str, Any]] = []  # what each register asked
        self.record: dict[str, Any] = {}  # lookup's answer for the node (set by register)
        self.relayed: list[tuple[int, int, str, str]] = []  # request_handshake calls

    def _call(self, name: str) -> None:
        with self.cond:
            self.calls.append((name, time.monotonic()))
            self.cond.notify_all()
            if self.down:
                raise RegistryError("connection refused")

    def count(self, name: str) -> int:
        with self.cond:
            return sum(1 for n, _ in self.calls if n == name)

    def wait_for(self, predicate: Callable[[], bool]) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, WAIT)

    def register(
        self, listen_addr: str, public_key_b64: str, owner: str = "", hostname: str = ""
    ) -> dict[str, Any]:
        self._call("register")
        with self.cond:
            self.registered.append({"listen_addr": listen_addr, "hostname": hostname})
            self.record = {"node_id": self.next_id, "public_key": public_key_b64, "public": True}
            self.record["real_addr"] = listen_addr
            if hostname:
                self.record["hostname"] = hostname
        answer: dict[str, Any] = {"type": "register_ok", "node_id": self.next_id}
        if hostname:
            answer["hostname"] = hostname
        if self.features:
            answer["features"] = self.features
        return answer

    def request_handshake(
        self, from_node_id: int, to_node_id: int, justification: str, signature_b64: str
    ) -> dict[str, Any]:
        self._call("request_handshake")
        with self.cond:
            self.relayed.append((from_node_id, to_node_id, justification, signature_b64))
        return {"type": "request_handshake_ok", "status": "relayed"}

    def lookup(self, node_id: int) -> dict[str, Any]:
        self._call("lookup")
        with self.cond:
            return {"type": "lookup_ok", **self.record}

    def heartbeat(self, node_id: int) -> dict[str, Any]:
        self._call("heartbeat")
        return {"type": "heartbeat_ok"}

    def set_visibility(self, node_id: int, public: bool) -> dict[str, Any]:
        self._call("set_visibility")
        return {"type": "set_visibility_ok"}

    def close(self) -> None:
        with self.cond:
            self.calls.append(("close", time.monotonic()))

    def poll_handshakes(self, node_id: int, wait: float = 0.0) -> dict[str, Any]:
        self._call("poll")
        with self.cond:
            requests, self.requests = self.requests, []
            responses, self.responses = self.responses, []
        return {"type": "poll_handshakes_ok", "requests": requests, "responses": responses}


class Target:
    """Records what the loop hands to the Manager."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[Any, ...]] = []
        self.outgoing: list[OutgoingRequest] = []

    def _add(self, item: tuple[Any, ...]) -> None:
        with self.cond:
            self.seen.append(item)
            self.cond.notify_all()

    def process_relayed_request(
        self, from_node_id: int, justification: str, public_key: str = ""
    ) -> None:
        if from_node_id == 666:
            raise RuntimeError("manager bug")
        self._add(("request", from_node_id, justification, public_key))

    def process_relayed_approval(self, from_node_id: int) -> None:
        self._add(("approval", from_node_id))

    def process_relayed_rejection(self, from_node_id: int, reason: str = "") -> None:
        self._add(("rejection", from_node_id, reason) if reason else ("rejection", from_node_id))

    def outgoing_requests(self) -> list[OutgoingRequest]:
        return list(self.outgoing)

    def wait_count(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.seen) >= count, WAIT)


def relay_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pilothandshake.registry_loop" and r.levelno == logging.WARNING
    ]
