"""An attacker on loopback for the attack tests: crafts raw port-444 messages and sends them
from a chosen source address (127.0.0.x), holds idle connections, floods junk, and captures
what a real daemon sends (``Capture``, a forwarding proxy or a sink).

Every socket operation has a timeout and every loop a bound, so a daemon that misbehaves
fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fakeruntime import Peer

from pilothandshake.identity import b64encode
from pilothandshake.messages import receipt_challenge
from pilothandshake.wire import send_message, write_receipt

__all__ = [
    "Capture",
    "IdleConnections",
    "Peer",
    "Trickle",
    "flood",
    "junk",
    "rewrite",
    "send_raw",
    "source_address",
]

CONNECT_TIMEOUT = 5.0


def source_address(index: int) -> str:
    """The ``index``-th extra loopback source address: 127.0.<10 + index>.1 (0..239).

    Linux routes all of 127.0.0.0/8 to the loopback device, so a client socket bound to any
    of them reaches the daemon on 127.0.0.1 and is seen as a different host. Each is in a
    /24 of its own: the pending queue counts a source as its /24 (round 3)."""
    if not 0 <= index < 240:
        raise ValueError(f"no loopback source address for index {index}")
    return f"127.0.{10 + index}.1"


def _connect(port: int, source: str, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def send_raw(port: int, data: bytes, source: str = "127.0.0.1", wait: float = 5.0) -> str:
    """Send ``data`` as one connection from ``source``, half-close, and wait up to ``wait``
    seconds for the daemon to close: "closed" (it read the message and closed normally),
    "reset" (refused, or closed with unread data), or "open" (still open at the deadline)."""
    with _connect(port, source) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "reset"
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "open"
            sock.settimeout(remaining)
            try:
                if not sock.recv(4096):
                    return "closed"
            except socket.timeout:
                return "open"
            except OSError:
                return "reset"


def flood(
    port: int, payloads: list[bytes], sources: list[str], timeout: float = 60.0
) -> dict[str, int]:
    """Send every payload as its own connection, one thread per source address, each thread
    sending its share one connection at a time. The daemon half-closes once it has read a
    message and decides afterwards (SPEC 3), so on a loaded machine a sender can outrun it
    into the per-source connection cap: a connection refused unread is sent again (counted
    in "refused"), so the per-source cap is never what stops them. Returns how the
    connections ended: counts of "closed" (read), "open" and "unsent"; stops at ``timeout``
    seconds."""
    counts = {"closed": 0, "open": 0, "unsent": 0, "refused": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def worker(source: str, share: list[bytes]) -> None:
        local = dict.fromkeys(counts, 0)
        for i, data in enumerate(share):
            while time.monotonic() < deadline:
                try:
                    outcome = send_raw(port, data, source, wait=5.0)
                except OSError:
                    outcome = "reset"
                if outcome != "reset":
                    local[outcome] += 1
                    break
                local["refused"] += 1
                time.sleep(0.02)
            else:
                local["unsent"] += len(share) - i
                break
        with lock:
            for name, value in local.items():
                counts[name] += value

    threads = [
        threading.Thread(target=worker, args=(source, payloads[i :: len(sources)]), daemon=True)
        for i, source in enumerate(sources)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 10.0)
    return counts


class IdleConnections:
    """``count`` connections from ``source`` that send nothing, held until ``close()``.

    A connection the daemon refuses may be reset before ``connect`` has returned (a timed
    connect checks its result after the handshake, and the reset can come first): it is
    counted in ``reset_at_connect`` and not held."""

    def __init__(self, port: int, count: int, source: str) -> None:
        self.socks: list[socket.socket] = []
        self.reset_at_connect = 0
        try:
            for _ in range(count):
                try:
                    self.socks.append(_connect(port, source))
                except ConnectionResetError:
                    self.reset_at_connect += 1
        except BaseException:
            self.close()
            raise

    def open_ones(self, settle: float) -> list[socket.socket]:
        """The connections the daemon has not closed or reset after watching them for
        ``settle`` seconds (a refused connection is reset at once, unread)."""
        ended: set[socket.socket] = set()
        deadline = time.monotonic() + settle
        while True:  # at least one pass, even with settle 0
            remaining = max(0.0, deadline - time.monotonic())
            watched = [s for s in self.socks if s not in ended]
            if not watched:
                break
            readable, _, _ = select.select(watched, [], [], min(remaining, 0.2))
            for sock in readable:
                if self._ended(sock):
                    ended.add(sock)
            if remaining <= 0:
                break
        return [s for s in self.socks if s not in ended]

    @staticmethod
    def _ended(sock: socket.socket) -> bool:
        sock.settimeout(0)
        try:
            return not sock.recv(1)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.socks = []

    def __enter__(self) -> IdleConnections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Trickle:
    """Slowloris: ``per_source`` connections from each of ``sources``, each sending one
    byte a second of a message that never ends; a connection the daemon ends is opened
    again (at most once a second per slot), so the pressure stays on. ``start()`` runs it
    on a thread until ``close()`` or ``limit`` seconds."""

    PREFIX = b'{"type":"handshake_request","justification":"'

    def __init__(self, port: int, sources: list[str], per_source: int, limit: float = 60.0) -> None:
        self.port = port
        self.slots = [source for source in sources for _ in range(per_source)]
        self.socks: list[socket.socket | None] = [None] * len(self.slots)
        self.sent = [0] * len(self.slots)
        self.reopened = 0
        self.limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def open_all(self) -> None:
        """Open every slot's connection and send its first byte."""
        for slot in range(len(self.slots)):
            self._open(slot)

    def _open(self, slot: int) -> None:
        with contextlib.suppress(OSError):
            sock = _connect(self.port, self.slots[slot])
            sock.setblocking(False)
            self.socks[slot] = sock
            self.sent[slot] = 0
            self._send(slot)

    def _send(self, slot: int) -> None:
        sock = self.socks[slot]
        if sock is None:
            return
        byte = self.PREFIX[self.sent[slot] : self.sent[slot] + 1] or b"a"
        try:
            sock.send(byte)
            self.sent[slot] += 1
        except OSError:
            self._drop(slot)

    def _drop(self, slot: int) -> None:
        sock, self.socks[slot] = self.socks[slot], None
        if sock is not None:
            sock.close()

    def open_ones(self, settle: float) -> int:
        """How many connections the daemon has not ended after watching for ``settle`` s
        (before ``start()``: the thread owns the connections after it)."""
        deadline = time.monotonic() + settle
        while True:
            self._reap(max(0.0, min(deadline - time.monotonic(), 0.2)))
            if time.monotonic() >= deadline:
                return sum(1 for sock in self.socks if sock is not None)

    def _reap(self, wait: float) -> None:
        """Drop the connections the daemon has ended (end of stream or reset)."""
        live = {sock: slot for slot, sock in enumerate(self.socks) if sock is not None}
        readable = select.select(list(live), [], [], wait)[0] if live else []
        for sock in readable:
            try:
                ended = not sock.recv(1)
            except BlockingIOError:
                ended = False
            except OSError:
                ended = True
            if ended:
                self._drop(live[sock])

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            tick = time.monotonic()
            self._reap(0.0)
            for slot, sock in enumerate(self.socks):
                if sock is None:
                    self.reopened += 1
                    self._open(slot)
                else:
                    self._send(slot)
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - tick)))

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for slot in range(len(self.socks)):
            self._drop(slot)

    def __enter__(self) -> Trickle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Capture:
    """A listening socket on 127.0.0.1 that records every message a daemon sends to it and,
    with ``forward_to``, passes it on to that port (a man in the middle on plain TCP 444,
    which hands the receiver's receipt back). With ``receipts`` it stands in for that peer's
    port 444 and answers with the peer's receipt (SPEC 3); without either it is a sink that
    reads and closes, proving nothing."""

    def __init__(self, forward_to: int | None = None, receipts: Peer | None = None) -> None:
        self.forward_to = forward_to
        self.receipts = receipts
        self.messages: list[bytes] = []
        self._cond = threading.Condition()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                data = _read_all(conn, 5.0)
                receipt = None
                if self.forward_to is not None:
                    with contextlib.suppress(OSError):
                        receipt = send_message(("127.0.0.1", self.forward_to), data)
                elif self.receipts is not None:
                    sender = json.loads(data).get("node_id", 0)
                    challenge = receipt_challenge(self.receipts.node_id, sender, data)
                    receipt = self.receipts.identity.sign(challenge)
                if receipt is not None:
                    write_receipt(conn, receipt)
            with self._cond:
                self.messages.append(data)
                self._cond.notify_all()

    def wait_for(self, msg_type: str, timeout: float = 10.0) -> bytes:
        """The first captured message of ``msg_type``; fails (AssertionError) at ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for data in self.messages:
                    if json.loads(data).get("type") == msg_type:
                        return data
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {msg_type} captured in {timeout} s: {self.messages}"
                self._cond.wait(remaining)

    def signatures(self) -> Iterator[str]:
        """Every non-empty signature field of the captured messages."""
        with self._cond:
            captured = list(self.messages)
        for data in captured:
            decoded = json.loads(data)
            for name in ("signature", "signature_v2"):
                if decoded.get(name):
                    yield str(decoded[name])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_all(conn: socket.socket, timeout: float) -> bytes:
    """Read until the sender half-closes (SPEC 3 sending), at most 64 KiB, within ``timeout``."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    while size <= 64 * 1024:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def rewrite(data: bytes, **fields: Any) -> bytes:
    """The captured message ``data`` with ``fields`` replaced and its signatures kept: what an
    observer can forge from a message it saw, without the sender's private key."""
    decoded = json.loads(data)
    decoded.update(fields)
    return json.dumps(decoded, separators=(",", ":")).encode()


def junk(count: int, peer: Peer, to: int) -> list[bytes]:
    """``count`` unauthenticated messages, cycling through kinds that each fail a different
    check: bytes that are not JSON, a non-object, a missing field, no key and no signature,
    a valid key with a bad signature, and a Go-style signature only (strict mode needs v2)."""
    unsigned = peer.message("handshake_request", to, v2=False, justification="junk")
    bad_signature = peer.message("handshake_request", to, justification="junk")
    bad_signature.signature_v2 = b64encode(peer.identity.sign(b"some other challenge"))
    go_only = peer.message("handshake_request", to, v2=False, legacy=True, justification="junk")
    kinds: Iterable[bytes] = (
        b"\x00\xffnot json at all",
        peer.message("handshake_request", to, v2=False, public_key="").to_json(),
        b"[1, 2, 3]",
        b'{"type": "handshake_request", "timestamp": 1}',
        json.dumps({"type": "handshake_request", "node_id": 66, "timestamp": 0}).encode(),
        unsigned.to_json(),
        bad_signature.to_json(),
        go_only.to_json(),
    )
    cycle = list(kinds)
    return [cycle[i % len(cycle)] for i in range(count)]
