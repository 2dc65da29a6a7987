"""Property tests of the config loader (SPEC 12): random documents to ``parse_config``,
random YAML text and random bytes to ``load_config`` through a real file.

Invariant: the result is a ``Config`` or a ``ConfigError`` whose message names the file,
never any other exception (TypeError, OverflowError, RecursionError, ...). A ``Config`` that
comes back holds values the daemon can use: addresses it can hand to the socket layer and
durations it can wait on.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from strategies import fuzz

from pilothandshake.addresses import parse_address
from pilothandshake.config import Config, load_config, parse_config
from pilothandshake.errors import ConfigError, RegistryError, SendError
from pilothandshake.registry.client import RegistryConnection
from pilothandshake.wire import send_message

SOURCE = "/etc/pilot-handshake/fuzz.yaml"


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "127.0.0.1:9000",
            "[::1]:0",
            "a..b:444",
            "x\x00y:1",
            "http://[",
            "http://h:1/",
            "~",
            "",
            "0" * 65 + ":1",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(scalars, inner, max_size=4),
    max_leaves=12,
)
SECTIONS: dict[str, list[str]] = {
    "registry": ["address", "tls", "fingerprint", "poll_interval", "heartbeat_interval", "public"],
    "trust": ["strict", "auto_approve", "outgoing_ttl", "allowlist", "deny"],
    "events": ["webhook"],
}
TOP = [
    "identity",
    "node_id",
    "listen",
    "peers",
    "max_connections",
    "max_connections_per_source",
    "max_replay_per_source",
    "log_level",
    "log_format",
]
allowlist_entries = st.dictionaries(
    st.sampled_from(["node_id", "name", "public_key", "other"]), values, max_size=3
)
sections = {
    name: st.dictionaries(
        st.sampled_from(keys),
        values | (st.lists(allowlist_entries, max_size=3) if name == "trust" else values),
        max_size=len(keys),
    )
    for name, keys in SECTIONS.items()
}
# Config-shaped documents: the real keys, each with a value of any type, often a section.
documents = st.fixed_dictionaries(
    {},
    optional={
        **{key: values for key in TOP},
        **{name: strategy | values for name, strategy in sections.items()},
        "peers": st.dictionaries(scalars, values, max_size=3) | values,
    },
)


def assert_usable(config: Config) -> None:
    """What the daemon will do with an accepted config must not fail with a non-OS error."""
    addresses = [config.listen, *config.peers.values()]
    if config.registry is not None:
        addresses.append(config.registry.address)
        for seconds in (config.registry.poll_interval, config.registry.heartbeat_interval):
            assert 0 < seconds <= threading.TIMEOUT_MAX
    assert 0 < config.trust.outgoing_ttl <= threading.TIMEOUT_MAX
    for address in addresses:
        host, _ = parse_address(address)
        # The resolver is never asked (no network); encoding is where TypeError and
        # UnicodeError come from.
        assert "\x00" not in host
        host.encode("idna")
    assert "\x00" not in config.identity
    os.path.dirname(config.identity)


def parse(data: Any) -> None:
    try:
        config = parse_config(data, SOURCE)
    except ConfigError as exc:
        assert str(exc).startswith(SOURCE), str(exc)
        return
    assert_usable(config)


def test_random_documents_give_a_config_or_a_config_error() -> None:
    @fuzz(400)
    @given(documents | values)
    def check(data: Any) -> None:
        parse(data)

    check()


def test_random_yaml_text_gives_a_config_or_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"

    @fuzz(150)
    @given(
        st.text(max_size=300)
        | documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True))
        | st.sampled_from(
            ["[" * 1500, "a: " + "{" * 1500, "!!python/object:os.system {}", "&a [*a, *a]"]
        )
    )
    def check(text: str) -> None:
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            config = load_config(str(path))
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), str(exc)
            return
        assert_usable(config)

    check()


def test_random_bytes_in_the_file_give_a_config_or_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"

    @fuzz(200)
    @given(st.binary(max_size=300))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            load_config(str(path))
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), str(exc)

    check()


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"trust": {"outgoing_ttl": 10**400}}, "trust.outgoing_ttl"),
        ({"registry": {"address": "r:1", "poll_interval": 10**400}}, "registry.poll_interval"),
        ({"registry": {"address": "r:1", "heartbeat_interval": 1e300}}, "heartbeat_interval"),
        ({"events": {"webhook": "http://["}}, "events.webhook"),
        ({"identity": "/var/lib/x\x00y/identity.json"}, "identity"),
        ({"listen": "x\x00y:444"}, "listen"),
        ({"peers": {5: "a..b:444"}}, "peers.5"),
    ],
)
def test_values_found_by_the_fuzzer_are_config_errors(document: dict[str, Any], key: str) -> None:
    """Regressions: each of these used to escape as OverflowError or ValueError, or to pass
    and then crash the daemon at bind, open or dial time (TypeError, UnicodeError)."""
    with pytest.raises(ConfigError, match=key):
        parse_config(document, SOURCE)


def test_deeply_nested_yaml_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("trust: " + "[" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(path))


def test_a_host_the_socket_layer_refuses_is_a_send_or_registry_error_not_a_crash() -> None:
    """The dial side of the same finding: a host that the idna codec refuses makes
    ``send_message`` raise ``SendError`` (so the relay fallback runs) and the registry client
    raise ``RegistryError``, instead of UnicodeError escaping."""
    with pytest.raises(SendError):
        send_message(("a..b", 444), b"{}", timeout=0.5)
    with pytest.raises(SendError):
        send_message(("x" * 64, 444), b"{}", timeout=0.5)
    client = RegistryConnection("a..b:9000", timeout=0.5)
    with pytest.raises(RegistryError):
        client.lookup(1)
