"""Coverage-guided fuzzing of the config loader (SPEC 12) with atheris.

Each input is written to a real file and loaded with ``load_config``; inputs that start
with byte 0x01 are instead turned into a config-shaped document (real keys, fuzzed YAML
values) so the fuzzer spends its time in validation rather than in the YAML scanner.

Invariants (a violation raises; atheris saves the input as ``crash-*``): the result is a
``Config`` or a ``ConfigError`` naming the file, never another exception; an accepted
config holds addresses the socket layer can encode (no NUL, idna-encodable host) and
durations a thread can wait on.

Run (see fuzz/README.md): ``.venv/bin/python fuzz/fuzz_config.py -max_total_time=120``
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import atheris

with atheris.instrument_imports():
    from pilothandshake.addresses import parse_address
    from pilothandshake.config import Config, load_config
    from pilothandshake.errors import ConfigError

PATH = os.path.join(tempfile.mkdtemp(prefix="fuzz-config-"), "config.yaml")
KEYS = [
    "identity",
    "node_id",
    "listen",
    "peers",
    "max_connections",
    "max_connections_per_source",
    "max_replay_per_source",
    "log_level",
    "log_format",
    "registry:\n  address",
    "registry:\n  address: r:1\n  poll_interval",
    "registry:\n  address: r:1\n  tls: true\n  fingerprint",
    "trust:\n  outgoing_ttl",
    "trust:\n  allowlist:\n    - node_id",
    "trust:\n  allowlist:\n    - {node_id: 4, public_key",
    "trust:\n  deny",
    "events:\n  webhook",
    "peers:\n  5",
]


def check_usable(config: Config) -> None:
    addresses = [config.listen, *config.peers.values()]
    waits = [config.trust.outgoing_ttl]
    if config.registry is not None:
        addresses.append(config.registry.address)
        waits += [config.registry.poll_interval, config.registry.heartbeat_interval]
    for address in addresses:
        host, _ = parse_address(address)
        if "\x00" in host:
            raise AssertionError(f"accepted a host with NUL: {address!r}")
        host.encode("idna")  # raises UnicodeError for a host the socket layer refuses
    if not all(0 < w <= threading.TIMEOUT_MAX for w in waits):
        raise AssertionError(f"accepted a duration no thread can wait: {waits}")
    if "\x00" in config.identity:
        raise AssertionError("accepted an identity path with NUL")


def TestOneInput(data: bytes) -> None:
    if data[:1] == b"\x01" and len(data) > 1:
        fdp = atheris.FuzzedDataProvider(data[1:])
        key = fdp.PickValueInList(KEYS)
        data = f"{key}: {fdp.ConsumeUnicode(fdp.remaining_bytes())}\n".encode(
            "utf-8", "surrogatepass"
        )
    with open(PATH, "wb") as handle:
        handle.write(data)
    try:
        config = load_config(PATH)
    except ConfigError as exc:
        if not str(exc).startswith(PATH):
            raise AssertionError(f"ConfigError does not name the file: {exc}") from None
        return
    check_usable(config)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
