"""The relay inboxes of the embedded registry (SPEC 11, 15): bounded in every dimension.

Each node has a request inbox (one entry per sender, at most ``capacity``: a full inbox
refuses) and a response inbox (one entry per sender, the latest replacing the earlier; at
most ``capacity``: a full one drops its oldest). Every entry expires ``ttl`` seconds after
it arrived, and a request keeps at most ``MAX_TEXT_BYTES`` of justification (cut on a
UTF-8 boundary), so memory is bounded by the number of nodes times ``capacity`` times a
small constant, whatever clients send. Not thread-safe: the registry calls it under its
lock.
"""

from __future__ import annotations

import math
from typing import Any

from ..constants import MAX_TEXT_BYTES, REGISTRY_INBOX, REGISTRY_INBOX_TTL
from ..messages import truncate_utf8

__all__ = ["Inboxes"]

# An inbox: sender node ID -> (expiry time, the entry as polled). Dicts keep insertion
# order, so the first item is the oldest.
_Inbox = dict[int, tuple[float, dict[str, Any]]]


class Inboxes:
    """Request and response inboxes of every node; times are monotonic seconds."""

    def __init__(self, capacity: int = REGISTRY_INBOX, ttl: float = REGISTRY_INBOX_TTL) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._requests: dict[int, _Inbox] = {}
        self._responses: dict[int, _Inbox] = {}
        self._next_sweep = -math.inf

    def add_request(self, to_id: int, entry: dict[str, Any], now: float) -> str:
        """Queue ``entry`` (with ``from_node_id`` and ``justification``) for ``to_id``.

        Returns "" when queued, else why it was refused.
        """
        self._sweep(now)
        inbox = self._live(self._requests, to_id, now)
        sender = entry["from_node_id"]
        if sender in inbox:
            return f"a request from node {sender} already waits in node {to_id}'s inbox"
        if len(inbox) >= self.capacity:
            return f"the inbox of node {to_id} is full ({self.capacity} requests)"
        stored = dict(entry, justification=truncate_utf8(entry["justification"], MAX_TEXT_BYTES))
        self._requests.setdefault(to_id, {})[sender] = (now + self.ttl, stored)
        return ""

    def add_response(self, to_id: int, entry: dict[str, Any], now: float) -> bool:
        """Queue ``entry`` (with ``from_node_id``) for ``to_id``, replacing an earlier one
        from the same sender. Returns False when the oldest response had to make room."""
        self._sweep(now)
        inbox = self._responses.setdefault(to_id, self._live(self._responses, to_id, now))
        sender = entry["from_node_id"]
        inbox.pop(sender, None)
        dropped = len(inbox) >= self.capacity
        if dropped:
            del inbox[next(iter(inbox))]
        inbox[sender] = (now + self.ttl, entry)
        return not dropped

    def drain(self, node_id: int, now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Remove and return ``node_id``'s live requests and responses."""
        requests = self._requests.pop(node_id, {})
        responses = self._responses.pop(node_id, {})
        return _unexpired(requests, now), _unexpired(responses, now)

    def entries(self) -> int:
        """How many entries are held (expired ones not yet swept included)."""
        return sum(len(i) for i in self._requests.values()) + sum(
            len(i) for i in self._responses.values()
        )

    def _live(self, boxes: dict[int, _Inbox], node_id: int, now: float) -> _Inbox:
        inbox = boxes.get(node_id)
        if inbox is None:
            return {}
        for sender in [s for s, (expiry, _) in inbox.items() if expiry <= now]:
            del inbox[sender]
        return inbox

    def _sweep(self, now: float) -> None:
        """Drop expired entries everywhere, at most once a minute: inboxes of nodes that
        never poll would otherwise hold their entries until the node is asked about."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        for boxes in (self._requests, self._responses):
            for node_id in list(boxes):
                if not self._live(boxes, node_id, now):
                    del boxes[node_id]


def _unexpired(inbox: _Inbox, now: float) -> list[dict[str, Any]]:
    return [entry for expiry, entry in inbox.values() if expiry > now]
