"""SPEC 5 step 3, registry part: the lookup cache and the re-ask throttle.

``Binding`` asks the registry which key it binds a node ID to, caching answers for
``REGISTRY_CACHE_TTL`` (failures never) and re-asking past the cache at most once per node
per ``REGISTRY_REASK_INTERVAL``. It holds its own small lock only around its dicts, never
across a registry call (SPEC 16).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..constants import REGISTRY_CACHE_TTL, REGISTRY_REASK_INTERVAL
from ..drops import Drop, DropKind
from ..errors import RegistryError
from ..identity import decode_key
from ..runtime import RegistryClient

__all__ = ["SIDE_TABLE_LIMIT", "Binding", "Checked", "answer_key", "answer_networks"]

log = logging.getLogger(__name__)

# Side tables keyed by node ID that invented IDs could grow are pruned past this size.
SIDE_TABLE_LIMIT = 4096


def answer_key(answer: dict[str, Any] | None) -> bytes | None:
    """The valid key a lookup answer binds, else None (not registry-bound)."""
    return None if answer is None else decode_key(answer.get("public_key"))


def answer_networks(answer: dict[str, Any] | None) -> tuple[int, ...]:
    """The non-backbone networks of a lookup answer (SPEC 6 row 3 ignores network 0)."""
    networks = None if answer is None else answer.get("networks")
    if not isinstance(networks, list):
        return ()
    return tuple(n for n in networks if type(n) is int and n != 0)


@dataclass(frozen=True)
class Checked:
    """A lookup checked against the keys we hold for the node.

    ``problem`` says why a differing answer could not be re-asked ("" when it was, or did not
    need to be); ``conflict`` is the key the re-asked registry binds when it still differs
    from the node's trust record (the caller marks the record in conflict)."""

    answer: dict[str, Any] | None
    problem: str = ""
    conflict: bytes | None = None

    def bound(self, key: bytes) -> bool | Drop:
        """Whether a message with ``key`` is registry-bound, or its drop: the registry binds
        another key."""
        registered = answer_key(self.answer)
        if registered is None:
            return False
        if registered == key:
            return True
        reason = "public key differs from the registry's"
        return Drop(DropKind.KEY_MISMATCH, f"{reason} ({self.problem})" if self.problem else reason)


class Binding:
    """The registry's answers about node IDs, by the monotonic ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        """Cache and throttle by ``clock`` (monotonic seconds)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[int, tuple[float, dict[str, Any]]] = {}
        self._reasked: dict[int, float] = {}

    def lookup(
        self, registry: RegistryClient, node: int, fresh: bool = False
    ) -> dict[str, Any] | None:
        """The registry's answer for ``node`` (cached ``REGISTRY_CACHE_TTL`` unless ``fresh``);
        None on error."""
        now = self._clock()
        if not fresh:
            with self._lock:
                cached = self._answers.get(node)
            if cached is not None and now - cached[0] < REGISTRY_CACHE_TTL:
                return cached[1]
        try:
            answer = registry.lookup(node)
        except RegistryError as exc:
            log.debug("registry lookup of node %d failed: %s", node, exc)
            return None
        if not isinstance(answer, dict):
            return None
        with self._lock:
            if len(self._answers) >= SIDE_TABLE_LIMIT:
                self._answers = {
                    n: hit for n, hit in self._answers.items() if now - hit[0] < REGISTRY_CACHE_TTL
                }
            self._answers[node] = (now, answer)
        return answer

    def checked(
        self,
        registry: RegistryClient,
        node: int,
        key: bytes | None,
        record_key: bytes | None,
    ) -> Checked:
        """The answer for ``node``, re-asked (SPEC 5: past the cache, at most once per node per
        ``REGISTRY_REASK_INTERVAL``) when its key differs from ``key`` (the message's) or
        ``record_key`` (the trust record's); when it cannot be re-asked, the first answer and
        why."""
        answer = self.lookup(registry, node)
        registered = answer_key(answer)
        if registered is None or (key in (None, registered) and record_key in (None, registered)):
            return Checked(answer)
        if not self._may_reask(node):
            return Checked(answer, "re-ask not allowed yet")
        fresh = self.lookup(registry, node, fresh=True)
        if fresh is None:
            return Checked(answer, "re-ask failed")
        registered = answer_key(fresh)
        if record_key is not None and registered is not None and registered != record_key:
            return Checked(fresh, conflict=registered)
        return Checked(fresh)

    def _may_reask(self, node: int) -> bool:
        now = self._clock()
        with self._lock:
            last = self._reasked.get(node)
            if last is not None and now - last < REGISTRY_REASK_INTERVAL:
                return False
            if len(self._reasked) >= SIDE_TABLE_LIMIT:
                self._reasked = {
                    n: t for n, t in self._reasked.items() if now - t < REGISTRY_REASK_INTERVAL
                }
            self._reasked[node] = now
            return True
