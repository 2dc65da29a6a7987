"""Issue 5.1: throughput on port 444.

Client processes on loopback send distinct signed ``handshake_request`` messages (one fresh
node ID and key each) to one ``pilot-handshaked`` process (auto-approve, persistence on, no
registry, per-source limits raised). A client's send ends at the daemon's receipt, which
SPEC 3 (round 3) writes once the message is verified, decided and written to trust.json
(group commit); the daemon's clock still stops only when its ``status`` (control socket)
counts every sender trusted, and its CPU is read then. After the daemon stops, the run
checks that trust.json holds every sender.

Baselines in the same run, with the same client: (a) a bare ``ThreadingTCPServer`` in its own
process that reads one message and closes (the transport ceiling); (b) the floor: the same
server that also decodes the message and verifies its signature, writing nothing (only its
CPU per message is compared: its clients' clock, like the ceiling's, ends at the end of
stream, which comes before the verify); (c) the
raw PyNaCl verify rate on one thread. Targets: daemon >= 0.6 x ceiling, <= 350 us of daemon
CPU per message.

    .venv/bin/python benchmarks/bench_throughput.py [--quick] [--runs N]
"""

from __future__ import annotations

import base64
import contextlib
import multiprocessing
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from typing import Any

import _common as c
import nacl.signing

from pilothandshake.client import Client
from pilothandshake.messages import HandshakeMsg
from pilothandshake.store import load_state
from pilothandshake.wire import read_message, send_message

TARGET_FRACTION = 0.6
TARGET_CPU_US = 350.0
DAEMON_NODE = 1


# (a) the transport ceiling: a bare ThreadingTCPServer, in a process of its own.


