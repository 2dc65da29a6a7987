"""Fixtures of the registry's tests: a started ``RegistryServer`` (stopped after the test), and a
``RegistryState`` on a settable clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest
from fakeruntime import TickClock
from registrytools import ROOMY

from pilothandshake.registry.config import RegistryLimits, ServerConfig, parse_networks
from pilothandshake.registry.server import RegistryServer
from pilothandshake.registry.state import Registry


@pytest.fixture
def make_server() -> Iterator[Callable[..., RegistryServer]]:
    servers: list[RegistryServer] = []

    def make(
        networks: dict[int, list[int | str]] | None = None,
        limits: RegistryLimits | None = None,
        **kwargs: Any,
    ) -> RegistryServer:
        # Tests register many identities from 127.0.0.1: the default limit of 10 a minute
        # is tested on its own.
        config = ServerConfig(parse_networks(networks, "test"), limits or ROOMY)
        server = RegistryServer("127.0.0.1", 0, config=config, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., RegistryServer]) -> RegistryServer:
    return make_server()


@pytest.fixture
def clock() -> TickClock:
    return TickClock()


@pytest.fixture
def registry(clock: TickClock) -> Registry:
    return Registry(limits=ROOMY, clock=clock, wall=clock)
