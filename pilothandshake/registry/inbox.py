"""The relay inboxes of the embedded registry (SPEC 11, 15, 17): bounded, fair, durable.

Each node has a request inbox and a response inbox, each at most ``capacity`` entries and
one per sender (a response replaces the sender's earlier one; a second request while the
first waits is refused). Entries live in the durable state (``storage.StoreState``) and
change only through ops, so they survive a restart; each expires ``ttl`` seconds after its
``timestamp`` (wall time, since it must age across restarts), and a request keeps at most
``MAX_TEXT_BYTES`` of justification and a response as much reason, cut on a UTF-8 boundary.

Who gets room when an inbox is full (issue 15 item 3):

- **Requests: fair between sources.** A full request inbox refuses a newcomer only when its
  source (an IPv4 /24 or IPv6 /64) already holds its share (capacity divided by the sources
  holding entries, the newcomer's included); otherwise the newest request of the source
  holding the most makes room. Free identities behind one source cannot keep a real peer's
  relayed request out.
- **Responses: by tie to the recipient.** A response from S to R ranks 2 when R vouched for S
  (R sent S a relayed request, reported trust in S, or accepted S's relayed request: R's
  own signed acts, which nobody else can forge), 1 when S vouched for R (S relayed R a
  request, reported trust in it, or accepted one of R's), and 0 (untied) otherwise. A
  response enters a full inbox only by evicting the oldest of the lowest-ranked entries,
  and only if that rank is below its own; else it is refused, so the responder hears of it
  and may retry. Untied responses are also rate-limited per identity and per source. So a
  real approval of R's own request is never pushed out by anything a stranger can send.

Not thread-safe: the registry calls it under its lock.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from ..constants import (
    MAX_TEXT_BYTES,
    REGISTRY_INBOX,
    REGISTRY_INBOX_TTL,
    REGISTRY_UNTIED_RESPONSES_PER_MINUTE_PER_NODE,
    REGISTRY_UNTIED_RESPONSES_PER_MINUTE_PER_SOURCE,
)
from ..messages import truncate_utf8
from .fields import FAILED, refuse
from .ratelimit import PerKey
from .storage import Changes, Inbox, StoreState

__all__ = ["Inboxes"]

# How often expired entries are swept from inboxes nobody polls (seconds).
_SWEEP_INTERVAL = 60.0


class Inboxes:
    """The inbox rules over ``state``'s inboxes; times are Unix seconds (``now``) and, for
    rate limits, monotonic seconds (``tick``)."""

    def __init__(
        self, state: StoreState, capacity: int = REGISTRY_INBOX, ttl: float = REGISTRY_INBOX_TTL
    ) -> None:
        self.state = state
        self.capacity = capacity
        self.ttl = ttl
        self._untied_by_node = PerKey(REGISTRY_UNTIED_RESPONSES_PER_MINUTE_PER_NODE)
        self._untied_by_source = PerKey(REGISTRY_UNTIED_RESPONSES_PER_MINUTE_PER_SOURCE)
        self._next_sweep = -math.inf

    def add_request(
        self, changes: Changes, to_id: int, entry: dict[str, Any], source: str, now: float
    ) -> None:
        """Queue ``entry`` (``from_node_id``, ``justification``, ``timestamp``,
        ``public_key``) from ``source`` for ``to_id``; refuses (``fields.Refused``) a
        second request from the sender and a source over its share of a full inbox."""
        inbox = self._live(changes, self.state.requests, to_id, now)
        sender = entry["from_node_id"]
        if sender in inbox:
            refuse(f"a request from node {sender} already waits in node {to_id}'s inbox")
        if len(inbox) >= self.capacity:
            held = Counter(q.source for q in inbox.values())
            share = max(1, self.capacity // len(held.keys() | {source}))
            if held[source] >= share:
                refuse(
                    f"the request inbox of node {to_id} is full and source {source} holds "
                    f"its share ({held[source]} of {self.capacity})",
                    FAILED,
                )
            hog = max(held, key=lambda s: held[s])
            newest = next(s for s, q in reversed(inbox.items()) if q.source == hog)
            changes.apply(["evict_request", to_id, newest])
        stored = dict(entry, justification=truncate_utf8(entry["justification"], MAX_TEXT_BYTES))
        changes.apply(["request", to_id, source, stored])

    def add_response(
        self,
        changes: Changes,
        to_id: int,
        entry: dict[str, Any],
        source: str,
        now: float,
        tick: float,
    ) -> None:
        """Queue ``entry`` (``from_node_id``, ``accept``, ``timestamp``, optional
        ``reason``) from ``source`` for ``to_id``, replacing the sender's earlier one, by
        the rules of the module doc. Call before the responder's own vouch of this request
        is recorded: the rank is what the pair had before. Refuses (``fields.Refused``)."""
        inbox = self._live(changes, self.state.responses, to_id, now)
        sender = entry["from_node_id"]
        rank = self.rank(to_id, sender)
        if rank == 0 and not (
            self._untied_by_node.take(sender, tick) and self._untied_by_source.take(source, tick)
        ):
            refuse(f"untied response rate limit for node {sender} from {source}", FAILED)
        if sender not in inbox and len(inbox) >= self.capacity:
            ranked = [(self.rank(to_id, s), s) for s in inbox]  # oldest first
            lowest = min(r for r, _ in ranked)
            if lowest >= rank:
                refuse(
                    f"the response inbox of node {to_id} is full ({self.capacity}) of "
                    f"responses tied to it at least as closely"
                )
            changes.apply(["evict_response", to_id, next(s for r, s in ranked if r == lowest)])
        if "reason" in entry:
            entry = dict(entry, reason=truncate_utf8(entry["reason"], MAX_TEXT_BYTES))
        changes.apply(["response", to_id, source, entry])

    def rank(self, to_id: int, sender: int) -> int:
        """How closely a response from ``sender`` is tied to its recipient ``to_id``."""
        if (to_id, sender) in self.state.vouches:
            return 2
        return 1 if (sender, to_id) in self.state.vouches else 0

    def drain(
        self, changes: Changes, node_id: int, now: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Remove and return ``node_id``'s live requests and responses."""
        requests = self.state.requests.get(node_id, {})
        responses = self.state.responses.get(node_id, {})
        if requests or responses:
            changes.apply(["drain", node_id])
        return self._unexpired(requests, now), self._unexpired(responses, now)

    def waiting(self, node_id: int) -> bool:
        """Whether anything waits for ``node_id`` (expired entries included)."""
        return node_id in self.state.requests or node_id in self.state.responses

    def entries(self) -> int:
        """How many entries are held (expired ones not yet swept included)."""
        return sum(len(i) for i in self.state.requests.values()) + sum(
            len(i) for i in self.state.responses.values()
        )

    def _live(self, changes: Changes, boxes: dict[int, Inbox], node_id: int, now: float) -> Inbox:
        """``node_id``'s inbox in ``boxes`` without its expired entries; sweeps every inbox
        at most once a minute (inboxes of nodes that never poll would keep theirs)."""
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_INTERVAL
            for box in (self.state.requests, self.state.responses):
                for to in list(box):
                    self._expire(changes, box, to, now)
        self._expire(changes, boxes, node_id, now)
        return boxes.get(node_id, {})

    def _expire(self, changes: Changes, boxes: dict[int, Inbox], node_id: int, now: float) -> None:
        inbox = boxes.get(node_id, {})
        kind = "evict_request" if boxes is self.state.requests else "evict_response"
        for sender in [s for s, q in inbox.items() if q.entry["timestamp"] + self.ttl <= now]:
            # Journaled like any removal: replay then never revives an entry that expired
            # on a clock that has since been set back.
            changes.apply([kind, node_id, sender])

    def _unexpired(self, inbox: Inbox, now: float) -> list[dict[str, Any]]:
        return [q.entry for q in inbox.values() if q.entry["timestamp"] + self.ttl > now]
