"""The daemon's YAML configuration (SPEC section 12), parsed into frozen dataclasses.

Every key has a default. An unknown key, a value of the wrong type or an invalid value
raises ``ConfigError`` whose message names the file, the dotted key (for example
``trust.allowlist[1].public_key``) and what was expected (the field checks are
``yamlconfig.FieldParser``'s). One pass finds every problem of a file: ``check_config``
returns them all (``pilot-handshaked --check-config``), ``load_config`` raises the first and
says how many more there are. A section written as an empty YAML key (``trust:`` with
nothing under it, i.e. null) means "all defaults"; ``registry:`` left empty therefore means
no registry, like omitting it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .addresses import parse_address
from .constants import (
    CONTROL_SOCKET_NAME,
    DEFAULT_IDENTITY_PATH,
    DEFAULT_LISTEN,
    HEARTBEAT_INTERVAL,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_SOURCE,
    MAX_REPLAY_PER_SOURCE,
    OUTGOING_TTL,
    PENDING_TTL,
    POLL_IDLE,
    POLL_INTERVAL,
    TRUST_FILE,
)
from .errors import ConfigError
from .identity import decode_key
from .messages import MAX_NODE_ID
from .runtime import AllowlistEntry
from .yamlconfig import FieldParser, describe, read_yaml

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Config",
    "ControlConfig",
    "EventsConfig",
    "RegistryConfig",
    "TrustConfig",
    "check_config",
    "load_config",
    "parse_config",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_T = TypeVar("_T")
# What an entry naming a node by hostname is told (allowlist, deny, peers).
_NOT_A_HOSTNAME = (
    f"a node ID (an integer 0..{MAX_NODE_ID}), not a hostname: a hostname is first come, first "
    "served at the registry, so it names a node but proves nothing"
)


@dataclass(frozen=True)
class RegistryConfig:
    """Section ``registry``: where the registry is and how often to talk to it."""

    address: str
    tls: bool = False
    fingerprint: str = ""  # lowercase hex SHA-256 of the certificate, no colons; "" = no pin
    poll_interval: float = POLL_INTERVAL  # the fast window's period (SPEC 18)
    poll_idle: float = POLL_IDLE  # the idle period (SPEC 18)
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    public: bool = False


@dataclass(frozen=True)
class TrustConfig:
    """Section ``trust``: strict mode, auto-approval, the allowlist and the deny list."""

    strict: bool = True
    auto_approve: bool = False
    outgoing_ttl: float = OUTGOING_TTL
    pending_ttl: float = PENDING_TTL
    allowlist: dict[int, AllowlistEntry] = field(default_factory=dict)
    deny: frozenset[int] = frozenset()


@dataclass(frozen=True)
class EventsConfig:
    """Section ``events``: the webhook every event is POSTed to ("" for none)."""

    webhook: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    """Section ``metrics``: the ``HOST:PORT`` that serves ``/metrics`` over HTTP ("" = off);
    ``created_series`` keeps the ``_created`` series of counters and histograms."""

    listen: str = ""
    created_series: bool = False


@dataclass(frozen=True)
class ControlConfig:
    """Section ``control``: who besides root and the daemon's user may use the control
    socket (``group``: the socket becomes mode 0660 owned by that group; "" for none)."""

    group: str = ""


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``path`` is the file it came from ("" when built in code)."""

    identity: str = field(default_factory=lambda: os.path.expanduser(DEFAULT_IDENTITY_PATH))
    node_id: int = 0
    listen: str = DEFAULT_LISTEN
    # Asked of the registry at registration; a taken or invalid name is logged, not fatal.
    hostname: str = ""
    registry: RegistryConfig | None = None
    trust: TrustConfig = field(default_factory=TrustConfig)
    peers: dict[int, str] = field(default_factory=dict)
    events: EventsConfig = field(default_factory=EventsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE
    max_replay_per_source: int = MAX_REPLAY_PER_SOURCE
    log_level: str = "info"
    log_format: str = "text"
    path: str = ""

    @property
    def trust_path(self) -> str:
        """``trust.json`` beside the identity file."""
        return os.path.join(os.path.dirname(self.identity), TRUST_FILE)

    @property
    def control_socket(self) -> str:
        """The control socket, ``control.sock`` beside the identity file."""
        return os.path.join(os.path.dirname(self.identity), CONTROL_SOCKET_NAME)

    def security_warnings(self) -> list[str]:
        """Valid settings that weaken security, one line each (the daemon logs them at start)."""
        warnings = []
        if not self.trust.strict:
            warnings.append(
                "trust.strict is false (legacy mode): a Go-style signature over a "
                "registry-bound key is accepted in place of signature_v2, and relayed input "
                "is handled as the Go daemon does; every port-444 message still needs a valid "
                "key and signature, and an accept still needs our own outgoing request"
            )
        registry = self.registry
        if (
            registry is not None
            and self.trust.strict
            and not registry.tls
            and not _is_loopback(parse_address(registry.address)[0])
        ):
            warnings.append(
                f"registry {registry.address} is not on loopback and TLS is off: its "
                "signatures travel in the clear and can be replayed; set registry.tls (and "
                "fingerprint)"
            )
        return warnings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str) -> Config:
    """Read and validate the YAML file at ``path``; raises ``ConfigError`` naming the file."""
    return parse_config(read_yaml(path), path)


