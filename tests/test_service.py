"""Service: the plugin adapter around a Manager (Go NewService)."""

from __future__ import annotations

from pathlib import Path

from fakeruntime import Peer

from pilothandshake.messages import HANDSHAKE_REQUEST
from pilothandshake.service import SERVICE_ORDER, Service
from pilothandshake.testing import MemoryRuntime


def test_service_names_itself_and_orders_early(tmp_path: Path) -> None:
    service = Service(MemoryRuntime(1, str(tmp_path)))
    try:
        assert service.name() == "handshake"
        assert service.order() == SERVICE_ORDER == 30
    finally:
        service.manager.close()


def test_service_start_and_stop_drive_the_manager(tmp_path: Path) -> None:
    runtime = MemoryRuntime(1, str(tmp_path))
    service = Service(runtime)
    service.start()
    assert runtime.handler == service.manager.handle_connection
    service.manager.process_message(Peer(7).data(HANDSHAKE_REQUEST, 1), ("127.0.0.1", 9))
    assert service.manager.pending_count() == 1
    service.stop()
    service.stop()
    assert runtime.listener is not None and runtime.listener.closed
    # The directory lock is released: a new service over the same directory starts.
    again = Service(MemoryRuntime(1, str(tmp_path)))
    assert again.manager.pending_count() == 1
    again.manager.close()
