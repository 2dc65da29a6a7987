"""pilot-registryd's YAML config: networks and limits, read like the daemon's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilothandshake.errors import ConfigError
from pilothandshake.identity import Identity
from pilothandshake.registry.config import RegistryLimits, load_config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return str(path)


def test_networks_take_node_ids_and_keys_and_limits_override_defaults(tmp_path: Path) -> None:
    key = Identity.generate()
    path = write(
        tmp_path,
        f"networks:\n  3: [7, '{key.public_key_b64}']\n"
        "limits:\n  register_per_minute: 100\n  idle_timeout: 2.5\n",
    )
    config = load_config(path)
    assert config.networks[3].node_ids == {7}
    assert config.networks[3].keys == {key.public_key}
    assert config.limits == RegistryLimits(register_per_minute=100, idle_timeout=2.5)
    assert load_config(write(tmp_path, "")).limits == RegistryLimits(10, 1024, 64, 300.0)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("networks:\n  '12': [1]\n", "networks.12: expected an integer 1..65535, got '12'"),
        ("networks:\n  3: ['12']\n", "networks.3[0]: expected a node ID or a base64"),
        ("networks:\n  0: [7]\n", "networks.0: expected an integer 1..65535"),
        ("networks:\n  3: 7\n", "networks.3: expected a list of members"),
        ("networks:\n  3: [true]\n", "networks.3[0]: expected an integer"),
        ("limits:\n  register_per_minute: '10'\n", "limits.register_per_minute: expected an"),
        (
            "limits:\n  max_connections: 0\n",
            "limits.max_connections: expected an integer 1..2147483647",
        ),
        ("limits:\n  idle_timeout: -1\n", "limits.idle_timeout: expected a number of seconds"),
        ("limits:\n  burst: 3\n", "limits.burst: unknown key"),
        ("peers: {}\n", "peers: unknown key"),
        ("networks: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("limits:\n  max_connections: " + "9" * 5000 + "\n", "invalid YAML"),
    ],
)
def test_bad_config_is_a_config_error_naming_file_and_key(
    tmp_path: Path, text: str, key: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert key in str(info.value)


def test_demo_config_and_its_commented_example_are_valid(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[2] / "conf" / "demo-registry.yaml"
    assert load_config(str(demo)).networks == {}
    # The commented example (networks by ID and by key, limits) must work when uncommented.
    lines = demo.read_text().splitlines()
    example = [
        line[1:]
        for line in lines
        if line.startswith("#   ") and not line.lstrip("# ").startswith("pilot-registryd")
    ]
    example = [line for line in example if not line.strip().startswith("--store")]
    config = load_config(write(tmp_path, "\n".join(example) + "\n"))
    assert config.networks[3].node_ids == {1}
    assert len(config.networks[3].keys) == 1
    assert config.limits == RegistryLimits()
