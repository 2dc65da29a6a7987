"""Config loading and validation (SPEC section 12)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from pilothandshake.addresses import format_address, parse_address
from pilothandshake.config import Config, check_config, load_config, parse_config
from pilothandshake.errors import ConfigError
from pilothandshake.runtime import AllowlistEntry

EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "example.yaml"
KEY = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_a_file_with_only_node_id_gives_every_other_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "node_id: 7\n"))
    assert config.identity == os.path.expanduser("~/.pilot-handshake/identity.json")
    assert config.node_id == 7
    assert config.listen == "0.0.0.0:444"
    assert config.registry is None
    assert config.trust.strict is True
    assert config.trust.auto_approve is False
    assert config.trust.outgoing_ttl == 604800
    assert config.trust.allowlist == {}
    assert config.trust.deny == frozenset()
    assert config.peers == {}
    assert config.events.webhook == ""
    assert (config.max_connections, config.max_connections_per_source) == (256, 16)
    assert config.max_replay_per_source == 1024
    assert (config.log_level, config.log_format) == ("info", "text")
    assert config.path == str(tmp_path / "config.yaml")


def test_registry_section_defaults_apply_when_only_address_given(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "registry: {address: '127.0.0.1:9000'}\n"))
    assert config.registry is not None
    assert config.registry.address == "127.0.0.1:9000"
    assert config.registry.tls is False
    assert config.registry.fingerprint == ""
    assert (config.registry.poll_interval, config.registry.heartbeat_interval) == (2, 60)
    assert config.registry.public is False


def test_example_config_holds_only_defaults_and_enables_nothing(tmp_path: Path) -> None:
    # Copied as it is, conf/example.yaml sets only where the state lives and which registry
    # to use: every other key is at its default, so no allowlist, deny or peers entry.
    example = load_config(str(EXAMPLE))
    minimal = load_config(
        write(
            tmp_path,
            "identity: /var/lib/pilot-handshake/identity.json\n"
            "registry: {address: '127.0.0.1:9000'}\n",
        )
    )
    assert dataclasses.replace(example, path="") == dataclasses.replace(minimal, path="")
    assert example.trust.allowlist == {} and example.peers == {}
    assert example.trust.deny == frozenset()


def test_example_configs_commented_out_entries_are_valid_when_enabled(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    text = re.sub(r"^\s*(allowlist: \[\]|deny: \[\]|peers: \{\})\n", "", text, flags=re.M)
    text = re.sub(
        r"^(\s*)# ((?:allowlist|deny|peers):.*|  (?:- \{|\d+:).*)$", r"\1\2", text, flags=re.M
    )
    config = load_config(write(tmp_path, text))
    assert config.trust.allowlist == {
        42: AllowlistEntry(42, "build-agent", ""),
        43: AllowlistEntry(43, "deployer", KEY),
    }
    assert config.trust.deny == frozenset({13})
    assert config.peers == {42: "10.0.0.5:444"}


def test_relative_identity_resolves_against_the_config_directory(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "identity: keys/id.json\nnode_id: 7\n"))
    assert config.identity == str(tmp_path / "keys" / "id.json")
    assert config.trust_path == str(tmp_path / "keys" / "trust.json")
    assert config.control_socket == str(tmp_path / "keys" / "control.sock")


def test_fingerprint_is_normalised_to_lowercase_hex_without_colons(tmp_path: Path) -> None:
    pin = ":".join(["AB"] * 32)
    text = f"registry: {{address: 'reg.example:9000', tls: true, fingerprint: '{pin}'}}\n"
    config = load_config(write(tmp_path, text))
    assert config.registry is not None and config.registry.fingerprint == "ab" * 32


def test_integer_accepted_for_seconds_and_null_section_means_defaults(tmp_path: Path) -> None:
    text = "node_id: 7\ntrust:\n  outgoing_ttl: 60\nevents:\nregistry:\n"
    config = load_config(write(tmp_path, text))
    assert config.trust.outgoing_ttl == 60.0
    assert isinstance(config.trust.outgoing_ttl, float)
    assert config.events.webhook == "" and config.registry is None


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("colour: blue\n", "colour", "unknown key"),
        ("trust: {strict: true, paranoid: true}\n", "trust.paranoid", "unknown key"),
        ("node_id: true\n", "node_id", "an integer 0..4294967295"),
        ("node_id: 4294967296\n", "node_id", "an integer 0..4294967295"),
        ("node_id: -1\n", "node_id", "an integer 0..4294967295"),
        ("listen: 'localhost'\n", "listen", "host:port"),
        ("listen: '0.0.0.0:70000'\n", "listen", "host:port"),
        ("registry: {tls: true}\n", "registry.address", "required"),
        ("registry: {address: 'r:0'}\n", "registry.address", "port 1..65535"),
        ("registry: {address: 'r:1', poll_interval: 0}\n", "registry.poll_interval", "> 0"),
        ("registry: {address: 'r:1', heartbeat_interval: '60'}\n", "registry", "> 0"),
        ("registry: {address: 'r:1', tls: true, fingerprint: 'abc'}\n", "fingerprint", "64 hex"),
        ("registry: {address: 'r:1', fingerprint: '" + "a" * 64 + "'}\n", "registry.tls", "true"),
        ("trust: {strict: 1}\n", "trust.strict", "true or false"),
        ("trust: {outgoing_ttl: -5}\n", "trust.outgoing_ttl", "> 0"),
        ("trust: {allowlist: {node_id: 4}}\n", "trust.allowlist", "a list"),
        (
            f"trust: {{allowlist: [{{node_id: 4, public_key: '{KEY}'}}, "
            "{node_id: 5, public_key: 'abcd'}]}\n",
            "trust.allowlist[1].public_key",
            "base64 of a 32-byte",
        ),
        ("trust: {allowlist: [{name: x}]}\n", "trust.allowlist[0].node_id", "required"),
        (
            "trust: {allowlist: [{node_id: 4}, {node_id: 4}]}\n",
            "trust.allowlist[1].node_id",
            "once",
        ),
        ("trust: {allowlist: [{node_id: 4, role: x}]}\n", "trust.allowlist[0].role", "unknown"),
        ("trust: {deny: [1, 'two']}\n", "trust.deny[1]", "an integer"),
        ("peers: {42: '10.0.0.5'}\n", "peers.42", "host:port"),
        ("peers: {x: '10.0.0.5:444'}\n", "peers.x", "an integer"),
        ("events: {webhook: 'ftp://x/y'}\n", "events.webhook", "http"),
        ("max_connections: 0\n", "max_connections", "an integer 1.."),
        ("max_connections_per_source: 2.5\n", "max_connections_per_source", "an integer"),
        ("log_level: verbose\n", "log_level", "debug, info, warning, error"),
        ("log_format: xml\n", "log_format", "text, json"),
        ("identity: ''\n", "identity", "non-empty path"),
        ("- just\n- a list\n", "(top level)", "a mapping"),
    ],
)
def test_invalid_config_error_names_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert key in message
    assert expected in message


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "trust: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path)
    assert str(info.value).startswith(path)


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(missing)
    assert missing in str(info.value)


def test_parse_config_accepts_loaded_data_and_names_source() -> None:
    config = parse_config({"node_id": 9, "peers": {9: "[::1]:444"}}, "/etc/x.yaml")
    assert config.node_id == 9 and config.peers == {9: "[::1]:444"}
    with pytest.raises(ConfigError, match=r"^/etc/x\.yaml: node_id: "):
        parse_config({"node_id": 1.5}, "/etc/x.yaml")


def test_listen_port_zero_is_allowed_for_ephemeral_binding(tmp_path: Path) -> None:
    text = "listen: '127.0.0.1:0'\nnode_id: 7\n"
    assert load_config(write(tmp_path, text)).listen == "127.0.0.1:0"


def test_config_built_in_code_has_defaults_and_is_frozen() -> None:
    config = Config()
    assert config.control_socket == os.path.expanduser("~/.pilot-handshake/control.sock")
    with pytest.raises(AttributeError):
        config.node_id = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "max_replay_per_source: " + "9" * 5000 + "\n",  # past Python's int() digit limit
        "trust: {deny: [" + "1" * 5000 + "]}\n",
        "node_id: 2026-13-45\n",  # YAML's timestamp constructor raises ValueError
    ],
)
def test_every_parse_failure_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert len(str(info.value)) < 400


def test_huge_hex_integer_is_described_without_printing_it(tmp_path: Path) -> None:
    # int() of hex has no digit limit, but repr() of the result would raise ValueError.
    path = write(tmp_path, "node_id: 0x" + "f" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"node_id: expected an integer 0\.\.\d+, got an integer"):
        load_config(path)


def test_counts_have_an_upper_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_connections: expected an integer 1\.\.2147483647"):
        load_config(write(tmp_path, "max_connections: 0x" + "f" * 40 + "\n"))


def test_pending_ttl_and_hostname(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, "node_id: 7\n"))
    assert default.trust.pending_ttl == 604800 and default.hostname == ""
    text = "node_id: 7\nhostname: build-1\ntrust: {pending_ttl: 60}\n"
    config = load_config(write(tmp_path, text))
    assert config.trust.pending_ttl == 60 and config.hostname == "build-1"
    with pytest.raises(ConfigError, match=r"trust\.pending_ttl: expected a number of seconds"):
        load_config(write(tmp_path, "trust: {pending_ttl: 0}\n"))
    with pytest.raises(ConfigError, match="hostname: expected a string"):
        load_config(write(tmp_path, "hostname: 5\n"))


def test_format_address_is_what_parse_address_reads_back() -> None:
    for address in (("127.0.0.1", 444), ("::1", 0), ("example.org", 65535)):
        assert parse_address(format_address(address)) == address
    assert format_address(("::1", 444)) == "[::1]:444"


def test_check_config_reports_every_problem_of_a_file_not_only_the_first(tmp_path: Path) -> None:
    text = (
        "colour: blue\n"
        "listen: localhost\n"
        "hostname: Build_07\n"
        "registry: {address: '127.0.0.1:9000', tls: false, fingerprint: '%s', poll: 3}\n"
        "trust:\n"
        "  strict: 1\n"
        "  allowlist: [build-07, {node_id: deployer}, {node_id: 5, public_key: nope}]\n"
        "  deny: [1, bad-node]\n"
        "peers: {build-08: '10.0.0.8:444', 9: nowhere}\n"
        "log_level: loud\n"
    ) % ("ab" * 32)
    path = write(tmp_path, text)
    problems = check_config(path)
    assert all(p.startswith(f"{path}: ") for p in problems), problems
    keys = [p[len(path) + 2 :].split(":", 1)[0] for p in problems]
    assert keys == [
        "colour",
        "listen",
        "hostname",
        "registry.poll",
        "registry.tls",
        "trust.strict",
        "trust.allowlist[0]",
        "trust.allowlist[1].node_id",
        "trust.allowlist[2].public_key",
        "trust.deny[1]",
        "peers.build-08",
        "peers.9",
        "log_level",
    ], problems
    # load_config (the daemon's start) says the first and how many more there are.
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{problems[0]} (and {len(problems) - 1} more problems: "
        f"pilot-handshaked --check-config {path} lists every one)"
    )


def test_check_config_of_a_valid_file_is_empty_and_of_unreadable_yaml_one_line(
    tmp_path: Path,
) -> None:
    assert check_config(str(EXAMPLE)) == []
    assert check_config(write(tmp_path, "node_id: 7\n")) == []
    [problem] = check_config(write(tmp_path, "trust: [\n"))
    assert "invalid YAML" in problem
    [missing] = check_config(str(tmp_path / "absent.yaml"))
    assert "cannot read config" in missing


@pytest.mark.parametrize("text", ["", "node_id: 0\n", "registry:\n", "listen: '127.0.0.1:0'\n"])
def test_no_registry_and_no_node_id_is_an_error_naming_the_fix(tmp_path: Path, text: str) -> None:
    with pytest.raises(
        ConfigError,
        match=r"node_id: expected this node's ID .* set node_id, or "
        r"add registry: \{address: HOST:PORT\}",
    ):
        load_config(write(tmp_path, text))


def test_a_misspelt_registry_section_is_the_first_problem_not_the_node_id(tmp_path: Path) -> None:
    problems = check_config(write(tmp_path, "registry: {adress: '127.0.0.1:9000'}\n"))
    keys = [p.split(": ")[1] for p in problems]
    assert keys == ["registry.adress", "registry.address"], problems


@pytest.mark.parametrize(
    "hostname", ["Build-07", "build_07", "-build", "build-", "a" * 64, "localhost", "b c"]
)
def test_an_invalid_hostname_is_an_error(tmp_path: Path, hostname: str) -> None:
    with pytest.raises(ConfigError, match=r"hostname: expected 1-63 lowercase letters"):
        load_config(write(tmp_path, f"node_id: 7\nhostname: '{hostname}'\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("trust: {allowlist: [build-07]}\n", r"trust\.allowlist\[0\]: expected a mapping"),
        ("trust: {allowlist: [{node_id: build-07}]}\n", r"trust\.allowlist\[0\]\.node_id"),
        ("trust: {deny: [build-07]}\n", r"trust\.deny\[0\]"),
        ("peers: {build-07: '10.0.0.7:444'}\n", r"peers\.build-07"),
    ],
)
def test_a_node_written_as_a_hostname_says_a_node_id_is_expected(
    tmp_path: Path, text: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=key + r".*not a hostname|" + key + r".*by its ID"):
        load_config(write(tmp_path, "node_id: 7\n" + text))


def test_outside_a_whole_parse_the_first_problem_is_raised() -> None:
    from pilothandshake.config import _ConfigParser

    parser = _ConfigParser("c.yaml")
    with pytest.raises(ConfigError, match=r"c\.yaml: identity: expected"):
        parser.get({"identity": ""}, "", "identity", "x", parser.identity)
    assert parser.problems == []
