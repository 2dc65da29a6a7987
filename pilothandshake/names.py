"""Hostnames pinned on first use (SPEC 17): ``name -> (node ID, key)``, kept in ``names.json``
in the state directory.

A registry's hostname is a hint: anyone may register a name the moment its holder lets go of
it (or is made to, by an unsigned re-register of its key). Like OpenSSH's ``known_hosts``,
the first answer for a name is remembered, and a later answer that maps the name to another
node ID or key is refused until the operator says it is expected (``forget``).

The file is JSON ``{"names": {"<name>": {"node_id": N, "public_key": "<b64>"}}}``, written
atomically (temporary file, fsync, rename) at every change; a file that does not parse is
an error naming it, never silently emptied.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from . import fsutil
from .errors import HandshakeError, StoreError
from .events import TRUST_CHANGED, EventBus
from .identity import b64encode, decode_key, fingerprint

__all__ = ["NAMES_FILE", "HostnameLearner", "HostnameMoved", "NamePins"]

log = logging.getLogger(__name__)

NAMES_FILE = "names.json"  # beside the identity
_FOLLOW_POLL = 0.5  # how often the learner checks whether it should stop


class HostnameMoved(HandshakeError):
    """A pinned hostname now resolves to another node ID or key; the command did nothing."""

    def __init__(self, name: str, pinned: tuple[int, str], resolved: tuple[int, str]) -> None:
        self.name = name
        self.pinned = pinned
        self.resolved = resolved
        super().__init__(
            f"hostname {name} moved from {_describe(pinned, resolved)} to "
            f"{_describe(resolved, pinned)}; if that is expected: "
            f"pilot-handshakectl forget-name {name}"
        )

    def payload(self) -> dict[str, object]:
        """The ``hostname.changed`` event's payload."""
        return {
            "peer_node_id": self.pinned[0],
            "hostname": self.name,
            "public_key": self.pinned[1],
            "new_node_id": self.resolved[0],
            "new_public_key": self.resolved[1],
        }


def _describe(side: tuple[int, str], other: tuple[int, str]) -> str:
    """``node N``, with the key's fingerprint when the node IDs alone do not tell the two
    sides apart."""
    node, key = side
    shown = fingerprint(key)
    return f"node {node}" if node != other[0] or not shown else f"node {node} (key {shown})"


class NamePins:
    """The pinned names of one node, in ``path`` ("" = memory only). Thread-safe."""

    def __init__(self, path: str) -> None:
        """Load ``path`` (missing: nothing pinned). ``StoreError`` naming the file when it
        cannot be read or does not parse."""
        self.path = path
        self._lock = threading.Lock()
        self._pins: dict[str, tuple[int, str]] = {}
        if path:
            self._pins = _load(path)

    def pinned(self, name: str) -> tuple[int, str] | None:
        """``(node ID, key)`` pinned for ``name``, or None."""
        with self._lock:
            return self._pins.get(name)

    def check(self, name: str, node_id: int, public_key: str) -> None:
        """Resolving ``name`` gave ``node_id`` with ``public_key`` (base64): pin it when the
        name is new (durably: ``StoreError`` when that fails), else raise ``HostnameMoved``
        when it differs from the pin. Keys compare as bytes."""
        with self._lock:
            pinned = self._pins.get(name)
            if pinned is None:
                self._pin(name, node_id, public_key)
                return
        if not _same(pinned, (node_id, public_key)):
            raise HostnameMoved(name, pinned, (node_id, public_key))

    def learn(self, name: str, node_id: int, public_key: str) -> bool:
        """Pin ``name`` (a trusted peer's hostname, first learnt) unless it is pinned
        already; whether it was pinned now. A failed write is logged, not raised."""
        with self._lock:
            if name in self._pins:
                return False
            try:
                self._pin(name, node_id, public_key)
            except StoreError as exc:
                log.error("%s", exc)
                return False
        log.info("pinned hostname %s to node %d", name, node_id)
        return True

    def forget(self, name: str) -> bool:
        """Drop the pin of ``name``; whether there was one (``StoreError`` when the write
        fails: the pin then stays)."""
        with self._lock:
            if name not in self._pins:
                return False
            kept = self._pins.pop(name)
            try:
                self._save()
            except StoreError:
                self._pins[name] = kept
                raise
        log.info("forgot the pin of hostname %s (was node %d)", name, kept[0])
        return True

    def _pin(self, name: str, node_id: int, public_key: str) -> None:
        """Call holding the lock."""
        self._pins[name] = (node_id, public_key)
        try:
            self._save()
        except StoreError:
            del self._pins[name]
            raise

    def _save(self) -> None:
        if not self.path:
            return
        document = {
            "names": {
                name: {"node_id": node, "public_key": key}
                for name, (node, key) in sorted(self._pins.items())
            }
        }
        data = json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            fsutil.write_atomically(self.path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path}: {exc}", path=self.path) from exc


