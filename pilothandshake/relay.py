"""The daemon's registry loop (SPEC 11): register, heartbeat, poll the relay.

One background thread does all three, so registry traffic from the loop is strictly
sequential. It registers to learn the node ID, heartbeats every ``heartbeat_interval``, and
polls the relay inbox every ``poll_interval``, handing each relayed request and response to
the Manager. On failure it backs off (``backoff``: doubling, at most ``MAX_BACKOFF``, with
jitter so that a fleet does not reconnect in step); while the registry is unreachable the
daemon keeps serving direct handshakes. Heartbeats are also sent at the backoff pace while
polls fail, and after ``HEARTBEAT_FAILURES_BEFORE_REREGISTER`` failed heartbeats in a row
the loop registers again (the real registry rate-limits ``register``, hence the backoff).

No exception ends the loop: every round is guarded, the computation of the next wait
included. Should the thread end all the same (an exception that is not an ``Exception``),
that is an ERROR and ``state()["loop"]`` says so, which ``status`` shows and which stops the
systemd watchdog from reporting the daemon healthy.

A poll answer comes from the network: at most ``MAX_RELAY_ITEMS_PER_POLL`` of its items are
processed, and malformed or excess items are counted and reported in one WARNING per
``RELAY_LOG_INTERVAL``, so a hostile or broken registry cannot flood the log or hold the
loop.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Protocol

from .constants import (
    HEARTBEAT_FAILURES_BEFORE_REREGISTER,
    MAX_BACKOFF,
    MAX_NODE_ID,
    REGISTRY_START_GRACE,
)
from .errors import RegistryError
from .identity import Identity

log = logging.getLogger(__name__)

# The real registry's inbox holds at most 100 requests per node; more in one answer is junk.
MAX_RELAY_ITEMS_PER_POLL = 256
BINDING_CHANGED = "registry.binding_changed"  # event topic (SPEC 14, 17)
RELAY_LOG_INTERVAL = 10.0  # at most one WARNING about dropped relay items per interval
# Doubling stops here: 2 ** 32 times any interval is far past MAX_BACKOFF, and the exponent
# must never grow with the length of an outage (2.0 ** 1024 overflows).
_MAX_DOUBLINGS = 32


def backoff(
    failures: int, base: float, cap: float, jitter: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after ``failures`` (>= 1) failures in a row: ``base`` doubled per
    failure, at most ``cap``, then between half and all of that (``jitter()`` in [0, 1)),
    so that daemons which lost the registry together do not come back in step."""
    ceiling = min(cap, base * 2.0 ** min(max(failures - 1, 0), _MAX_DOUBLINGS))
    return ceiling / 2 + jitter() * ceiling / 2


class LoopRegistry(Protocol):
    """The registry calls the loop makes (``registry.Client`` provides them)."""

    address: str

    def register(
        self, listen_addr: str, public_key_b64: str, owner: str = "", hostname: str = ""
    ) -> dict[str, Any]: ...

    def heartbeat(self, node_id: int) -> dict[str, Any]: ...

    def lookup(self, node_id: int) -> dict[str, Any]: ...

    def set_visibility(self, node_id: int, public: bool) -> dict[str, Any]: ...

    def poll_handshakes(self, node_id: int) -> dict[str, Any]: ...


class RelayTarget(Protocol):
    """Where relayed input goes (``Manager`` provides these)."""

    def process_relayed_request(
        self, from_node_id: int, justification: str, public_key: str = ""
    ) -> None: ...

    def process_relayed_approval(self, from_node_id: int) -> None: ...

    def process_relayed_rejection(self, from_node_id: int) -> None: ...


def _node_id(value: Any) -> int:
    """``value`` when it is a valid non-zero node ID, else 0."""
    return value if type(value) is int and 0 < value <= MAX_NODE_ID else 0


