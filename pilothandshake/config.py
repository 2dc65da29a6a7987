"""The daemon's YAML configuration (SPEC section 12), parsed into frozen dataclasses.

Every key has a default. An unknown key, a value of the wrong type or an invalid value
raises ``ConfigError`` whose message names the file, the dotted key (for example
``trust.allowlist[1].public_key``) and what was expected. ``bool`` is never accepted where
an integer belongs; an integer is accepted where a float belongs. A section written as an
empty YAML key (``trust:`` with nothing under it, i.e. null) means "all defaults";
``registry:`` left empty therefore means no registry, like omitting it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml

from .constants import (
    CONTROL_SOCKET_NAME,
    DEFAULT_IDENTITY_PATH,
    DEFAULT_LISTEN,
    HEARTBEAT_INTERVAL,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_SOURCE,
    MAX_NODE_ID,
    MAX_REPLAY_PER_SOURCE,
    OUTGOING_TTL,
    PENDING_TTL,
    POLL_INTERVAL,
    TRUST_FILE,
)
from .errors import ConfigError
from .identity import decode_key
from .messages import format_address, parse_address
from .runtime import AllowlistEntry

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Config",
    "ControlConfig",
    "EventsConfig",
    "FieldParser",
    "RegistryConfig",
    "TrustConfig",
    "format_address",
    "load_config",
    "parse_address",
    "parse_config",
    "read_yaml",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
# Longest accepted duration (about 31 years): within threading.TIMEOUT_MAX everywhere.
_MAX_SECONDS = 1e9
# Largest accepted count (connections, replay entries): a C int everywhere it may go.
_MAX_COUNT = 2**31 - 1
_T = TypeVar("_T")


@dataclass(frozen=True)
class RegistryConfig:
    """Section ``registry``: where the registry is and how often to talk to it."""

    address: str
    tls: bool = False
    fingerprint: str = ""  # lowercase hex SHA-256 of the certificate, no colons; "" = no pin
    poll_interval: float = POLL_INTERVAL
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
    """Section ``metrics``: the ``HOST:PORT`` that serves ``/metrics`` over HTTP ("" = off)."""

    listen: str = ""


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


def load_config(path: str) -> Config:
    """Read and validate the YAML file at ``path``; raises ``ConfigError`` naming the file."""
    return parse_config(read_yaml(path), path)


def read_yaml(path: str) -> object:
    """The YAML document in the file at ``path`` (None when empty).

    Every failure is a ``ConfigError`` naming the file: unreadable, not UTF-8, not YAML,
    nested too deeply, or holding an integer too long to convert.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(str(exc))}") from exc
    except RecursionError:
        # PyYAML composes recursively: a few thousand nested brackets exhaust the stack.
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        # PyYAML converts scalars with int() and datetime(): a 5,000-digit integer passes
        # Python's digit limit, 2026-13-45 is no date. Its message names no line.
        raise ConfigError(f"{path}: invalid YAML value: {_one_line(str(exc))[:200]}") from None


