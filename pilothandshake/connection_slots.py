"""``ConnectionSlots``: the caps on open connections, in all and per source (SPEC 15, 17).

Each server that accepts connections (port 444, ``pilot-registryd``, the control socket)
takes a slot for a connection before it serves it and gives it back when the connection
ends; a connection that gets no slot is refused unread. What a refusal looks like (a reset,
a ``busy`` line), what is logged and counted, stays with each server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

__all__ = ["SOURCE_CAP", "TOTAL_CAP", "ConnectionSlots", "SlotAnswer"]

# Which cap a refused connection met: the names of the config keys and of the metric label.
TOTAL_CAP = "max_connections"
SOURCE_CAP = "max_connections_per_source"

C = TypeVar("C", bound=Hashable)


@dataclass
class SlotAnswer(Generic[C]):
    """What ``ConnectionSlots.take`` did: ``refused`` names the cap that refused the
    connection ("" when it got a slot), ``evicted`` the connection whose slot it took;
    ``active`` and ``from_source`` count the slots held afterwards, in all and by its source."""

    # One is made per accepted connection: slots, and not frozen, make that a third as
    # costly (frozen fields are set through object.__setattr__).
    __slots__ = ("active", "evicted", "from_source", "refused")

    refused: str
    evicted: C | None
    active: int
    from_source: int

    @property
    def admitted(self) -> bool:
        """Whether the connection got a slot."""
        return not self.refused


class ConnectionSlots(Generic[C]):
    """At most ``total`` connections at once, and at most ``per_source`` from one source
    (None: no cap per source). Thread-safe. The connections holding a slot are kept in the
    order they were admitted, which is the order they were opened in."""

    def __init__(self, total: int, per_source: int | None = None) -> None:
        """Caps of ``total`` and ``per_source``; both may be changed while serving."""
        self.total = total
        self.per_source = per_source
        self._cond = threading.Condition()
        self._held: dict[C, str] = {}
        self._by_source: dict[str, int] = {}

    def __len__(self) -> int:
        """How many slots are held now."""
        with self._cond:
            return len(self._held)

    def take(
        self,
        conn: C,
        source: str = "",
        evict: Callable[[Iterable[C]], C | None] | None = None,
    ) -> SlotAnswer[C]:
        """A slot for ``conn`` from ``source`` if the caps allow it. At the total cap,
        ``evict`` (when given) may pick a connection, from those holding a slot oldest
        first, whose slot ``conn`` takes instead (the caller cuts that one off)."""
        with self._cond:
            from_source = self._by_source.get(source, 0)
            refused, victim = "", None
            if self.per_source is not None and from_source >= self.per_source:
                refused = SOURCE_CAP
            elif len(self._held) >= self.total:
                victim = evict(self._held) if evict is not None else None
                if victim is None:
                    refused = TOTAL_CAP
                else:
                    self._release(victim)
            if not refused:
                self._put(conn, source)
            return SlotAnswer(refused, victim, len(self._held), self._by_source.get(source, 0))

    def release(self, conn: C) -> None:
        """Give back the slot of ``conn``; nothing when it holds none (any more)."""
        with self._cond:
            self._release(conn)

    @contextlib.contextmanager
    def set_aside(self, conn: C) -> Iterator[None]:
        """While inside, the slot of ``conn`` is free for others; ``conn`` takes one again
        afterwards, above the caps if need be (for a wait bounded on its own)."""
        with self._cond:
            source = self._release(conn)
        try:
            yield
        finally:
            if source is not None:
                with self._cond:
                    self._put(conn, source)

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no slot is held; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._held, timeout)

    def _put(self, conn: C, source: str) -> None:
        self._held[conn] = source
        self._by_source[source] = self._by_source.get(source, 0) + 1

    def _release(self, conn: C) -> str | None:
        """Give back the slot of ``conn``, once; its source, or None. Call holding the lock."""
        source = self._held.pop(conn, None)
        if source is None:
            return None
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]
        self._cond.notify_all()
        return source
