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
      mutations_per_minute_per_node: 60     # round 3 (SPEC 17)
      mutations_per_minute_per_source: 600  # a source is an IPv4 /24 or an IPv6 /64
      max_nodes: 100000
      max_vouches_per_node: 1024
      max_held_polls: 4096                  # polls held open with `wait` (SPEC 18)

Every key applies live when ``pilot-registryd`` reloads on SIGHUP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Union

from ..constants import (
    MAX_NETWORK,
    MAX_NODE_ID,
    REGISTRY_IDLE_TIMEOUT,
    REGISTRY_MAX_CONNECTIONS,
    REGISTRY_MAX_CONNECTIONS_PER_SOURCE,
    REGISTRY_MAX_HELD_POLLS,
    REGISTRY_MAX_NODES,
    REGISTRY_MAX_VOUCHES_PER_NODE,
    REGISTRY_MUTATIONS_PER_MINUTE_PER_NODE,
    REGISTRY_MUTATIONS_PER_MINUTE_PER_SOURCE,
    REGISTRY_REGISTER_PER_MINUTE,
)
from ..identity import decode_key
from ..yamlconfig import FieldParser, read_yaml

__all__ = [
    "Members",
    "NetworkEntry",
    "RegistryLimits",
    "ServerConfig",
    "load_config",
    "parse_networks",
]


NetworkEntry = Union[int, str]


@dataclass(frozen=True)
class RegistryLimits:
    """Section ``limits``: the registry's bounds against floods (SPEC 11)."""

    register_per_minute: int = REGISTRY_REGISTER_PER_MINUTE  # new keys per source address
    max_connections: int = REGISTRY_MAX_CONNECTIONS
    max_connections_per_source: int = REGISTRY_MAX_CONNECTIONS_PER_SOURCE
    idle_timeout: float = REGISTRY_IDLE_TIMEOUT  # seconds between requests on a connection
    # Round 3 (SPEC 17): every mutating request, per node (after its signature verified)
    # and per source prefix; the store's caps; polls held open with `wait` (SPEC 18).
    mutations_per_minute_per_node: int = REGISTRY_MUTATIONS_PER_MINUTE_PER_NODE
    mutations_per_minute_per_source: int = REGISTRY_MUTATIONS_PER_MINUTE_PER_SOURCE
    max_nodes: int = REGISTRY_MAX_NODES
    max_vouches_per_node: int = REGISTRY_MAX_VOUCHES_PER_NODE
    max_held_polls: int = REGISTRY_MAX_HELD_POLLS


@dataclass(frozen=True)
class Members:
    """The members of one network: node IDs and public keys (a key joins under any ID)."""

    node_ids: frozenset[int]
    keys: frozenset[bytes]


@dataclass(frozen=True)
class ServerConfig:
    """The whole registry config."""

    networks: dict[int, Members] = field(default_factory=dict)
    limits: RegistryLimits = field(default_factory=RegistryLimits)


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
        parser.integer(network, key, 1, MAX_NETWORK)
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


def _limits(parser: FieldParser, raw: object) -> RegistryLimits:
    default = RegistryLimits()
    known = tuple(f.name for f in fields(RegistryLimits))
    section = parser.section(raw, "limits", known)
    values = {
        name: parser.get(
            section,
            "limits",
            name,
            getattr(default, name),
            parser.seconds if name == "idle_timeout" else parser.count,
        )
        for name in known
    }
    return RegistryLimits(**values)
