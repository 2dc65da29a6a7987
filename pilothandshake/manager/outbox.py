"""Answers that could not be delivered, kept and retried until they are.

An answer (our accept, reject, revoke, or the withdrawal of our own request) reaches the
peer either directly on port 444 or through the registry. When the registry is down and the
peer cannot be dialled (a private peer, or one whose address only the registry knows), both
paths fail; without this module the answer was lost for good: the approving side trusted the
peer while the requester waited until its request expired.

``Outbox`` remembers each answer from the moment its decision is made until one path
delivers it. An answer whose first attempt failed is written to ``outbox.json`` beside
``trust.json`` (replaced atomically), so it also survives a restart, and is retried on a
thread of its own with backoff (``OUTBOX_FIRST_RETRY`` doubling to ``MAX_BACKOFF``, with
jitter so a fleet does not retry in step) until a delivery counts: a direct send that the
runtime reports delivered, or the registry's OK. One answer per peer is kept, the latest
(a revoke supersedes an accept that never arrived); at most ``MAX_OUTBOX``; an answer older
than ``trust.outgoing_ttl`` is dropped with a WARNING, as the request it answers would have
expired at the requester by then.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from ..constants import MAX_BACKOFF
from ..errors import HandshakeError
from ..fsutil import read_file, write_atomically
from ..messages import HANDSHAKE_ACCEPT, HANDSHAKE_REJECT, HANDSHAKE_REVOKE, truncate_utf8
from .clock import Clock

__all__ = [
    "ACCEPT",
    "KINDS",
    "MAX_OUTBOX",
    "OUTBOX_FILE",
    "OUTBOX_FIRST_RETRY",
    "REJECT",
    "REVOKE",
    "WITHDRAW",
    "Outbox",
]

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.json"
MAX_OUTBOX = 256
# The first retry waits out the first attempt (dial, receipt grace, registry timeout).
OUTBOX_FIRST_RETRY = 10.0

# What an answer is: the message sent directly, and its registry form.
ACCEPT = "accept"  # handshake_accept, else respond_handshake(accept=True)
REJECT = "reject"  # handshake_reject, else respond_handshake(accept=False)
REVOKE = "revoke"  # handshake_revoke, else revoke_trust at the registry
WITHDRAW = "withdraw"  # handshake_revoke "request withdrawn", else respond_handshake(False)
KINDS = {ACCEPT: HANDSHAKE_ACCEPT, REJECT: HANDSHAKE_REJECT, REVOKE: HANDSHAKE_REVOKE}
KINDS[WITHDRAW] = HANDSHAKE_REVOKE


@dataclass
class _Answer:
    kind: str
    reason: str
    created: datetime  # wall time of the decision (persisted; expiry)
    due: float  # monotonic time of the next retry
    attempts: int = 0
    durable: bool = False


# deliver(peer, kind, reason) -> whether a path delivered it.
Deliver = Callable[[int, str, str], bool]


class Outbox:
    """Undelivered answers of one node, persisted at ``path`` ("" keeps them in memory only).

    ``expect`` is called when a decision makes an answer, ``delivered`` when any path got
    it through, ``failed`` when an attempt did not; ``start``/``stop`` run the retry thread,
    which calls ``deliver``. Thread-safe.
    """

    def __init__(self, path: str, deliver: Deliver, ttl: Callable[[], float], clock: Clock) -> None:
        """Load the answers kept at ``path`` (a damaged file is moved aside and logged)."""
        self._path = path
        self._deliver = deliver
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._answers: dict[int, _Answer] = {}
        self._stopping = False
        self._changed = False  # an answer came since the retry thread last looked
        self._thread: threading.Thread | None = None
        self._random = random.Random()
        if path:
            self._load()

    # -- what the Manager calls --------------------------------------------------------

    def expect(self, peer: int, kind: str, reason: str = "") -> None:
        """An answer of ``kind`` to ``peer`` is about to be tried; it replaces any older one."""
        now = self._clock.monotonic()
        with self._lock:
            old = self._answers.get(peer)
            self._answers[peer] = _Answer(
                kind, truncate_utf8(reason), self._wall(), now + OUTBOX_FIRST_RETRY
            )
            if old is not None and old.durable:
                self._save_locked()  # the superseded answer must not come back after a crash
            self._evict_locked()
            self._changed = True
            self._wake.notify_all()

    def delivered(self, peer: int, kinds: Iterable[str]) -> None:
        """A path delivered an answer of one of ``kinds`` to ``peer``: forget it."""
        answer = self._forget(peer, kinds)
        if answer is not None and answer.attempts:
            log.info(
                "delivered our %s to node %d after %d retries", answer.kind, peer, answer.attempts
            )

    def cancel(self, peer: int, kinds: Iterable[str] = (REJECT, REVOKE, WITHDRAW)) -> None:
        """We trust ``peer`` again or asked it anew (or it asked us: ``kinds`` is then a
        revoke alone): a kept answer that says no is stale and must never arrive after what
        superseded it."""
        answer = self._forget(peer, kinds)
        if answer is not None:
            log.info("dropped our undelivered %s to node %d: superseded", answer.kind, peer)

    def _forget(self, peer: int, kinds: Iterable[str]) -> _Answer | None:
        with self._lock:
            answer = self._answers.get(peer)
            if answer is None or answer.kind not in kinds:
                return None
            del self._answers[peer]
            if answer.durable:
                self._save_locked()
        return answer

    def failed(self, peer: int) -> None:
        """An attempt to deliver ``peer``'s answer failed: keep it on disk from now on."""
        with self._lock:
            answer = self._answers.get(peer)
            if answer is None or answer.durable:
                return
            answer.durable = True
            self._save_locked()

    def count(self) -> int:
        """How many answers wait for delivery."""
        with self._lock:
            return len(self._answers)

    def start(self) -> None:
        """Start retrying on a background thread. Idempotent."""
        with self._lock:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._run, name="handshake-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop retrying; waits up to ``timeout`` for an attempt in flight. What is still
        undelivered stays on disk for the next start."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(timeout, 0.0))

    # -- the retry thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                wait = self.retry_due()
            except Exception:
                # The thread must outlive any bug: the answers would never be retried again.
                log.exception("outbox round failed")
                wait = MAX_BACKOFF
            with self._lock:
                if self._stopping:
                    return
                if not self._changed:
                    self._wake.wait(None if wait is None else min(wait, MAX_BACKOFF))
                self._changed = False

    def retry_due(self) -> float | None:
        """Try once more every answer whose retry is due (the retry thread's round); the
        seconds until the next one is due, None when none waits."""
        while True:
            with self._lock:
                self._expire_locked()
                if self._stopping or not self._answers:
                    return None
                peer, answer = min(self._answers.items(), key=lambda item: item[1].due)
                wait = answer.due - self._clock.monotonic()
            if wait > 0:
                return wait
            self._attempt(peer, answer)

    def _attempt(self, peer: int, answer: _Answer) -> None:
        try:
            ok = self._deliver(peer, answer.kind, answer.reason)
        except HandshakeError as exc:
            log.debug("outbox: our %s to node %d: %s", answer.kind, peer, exc)
            ok = False
        except Exception:  # a bug in one delivery must not stop the retries of the others
            log.warning("outbox: our %s to node %d failed", answer.kind, peer, exc_info=True)
            ok = False
        if ok:
            self.delivered(peer, (answer.kind,))
            return
        with self._lock:
            if self._answers.get(peer) is not answer:
                return  # superseded or delivered meanwhile
            answer.attempts += 1
            answer.due = self._clock.monotonic() + self._backoff(answer.attempts)
            first = not answer.durable
            answer.durable = True
            if first:
                self._save_locked()
        if answer.attempts == 1:
            log.warning(
                "could not deliver our %s to node %d (directly or through the registry): "
                "retrying until it arrives",
                answer.kind,
                peer,
            )

    def _backoff(self, attempts: int) -> float:
        # Capped before the power: the exponent grows without bound in a long outage.
        delay = min(MAX_BACKOFF, OUTBOX_FIRST_RETRY * 2.0 ** min(attempts - 1, 16))
        return delay * self._random.uniform(0.5, 1.0)

    # -- bounds ------------------------------------------------------------------------

    def _expire_locked(self) -> None:
        ttl = self._ttl()
        wall = self._wall()
        old = [p for p, a in self._answers.items() if (wall - a.created).total_seconds() > ttl]
        for peer in old:
            kind = self._answers[peer].kind
            log.warning("gave up on our %s to node %d: older than outgoing_ttl", kind, peer)
            del self._answers[peer]
        if old:
            self._save_locked()

    def _evict_locked(self) -> None:
        while len(self._answers) > MAX_OUTBOX:
            peer = min(self._answers, key=lambda p: self._answers[p].created)
            log.warning("outbox full (%d): gave up on our answer to node %d", MAX_OUTBOX, peer)
            del self._answers[peer]
            self._save_locked()

    # -- persistence -------------------------------------------------------------------

    def _wall(self) -> datetime:
        return datetime.fromtimestamp(self._clock.time(), timezone.utc).replace(microsecond=0)

    def _save_locked(self) -> None:
        if not self._path:
            return
        rows = [
            {
                "node_id": peer,
                "kind": answer.kind,
                "reason": answer.reason,
                "created": answer.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            for peer, answer in sorted(self._answers.items())
            if answer.durable
        ]
        try:
            write_atomically(self._path, json.dumps({"answers": rows}).encode() + b"\n")
        except OSError as exc:
            # Still retried from memory; only a crash now would lose them.
            log.error("could not write %s: %s", self._path, exc)

    def _load(self) -> None:
        try:
            data = read_file(self._path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("could not read %s: %s; undelivered answers are lost", self._path, exc)
            return
        try:
            rows = json.loads(data)["answers"]
            now = self._clock.monotonic()
            for row in rows:
                kind = row["kind"]
                peer = row["node_id"]
                if kind not in KINDS or type(peer) is not int or not isinstance(row["reason"], str):
                    raise ValueError(f"bad entry {row!r:.100}")
                created = datetime.strptime(row["created"], "%Y-%m-%dT%H:%M:%SZ")
                self._answers[peer] = _Answer(
                    kind,
                    truncate_utf8(row["reason"]),
                    created.replace(tzinfo=timezone.utc),
                    now,
                    durable=True,
                )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            aside = f"{self._path}.damaged"
            log.error(
                "%s is damaged (%s): moved to %s; no undelivered answers kept",
                self._path,
                exc,
                aside,
            )
            self._answers.clear()
            try:
                os.replace(self._path, aside)
            except OSError as move_error:
                log.error("could not move %s aside: %s", self._path, move_error)
            return
        if self._answers:
            log.info("%d undelivered answers from before the restart: retrying", len(self._answers))