def control_socket_of(path: str) -> str:
    """The control socket of the daemon configured at ``path``: ``control.sock`` beside its
    identity. Reads only ``identity``: a client needs no more, and an error elsewhere in the
    file (the operator is fixing it) must not keep it from a running daemon (SPEC 13).
    Raises ``ConfigError`` naming the file when the file or that key is invalid."""
    data = read_yaml(path)
    parser = _ConfigParser(path)
    if data is not None and not isinstance(data, dict):
        parser.fail("(top level)", "a mapping", describe(data))
    top = data or {}
    identity = parser.get(top, "", "identity", Config().identity, parser.identity)
    return os.path.join(os.path.dirname(identity), CONTROL_SOCKET_NAME)


def parse_config(data: object, source: str) -> Config:
    """Validate already-loaded YAML ``data`` from file ``source`` into a ``Config``.

    ``source`` names the file in error messages, and a relative ``identity`` path is
    resolved against its directory. ``ConfigError`` tells the first problem and how many
    more there are.
    """
    parser = _ConfigParser(source)
    config = parser.config(data)
    if parser.problems:
        first, more = parser.problems[0], len(parser.problems) - 1
        if more:
            first += (
                f" (and {more} more problem{'s' if more > 1 else ''}: "
                f"pilot-handshaked --check-config {source} lists every one)"
            )
        raise ConfigError(first)
    return config


def check_config(path: str) -> list[str]:
    """Every problem of the config file at ``path``, one line each naming the file and the
    key (empty when it is valid). Reads the file only: binds nothing, locks nothing."""
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        return [str(exc)]
    parser = _ConfigParser(path)
    parser.config(data)
    return parser.problems