class _ReadOne(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # The same bounded reader the daemon uses; a malformed read just ends the connection.
        with contextlib.suppress(Exception):
            read_message(self.request)


class _BareServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class _Verify(socketserver.BaseRequestHandler):
    """The floor of the needed work on the same transport: read, decode, verify the
    ``signature_v2`` with the key the message carries; no decision, nothing written."""

    def handle(self) -> None:
        with contextlib.suppress(Exception):
            msg = HandshakeMsg.from_json(read_message(self.request))
            key = nacl.signing.VerifyKey(base64.b64decode(msg.public_key))
            key.verify(msg.v2_challenge(DAEMON_NODE), base64.b64decode(msg.signature_v2))


def serve_bare(handler: type[socketserver.BaseRequestHandler]) -> int:
    """Run a bare server with ``handler`` until SIGTERM; print its port first."""
    server = _BareServer((c.LOOPBACK, 0), handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(server.server_address[1], flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    return 0


# The client: one process of several threads, messages signed before the clock starts.


def _client(
    port: int,
    first_node: int,
    count: int,
    threads: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    identities = c.identities(count)
    messages = [
        c.signed_request(identity, first_node + index, DAEMON_NODE)
        for index, identity in enumerate(identities)
    ]
    lock = threading.Lock()
    sent = [0, 0]  # delivered, failed

    def worker(share: list[bytes]) -> None:
        for data in share:
            try:
                send_message((c.LOOPBACK, port), data)
                ok = 0
            except Exception:
                ok = 1
            with lock:
                sent[ok] += 1

    shares = [messages[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=worker, args=(share,)) for share in shares]
    ready.put(1)
    go.wait(60)
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(120)
    results.put((sent[0], sent[1], time.monotonic()))


def drive(port: int, total: int, processes: int, threads: int, first_node: int) -> dict[str, Any]:
    """Send ``total`` messages from ``processes`` x ``threads`` clients; returns the figures."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    per = total // processes
    procs = [
        ctx.Process(
            target=_client,
            args=(port, first_node + i * per, per, threads, ready, go, results),
        )
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    start = time.monotonic()
    go.set()
    outcomes = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(30)
    end = max(outcome[2] for outcome in outcomes)
    delivered = sum(outcome[0] for outcome in outcomes)
    failed = sum(outcome[1] for outcome in outcomes)
    elapsed = end - start
    return {
        "delivered": delivered,
        "failed": failed,
        "started": start,
        "seconds": elapsed,
        "per_second": delivered / elapsed,
    }


def run_bare(
    total: int, processes: int, threads: int, mode: str = "--serve-bare"
) -> dict[str, Any]:
    """The transport ceiling (``--serve-bare``), or the floor (``--serve-floor``)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        cpu_before = c.cpu_seconds(proc.pid)
        figures = drive(port, total, processes, threads, first_node=100)
        figures["server_cpu_us"] = (c.cpu_seconds(proc.pid) - cpu_before) / total * 1e6
        return figures
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


def run_daemon(total: int, processes: int, threads: int, profile: str = "") -> dict[str, Any]:
    """The daemon: every delivered message must end up trusted in trust.json. With
    ``profile``, py-spy samples the daemon during the run into that file (raw format)."""
    with c.temp_dir() as directory:
        port = c.free_port()
        config = c.yaml_config(directory, DAEMON_NODE, port)
        with c.DaemonProcess(config, os.path.join(directory, "daemon.log")) as daemon:
            daemon.start()
            spy = _py_spy(daemon.pid, profile) if profile else None
            cpu_before = c.cpu_seconds(daemon.pid)
            figures = drive(port, total, processes, threads, first_node=100)
            # Delivered is not yet processed: stop the clock when the daemon is done.
            status = Client(os.path.join(directory, "control.sock")).request
            if not c.wait_until(
                lambda: status("status")["data"]["trusted"] >= figures["delivered"], 60.0, 0.005
            ):
                raise RuntimeError("the daemon did not process every delivered message in 60 s")
            figures["seconds"] = time.monotonic() - figures["started"]
            figures["per_second"] = figures["delivered"] / figures["seconds"]
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            figures["server_cpu_us"] = (c.cpu_seconds(daemon.pid) - cpu_before) / total * 1e6
            figures["daemon_rss_kib"] = c.rss_kib(daemon.pid)
        trusted = len(load_state(os.path.join(directory, "trust.json")).trusted)
        figures["trusted_on_disk"] = trusted
        if trusted != figures["delivered"]:
            with open(os.path.join(directory, "daemon.log"), encoding="utf-8") as log:
                tail = log.read()[-2000:]
            raise RuntimeError(f"{figures['delivered']} delivered, {trusted} on disk: {tail}")
    return figures


def _py_spy(pid: int, out: str) -> subprocess.Popen[bytes]:
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    proc = subprocess.Popen(
        [spy, "record", "-p", str(pid), "-o", out, "-f", "raw", "-r", "250", "--gil"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches before the clock starts
    return proc


def verify_rate(seconds: float) -> float:
    """Raw PyNaCl: build the verify key and verify one signature, one thread, distinct keys."""
    samples = []
    for index in range(256):
        key = nacl.signing.SigningKey.generate()
        message = b"handshake-v2:handshake_request:%d:1:1700000000:" % index + b"0" * 200
        samples.append((bytes(key.verify_key), message, key.sign(message).signature))
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for public, message, signature in samples:
            nacl.signing.VerifyKey(public).verify(message, signature)
        done += len(samples)
    return done / (time.perf_counter() - start)


def main() -> int:
    """Run the benchmark; print figures and targets."""
    if "--serve-bare" in sys.argv:
        return serve_bare(_ReadOne)
    if "--serve-floor" in sys.argv:
        return serve_bare(_Verify)

    def extra(parser: Any) -> None:
        parser.add_argument("--py-spy", default="", help="profile the daemon into FILE (raw)")

    args = c.parse_args(__doc__.splitlines()[0], extra, default_runs=5)
    total = 600 if args.quick else 4000
    processes, threads = 4, 4
    print(f"throughput: {total} messages, {processes} client processes x {threads} threads")
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        bare = run_bare(total, processes, threads)
        floor = run_bare(total, processes, threads, "--serve-floor")
        daemon = run_daemon(total, processes, threads, args.py_spy)
        verify = verify_rate(0.3 if args.quick else 1.5)
        ratio = daemon["per_second"] / bare["per_second"]
        runs.append(
            {
                "bare": bare,
                "floor": floor,
                "daemon": daemon,
                "verify_per_second": verify,
                "ratio": ratio,
            }
        )
        print(
            f"  run {run + 1}: bare {bare['per_second']:.0f}/s, daemon "
            f"{daemon['per_second']:.0f}/s "
            f"({daemon['failed']} failed, {daemon['trusted_on_disk']} trusted on disk), server "
            f"CPU per message: bare {bare['server_cpu_us']:.0f} us, floor "
            f"{floor['server_cpu_us']:.0f} us, daemon {daemon['server_cpu_us']:.0f} us, "
            f"verify {verify:.0f}/s, ratio {ratio:.2f}"
        )
    summary = {
        "bare_per_second": c.median([r["bare"]["per_second"] for r in runs]),
        "daemon_per_second": c.median([r["daemon"]["per_second"] for r in runs]),
        "verify_per_second": c.median([r["verify_per_second"] for r in runs]),
        "ratio": c.median([r["ratio"] for r in runs]),
        "daemon_cpu_us": c.median([r["daemon"]["server_cpu_us"] for r in runs]),
        "bare_cpu_us": c.median([r["bare"]["server_cpu_us"] for r in runs]),
        "floor_cpu_us": c.median([r["floor"]["server_cpu_us"] for r in runs]),
        "messages": total,
        "clients": f"{processes} processes x {threads} threads",
    }
    print(
        f"median: transport ceiling {summary['bare_per_second']:.0f} msg/s "
        f"({summary['bare_cpu_us']:.0f} us CPU per message; the floor "
        f"{summary['floor_cpu_us']:.0f} us), daemon "
        f"{summary['daemon_per_second']:.0f} msg/s ({summary['daemon_cpu_us']:.0f} us), PyNaCl "
        f"verify {summary['verify_per_second']:.0f}/s (one thread)"
    )
    summary["met"] = c.verdict("daemon / ceiling", summary["ratio"], TARGET_FRACTION, at_most=False)
    c.verdict(
        "daemon CPU per message", summary["daemon_cpu_us"], TARGET_CPU_US, at_most=True, unit=" us"
    )
    c.save("throughput", args, {"summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
