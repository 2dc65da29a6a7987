"""Metrics (SPEC 13b): names, the fixed drop labels, one registry per daemon, the HTTP
endpoint, the ``metrics.listen`` config key and the control command."""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from fakeruntime import Nodes, Peer, seed_trust
from prometheus_client.parser import text_string_to_metric_families

from pilothandshake.client import ControlClient
from pilothandshake.config import Config, load_config, parse_config
from pilothandshake.constants import METRICS_DEADLINE, METRICS_MAX_CONNECTIONS
from pilothandshake.daemon import Daemon
from pilothandshake.drops import DropKind
from pilothandshake.errors import ConfigError, HandshakeError
from pilothandshake.manager import Manager
from pilothandshake.messages import HANDSHAKE_ACCEPT, HANDSHAKE_REQUEST
from pilothandshake.metrics import REFUSAL_CAPS, Metrics, MetricsServer
from pilothandshake.server import HandshakeServer
from pilothandshake.store import TrustRecord
from pilothandshake.wire import send_message


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metric_names_start_with_the_prefix_but_the_process_ones_are_standard() -> None:
    metrics = Metrics(process=True)
    names = {family.name for family in text_string_to_metric_families(metrics.render())}
    process = {name for name in names if name.startswith("process_")}
    # The standard names dashboards expect (issue 19), not pilot_handshake_process_*.
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= process
    assert names - process and all(n.startswith("pilot_handshake_") for n in names - process)


def test_build_info_carries_the_version() -> None:
    import pilothandshake

    text = Metrics().render()
    assert value(text, "pilot_handshake_build_info", version=pilothandshake.__version__) == 1


def test_no_created_series_unless_asked() -> None:
    plain, asked = Metrics(), Metrics(created=True)
    plain.message("handshake_request", "received")
    asked.message("handshake_request", "received")
    assert "_created" not in plain.render()
    assert "pilot_handshake_messages_created" in asked.render()


def test_messages_tell_sent_directly_from_relayed_from_failed_both_ways() -> None:
    metrics = Metrics()
    metrics.message("handshake_request", "sent")
    metrics.relay("handshake_request", "out")
    metrics.relay("handshake_request", "in")  # arriving: counted as received elsewhere
    text = metrics.render()
    assert value(text, "pilot_handshake_messages_total", type="handshake_request", result="sent")
    relayed = value(
        text, "pilot_handshake_messages_total", type="handshake_request", result="relayed"
    )
    assert relayed == 1


def test_drop_series_are_the_kinds_of_drop_each_at_zero_from_the_start() -> None:
    text = Metrics().render()
    reasons = {
        dict(labels)["reason"]
        for (name, labels) in samples(text)
        if name == "pilot_handshake_drops_total"
    }
    assert reasons == {kind.value for kind in DropKind}
    assert all(
        value(text, "pilot_handshake_drops_total", reason=kind.value) == 0 for kind in DropKind
    )
    for cap in REFUSAL_CAPS:
        assert ("pilot_handshake_refused_connections_total", (("cap", cap),)) in samples(text)