class _ConfigParser(FieldParser):
    """The sections of the daemon's config on top of the field checks. While ``config()``
    parses a whole file, a problem is noted in ``problems`` and the parse goes on with the
    key's default, so one pass finds every problem; any other use raises the first, as
    ``FieldParser`` does."""

    def config(self, data: object) -> Config:
        """The whole file's ``Config``, every problem noted in ``problems``."""
        self.collecting = True
        try:
            return self._config(data)
        finally:
            self.collecting = False

    def _config(self, data: object) -> Config:
        top = self.section(
            data,
            "",
            (
                "identity",
                "node_id",
                "listen",
                "hostname",
                "registry",
                "trust",
                "peers",
                "events",
                "metrics",
                "control",
                "max_connections",
                "max_connections_per_source",
                "max_replay_per_source",
                "log_level",
                "log_format",
            ),
        )
        defaults = Config()
        config = Config(
            identity=self.get(top, "", "identity", defaults.identity, self.identity),
            node_id=self.get(top, "", "node_id", defaults.node_id, self.node_id),
            listen=self.get(top, "", "listen", defaults.listen, self.listen),
            hostname=self.get(top, "", "hostname", defaults.hostname, self.hostname),
            registry=self.noting(None, self.registry, top.get("registry")),
            trust=self.noting(TrustConfig(), self.trust, top.get("trust")),
            peers=self.noting({}, self.peers, top.get("peers")),
            events=self.events(top.get("events")),
            metrics=self.metrics(top.get("metrics")),
            control=self.control(top.get("control")),
            max_connections=self.get(
                top, "", "max_connections", defaults.max_connections, self.count
            ),
            max_connections_per_source=self.get(
                top,
                "",
                "max_connections_per_source",
                defaults.max_connections_per_source,
                self.count,
            ),
            max_replay_per_source=self.get(
                top, "", "max_replay_per_source", defaults.max_replay_per_source, self.count
            ),
            log_level=self.get(top, "", "log_level", defaults.log_level, self.choice(LOG_LEVELS)),
            log_format=self.get(
                top, "", "log_format", defaults.log_format, self.choice(LOG_FORMATS)
            ),
            path=self.source,
        )
        if top.get("registry") is None and config.node_id == 0:
            # Without a registry nothing assigns an ID: node 0 would start, and every
            # command naming it would fail later. Noted last: a fault elsewhere (a
            # misspelt registry key) may be the cause.
            self.note(
                "node_id",
                f"this node's ID (1..{MAX_NODE_ID}) when there is no registry section: set "
                "node_id, or add registry: {address: HOST:PORT} so the registry assigns one",
                "0" if "node_id" in top else "none",
            )
        return config

    def registry(self, value: object) -> RegistryConfig | None:
        if value is None:
            return None
        known = (
            "address",
            "tls",
            "fingerprint",
            "poll_interval",
            "poll_idle",
            "heartbeat_interval",
            "public",
        )
        section = self.section(value, "registry", known)
        if "address" not in section:
            self.fail("registry.address", "host:port of the registry (the key is required)")
        defaults = RegistryConfig(address="")
        tls = self.get(section, "registry", "tls", defaults.tls, self.boolean)
        pin = self.get(section, "registry", "fingerprint", defaults.fingerprint, self.fingerprint)
        if pin and not tls:
            # A pin without TLS would silently protect nothing.
            self.note("registry.tls", "true when registry.fingerprint is set", "false")
        return RegistryConfig(
            address=self.get(section, "registry", "address", "", self.address),
            tls=tls,
            fingerprint=pin,
            poll_interval=self.get(
                section, "registry", "poll_interval", defaults.poll_interval, self.seconds
            ),
            poll_idle=self.get(section, "registry", "poll_idle", defaults.poll_idle, self.seconds),
            heartbeat_interval=self.get(
                section,
                "registry",
                "heartbeat_interval",
                defaults.heartbeat_interval,
                self.seconds,
            ),
            public=self.get(section, "registry", "public", defaults.public, self.boolean),
        )

    def trust(self, value: object) -> TrustConfig:
        known = ("strict", "auto_approve", "outgoing_ttl", "pending_ttl", "allowlist", "deny")
        section = self.section(value, "trust", known)
        defaults = TrustConfig()
        return TrustConfig(
            strict=self.get(section, "trust", "strict", defaults.strict, self.boolean),
            auto_approve=self.get(
                section, "trust", "auto_approve", defaults.auto_approve, self.boolean
            ),
            outgoing_ttl=self.get(
                section, "trust", "outgoing_ttl", defaults.outgoing_ttl, self.seconds
            ),
            pending_ttl=self.get(
                section, "trust", "pending_ttl", defaults.pending_ttl, self.seconds
            ),
            allowlist=self.allowlist(section.get("allowlist")),
            deny=self.deny(section.get("deny")),
        )

    def allowlist(self, value: object) -> dict[int, AllowlistEntry]:
        entries: dict[int, AllowlistEntry] = {}
        items: list[Any] = self.noting([], self.items, value, "trust.allowlist")
        for index, item in enumerate(items):
            self.noting(None, self.allowlist_entry, index, item, entries)
        return entries

    def allowlist_entry(self, index: int, item: object, entries: dict[int, AllowlistEntry]) -> None:
        key = f"trust.allowlist[{index}]"
        if not isinstance(item, dict):
            self.fail(
                key,
                "a mapping {node_id: N, name: NAME, public_key: KEY}: an entry names a node by "
                "its ID (and pins its key), not by its hostname",
                describe(item),
            )
        entry = self.section(item, key, ("node_id", "name", "public_key"))
        if "node_id" not in entry:
            self.fail(f"{key}.node_id", "the agent's node ID (the key is required)")
        node_id = self.node_ref(entry["node_id"], f"{key}.node_id")
        if node_id in entries:
            self.fail(f"{key}.node_id", "each node ID listed once", f"{node_id} again")
        public_key = self.get(entry, key, "public_key", "", self.string)
        if public_key and decode_key(public_key) is None:
            self.fail(
                f"{key}.public_key",
                "standard base64 of a 32-byte Ed25519 key",
                describe(public_key),
            )
        name = self.get(entry, key, "name", "", self.string)
        entries[node_id] = AllowlistEntry(node_id=node_id, name=name, public_key=public_key)

    def deny(self, value: object) -> frozenset[int]:
        denied = set()
        items: list[Any] = self.noting([], self.items, value, "trust.deny")
        for index, item in enumerate(items):
            node = self.noting(None, self.node_ref, item, f"trust.deny[{index}]")
            if node is not None:
                denied.add(node)
        return frozenset(denied)

    def peers(self, value: object) -> dict[int, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail("peers", "a mapping of node ID to host:port", describe(value))
        peers = {}
        for node, address in value.items():
            key = f"peers.{node}"
            peer = self.noting(None, self.node_ref, node, key)
            where = self.noting("", self.address, address, key)
            if peer is not None and where:
                peers[peer] = where
        return peers

    def node_ref(self, value: object, key: str) -> int:
        """A node ID where an operator might write a hostname (allowlist, deny, peers)."""
        if isinstance(value, str):
            self.fail(key, _NOT_A_HOSTNAME, describe(value))
        return self.node_id(value, key)

    def hostname(self, value: object, key: str) -> str:
        """This node's name at the registry ("" for none), by the registry's own rule."""
        # Imported here: the registry package loads its client, which a CLI reading only
        # the socket's location from a config does not need.
        from .registry.fields import hostname_problem

        text = self.string(value, key)
        if text and hostname_problem(text):
            self.fail(
                key,
                "1-63 lowercase letters, digits and hyphens, starting and ending with a "
                'letter or digit, not localhost, backbone or broadcast (or "" for none)',
                describe(value),
            )
        return text

    def events(self, value: object) -> EventsConfig:
        section = self.section(value, "events", ("webhook",))
        return EventsConfig(
            webhook=self.get(section, "events", "webhook", EventsConfig().webhook, self.webhook)
        )

    def metrics(self, value: object) -> MetricsConfig:
        section = self.section(value, "metrics", ("listen", "created_series"))
        return MetricsConfig(
            listen=self.get(section, "metrics", "listen", "", self.optional_listen),
            created_series=self.get(section, "metrics", "created_series", False, self.boolean),
        )

    def control(self, value: object) -> ControlConfig:
        section = self.section(value, "control", ("group",))
        return ControlConfig(
            group=self.get(section, "control", "group", ControlConfig().group, self.group)
        )