class _DropReport:
    """Counts relay items dropped (malformed, or past the per-poll bound) and logs them in
    one WARNING per ``RELAY_LOG_INTERVAL``, with an example of the last malformed one."""

    def __init__(self) -> None:
        self._last = -RELAY_LOG_INTERVAL
        self._malformed = 0
        self._excess = 0
        self._example = ""

    def malformed(self, kind: str, item: Any) -> None:
        self._malformed += 1
        self._example = f"{kind} {item!r:.100}"

    def excess(self, count: int) -> None:
        self._excess += count

    def flush(self, address: str) -> None:
        """Log what was counted, unless a line was logged less than an interval ago."""
        now = time.monotonic()
        if not (self._malformed or self._excess) or now - self._last < RELAY_LOG_INTERVAL:
            return
        log.warning(
            "relay %s: dropped %d malformed items (last: %s) and %d past the limit of %d per poll",
            address,
            self._malformed,
            self._example or "none",
            self._excess,
            MAX_RELAY_ITEMS_PER_POLL,
        )
        self._last = now
        self._malformed = self._excess = 0
        self._example = ""


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def _shown(value: Any) -> Any:
    """A value from the registry as logs and events may carry it: a long string cut short
    (a hostile registry must not fill the log), anything but a str or an int as its repr."""
    if isinstance(value, str):
        return value if len(value) <= 100 else value[:100] + "..."
    return value if value is None or type(value) is int else repr(value)[:100]