def test_the_readme_lists_exactly_the_kinds_of_drop() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `pilot_handshake_drops")]
    assert set(re.findall(r"`([a-z_]+)`", row.split("|")[3])) == {k.value for k in DropKind}


# One real drop of each kind, sent over TCP to a Manager's port-444 handler: the counter of
# that kind, and of no other, goes up. A new kind needs a case in REAL_DROPS.

OWN = 1
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)


def _impostor_of_a_trusted_node(nodes: Nodes) -> tuple[Manager, list[bytes]]:
    seed_trust(f"{nodes.root}/n1", trusted=(TrustRecord(7, Peer(7).key, T0),))
    manager, _ = nodes.make()
    return manager, [Peer(7).data(HANDSHAKE_REQUEST, OWN)]  # another key claiming node 7


def _denied(nodes: Nodes) -> tuple[Manager, list[bytes]]:
    manager, runtime = nodes.make()
    runtime.deny.add(7)
    return manager, [Peer(7).data(HANDSHAKE_REQUEST, OWN)]


def _replayed(nodes: Nodes) -> tuple[Manager, list[bytes]]:
    data = Peer(7).data(HANDSHAKE_REQUEST, OWN)
    return nodes.make()[0], [data, data]


def _over_the_source_quota(nodes: Nodes) -> tuple[Manager, list[bytes]]:
    manager, _ = nodes.make(max_pending_per_source=1)
    return manager, [Peer(7).data(HANDSHAKE_REQUEST, OWN), Peer(8).data(HANDSHAKE_REQUEST, OWN)]


def _plain(make: Callable[[], bytes]) -> Callable[[Nodes], tuple[Manager, list[bytes]]]:
    # The message is made when the test runs: its timestamp must be fresh then.
    return lambda nodes: (nodes.make()[0], [make()])


REAL_DROPS: dict[DropKind, Callable[[Nodes], tuple[Manager, list[bytes]]]] = {
    DropKind.OWN_NODE_ID: _plain(lambda: Peer(OWN).data(HANDSHAKE_REQUEST, OWN)),
    DropKind.DENIED: _denied,
    DropKind.STALE: _plain(lambda: Peer(7).data(HANDSHAKE_REQUEST, OWN, timestamp=1_000_000_000)),
    DropKind.REPLAY: _replayed,
    DropKind.KEY_MISMATCH: _impostor_of_a_trusted_node,
    DropKind.SIGNATURE: _plain(lambda: Peer(7).data(HANDSHAKE_REQUEST, OWN, v2=False)),
    DropKind.QUEUE_FULL: _over_the_source_quota,
    DropKind.UNSOLICITED: _plain(lambda: Peer(7).data(HANDSHAKE_ACCEPT, OWN)),
    # Its type quotes words of other drops: the kind, not the text, picks the label.
    DropKind.MALFORMED: _plain(lambda: b'{"type":"replayed message on the deny list","node_id":7}'),
}


@pytest.mark.parametrize("kind", list(DropKind), ids=lambda kind: kind.value)
def test_a_real_drop_counts_under_its_kind_only(nodes: Nodes, kind: DropKind) -> None:
    manager, messages = REAL_DROPS[kind](nodes)
    server = HandshakeServer(("127.0.0.1", 0), manager.handle_connection)
    server.start()
    try:
        for data in messages:
            send_message(server.address, data)  # returns once the Manager closed the connection
    finally:
        server.close()
    text = manager.metrics.render()
    counts = {k: value(text, "pilot_handshake_drops_total", reason=k.value) for k in DropKind}
    assert counts == {k: 1.0 if k is kind else 0.0 for k in DropKind}


def test_two_metrics_objects_in_one_process_count_apart() -> None:
    first, second = Metrics(process=True), Metrics(process=True)  # no "Duplicated timeseries"
    first.drop(DropKind.REPLAY)
    first.message("handshake_request", "received")
    assert value(first.render(), "pilot_handshake_drops_total", reason="replay") == 1
    assert value(second.render(), "pilot_handshake_drops_total", reason="replay") == 0
    assert value(second.render(), "pilot_handshake_messages_total", type="handshake_request") == 0


def test_hooks_move_their_metrics() -> None:
    metrics = Metrics()
    metrics.message("handshake_accept", "sent")
    metrics.event("trust.changed")
    metrics.relay("handshake_accept", "out")
    metrics.registry_request("lookup", "ok", 0.02)
    metrics.refusal("max_connections_per_source")
    metrics.store_commit(0.004, 3)
    text = metrics.render()
    assert (
        value(text, "pilot_handshake_messages_total", type="handshake_accept", result="sent") == 1
    )
    assert value(text, "pilot_handshake_events_total", topic="trust.changed") == 1
    assert (
        value(
            text, "pilot_handshake_relayed_messages_total", type="handshake_accept", direction="out"
        )
        == 1
    )
    assert value(text, "pilot_handshake_registry_requests_total", type="lookup", outcome="ok") == 1
    assert value(text, "pilot_handshake_registry_request_seconds_count", type="lookup") == 1
    assert (
        value(text, "pilot_handshake_refused_connections_total", cap="max_connections_per_source")
        == 1
    )
    assert value(text, "pilot_handshake_store_write_seconds_count") == 1
    assert value(text, "pilot_handshake_store_changes_per_write_sum") == 3


def test_gauges_are_read_at_scrape_and_registry_up_exists_only_with_a_registry() -> None:
    counts = {"trusted": 2}
    metrics = Metrics()
    metrics.watch(
        trusted=lambda: counts["trusted"],
        pending=lambda: 1,
        outgoing=lambda: 0,
        active_connections=lambda: 3,
        registry_up=None,
    )
    assert value(metrics.render(), "pilot_handshake_trusted_peers") == 2
    counts["trusted"] = 5
    text = metrics.render()
    assert value(text, "pilot_handshake_trusted_peers") == 5
    assert value(text, "pilot_handshake_active_connections") == 3
    assert "pilot_handshake_registry_up" not in text

    with_registry = Metrics()
    with_registry.watch(
        trusted=lambda: 0,
        pending=lambda: 0,
        outgoing=lambda: 0,
        active_connections=lambda: 0,
        registry_up=lambda: 1,
    )
    assert value(with_registry.render(), "pilot_handshake_registry_up") == 1


def test_http_endpoint_serves_metrics_only_at_slash_metrics() -> None:
    metrics = Metrics()
    metrics.drop(DropKind.DENIED)
    server = MetricsServer("127.0.0.1:0", metrics)
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        assert value(text, "pilot_handshake_drops_total", reason="denied") == 1
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/html")
            assert '<a href="/metrics">' in response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=10)
        assert caught.value.code == 404
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()


def test_http_endpoint_holds_at_most_16_scrapes_and_cuts_each_off_after_5_s() -> None:
    """Issue 15 item 7: 1,013 trickling connections took the daemon's file descriptors."""
    server = MetricsServer("127.0.0.1:0", Metrics())
    address = server.address
    tricklers: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(METRICS_MAX_CONNECTIONS):
            trickler = socket.create_connection(address, timeout=10)
            trickler.sendall(b"GET /met")  # and never the rest
            tricklers.append(trickler)
        deadline = time.monotonic() + 10
        while server.open_connections() < METRICS_MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.open_connections() == METRICS_MAX_CONNECTIONS
        try:
            refused: socket.socket | None = socket.create_connection(address, timeout=10)
        except ConnectionResetError:
            refused = None  # on loopback the reset can come before connect() returns
        if refused is not None:
            with refused:
                with contextlib.suppress(ConnectionResetError):
                    refused.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                with pytest.raises(ConnectionResetError):
                    refused.recv(1024)  # reset unread: no thread, no descriptor kept
        assert server.open_connections() == METRICS_MAX_CONNECTIONS
        for trickler in tricklers:  # each is cut off at its deadline, however it trickles
            assert trickler.recv(1024) == b""
        cut_after = time.monotonic() - opened
        assert METRICS_DEADLINE - 0.5 <= cut_after < METRICS_DEADLINE + 5
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as r:
            assert r.status == 200
    finally:
        for trickler in tricklers:
            trickler.close()
        server.close()


class _Broken:
    """A collector that fails at every scrape."""

    def collect(self) -> Iterator[Any]:
        raise RuntimeError("collector broke")


def test_failing_scrapes_are_rate_limited_log_lines_never_tracebacks(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    metrics = Metrics()
    metrics.registry.register(_Broken())  # type: ignore[arg-type]
    server = MetricsServer("127.0.0.1:0", metrics)
    host, port = server.address
    try:
        with caplog.at_level(logging.WARNING, logger="pilothandshake.metrics"):
            for _ in range(20):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).close()
    finally:
        server.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pilothandshake.metrics"]
    assert 1 <= len(lines) <= 3  # one a second at most, not 20
    assert lines[0] == f"metrics request from {host} failed: RuntimeError: collector broke"
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_metrics_listen_is_off_by_default_and_validated_like_listen() -> None:
    assert Config().metrics.listen == ""

    def parse(metrics: object) -> Config:
        return parse_config({"node_id": 7, "metrics": metrics}, "c.yaml")

    assert parse(None).metrics.listen == ""
    assert parse({"listen": "127.0.0.1:9464"}).metrics.listen == "127.0.0.1:9464"
    assert parse({"listen": "[::1]:0"}).metrics.listen == "[::1]:0"
    with pytest.raises(ConfigError, match=r"c\.yaml: metrics\.listen: expected host:port"):
        parse({"listen": "nonsense"})
    with pytest.raises(ConfigError, match=r"c\.yaml: metrics\.port: unknown key"):
        parse({"port": 9464})


def daemon_config(directory: Path, **extra: object) -> Config:
    path = directory / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "identity": str(directory / "identity.json"),
                "node_id": 7,
                "listen": "127.0.0.1:0",
                **extra,
            }
        )
    )
    return load_config(str(path))


def test_embedded_daemon_serves_its_own_metrics_over_http_and_the_control_socket(
    short_dir: Path,
) -> None:
    (short_dir / "a").mkdir()
    (short_dir / "b").mkdir()
    first = Daemon(daemon_config(short_dir / "a", metrics={"listen": "127.0.0.1:0"}))
    second = Daemon(daemon_config(short_dir / "b"))  # same process, its own registry
    with first, second:
        assert second.metrics_address is None
        first.metrics.drop(DropKind.REPLAY)
        host, port = first.metrics_address or ("", 0)
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert value(scraped, "pilot_handshake_drops_total", reason="replay") == 1
        assert "pilot_handshake_registry_up" not in scraped  # no registry configured
        assert "\nprocess_open_fds " in scraped
        answer = ControlClient(first.config.control_socket).request("metrics")
        assert answer["status"] == "ok"
        assert value(answer["data"]["text"], "pilot_handshake_drops_total", reason="replay") == 1
        other = ControlClient(second.config.control_socket).request("metrics")
        assert value(other["data"]["text"], "pilot_handshake_drops_total", reason="replay") == 0


def test_metrics_address_in_use_fails_start_naming_the_key(short_dir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = f"127.0.0.1:{blocker.getsockname()[1]}"
        daemon = Daemon(daemon_config(short_dir, metrics={"listen": taken}))
        with pytest.raises(HandshakeError, match=rf"cannot serve metrics on {taken} "):
            daemon.start()
    # start() stopped everything again: the identity directory is free for a new daemon.
    Daemon(daemon_config(short_dir)).stop()


def test_refused_connections_are_counted_by_the_cap_reached() -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)

    def hold(conn: socket.socket) -> None:
        entered.release()
        release.wait(10)
        conn.close()

    metrics = Metrics()
    server = HandshakeServer(
        ("127.0.0.1", 0), hold, max_connections=2, max_connections_per_source=1, metrics=metrics
    )
    server.start()
    opened: list[socket.socket] = []

    def connect(source: str) -> None:
        sock = socket.socket()
        opened.append(sock)
        sock.settimeout(5)
        sock.bind((source, 0))
        with contextlib.suppress(ConnectionResetError):  # a refusal may reset the connect
            sock.connect(server.address)

    def refusals() -> tuple[float, float]:
        text = metrics.render()
        return (
            value(text, "pilot_handshake_refused_connections_total", cap="max_connections"),
            value(
                text, "pilot_handshake_refused_connections_total", cap="max_connections_per_source"
            ),
        )

    try:
        connect("127.0.0.1")
        assert entered.acquire(timeout=5)
        connect("127.0.0.1")  # a second from the same source: the per-source cap
        connect("127.0.0.2")
        assert entered.acquire(timeout=5)
        connect("127.0.0.3")  # two admitted: the global cap
        deadline = time.monotonic() + 10
        while refusals() != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert refusals() == (1, 1)
    finally:
        release.set()
        for sock in opened:
            sock.close()
        server.close()


DASHBOARD = Path(__file__).resolve().parents[1] / "conf" / "grafana-dashboard.json"


def exported_names() -> set[str]:
    """Every sample name a daemon's /metrics can hold (with a registry configured)."""
    metrics = Metrics(process=True)
    metrics.watch(
        trusted=lambda: 0,
        pending=lambda: 0,
        outgoing=lambda: 0,
        active_connections=lambda: 0,
        registry_up=lambda: 1,
    )
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(metrics.render())
        for suffix in suffixes.get(family.type, ("",))
    }


def test_grafana_dashboard_is_json_and_names_only_metrics_the_daemon_exports() -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())  # valid JSON, or this raises
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    exported = exported_names()
    named = set()
    for query in queries:
        names = set(re.findall(r"\b((?:pilot_handshake|process)_[a-z0-9_]+)\b", query))
        assert names, query  # every expression reads a metric
        named |= names
    assert named <= exported, sorted(named - exported)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for panel in ("trusted", "pending", "handshakes by outcome", "drops by kind", "relay latency"):
        assert panel in titles, panel
    assert {"pilot_handshake_registry_up", "pilot_handshake_store_write_seconds_bucket"} <= named
    # The registry request types the relay panels select are the client's own.
    client = (Path(__file__).resolve().parents[1] / "pilothandshake/registry/client.py").read_text()
    for kind in ("request_handshake", "respond_handshake", "poll_handshakes"):
        assert f'"type": "{kind}"' in client
