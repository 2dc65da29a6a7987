"""The composition root: ``DaemonRuntime`` and ``Daemon`` (SPEC sections 1, 11, 12, 12a).

``Daemon(config)`` builds everything from a parsed config: the identity, the event bus, the
registry client, the runtime, the ``Manager`` (which loads ``trust.json`` and takes the
identity directory's lock), the control socket and the registry loop. ``start()`` binds port
444 (the ``listen`` address), registers once, and starts the background threads; ``stop()``
undoes it. The ``pilot-handshaked`` program around it (signals, logging, exit codes) is
``handshaked.main()``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import threading
from types import TracebackType
from typing import Any, Callable

from .addresses import format_address, parse_address
from .config import Config, RegistryConfig, load_config
from .constants import REGISTRY_TIMEOUT, STOP_TIMEOUT
from .control import ControlServer
from .errors import HandshakeError, RegistryError, SendError
from .events import EventBus
from .identity import Identity, fingerprint, verify
from .manager import Manager
from .messages import receipt_challenge
from .metrics import Metrics, MetricsServer
from .names import NAMES_FILE, HostnameLearner, NamePins
from .registry.client import RegistryConnection
from .registry_loop import RegistryLoop
from .runtime import AllowlistEntry, Closeable
from .server import HandshakeServer
from .statedir import NODE_FILE, NodeIdMemory, check_identity_mode, prepare_state_directory
from .wire import send_message

log = logging.getLogger(__name__)

__all__ = ["Daemon", "DaemonRuntime"]

# How long a stop lets background registry calls finish before it aborts them.
STOP_REGISTRY_GRACE = 0.5


class DaemonRuntime:
    """The ``Runtime`` of the daemon: policy from the config, the identity, events to the
    ``EventBus``, port 444 through a ``HandshakeServer`` on ``config.listen``, dialling via
    the ``peers`` map or the registry's ``resolve``.

    ``reload(config)`` swaps the reloadable part of the config (``trust`` and ``peers``) in
    one assignment, so every call sees either the old policy or the new one.
    """

    def __init__(
        self,
        config: Config,
        identity: Identity,
        events: EventBus,
        client: RegistryConnection | None,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics if metrics is not None else Metrics()
        self._identity = identity
        self._events = events
        self._client = client
        self._registered_id = 0
        self._server: HandshakeServer | None = None
        self._peer_key: Callable[[int], bytes | None] = _no_key

    @property
    def config(self) -> Config:
        """The config in force (after any reload)."""
        return self._config

    def reload(self, config: Config) -> None:
        """Take ``trust`` (allowlist, deny, auto_approve, strict, the TTLs) and ``peers``
        from ``config``; the rest needs a restart."""
        self._config = dataclasses.replace(self._config, trust=config.trust, peers=config.peers)

    def set_node_id(self, node_id: int) -> None:
        """Record the registry-assigned node ID (the registry loop calls this)."""
        self._registered_id = node_id

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """The bound (host, port) of port 444, None before it is bound."""
        server = self._server
        return server.address if server is not None else None

    def active_connections(self) -> int:
        """How many port-444 connections are being served (0 before it is bound)."""
        server = self._server
        return server.active_connections() if server is not None else 0

    def close_listener(self) -> None:
        """Stop accepting on port 444 and wait (bounded) for the handlers in flight."""
        if self._server is not None:
            self._server.close()

    # -- the Runtime protocol ----------------------------------------------------------

    def node_id(self) -> int:
        """``config.node_id`` without a registry; with one, the ID it assigned, until then
        the one it assigned last time (``NodeIdMemory``), else 0."""
        return self._config.node_id if self._client is None else self._registered_id

    def public_key(self) -> bytes:
        """The raw Ed25519 public key."""
        return self._identity.public_key

    def sign(self, msg: bytes) -> bytes:
        """Sign with the node's identity."""
        return self._identity.sign(msg)

    def identity_path(self) -> str:
        """The identity file; trust.json lives beside it."""
        return self._config.identity

    def trust_auto_approve(self) -> bool:
        """Config ``trust.auto_approve``."""
        return self._config.trust.auto_approve

    def trusted_agent(self, node_id: int) -> AllowlistEntry | None:
        """The allowlist entry for ``node_id``, if any."""
        return self._config.trust.allowlist.get(node_id)

    def trust_strict(self) -> bool:
        """Config ``trust.strict``."""
        return self._config.trust.strict

    def trust_outgoing_ttl(self) -> float:
        """Config ``trust.outgoing_ttl``."""
        return self._config.trust.outgoing_ttl

    def trust_pending_ttl(self) -> float:
        """Config ``trust.pending_ttl``."""
        return self._config.trust.pending_ttl

    def is_denied(self, node_id: int) -> bool:
        """Whether ``node_id`` is on the deny list."""
        return node_id in self._config.trust.deny

    def publish_event(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish on the event bus (never blocks)."""
        self._events.publish(topic, payload)

    def port_listener(self, port: int, handler: Callable[[socket.socket], None]) -> Closeable:
        """Serve ``handler`` on ``config.listen``: the listen address decides the real port,
        ``port`` (always 444 from the Manager) only names the service."""
        config = self._config
        server = HandshakeServer(
            parse_address(config.listen),
            handler,
            max_connections=config.max_connections,
            max_connections_per_source=config.max_connections_per_source,
            metrics=self._metrics,
        )
        server.start()
        self._server = server
        return server

    def set_peer_keys(self, peer_key: Callable[[int], bytes | None]) -> None:
        """Where ``dial_and_send`` learns the key a peer's receipt must verify with (the
        Manager's ``peer_key``; until set, every well-formed receipt counts)."""
        self._peer_key = peer_key

    def dial_and_send(self, peer_node_id: int, port: int, data: bytes) -> None:
        """Deliver ``data`` to the peer's port 444 at its ``peers`` address, else at the
        address the registry resolves. Delivered means the receiver returned a receipt
        signed by the key we expect for that peer (SPEC 3); with no key known, a well-formed
        one (trust on first use). Raises ``SendError``: a missing or wrong receipt is one
        WARNING naming the address, and the caller then relays."""
        address = self._peer_address(peer_node_id)
        receipt = send_message(address, data)
        key = self._peer_key(peer_node_id)
        if receipt is None:
            problem = "no receipt"
        elif key is not None and not verify(
            key, receipt_challenge(peer_node_id, self.node_id(), data), receipt
        ):
            problem = "a receipt not signed by its key"
        else:
            return
        where = format_address(address)
        log.warning(
            "%s did not prove the key of node %d (%s); not delivered", where, peer_node_id, problem
        )
        raise SendError(f"{where} did not prove the key of node {peer_node_id}: {problem}")

    def can_dial(self, node_id: int) -> bool:
        """Whether ``dial_and_send`` may reach ``node_id``: it has a ``peers`` address, or
        we are registered with a registry that may resolve it. Asks nothing on the network."""
        return bool(self._config.peers.get(node_id)) or (
            self._client is not None and self.node_id() != 0
        )

    def _peer_address(self, peer: int) -> tuple[str, int]:
        static = self._config.peers.get(peer)
        if static:
            return parse_address(static)
        if self._client is None:
            raise SendError(f"no address for node {peer}: not in peers and no registry")
        own = self.node_id()
        if not own:
            raise SendError(f"cannot resolve node {peer}: not registered yet")
        try:
            answer = self._client.resolve(peer, own)
        except RegistryError as exc:
            raise SendError(f"cannot resolve node {peer}: {exc}") from exc
        real_addr = answer.get("real_addr")
        if not isinstance(real_addr, str) or not real_addr:
            raise SendError(f"registry gave no address for node {peer}")
        try:
            return parse_address(real_addr)
        except ValueError as exc:
            raise SendError(f"registry gave a bad address for node {peer}: {exc}") from exc

    def remove_tunnel_peer(self, node_id: int) -> None:
        """No tunnels in the daemon: nothing to tear down."""

    def registry(self) -> RegistryConnection | None:
        """The registry client, None without a registry."""
        return self._client


def _no_key(node_id: int) -> bytes | None:
    return None


def _bind_error(listen: str, exc: OSError) -> HandshakeError:
    """One clear line for a failure to bind port 444."""
    if exc.errno == errno.EADDRINUSE:
        return HandshakeError(f"cannot listen on {listen}: address already in use")
    if exc.errno == errno.EACCES:
        return HandshakeError(
            # Not `setcap` on the interpreter: that would grant every script it runs.
            f"cannot listen on {listen}: permission denied; a port below 1024 needs "
            "CAP_NET_BIND_SERVICE: run under the systemd unit (AmbientCapabilities), or "
            "listen on a port >= 1024 and redirect the port to it"
        )
    return HandshakeError(f"cannot listen on {listen}: {exc.strerror or exc}")


class Daemon:
    """A whole node in one object (SPEC 12a): ``with Daemon.from_file(path) as node: ...``.

    Construction loads the identity and ``trust.json`` and takes the identity directory's
    lock (``StoreError`` when it is corrupt, unreadable or in use); ``start()`` binds the
    listen address and registers; ``stop()`` releases everything. Both are idempotent.
    """

    def __init__(self, config: Config) -> None:
        """Build every part from ``config``; nothing listens until ``start()``."""
        self.config = config
        self.metrics = Metrics(process=True, created=config.metrics.created_series)
        prepare_state_directory(config.identity)
        check_identity_mode(config.identity)
        self.identity = Identity.load_or_create(config.identity)
        self.events = EventBus(self._current_node_id, config.events.webhook, metrics=self.metrics)
        self.client: RegistryConnection | None = None
        registry = config.registry
        if registry is not None:
            self.client = self._registry_client(registry)
        self.runtime = DaemonRuntime(
            config, self.identity, self.events, self.client, metrics=self.metrics
        )
        self._node_memory = NodeIdMemory(
            os.path.join(os.path.dirname(config.identity), NODE_FILE), self.events.publish
        )
        if registry is not None:
            self.runtime.set_node_id(self._node_memory.remembered(registry.address))
        try:
            self.manager = Manager(
                self.runtime,
                max_replay_per_source=config.max_replay_per_source,
                metrics=self.metrics,
            )
        except BaseException:
            if self.client is not None:
                self.client.close()
            raise
        self.runtime.set_peer_keys(self.manager.peer_key)
        try:
            self.names = NamePins(os.path.join(os.path.dirname(config.identity), NAMES_FILE))
            self.control = ControlServer(
                config.control_socket,
                self.manager,
                self.status,
                self.events,
                node_id=self.runtime.node_id,
                registry=self.client,
                group=config.control.group,
                names=self.names,
            )
        except BaseException:
            self.manager.close()
            if self.client is not None:
                self.client.close()
            raise
        self.control.commands.reload = self.apply_reload
        self.loop: RegistryLoop | None = None
        self.metrics_server: MetricsServer | None = None
        # A trusted peer's hostname is pinned when first learnt (SPEC 17).
        self.learner = (
            HostnameLearner(self.names, self.events, self.client.lookup, self.manager.peer_key)
            if self.client is not None
            else None
        )
        self.metrics.watch(
            trusted=lambda: len(self.manager.trusted_peers()),
            pending=self.manager.pending_count,
            outgoing=lambda: sum(r.waiting for r in self.manager.outgoing_requests()),
            active_connections=self.runtime.active_connections,
            registry_up=self._registry_up if registry is not None else None,
        )
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    @classmethod
    def from_file(cls, path: str) -> Daemon:
        """Load and validate the YAML config at ``path`` (``ConfigError``) and build."""
        return cls(load_config(path))

    def _registry_up(self) -> float:
        loop = self.loop
        return 1.0 if loop is not None and loop.state()["reachable"] else 0.0

    def _current_node_id(self) -> int:
        return self.runtime.node_id()

    @property
    def node_id(self) -> int:
        """This node's ID; with a registry, the one it assigned last time until it answers,
        0 when there is none."""
        return self.runtime.node_id()

    @property
    def listen_address(self) -> tuple[str, int]:
        """The bound (host, port) of port 444 (the configured one before ``start()``)."""
        return self.runtime.listen_address or parse_address(self.config.listen)

    def status(self) -> dict[str, Any]:
        """What ``pilot-handshakectl status`` shows (SPEC 13), with this node's own public
        key and its fingerprint (the form ``pending`` shows), so an operator can pin this
        node in a peer's allowlist without opening identity.json."""
        loop = self.loop
        registry = None
        if self.config.registry is not None:
            registry = (
                loop.state()
                if loop is not None
                else {"address": self.config.registry.address, "reachable": False}
            )
        return {
            "node_id": self.node_id,
            "listen": format_address(self.listen_address),
            "registry": registry,
            "trusted": len(self.manager.trusted_peers()),
            "pending": self.manager.pending_count(),
            # Our answers that neither path delivered yet, being retried (SPEC 7 outbox).
            "undelivered": self.manager.undelivered_answers(),
            "public_key": self.identity.public_key_b64,
            "fingerprint": fingerprint(self.identity.public_key_b64),
            "webhook": (
                {"url": self.config.events.webhook, "dropped": self.events.webhook_dropped}
                if self.config.events.webhook
                else None
            ),
        }

    def status_line(self) -> str:
        """``status()`` in one line, for systemd's ``STATUS=``; asks the Manager, so it
        is also the watchdog's proof that the Manager answers."""
        status = self.status()
        line = (
            f"node {status['node_id']} on {status['listen']}: "
            f"{status['trusted']} trusted, {status['pending']} pending"
        )
        registry = status["registry"]
        if registry is not None:
            state = "reachable" if registry.get("reachable") else "unreachable"
            line += f", registry {registry['address']} {state}"
            if registry.get("loop", "running") != "running":
                line += f" (registry loop {registry['loop']})"
        return line

    def problems(self) -> list[str]:
        """What is broken although the Manager answers: a background loop that stopped.
        Under systemd, the watchdog reports the daemon healthy only while this is empty."""
        loop = self.loop
        state = loop.state()["loop"] if loop is not None else "running"
        return [] if state == "running" else [f"registry loop {state}"]

    def start(self, registration_wait: float = REGISTRY_TIMEOUT) -> None:
        """Bind port 444, serve the control socket, start the registry loop (it registers
        in the background) and the events, then wait up to ``registration_wait`` seconds
        for the first registration to be tried, so that ``node_id`` is known when the
        registry answers (port 444 and the control socket serve meanwhile; a registry that
        never answers costs this wait and nothing else). Idempotent; on failure everything
        is stopped again and ``HandshakeError`` says what went wrong."""
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        if registration_wait > 0:
            self.wait_registration(registration_wait)

    def wait_registration(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first registration to be tried; whether it
        was (True without a registry; ``node_id`` tells whether it succeeded)."""
        return self.loop.wait_registration(timeout) if self.loop is not None else True

    def _on_registered(self, node_id: int) -> None:
        self.runtime.set_node_id(node_id)
        if self.config.registry is not None:
            self._node_memory.check(self.config.registry.address, node_id)

    def _start(self) -> None:
        registry = self.config.registry
        for warning in self.config.security_warnings():
            log.warning("%s", warning)
        self.events.start()
        if self.learner is not None:
            self.learner.start()
        try:
            self.manager.start()
        except OSError as exc:
            raise _bind_error(self.config.listen, exc) from exc
        self.control.start()
        if self.config.metrics.listen:
            try:
                self.metrics_server = MetricsServer(self.config.metrics.listen, self.metrics)
            except OSError as exc:
                raise HandshakeError(
                    f"cannot serve metrics on {self.config.metrics.listen} (metrics.listen): "
                    f"{exc.strerror or exc}"
                ) from exc
        if registry is not None:
            # The loop has a client of its own: stopping the loop aborts its calls (a held
            # poll, a registry that never answers) and no one else's.
            self.loop = RegistryLoop(
                self._registry_client(registry),
                self.identity,
                self.manager,
                listen_addr=format_address(self.listen_address),
                poll_interval=registry.poll_interval,
                poll_idle=registry.poll_idle,
                heartbeat_interval=registry.heartbeat_interval,
                public=registry.public,
                hostname=self.config.hostname,
                on_node_id=self._on_registered,
                publish=self.events.publish,
            )
            self.control.commands.refresh = self.loop.refresh
            if self.client is not None:
                self.client.on_relayed = self.loop.relayed
            self.loop.start()

    def _registry_client(self, registry: RegistryConfig) -> RegistryConnection:
        return RegistryConnection(
            registry.address,
            self.identity.sign,
            tls=registry.tls,
            fingerprint=registry.fingerprint,
            metrics=self.metrics,
        )

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """The bound (host, port) of ``/metrics`` over HTTP, None when not served."""
        server = self.metrics_server
        return server.address if server is not None else None

    def stop(self) -> None:
        """Stop accepting, let handlers in flight finish, stop the registry loop, the
        Manager (it waits for background work), events and the control socket.
        Idempotent; also releases the identity directory when never started."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.runtime.close_listener()
        if self.loop is not None:
            self.loop.stop()
        if self.client is not None:
            # Background registry calls get a moment to finish; then the client is closed,
            # which aborts any that hang (a registry that accepts and never answers), so a
            # stop never waits out registry timeouts.
            self.manager.drain(STOP_REGISTRY_GRACE)
            self.client.close()
        self.manager.stop()
        # stop() does nothing for a Manager that never started; the directory lock must
        # still be released.
        self.manager.close()
        if self.learner is not None:
            self.learner.stop(STOP_TIMEOUT)
        self.events.stop()
        self.control.stop()

    def reload(self) -> list[str]:
        """Re-read the config file and apply its ``trust`` and ``peers`` sections (SIGHUP).
        Raises ``ConfigError`` (the old config stays) when the file is invalid. Returns the
        other keys that changed: they need a restart (and are logged)."""
        if not self.config.path:
            raise HandshakeError("this daemon was not built from a file; nothing to reload")
        fresh = load_config(self.config.path)
        ignored = [
            f.name
            for f in dataclasses.fields(Config)
            if f.name not in ("trust", "peers")
            and getattr(fresh, f.name) != getattr(self.config, f.name)
        ]
        self.runtime.reload(fresh)
        self.config = self.runtime.config
        if ignored:
            log.warning("config reload: changes to %s need a restart", ", ".join(ignored))
        return ignored

    def apply_reload(self) -> dict[str, Any]:
        """``reload()`` as SIGHUP and ``pilot-handshakectl reload`` do it: logged either way;
        the answer names what was reloaded and what needs a restart. ``HandshakeError``
        (the old config stays) when the file is invalid."""
        try:
            restart = self.reload()
        except HandshakeError as exc:
            log.error("config reload failed, keeping the old config: %s", exc)
            raise
        log.info("config reloaded: allowlist, deny list, peers, auto-approve")
        return {
            "reloaded": ["trust", "peers"],
            "restart_needed": restart,
            "config": self.config.path,
        }

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
