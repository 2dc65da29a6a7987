"""Fixtures of the registry loop's tests: a fake registry, a target, and loops started on
them that are stopped after the test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest
from looptools import FakeRegistry, Target

from pilothandshake.identity import Identity
from pilothandshake.registry_loop import RegistryLoop


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def target() -> Target:
    return Target()


@pytest.fixture
def make_loop(registry: FakeRegistry, target: Target) -> Iterator[Callable[..., RegistryLoop]]:
    loops: list[RegistryLoop] = []

    def make(**kwargs: Any) -> RegistryLoop:
        options: dict[str, Any] = {
            "listen_addr": "127.0.0.1:4444",
            "poll_interval": 0.02,
            "heartbeat_interval": 60.0,
        }
        options.update(kwargs)
        # The idle period as short as the fast one, unless a test is about the schedule.
        options.setdefault("poll_idle", options["poll_interval"])
        loop = RegistryLoop(registry, Identity.generate(), target, **options)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop()