def parse_config(data: object, source: str) -> Config:
    """Validate already-loaded YAML ``data`` from file ``source`` into a ``Config``.

    ``source`` names the file in error messages, and a relative ``identity`` path is
    resolved against its directory.
    """
    return FieldParser(source).config(data)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(value: object) -> str:
    """How a wrong value is shown in an error: scalars as written, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # repr() of a huge integer is long, and past 4,300 digits raises ValueError.
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


class FieldParser:
    """Validation with error messages that name the file and the dotted key (the daemon's
    config here; ``pilot-registryd``'s reuses it)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: str = "") -> NoReturn:
        suffix = f", got {got}" if got else ""
        raise ConfigError(f"{self.source}: {key}: expected {expected}{suffix}")

    def section(self, value: object, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        """A mapping whose keys are all in ``known``; null counts as empty."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key or "(top level)", "a mapping", _describe(value))
        for name in value:
            if name not in known:
                dotted = f"{key}.{name}" if key else str(name)
                raise ConfigError(
                    f"{self.source}: {dotted}: unknown key (expected one of: {', '.join(known)})"
                )
        return value

    def get(
        self,
        section: dict[str, Any],
        prefix: str,
        name: str,
        default: _T,
        check: Callable[[object, str], _T],
    ) -> _T:
        """``section[name]`` checked by ``check`` (errors name ``prefix.name``), or ``default``."""
        if name not in section:
            return default
        return check(section[name], f"{prefix}.{name}" if prefix else name)

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            self.fail(key, "true or false", _describe(value))
        return value

    def integer(self, value: object, key: str, low: int, high: int | None = None) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            self.fail(key, f"an integer {bound}", _describe(value))
        return value

    def node_id(self, value: object, key: str) -> int:
        return self.integer(value, key, 0, MAX_NODE_ID)

    def count(self, value: object, key: str) -> int:
        return self.integer(value, key, 1, _MAX_COUNT)

    def seconds(self, value: object, key: str) -> float:
        # Compare before converting: float() of a huge YAML integer raises OverflowError.
        # The upper bound keeps every interval usable as a thread wait timeout.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value <= _MAX_SECONDS
        ):
            self.fail(key, f"a number of seconds > 0 and <= {_MAX_SECONDS:g}", _describe(value))
        return float(value)

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, "a string", _describe(value))
        return value

    def choice(self, choices: tuple[str, ...]) -> Callable[[object, str], str]:
        def check(value: object, key: str) -> str:
            if not isinstance(value, str) or value not in choices:
                self.fail(key, f"one of {', '.join(choices)}", _describe(value))
            return value

        return check

    def address(self, value: object, key: str, *, allow_port_zero: bool = False) -> str:
        text = self.string(value, key)
        try:
            host, port = parse_address(text)
            # The socket layer refuses these hosts with TypeError / UnicodeError rather than
            # OSError, so catch them here instead of crashing the daemon at bind or dial.
            if "\x00" in host:
                raise ValueError(f"bad address {text!r}: NUL in host")
            host.encode("idna")
        except ValueError as exc:  # UnicodeError is a ValueError
            self.fail(key, "host:port", str(exc))
        if port == 0 and not allow_port_zero:
            self.fail(key, "host:port with a port 1..65535", _describe(value))
        return text

    def listen(self, value: object, key: str) -> str:
        # Port 0 lets the kernel pick a free port: tests and ad-hoc fleets on one machine use it.
        return self.address(value, key, allow_port_zero=True)

    def fingerprint(self, value: object, key: str) -> str:
        text = self.string(value, key).replace(":", "").lower()
        if text and not _HEX_FINGERPRINT.fullmatch(text):
            self.fail(key, "64 hex digits of a SHA-256 (colons allowed) or empty", _describe(value))
        return text

    def webhook(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if text:
            try:
                parts = urlsplit(text)
            except ValueError:  # e.g. "http://[" (an unclosed IPv6 bracket)
                self.fail(key, "an http:// or https:// URL, or empty", _describe(value))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self.fail(key, "an http:// or https:// URL, or empty", _describe(value))
        return text

    def identity(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if not text or "\x00" in text:
            # A NUL would make every later open() raise ValueError.
            self.fail(key, "a non-empty path without NUL", _describe(value))
        path = os.path.expanduser(text)
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(self.source)), path)
        return os.path.normpath(path)

    def config(self, data: object) -> Config:
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
        return Config(
            identity=self.get(top, "", "identity", defaults.identity, self.identity),
            node_id=self.get(top, "", "node_id", defaults.node_id, self.node_id),
            listen=self.get(top, "", "listen", defaults.listen, self.listen),
            hostname=self.get(top, "", "hostname", defaults.hostname, self.string),
            registry=self.registry(top.get("registry")),
            trust=self.trust(top.get("trust")),
            peers=self.peers(top.get("peers")),
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

    def registry(self, value: object) -> RegistryConfig | None:
        if value is None:
            return None
        known = ("address", "tls", "fingerprint", "poll_interval", "heartbeat_interval", "public")
        section = self.section(value, "registry", known)
        if "address" not in section:
            self.fail("registry.address", "host:port of the registry (the key is required)")
        defaults = RegistryConfig(address="")
        tls = self.get(section, "registry", "tls", defaults.tls, self.boolean)
        pin = self.get(section, "registry", "fingerprint", defaults.fingerprint, self.fingerprint)
        if pin and not tls:
            # A pin without TLS would silently protect nothing.
            self.fail("registry.tls", "true when registry.fingerprint is set", "false")
        return RegistryConfig(
            address=self.address(section["address"], "registry.address"),
            tls=tls,
            fingerprint=pin,
            poll_interval=self.get(
                section, "registry", "poll_interval", defaults.poll_interval, self.seconds
            ),
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

    def items(self, value: object, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, "a list", _describe(value))
        return value

    def allowlist(self, value: object) -> dict[int, AllowlistEntry]:
        entries: dict[int, AllowlistEntry] = {}
        for index, item in enumerate(self.items(value, "trust.allowlist")):
            key = f"trust.allowlist[{index}]"
            entry = self.section(item, key, ("node_id", "name", "public_key"))
            if "node_id" not in entry:
                self.fail(f"{key}.node_id", "the agent's node ID (the key is required)")
            node_id = self.node_id(entry["node_id"], f"{key}.node_id")
            if node_id in entries:
                self.fail(f"{key}.node_id", "each node ID listed once", f"{node_id} again")
            public_key = self.get(entry, key, "public_key", "", self.string)
            if public_key and decode_key(public_key) is None:
                self.fail(
                    f"{key}.public_key",
                    "standard base64 of a 32-byte Ed25519 key",
                    _describe(public_key),
                )
            name = self.get(entry, key, "name", "", self.string)
            entries[node_id] = AllowlistEntry(node_id=node_id, name=name, public_key=public_key)
        return entries

    def deny(self, value: object) -> frozenset[int]:
        return frozenset(
            self.node_id(item, f"trust.deny[{index}]")
            for index, item in enumerate(self.items(value, "trust.deny"))
        )

    def peers(self, value: object) -> dict[int, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail("peers", "a mapping of node ID to host:port", _describe(value))
        return {
            self.node_id(node, f"peers.{node}"): self.address(address, f"peers.{node}")
            for node, address in value.items()
        }

    def events(self, value: object) -> EventsConfig:
        section = self.section(value, "events", ("webhook",))
        return EventsConfig(
            webhook=self.get(section, "events", "webhook", EventsConfig().webhook, self.webhook)
        )

    def metrics(self, value: object) -> MetricsConfig:
        section = self.section(value, "metrics", ("listen",))
        return MetricsConfig(
            listen=self.get(section, "metrics", "listen", "", self.optional_listen)
        )

    def optional_listen(self, value: object, key: str) -> str:
        return self.listen(value, key) if value != "" else ""

    def control(self, value: object) -> ControlConfig:
        section = self.section(value, "control", ("group",))
        return ControlConfig(
            group=self.get(section, "control", "group", ControlConfig().group, self.group)
        )

    def group(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if "\x00" in text or text != text.strip():
            self.fail(key, "a group name (or empty for none)", _describe(value))
        return text
