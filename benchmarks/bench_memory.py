"""Issue 5.5: memory of the daemon.

RSS (``VmRSS``; peak ``VmHWM`` beside it) of a ``pilot-handshaked`` process (no registry):

- idle: a fresh daemon with nothing on disk, after it settles;
- loaded: started on a trust.json of 10,000 trusted peers and 256 pending requests, then
  8,192 signed requests from trusted peers (distinct messages) fill the replay set to its
  SPEC bound (8,192 entries).

Targets: idle <= 40 MB, loaded <= 80 MB (MB = 10^6 bytes).

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--runs N]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import _common as c

from pilothandshake.constants import MAX_PENDING, MAX_REPLAY
from pilothandshake.wire import send_message

TRUSTED = 10_000
TARGET_IDLE_MB = 40.0
TARGET_LOADED_MB = 80.0
SENDERS = 16
SETTLE = 1.0
ATTEMPTS = 50
RETRY_PAUSE = 0.05


def peak_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def idle_rss() -> dict[str, float]:
    """A fresh daemon, nothing on disk."""
    with c.temp_dir() as directory:
        port = c.free_port()
        with c.DaemonProcess(
            c.yaml_config(directory, 1, port), os.path.join(directory, "log")
        ) as d:
            d.start()
            time.sleep(SETTLE)
            return {
                "rss_mb": c.rss_kib(d.pid) * 1024 / 1e6,
                "peak_mb": peak_kib(d.pid) * 1024 / 1e6,
            }


def send_all(port: int, messages: list[bytes]) -> int:
    """Send every message on SENDERS threads, each until delivered (at most ATTEMPTS tries):
    the one daemon is overloaded on purpose, and at ``max_connections`` it resets newcomers,
    as a sender would see before trying its relay. Returns how many sends needed a retry.
    Raises ``RuntimeError`` if a message could not be delivered at all."""
    retried = [0]
    lock = threading.Lock()

    def worker(share: list[bytes]) -> None:
        for data in share:
            for attempt in range(ATTEMPTS):
                try:
                    send_message((c.LOOPBACK, port), data)
                    break
                except Exception:
                    if attempt == 0:
                        with lock:
                            retried[0] += 1
                    time.sleep(RETRY_PAUSE)
            else:
                raise RuntimeError(f"a message was not delivered in {ATTEMPTS} tries")

    threads = [
        threading.Thread(target=worker, args=(messages[i::SENDERS],)) for i in range(SENDERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return retried[0]


def loaded_rss(trusted: int, replay: int, pending: int) -> dict[str, float]:
    """``trusted`` peers and ``pending`` requests on disk, ``replay`` messages received."""
    peers = c.identities(trusted)
    with c.temp_dir() as directory:
        c.write_trust_file(
            directory,
            {1000 + i: identity.public_key_b64 for i, identity in enumerate(peers)},
            {100_000 + i: key for i, key in enumerate(c.random_keys(pending))},
        )
        messages = [
            c.signed_request(identity, 1000 + i, 1) for i, identity in enumerate(peers[:replay])
        ]
        port = c.free_port()
        with c.DaemonProcess(
            c.yaml_config(directory, 1, port), os.path.join(directory, "log")
        ) as d:
            d.start()
            started_mb = c.rss_kib(d.pid) * 1024 / 1e6
            retried = send_all(port, messages)
            time.sleep(SETTLE)
            return {
                "rss_mb": c.rss_kib(d.pid) * 1024 / 1e6,
                "peak_mb": peak_kib(d.pid) * 1024 / 1e6,
                "after_load_mb": started_mb,
                "retried": retried,
            }


def main() -> int:
    """Run the benchmark; print figures and targets."""
    args = c.parse_args(__doc__.splitlines()[0])
    trusted = 2000 if args.quick else TRUSTED
    replay = 1000 if args.quick else MAX_REPLAY
    print(f"memory: idle, and {trusted} trusted + {MAX_PENDING} pending + {replay} replay entries")
    runs: list[dict[str, Any]] = []
    for run in range(args.runs):
        idle = idle_rss()
        loaded = loaded_rss(trusted, replay, MAX_PENDING)
        runs.append({"idle": idle, "loaded": loaded})
        print(
            f"  run {run + 1}: idle {idle['rss_mb']:.1f} MB; loaded {loaded['rss_mb']:.1f} MB "
            f"(just after loading trust.json {loaded['after_load_mb']:.1f} MB, peak "
            f"{loaded['peak_mb']:.1f} MB, {loaded['retried']} sends retried)"
        )
    summary = {
        "idle_mb": c.median([r["idle"]["rss_mb"] for r in runs]),
        "loaded_mb": c.median([r["loaded"]["rss_mb"] for r in runs]),
        "loaded_peak_mb": c.median([r["loaded"]["peak_mb"] for r in runs]),
        "after_load_mb": c.median([r["loaded"]["after_load_mb"] for r in runs]),
    }
    print(
        f"median: idle {summary['idle_mb']:.1f} MB, loaded {summary['loaded_mb']:.1f} MB "
        f"(peak {summary['loaded_peak_mb']:.1f} MB)"
    )
    met = {
        "idle": c.verdict("idle RSS", summary["idle_mb"], TARGET_IDLE_MB, at_most=True, unit=" MB"),
        "loaded": c.verdict(
            "loaded RSS", summary["loaded_mb"], TARGET_LOADED_MB, at_most=True, unit=" MB"
        ),
    }
    c.save("memory", args, {"summary": summary, "met": met, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