class RecordWatch:
    """What this node's own record at the registry should say (SPEC 17): its node ID, key,
    hostname and, when public, address; ``differences(lookup_answer)`` names what moved.

    The hostname is the one the registry granted at registration, and the address is the
    registry's own spelling of it (registries fill in the host a node listens on as
    0.0.0.0 from the connection), both learnt from the first lookup after a registration;
    that first answer must already carry this node's listen port.
    """

    def __init__(self, public_key_b64: str, listen_addr: str, public: bool) -> None:
        self._key = public_key_b64
        self._listen_addr = listen_addr
        self._public = public
        self._node_id = 0
        self._hostname: str | None = None
        self._address: str | None = None

    def registered(self, node_id: int, hostname: str | None) -> None:
        """A registration answered ``node_id``; ``hostname`` is the name it granted, None
        when none was asked (then whatever the first lookup shows is this node's)."""
        self._node_id = node_id
        self._hostname = hostname
        self._address = None

    def differences(self, found: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``{field: {"expected": ..., "found": ...}}`` for each field of the lookup answer
        ``found`` that is not what this node registered; {} when all match."""
        hostname = found.get("hostname", "")
        address = found.get("real_addr", "")
        if self._hostname is None:
            self._hostname = hostname
        if (
            self._public
            and self._address is None
            and _port(str(address)) == _port(self._listen_addr)
        ):
            self._address = address
        expected: dict[str, Any] = {
            "node_id": self._node_id,
            "public_key": self._key,
            "hostname": self._hostname,
        }
        if self._public:
            expected["address"] = self._address or self._listen_addr
        actual = {
            "node_id": found.get("node_id"),
            "public_key": found.get("public_key"),
            "hostname": hostname,
            "address": address,
        }
        return {
            name: {"expected": value, "found": _shown(actual[name])}
            for name, value in expected.items()
            if actual[name] != value
        }


class RegistryLoop:
    """Keeps this node registered and drains its relay inbox on a background thread.

    ``listen_addr`` is what ``register`` announces, with ``hostname`` when not "" (a name
    the registry refuses is an ERROR and shows in ``state()``, never a failed start);
    ``on_node_id(node_id)`` runs whenever the registry assigns an ID (the runtime's
    ``node_id()`` reads it). After registering, and then once per ``heartbeat_interval``,
    the loop checks its own record (``RecordWatch``): a difference is an ERROR and a
    ``registry.binding_changed`` event through ``publish``, and a registry that honours
    signed re-registers (``pilot-registryd``, which advertises ``features``) is told the
    record again. Thread-safe.
    """

    def __init__(
        self,
        client: LoopRegistry,
        identity: Identity,
        target: RelayTarget,
        *,
        listen_addr: str,
        poll_interval: float,
        heartbeat_interval: float,
        public: bool = False,
        hostname: str = "",
        on_node_id: Callable[[int], None] | None = None,
        publish: Callable[[str, dict[str, Any]], None] | None = None,
        max_backoff: float = MAX_BACKOFF,
        start_grace: float = REGISTRY_START_GRACE,
    ) -> None:
        self._client = client
        self._identity = identity
        self._target = target
        self.listen_addr = listen_addr
        self._poll_interval = poll_interval
        self._heartbeat_interval = heartbeat_interval
        self._public = public
        self._hostname = hostname
        self._hostname_error = ""
        self._on_node_id = on_node_id
        self._publish = publish
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._node_id = 0
        self._loop_state = "running"
        self._reachable = False
        self._last_error = ""
        self._visibility_done = not public
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Loop-thread state: only the loop thread (or register_once before start) touches it.
        self._failures = 0
        self._heartbeat_failures = 0
        self._next_heartbeat = 0.0
        self._watch = RecordWatch(identity.public_key_b64, listen_addr, public)
        self._next_record_check = 0.0
        self._next_reassert = 0.0
        self._moved: dict[str, dict[str, Any]] = {}
        self._features: frozenset[str] = frozenset()
        self._drops = _DropReport()
        self._created = time.monotonic()
        self._start_grace = start_grace
        self._complained = False  # a WARNING was logged for the outage going on
        self._waiting_said = False  # the start-up INFO was logged

    # -- state ------------------------------------------------------------------------

    @property
    def node_id(self) -> int:
        """The registry-assigned node ID; 0 until registered."""
        with self._lock:
            return self._node_id

    def state(self) -> dict[str, Any]:
        """The registry's state for ``status``: address, reachability, last error, the
        hostname asked for with why the registry did not set it ("" when it did), and
        ``loop``: "running", or "stopped: <why>" when the loop thread ended on its own."""
        with self._lock:
            return {
                "address": self._client.address,
                "reachable": self._reachable,
                "loop": self._loop_state,
                "registered": self._node_id != 0,
                "error": self._last_error,
                "hostname": self._hostname,
                "hostname_error": self._hostname_error,
            }

    def _note(self, ok: bool, error: str = "") -> None:
        """Record reachability; one WARNING per outage, one INFO when it ends.

        While the first registration is younger than ``start_grace``, failures are INFO: a
        fleet started all at once (or a README block pasted whole) starts its daemons
        before the registry listens, and that is no fault.
        """
        with self._lock:
            self._reachable = ok
            self._last_error = error
            registered = self._node_id != 0
        if ok:
            if self._complained:
                log.info("registry %s reachable again", self._client.address)
            self._complained = self._waiting_said = False
        elif self._complained:
            return
        elif not registered and time.monotonic() - self._created < self._start_grace:
            if not self._waiting_said:
                log.info(
                    "registry %s not reachable yet (%s); retrying", self._client.address, error
                )
                self._waiting_said = True
        else:
            log.warning("registry %s: %s", self._client.address, error)
            self._complained = True

    # -- lifecycle --------------------------------------------------------------------

    def register_once(self) -> bool:
        """Register now (used once before ``start()``); True on success."""
        response = self._register()
        if response is None:
            return False
        node_id = _node_id(response.get("node_id"))
        if not node_id:
            self._note(False, f"register answered a bad node_id: {response.get('node_id')!r}")
            return False
        with self._lock:
            changed = node_id != self._node_id
            self._node_id = node_id
        self._note(True)
        self._check_hostname(response)
        granted = response.get("hostname")
        self._watch.registered(
            node_id, (granted if isinstance(granted, str) else "") if self._hostname else None
        )
        self._next_record_check = 0.0  # now: the record as this registration left it
        self._heartbeat_failures = 0
        self._next_heartbeat = time.monotonic() + self._heartbeat_interval
        # A registry that lost this node lost its visibility too.
        self._visibility_done = not self._public
        if changed:
            log.info("registered with %s as node %d", self._client.address, node_id)
            if self._on_node_id is not None:
                self._on_node_id(node_id)
        self._ensure_visibility(node_id)
        return True

    def _register(self) -> dict[str, Any] | None:
        """``register`` (signed by the client), or None when it failed. Remembers the
        ``features`` the registry advertises."""
        try:
            response = self._client.register(
                self.listen_addr, self._identity.public_key_b64, hostname=self._hostname
            )
        except RegistryError as exc:
            self._note(False, f"register failed: {exc}")
            return None
        features = response.get("features")
        self._features = frozenset(
            f for f in (features if isinstance(features, list) else []) if isinstance(f, str)
        )
        return response

    def _check_hostname(self, response: dict[str, Any]) -> None:
        # The registry registers the node without a name it refuses (taken or invalid) and
        # then leaves ``hostname`` out of its answer.
        if not self._hostname:
            return
        granted = response.get("hostname") == self._hostname
        error = "" if granted else "the registry did not set it (taken by another node, or invalid)"
        with self._lock:
            changed, self._hostname_error = error != self._hostname_error, error
        if error and changed:
            log.error("hostname %r: %s", self._hostname, error)

    def start(self) -> None:
        """Start the background thread. Idempotent."""
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="registry-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = MAX_BACKOFF) -> None:
        """Wake the thread and join it (bounded by the registry call in flight). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            delay = 0.0
            while not self._stop.wait(delay):
                delay = self._round()
        finally:
            if not self._stop.is_set():
                # Only a BaseException that is not an Exception gets here (it is logged by
                # threading.excepthook); the node is off the registry until it restarts.
                self._stopped("ended by an unexpected exception")

    def _round(self) -> float:
        """One guarded round; returns how long to wait before the next."""
        try:
            ok = self._step()
        except Exception:
            # A bug in one round must not end relay service for the daemon's lifetime.
            log.exception("registry loop round failed")
            ok = False
        try:
            return self._delay_after(ok)
        except Exception:
            log.exception("registry loop: computing the next wait failed")
            return self._max_backoff

    def _delay_after(self, ok: bool) -> float:
        if not ok:
            self._failures += 1
            return backoff(self._failures, self._poll_interval, self._max_backoff)
        self._failures = 0
        delay = self._poll_interval
        if self.node_id:
            delay = min(delay, max(0.0, self._next_heartbeat - time.monotonic()))
        return delay

    def _stopped(self, why: str) -> None:
        with self._lock:
            self._loop_state = f"stopped: {why}"
        log.error(
            "registry loop %s: this node no longer heartbeats or polls the relay; "
            "restart the daemon",
            why,
        )

    def _step(self) -> bool:
        """One round; False when the registry failed (the caller backs off)."""
        node_id = self.node_id
        if not node_id:
            return self.register_once()
        heartbeat_due = self._failures or time.monotonic() >= self._next_heartbeat
        if heartbeat_due and not self._heartbeat(node_id):
            return False
        self._ensure_visibility(node_id)
        if time.monotonic() >= self._next_record_check:
            self._check_record(node_id)
        return self._poll(node_id)

    def _check_record(self, node_id: int) -> None:
        """SPEC 17: does the registry still give this node's ID, key, hostname and address?"""
        self._next_record_check = time.monotonic() + self._heartbeat_interval
        try:
            found = self._client.lookup(node_id)
        except RegistryError as exc:
            # Not a binding change: the registry may hide why (the next check retries).
            log.debug("registry %s: own-record lookup failed: %s", self._client.address, exc)
            return
        moved = self._watch.differences(found)
        if moved != self._moved:
            self._moved = moved
            self._say_moved(node_id, moved)
        if moved and self._features:
            # pilot-registryd honours a signed register of a known key (and only that): tell
            # it the record again, and look again at the next round.
            now = time.monotonic()
            if now >= self._next_reassert:
                self._next_reassert = now + self._heartbeat_interval
                self._next_record_check = now
                self._register()

    def _say_moved(self, node_id: int, moved: dict[str, dict[str, Any]]) -> None:
        address = self._client.address
        if not moved:
            log.info("registry %s holds node %d's record as registered again", address, node_id)
            return
        said = ", ".join(
            f"{name} {change['expected']!r} -> {change['found']!r}"
            for name, change in moved.items()
        )
        log.error(
            "registry %s changed this node's record (node %d): %s; %s",
            address,
            node_id,
            said,
            "registering again (signed)"
            if self._features
            else "someone re-registered this node's key or re-bound its ID: check the registry",
        )
        if self._publish is not None:
            self._publish(BINDING_CHANGED, {"node_id": node_id, "moved": moved})

    def _heartbeat(self, node_id: int) -> bool:
        try:
            self._client.heartbeat(node_id)
        except RegistryError as exc:
            self._heartbeat_failures += 1
            self._note(False, f"heartbeat failed: {exc}")
            if self._heartbeat_failures >= HEARTBEAT_FAILURES_BEFORE_REREGISTER:
                if self._heartbeat_failures == HEARTBEAT_FAILURES_BEFORE_REREGISTER:
                    log.warning("%d heartbeats failed: registering again", self._heartbeat_failures)
                return self.register_once()
            return False
        self._heartbeat_failures = 0
        self._next_heartbeat = time.monotonic() + self._heartbeat_interval
        self._note(True)
        return True

    def _ensure_visibility(self, node_id: int) -> None:
        if self._visibility_done:
            return
        try:
            self._client.set_visibility(node_id, True)
        except RegistryError as exc:
            log.warning("set_visibility(public) failed, will retry: %s", exc)
            return
        self._visibility_done = True
        log.info("node %d is public on the registry", node_id)

    def _poll(self, node_id: int) -> bool:
        try:
            response = self._client.poll_handshakes(node_id)
        except RegistryError as exc:
            self._note(False, f"poll failed: {exc}")
            return False
        self._note(True)
        requests = response.get("requests")
        responses = response.get("responses")
        requests = requests if isinstance(requests, list) else []
        responses = responses if isinstance(responses, list) else []
        budget = MAX_RELAY_ITEMS_PER_POLL
        # Responses first: they complete our own requests, and are few.
        for item in responses[:budget]:
            self._deliver_response(item)
        budget = max(0, budget - len(responses))
        for item in requests[:budget]:
            self._deliver_request(item)
        self._drops.excess(max(0, len(responses) + len(requests) - MAX_RELAY_ITEMS_PER_POLL))
        self._drops.flush(self._client.address)
        return True

    def _deliver_request(self, item: Any) -> None:
        if not isinstance(item, dict) or not _node_id(item.get("from_node_id")):
            self._drops.malformed("request", item)
            return
        justification = item.get("justification")
        public_key = item.get("public_key")
        try:
            self._target.process_relayed_request(
                item["from_node_id"],
                justification if isinstance(justification, str) else "",
                public_key if isinstance(public_key, str) else "",
            )
        except Exception as exc:
            log.error("relay: request from node %d failed: %s", item["from_node_id"], exc)

    def _deliver_response(self, item: Any) -> None:
        if (
            not isinstance(item, dict)
            or not _node_id(item.get("from_node_id"))
            or type(item.get("accept")) is not bool
        ):
            self._drops.malformed("response", item)
            return
        peer = item["from_node_id"]
        try:
            if item["accept"]:
                self._target.process_relayed_approval(peer)
            else:
                self._target.process_relayed_rejection(peer)
        except Exception as exc:
            log.error("relay: response from node %d failed: %s", peer, exc)
