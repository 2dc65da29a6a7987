"""The daemon's registry loop (SPEC 11, 17, 18): register, heartbeat, poll the relay.

Two background threads share the work. ``registry-loop`` keeps the node registered: it
registers to learn the node ID, heartbeats every ``heartbeat_interval``, checks the node's
own record (``RecordWatch``) and its visibility, and after ``HEARTBEAT_FAILURES_BEFORE_
REREGISTER`` failed heartbeats in a row registers again (the real registry rate-limits
``register``). ``registry-poll`` drains the relay inbox when ``PollSchedule`` says so (idle,
fast window, on demand), or, with a registry that advertises ``wait_poll``, keeps one long
poll open; it hands each relayed request and response to the Manager. Each thread backs off
on failure (``backoff``: doubling up to ``MAX_BACKOFF``, with jitter, so a fleet does not
reconnect in step); a failed poll also makes the other thread heartbeat at once, so a
registry that forgot the node is noticed at the pace of the polls. While the registry is
unreachable the daemon keeps serving direct handshakes.

No exception ends a thread: every round is guarded, the computation of the next wait
included. Should one end all the same (an exception that is not an ``Exception``), that is
an ERROR and ``state()["loop"]`` says so, which ``status`` shows and which stops the systemd
watchdog from reporting the daemon healthy. ``stop()`` closes the loop's registry client,
which aborts a call in flight (a held poll, a registry that never answers) at once.

A poll answer comes from the network: at most ``MAX_RELAY_ITEMS_PER_POLL`` of its items are
processed, and malformed or excess items are counted and reported in one WARNING per
``RELAY_LOG_INTERVAL``, so a hostile or broken registry cannot flood the log or hold the
loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from .constants import (
    HEARTBEAT_FAILURES_BEFORE_REREGISTER,
    MAX_BACKOFF,
    MAX_NODE_ID,
    POLL_IDLE,
    REGISTRY_START_GRACE,
)
from .errors import RegistryError
from .events import BINDING_CHANGED
from .identity import Identity, b64encode
from .logthrottle import LogThrottle
from .messages import handshake_challenge
from .pollschedule import ON_DEMAND_BOUND, PollSchedule, backoff

log = logging.getLogger(__name__)

# The real registry's inbox holds at most 100 requests per node; more in one answer is junk.
MAX_RELAY_ITEMS_PER_POLL = 256
RELAY_LOG_INTERVAL = 10.0  # at most one WARNING about dropped relay items per interval
WAIT_POLL = "wait_poll"  # the registry feature of held polls (SPEC 18)
LONG_POLL_WAIT = 55.0  # seconds a held poll may wait (SPEC 18)
MAX_RELAYED_REMEMBERED = 1024  # relayed requests whose text is kept to send again
MAX_REASON = 4096  # characters of a relayed rejection's reason taken (the Manager keeps 1 KiB)


class LoopRegistry(Protocol):
    """The registry calls the loop makes (``registry.client.RegistryConnection`` provides them)."""

    address: str

    def register(
        self, listen_addr: str, public_key_b64: str, owner: str = "", hostname: str = ""
    ) -> dict[str, Any]: ...

    def heartbeat(self, node_id: int) -> dict[str, Any]: ...

    def lookup(self, node_id: int) -> dict[str, Any]: ...

    def set_visibility(self, node_id: int, public: bool) -> dict[str, Any]: ...

    def poll_handshakes(self, node_id: int, wait: float = 0.0) -> dict[str, Any]: ...

    def request_handshake(
        self, from_node_id: int, to_node_id: int, justification: str, signature_b64: str
    ) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Outgoing(Protocol):
    """An outgoing request as the Manager lists it: to whom, when it was sent, and whether
    it still waits for an answer."""

    @property
    def node_id(self) -> int: ...

    @property
    def sent_at(self) -> datetime: ...

    @property
    def waiting(self) -> bool: ...


class RelayTarget(Protocol):
    """Where relayed input goes, and what we wait for (``Manager`` provides these)."""

    def process_relayed_request(
        self, from_node_id: int, justification: str, public_key: str = ""
    ) -> None: ...

    def process_relayed_approval(self, from_node_id: int) -> None: ...

    def process_relayed_rejection(self, from_node_id: int, reason: str = "") -> None: ...

    def outgoing_requests(self) -> Sequence[Outgoing]: ...


def _node_id(value: Any) -> int:
    """``value`` when it is a valid non-zero node ID, else 0."""
    return value if type(value) is int and 0 < value <= MAX_NODE_ID else 0


class _DropReport:
    """Counts relay items dropped (malformed, or past the per-poll bound) and logs them in
    one WARNING per ``RELAY_LOG_INTERVAL``, with an example of the last malformed one."""

    def __init__(self) -> None:
        self._throttle = LogThrottle(RELAY_LOG_INTERVAL)
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
        if not (self._malformed or self._excess) or self._throttle.admit() is None:
            return
        log.warning(
            "relay %s: dropped %d malformed items (last: %s) and %d past the limit of %d per poll",
            address,
            self._malformed,
            self._example or "none",
            self._excess,
            MAX_RELAY_ITEMS_PER_POLL,
        )
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
    """Keeps this node registered and drains its relay inbox on two background threads.

    ``listen_addr`` is what ``register`` announces, with ``hostname`` when not "" (a name
    the registry refuses is an ERROR and shows in ``state()``, never a failed start);
    ``on_node_id(node_id)`` runs whenever the registry assigns an ID (the runtime's
    ``node_id()`` reads it). After registering, and then once per ``heartbeat_interval``,
    the loop checks its own record (``RecordWatch``): a difference is an ERROR and a
    ``registry.binding_changed`` event through ``publish``, and a registry that honours
    signed re-registers (``pilot-registryd``, which advertises ``features``) is told the
    record again. ``relayed(peer, justification)`` is told of each relayed request this
    daemon sends (``RegistryConnection.on_relayed``); each time the registry answers again
    after it could not be reached, the ones still waiting for an answer are sent once more
    (a registry may lose its inboxes: ``pilot-registryd`` before round 3, or any that
    restarts; the production one refuses the copy while the first still waits, which just
    means it is there). The loop owns ``client``: ``stop()`` closes it. Thread-safe.
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
        poll_idle: float = POLL_IDLE,
        public: bool = False,
        hostname: str = "",
        on_node_id: Callable[[int], None] | None = None,
        publish: Callable[[str, dict[str, Any]], None] | None = None,
        max_backoff: float = MAX_BACKOFF,
        start_grace: float = REGISTRY_START_GRACE,
        long_poll_wait: float = LONG_POLL_WAIT,
    ) -> None:
        self._client = client
        self._identity = identity
        self._target = target
        self.listen_addr = listen_addr
        self._poll_interval = poll_interval
        self._heartbeat_interval = heartbeat_interval
        self._public = public
        self._hostname = hostname
        self._on_node_id = on_node_id
        self._publish = publish
        self._max_backoff = max_backoff
        self._start_grace = start_grace
        self._long_poll_wait = long_poll_wait
        self._created = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Shared state, under the condition's lock.
        self._cond = threading.Condition()
        self._node_id = 0
        self._loop_state = "running"
        self._reachable = False
        self._last_error = ""
        self._hostname_error = ""
        self._features: frozenset[str] = frozenset()
        self._complained = False  # a WARNING was logged for the outage going on
        self._waiting_said = False  # the start-up INFO was logged
        self._outages = 0  # times the registry became unreachable
        self._outages_seen = 0  # ... of which the relayed requests were sent again for
        self._relayed: dict[int, str] = {}  # peer -> justification of our relayed request
        self._suspect = False  # a poll failed: heartbeat now
        self._attempted = False  # the first registration was tried
        self._schedule = PollSchedule(
            time.monotonic, fast=poll_interval, idle=poll_idle, cap=max_backoff
        )
        self._polling = False
        self._polls_done = 0
        # Upkeep-thread state: only that thread (or register_once before start) touches it.
        self._failures = 0
        self._heartbeat_failures = 0
        self._next_heartbeat = 0.0
        self._visibility_done = not public
        self._watch = RecordWatch(identity.public_key_b64, listen_addr, public)
        self._next_record_check = 0.0
        self._next_reassert = 0.0
        self._moved: dict[str, dict[str, Any]] = {}
        # Poll-thread state.
        self._drops = _DropReport()
        self._plain_next = False

    # -- state ------------------------------------------------------------------------

    @property
    def node_id(self) -> int:
        """The registry-assigned node ID; 0 until registered."""
        with self._cond:
            return self._node_id

    def state(self) -> dict[str, Any]:
        """The registry's state for ``status``: address, reachability, last error, why
        the registry did not set the hostname asked for ("" when it did; the name itself is
        ``status``'s top-level ``hostname``, as the registry has it), how the relay is
        polled (``relay``: "push" or "poll"), and ``loop``: "running", or "stopped: <why>"
        when a loop thread ended on its own."""
        with self._cond:
            return {
                "address": self._client.address,
                "reachable": self._reachable,
                "loop": self._loop_state,
                "registered": self._node_id != 0,
                "relay": "push" if WAIT_POLL in self._features else "poll",
                "error": self._last_error,
                "hostname_error": self._hostname_error,
            }

    def _note(self, ok: bool, error: str = "") -> None:
        """Record reachability; one WARNING per outage, one INFO when it ends.

        While the first registration is younger than ``start_grace``, failures are INFO: a
        fleet started all at once (or a README block pasted whole) starts its daemons
        before the registry listens, and that is no fault.
        """
        address = self._client.address
        with self._cond:
            was = self._reachable
            self._reachable = ok
            self._last_error = error
            if ok:
                say = "back" if self._complained else ""
                self._complained = self._waiting_said = False
            elif self._complained:
                say = ""
            elif not self._node_id and time.monotonic() - self._created < self._start_grace:
                say = "" if self._waiting_said else "waiting"
                self._waiting_said = True
            else:
                say = "warn"
                self._complained = True
            if was and not ok:
                self._outages += 1
            if was != ok:
                self._cond.notify_all()
        if say == "back":
            log.info("registry %s reachable again", address)
        elif say == "waiting":
            log.info("registry %s not reachable yet (%s); retrying", address, error)
        elif say == "warn":
            log.warning("registry %s: %s", address, error)

    # -- lifecycle --------------------------------------------------------------------

    def register_once(self) -> bool:
        """Register now; True on success. The loop does this itself first when started."""
        try:
            response = self._register()
            if response is None:
                return False
            node_id = _node_id(response.get("node_id"))
            if not node_id:
                self._note(False, f"register answered a bad node_id: {response.get('node_id')!r}")
                return False
            with self._cond:
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
        finally:
            with self._cond:
                self._attempted = True
                self._cond.notify_all()

    def wait_registration(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first registration to be tried (or the
        loop to stop); whether it was (``node_id`` tells whether it succeeded)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._attempted or self._stop.is_set(), timeout)

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
        listed = features if isinstance(features, list) else []
        with self._cond:
            self._features = frozenset(f for f in listed if isinstance(f, str))
            self._cond.notify_all()
        return response

    def _check_hostname(self, response: dict[str, Any]) -> None:
        # The registry registers the node without a name it refuses (taken or invalid) and
        # then leaves ``hostname`` out of its answer.
        if not self._hostname:
            return
        granted = response.get("hostname") == self._hostname
        error = ""
        if not granted:
            # pilot-registryd and the production registry say why in ``hostname_error``
            # ("taken by node 3", invalid); the production registry's re-registration of
            # a known key drops a taken name without a word.
            said = response.get("hostname_error")
            reason = said if isinstance(said, str) and said else "taken by another node"
            name = repr(self._hostname)
            error = reason if name in reason else f"hostname {name} not set: {reason}"
        with self._cond:
            changed, self._hostname_error = error != self._hostname_error, error
        if error and changed:
            log.error("%s", error)

    def start(self) -> None:
        """Start the background threads (the first registration is theirs). Idempotent."""
        if self._threads or self._stop.is_set():
            return
        for name, run in (
            ("registry-loop", self._upkeep_round),
            ("registry-poll", self._poll_round),
        ):
            thread = threading.Thread(target=self._run, args=(run,), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = MAX_BACKOFF) -> None:
        """Stop the threads: wake them, abort the registry call in flight (the client is
        closed), join them. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._client.close()
        for thread in self._threads:
            thread.join(timeout)

    def refresh(self, timeout: float = ON_DEMAND_BOUND) -> None:
        """Poll the relay once now, for an operator about to look at handshake state (SPEC
        18): wait (at most ``timeout``) for a poll that starts after this call, or for the
        one in flight. Returns at once with push (the held poll delivers at once), when a
        poll started less than 2 s ago, while polls fail, and before registration."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._node_id or not self._reachable or self._loop_state != "running":
                return
            if WAIT_POLL in self._features:
                return  # the held poll is open: whatever arrives is delivered at once
            if self._polling:
                target = self._polls_done + 1
            elif self._schedule.demand():
                target = self._polls_done + 1
                self._cond.notify_all()
            else:
                return
            while self._polls_done < target and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    # -- the threads ------------------------------------------------------------------

    def _run(self, one_round: Callable[[], float]) -> None:
        try:
            delay = 0.0
            while True:
                with self._cond:
                    if self._stop.is_set():
                        return
                    if delay > 0:
                        self._cond.wait(delay)
                    if self._stop.is_set():
                        return
                delay = self._guarded(one_round)
        finally:
            if not self._stop.is_set():
                # Only a BaseException that is not an Exception gets here (it is logged by
                # threading.excepthook); the node is off the registry until it restarts.
                self._stopped(f"{threading.current_thread().name} ended by an unexpected exception")

    def _guarded(self, one_round: Callable[[], float]) -> float:
        """One round; returns how long to wait before the next (woken earlier by news)."""
        try:
            return max(0.0, float(one_round()))
        except Exception:
            # A bug in one round must not end relay service for the daemon's lifetime.
            log.exception("%s: round failed", threading.current_thread().name)
            return self._max_backoff

    def _stopped(self, why: str) -> None:
        with self._cond:
            self._loop_state = f"stopped: {why}"
        log.error(
            "registry loop stopped: %s; this node no longer heartbeats or polls the relay: "
            "restart the daemon",
            why,
        )

    # -- upkeep: register, heartbeat, own record --------------------------------------

    def _upkeep_round(self) -> float:
        ok = self._upkeep()
        if not ok:
            self._failures += 1
            return backoff(self._failures, self._poll_interval, self._max_backoff)
        self._failures = 0
        self._after_outage_once()
        now = time.monotonic()
        due = min(self._next_heartbeat, self._next_record_check)
        with self._cond:
            if self._suspect:
                return 0.0
        return min(self._heartbeat_interval, max(0.0, due - now))

    def _upkeep(self) -> bool:
        """One upkeep round; False when the registry failed (the caller backs off)."""
        node_id = self.node_id
        if not node_id:
            return self.register_once()
        with self._cond:
            suspect, self._suspect = self._suspect, False
        due = self._failures or suspect or time.monotonic() >= self._next_heartbeat
        if due and not self._heartbeat(node_id):
            return False
        self._ensure_visibility(node_id)
        if time.monotonic() >= self._next_record_check:
            self._check_record(node_id)
        return True

    def relayed(self, peer: int, justification: str) -> None:
        """Our relayed request to ``peer`` with ``justification`` was queued at the registry
        (kept, the latest per peer and at most ``MAX_RELAYED_REMEMBERED``, to send again
        after an outage)."""
        with self._cond:
            self._relayed.pop(peer, None)
            self._relayed[peer] = justification
            while len(self._relayed) > MAX_RELAYED_REMEMBERED:
                del self._relayed[next(iter(self._relayed))]

    def _after_outage_once(self) -> None:
        """After an outage, send each relayed request still waiting for an answer once
        more (issue 20.3): the registry may have lost it."""
        with self._cond:
            node_id = self._node_id
            if self._outages == self._outages_seen or not self._reachable or not node_id:
                return
            self._outages_seen = self._outages
            remembered = dict(self._relayed)
        waiting = {r.node_id for r in self._target.outgoing_requests() if r.waiting}
        for peer, justification in remembered.items():
            if peer not in waiting:
                with self._cond:
                    self._relayed.pop(peer, None)
                continue
            signature = b64encode(self._identity.sign(handshake_challenge(node_id, peer)))
            try:
                self._client.request_handshake(node_id, peer, justification, signature)
            except RegistryError as exc:
                # The production registry refuses a second request while the first waits
                # in the inbox: then it is still there.
                log.debug("relayed request to node %d not sent again: %s", peer, exc)
                continue
            log.info("relayed request to node %d sent again after the registry outage", peer)

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
        with self._cond:
            reassert = bool(self._features)
        if moved and reassert:
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
        with self._cond:
            reassert = bool(self._features)
        log.error(
            "registry %s changed this node's record (node %d): %s; %s",
            address,
            node_id,
            said,
            "registering again (signed)"
            if reassert
            else "someone re-registered this node's key or re-bound its ID: check the registry",
        )
        if self._publish is not None:
            self._publish(BINDING_CHANGED, {"node_id": node_id, "moved": moved})

    # -- polls ------------------------------------------------------------------------

    def _poll_round(self) -> float:
        with self._cond:
            node_id = self._node_id
            push = WAIT_POLL in self._features
            self._schedule.push = push
        if not node_id:
            return self._poll_interval  # woken when registered
        due = self._schedule.next_poll(self._waiting_since()) - time.monotonic()
        if due > 0:
            # Looked at again at least every poll_interval: a request sent meanwhile opens
            # the fast window (the Manager's outgoing requests are the truth of it).
            return min(due, self._poll_interval) if not push else due
        with self._cond:
            self._polling = True
            self._schedule.started()
        # A held poll the registry refused (at its cap of held polls) or that failed is
        # followed by a plain one: the inbox is drained whatever happens to holding.
        wait = self._long_poll_wait if push and not self._plain_next else 0.0
        ok, items = False, 0
        try:
            ok, items = self._poll(node_id, wait)
            self._plain_next = wait > 0 and not ok
        finally:
            with self._cond:
                self._polling = False
                self._polls_done += 1
                self._schedule.finished(ok, items)
                if not ok:
                    self._suspect = True
                self._cond.notify_all()
        return 0.0

    def _waiting_since(self) -> list[float]:
        """When each outgoing request still waiting was sent, on the monotonic clock."""
        wall, mono = time.time(), time.monotonic()
        since = []
        for request in self._target.outgoing_requests():
            if not request.waiting:
                continue
            sent = request.sent_at
            if sent.tzinfo is None:
                sent = sent.replace(tzinfo=timezone.utc)
            since.append(mono - (wall - sent.timestamp()))
        return since

    def _poll(self, node_id: int, wait: float) -> tuple[bool, int]:
        """One poll (held up to ``wait`` seconds with push): (ok, items delivered)."""
        try:
            response = self._client.poll_handshakes(node_id, wait)
        except RegistryError as exc:
            if not self._stop.is_set():
                self._note(False, f"poll failed: {exc}")
            return False, 0
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
        return True, len(requests) + len(responses)

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
        reason = item.get("reason")  # pilot-registryd passes a rejection's reason on
        try:
            if item["accept"]:
                self._target.process_relayed_approval(peer)
            else:
                self._target.process_relayed_rejection(
                    peer, reason[:MAX_REASON] if isinstance(reason, str) else ""
                )
        except Exception as exc:
            log.error("relay: response from node %d failed: %s", peer, exc)
