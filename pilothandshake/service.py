"""The plugin adapter (Go ``NewService`` / ``Service``): the handshake as one service among
those a host application starts in order."""

from __future__ import annotations

from .manager import Manager
from .runtime import Runtime

__all__ = ["SERVICE_ORDER", "Service"]

# Hosts start services by ascending order and stop them in reverse. The handshake needs only
# the node's identity and transport, which come first, and other services ask it about trust,
# so it sits early.
SERVICE_ORDER = 30


class Service:
    """Wraps a ``Manager`` over ``runtime`` with the host's service lifecycle."""

    def __init__(self, runtime: Runtime) -> None:
        """Build the Manager (loads trust.json; may raise ``StoreError``)."""
        self.manager = Manager(runtime)

    def name(self) -> str:
        """The service's name: ``"handshake"``."""
        return "handshake"

    def order(self) -> int:
        """Start position among the host's services (``SERVICE_ORDER``; lower starts first)."""
        return SERVICE_ORDER

    def start(self) -> None:
        """Start the Manager: bind port 444 through the runtime, start the reaper."""
        self.manager.start()

    def stop(self) -> None:
        """Stop the Manager; idempotent."""
        self.manager.stop()
