"""``pilot-registryd``'s YAML config (SPEC 11): networks and limits.

Loaded and checked with the shared reader and field parser (``..yamlconfig``), so
every failure is a ``ConfigError`` naming the file, the dotted key and what was expected,
in the same words as the daemon's::

    networks:             # network ID 1..65535 -> members: node IDs or base64 public keys
      3: [1, "mC0K...="]
    limits:               # every key optional; defaults are the production registry's
      register_per_minute: 10
      max_connections: 1024
      max_connections_per_source: 64
      idle_timeout: 300
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from ..constants import (
    REGISTRY_IDLE_TIMEOUT,
    REGISTRY_MAX_CONNECTIONS,
    REGISTRY_MAX_CONNECTIONS_PER_SOURCE,
    REGISTRY_REGISTER_PER_MINUTE,
)
from ..identity import decode_key
from ..messages import MAX_NODE_ID
from ..yamlconfig import FieldParser, read_yaml

__all__ = [
    "MAX_NETWORK_ID",
    "Limits",
    "Members",
    "NetworkEntry",
    "ServerConfig",
    "load_config",
    "parse_networks",
]

MAX_NETWORK_ID = 2**16 - 1

NetworkEntry = Union[int, str]


@dataclass(frozen=True)
class Limits:
    """Section ``limits``: the registry's bounds against floods (SPEC 11)."""

    register_per_minute: int = REGISTRY_REGISTER_PER_MINUTE  # new keys per source address
    max_connections: int = REGISTRY_MAX_CONNECTIONS
    max_connections_per_source: int = REGISTRY_MAX_CONNECTIONS_PER_SOURCE
    idle_timeout: float = REGISTRY_IDLE_TIMEOUT  # seconds between requests on a connection


@dataclass(frozen=True)
class Members:
    """The members of one network: node IDs and public keys (a key joins under any ID)."""

    node_ids: frozenset[int]
    keys: frozenset[bytes]


@dataclass(frozen=True)
class ServerConfig:
    """The whole registry config."""

    networks: dict[int, Members] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)


def load_config(path: str) -> ServerConfig:
    """Read and validate the registry's YAML config at ``path``; raises ``ConfigError``."""
    parser = FieldParser(path)
    top = parser.section(read_yaml(path), "", ("networks", "limits"))
    return ServerConfig(
        networks=parse_networks(top.get("networks"), path),
        limits=_limits(parser, top.get("limits")),
    )


def parse_networks(raw: object, source: str) -> dict[int, Members]:
    """Validate ``{network_id: [node_id or base64 key, ...]}``; errors name ``source``."""
    parser = FieldParser(source)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        parser.fail("networks", "a mapping of network ID to a list of members")
    result: dict[int, Members] = {}
    for network, members in raw.items():
        key = f"networks.{network}"
        # A YAML key written as 3 is an int; "3" is a string and refused like any other.
        parser.integer(network, key, 1, MAX_NETWORK_ID)
        if not isinstance(members, Sequence) or isinstance(members, str):
            parser.fail(key, "a list of members (node IDs or base64 public keys)")
        node_ids: set[int] = set()
        keys: set[bytes] = set()
        for index, member in enumerate(members):
            where = f"{key}[{index}]"
            if not isinstance(member, str):
                node_ids.add(parser.integer(member, where, 1, MAX_NODE_ID))
                continue
            raw_key = decode_key(member)
            if raw_key is None:
                shown = member if len(member) <= 60 else member[:57] + "..."
                parser.fail(where, "a node ID or a base64 Ed25519 public key", repr(shown))
            keys.add(raw_key)
        result[network] = Members(frozenset(node_ids), frozenset(keys))
    return result


def _limits(parser: FieldParser, raw: object) -> Limits:
    known = ("register_per_minute", "max_connections", "max_connections_per_source", "idle_timeout")
    section = parser.section(raw, "limits", known)
    default = Limits()
    return Limits(
        register_per_minute=parser.get(
            section, "limits", "register_per_minute", default.register_per_minute, parser.count
        ),
        max_connections=parser.get(
            section, "limits", "max_connections", default.max_connections, parser.count
        ),
        max_connections_per_source=parser.get(
            section,
            "limits",
            "max_connections_per_source",
            default.max_connections_per_source,
            parser.count,
        ),
        idle_timeout=parser.get(
            section, "limits", "idle_timeout", default.idle_timeout, parser.seconds
        ),
    )