def _same(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """Same node ID and the same key bytes (base64 has several spellings)."""
    return a[0] == b[0] and (decode_key(a[1]) or a[1]) == (decode_key(b[1]) or b[1])


def _load(path: str) -> dict[str, tuple[int, str]]:
    try:
        document = json.loads(fsutil.read_file(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        raise StoreError(f"{path}: cannot read the pinned hostnames: {exc}", path=path) from exc
    names = document.get("names") if isinstance(document, dict) else None
    if not isinstance(names, dict):
        raise StoreError(f'{path}: expected {{"names": {{...}}}}', path=path)
    pins: dict[str, tuple[int, str]] = {}
    for name, pin in names.items():
        node = pin.get("node_id") if isinstance(pin, dict) else None
        key = pin.get("public_key") if isinstance(pin, dict) else None
        if type(node) is not int or not isinstance(key, str):
            raise StoreError(
                f"{path}: names.{name}: expected node_id (integer), public_key", path=path
            )
        pins[name] = (node, key)
    return pins


class HostnameLearner:
    """Pins the hostname of each peer we come to trust, when first learnt (SPEC 17).

    Follows ``events`` on a thread of its own: after a ``trust.changed`` grant it asks
    ``lookup`` (the registry's) for the peer and pins the hostname there, but only when the
    registry binds the peer to the key we trust (``trusted_key``); a name pinned already is
    left as it is. Best effort: a failed lookup pins nothing (the next command that resolves
    the name pins it)."""

    def __init__(
        self,
        pins: NamePins,
        events: EventBus,
        lookup: Callable[[int], dict[str, Any]],
        trusted_key: Callable[[int], bytes | None],
    ) -> None:
        """Learn into ``pins``; nothing runs until ``start()``."""
        self._pins = pins
        self._events = events
        self._lookup = lookup
        self._trusted_key = trusted_key
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Follow the event stream on a daemon thread."""
        subscription = self._events.subscribe()
        self._thread = threading.Thread(
            target=self._run, args=(subscription,), name="hostname-learner", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop following (waits up to ``timeout`` for a lookup in flight)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, subscription: Any) -> None:
        try:
            while not self._stopping.is_set():
                event = subscription.get(_FOLLOW_POLL)
                data = event.get("data") if event is not None else None
                if (
                    event is not None
                    and event.get("event") == TRUST_CHANGED
                    and isinstance(data, dict)
                    and data.get("state") == "granted"
                    and type(data.get("peer_node_id")) is int
                ):
                    self.learn(data["peer_node_id"])
        finally:
            subscription.close()

    def learn(self, node_id: int) -> None:
        """Pin the registry's hostname of the trusted ``node_id``, if it has one and the
        registry binds the key we trust."""
        try:
            answer = self._lookup(node_id)
        except (HandshakeError, OSError) as exc:
            log.debug("no hostname learnt for node %d: %s", node_id, exc)
            return
        name = answer.get("hostname")
        key = decode_key(answer.get("public_key"))
        if not isinstance(name, str) or not name or key is None:
            return
        if key != self._trusted_key(node_id):
            return  # the registry binds another key: that name is not our peer's
        self._pins.learn(name, node_id, b64encode(key))
