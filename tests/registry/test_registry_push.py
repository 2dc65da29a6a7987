"""``wait_poll`` (SPEC 18, issue 18 item 2) over real loopback sockets: ``register_ok``
advertises it; a poll with ``wait`` is held until an item is queued for its node (and woken
at once), or answered empty when the wait ends; held polls do not eat the connection caps
meant for floods, have their own bound, and end cleanly when the registry stops."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from fakeruntime import wait_until
from registrytools import ROOMY

from pilothandshake.identity import Identity, b64encode
from pilothandshake.messages import handshake_challenge
from pilothandshake.registry.challenges import poll_challenge, respond_challenge
from pilothandshake.registry.client import RegistryConnection, encode_frame, read_frame
from pilothandshake.registry.server import RegistryServer

LONG = 30.0  # a wait no test should ever sit out: an answer before it was woken


class Node:
    """A registered node with its own connection for requests."""

    def __init__(self, server: RegistryServer) -> None:
        self.server = server
        self.identity = Identity.generate()
        host, port = server.address
        self.client = RegistryConnection(f"{host}:{port}", self.identity.sign, timeout=5.0)
        self.registered = self.client.register("127.0.0.1:4000", self.identity.public_key_b64)
        self.node_id: int = self.registered["node_id"]

    def sig(self, challenge: bytes) -> str:
        return b64encode(self.identity.sign(challenge))

    def poll_request(self, wait: float) -> dict[str, Any]:
        return {
            "type": "poll_handshakes",
            "node_id": self.node_id,
            "signature": self.sig(poll_challenge(self.node_id)),
            "wait": wait,
        }

    def request(self, to: int) -> dict[str, Any]:
        return self.client.call(
            {
                "type": "request_handshake",
                "from_node_id": self.node_id,
                "to_node_id": to,
                "justification": "hi",
                "signature": self.sig(handshake_challenge(self.node_id, to)),
            }
        )


class HeldPoll:
    """A poll with ``wait`` sent on a connection of its own; ``answer`` waits for it."""

    def __init__(self, node: Node, wait: float) -> None:
        self.sock = socket.create_connection(node.server.address, timeout=LONG + 10)
        self.sock.sendall(encode_frame(node.poll_request(wait)))
        self.sent = time.monotonic()
        self._answer: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._answer = read_frame(self.sock, 1 << 20, LONG + 10, LONG + 10)
        except OSError:
            self._answer = None

    def answered(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def answer(self, timeout: float = LONG + 10) -> dict[str, Any] | None:
        assert self.answered(timeout), "no answer"
        return self._answer

    def close(self) -> None:
        self.sock.close()


def test_register_ok_advertises_wait_poll(make_server: Callable[..., RegistryServer]) -> None:
    node = Node(make_server())
    assert node.registered["features"] == ["wait_poll"]


def test_a_held_poll_is_answered_as_soon_as_a_request_is_relayed(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server()
    a, b = Node(server), Node(server)
    held = HeldPoll(b, LONG)
    wait_until(lambda: server.registry.held_polls() == 1)
    assert not held.answered(0.2)  # nothing waits: it is held
    a.request(b.node_id)
    answer = held.answer(timeout=LONG / 2)  # woken by the request, not by the wait's end
    assert answer is not None and answer["type"] == "poll_handshakes_ok"
    assert [r["from_node_id"] for r in answer["requests"]] == [a.node_id]
    assert server.registry.held_polls() == 0
    held.close()


def test_a_held_poll_is_woken_by_a_response_too(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server()
    a, b = Node(server), Node(server)
    a.request(b.node_id)
    held = HeldPoll(a, LONG)
    wait_until(lambda: server.registry.held_polls() == 1)
    b.client.call(
        {
            "type": "respond_handshake",
            "node_id": b.node_id,
            "peer_id": a.node_id,
            "accept": True,
            "signature": b.sig(respond_challenge(b.node_id, a.node_id)),
        }
    )
    answer = held.answer(timeout=LONG / 2)
    assert answer is not None
    assert [(r["from_node_id"], r["accept"]) for r in answer["responses"]] == [(b.node_id, True)]
    held.close()


def test_a_poll_with_something_waiting_or_an_ended_wait_answers_at_once_or_empty(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server()
    a, b = Node(server), Node(server)
    a.request(b.node_id)
    ready = HeldPoll(b, LONG)
    answer = ready.answer(timeout=LONG / 2)
    assert answer is not None and len(answer["requests"]) == 1
    short = HeldPoll(b, 0.3)
    assert short.answer(timeout=LONG / 2) == {
        "type": "poll_handshakes_ok",
        "requests": [],
        "responses": [],
    }
    for poll in (ready, short):
        poll.close()


def test_a_newer_held_poll_of_a_node_ends_the_older_one(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server()
    a, b = Node(server), Node(server)
    older = HeldPoll(b, LONG)
    wait_until(lambda: server.registry.held_polls() == 1)
    newer = HeldPoll(b, LONG)
    older_answer = older.answer(timeout=LONG / 2)
    assert older_answer is not None and older_answer["requests"] == []
    assert server.registry.held_polls() == 1
    a.request(b.node_id)
    newer_answer = newer.answer(timeout=LONG / 2)
    assert newer_answer is not None and len(newer_answer["requests"]) == 1
    for poll in (older, newer):
        poll.close()


def test_held_polls_do_not_count_against_the_connection_caps_but_have_their_own(
    make_server: Callable[..., RegistryServer],
) -> None:
    server = make_server(
        limits=replace(ROOMY, max_connections=4, max_connections_per_source=4, max_held_polls=6)
    )
    nodes = []
    for _ in range(7):
        nodes.append(Node(server))
        nodes[-1].client.close()  # its idle connection would count
        wait_until(lambda: server.open_connections() == 0)
    held = [HeldPoll(node, LONG) for node in nodes[:6]]
    wait_until(lambda: server.registry.held_polls() == 6)
    assert server.open_connections() == 0
    # Six polls held on six connections, and the four ordinary slots are all free.
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(encode_frame({"type": "lookup", "node_id": 1}))
        answer = read_frame(sock, 1 << 20, 5.0, 5.0)
        assert answer is not None and answer["type"] == "lookup_ok"
    # The seventh node's poll is over the held polls' own bound: refused at once.
    seventh = HeldPoll(nodes[6], LONG)
    assert seventh.answer(timeout=LONG / 2) == {"type": "error", "error": "request failed"}
    for poll in [*held, seventh]:
        poll.close()


def test_stop_answers_every_held_poll(make_server: Callable[..., RegistryServer]) -> None:
    server = make_server()
    nodes = [Node(server) for _ in range(5)]
    held = [HeldPoll(node, LONG) for node in nodes]
    wait_until(lambda: server.registry.held_polls() == 5)
    began = time.monotonic()
    server.stop()
    for poll in held:
        # An empty answer (or, for one caught closing, a closed connection): never a hang.
        answer = poll.answer(timeout=LONG / 2)
        assert answer in (None, {"type": "poll_handshakes_ok", "requests": [], "responses": []})
        poll.close()
    assert time.monotonic() - began < LONG / 2
    assert server.registry.held_polls() == 0


def test_a_malformed_wait_is_refused(make_server: Callable[..., RegistryServer]) -> None:
    node = Node(make_server())
    with socket.create_connection(node.server.address, timeout=5) as sock:
        for wait in ("5", True, -1, None):
            sock.sendall(encode_frame({**node.poll_request(0), "wait": wait}))
            answer = read_frame(sock, 1 << 20, 5.0, 5.0)
            assert answer is not None and answer["type"] == "error", wait
            assert "'wait'" in answer["error"], wait


def test_what_arrives_for_a_poller_that_went_away_waits_for_its_next_poll(
    make_server: Callable[..., RegistryServer],
) -> None:
    # Found by the fault-injection runs: a daemon SIGKILLed while its poll was held; the
    # next answer for it was drained into the dead connection and lost for good.
    server = make_server()
    a, b = Node(server), Node(server)
    held = HeldPoll(b, LONG)
    wait_until(lambda: server.registry.held_polls() == 1)
    # The poller dies (a FIN, as when its process is killed); the registry still holds it.
    held.sock.shutdown(socket.SHUT_RDWR)
    held.close()
    a.request(b.node_id)
    wait_until(lambda: server.registry.held_polls() == 0)
    answer = b.client.call(b.poll_request(0))
    assert [r["from_node_id"] for r in answer["requests"]] == [a.node_id]
