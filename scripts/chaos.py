#!/usr/bin/env python3
"""Fault injection against a fleet on loopback (issue 20.4), for minutes.

8 pilot-handshaked daemons (3 private: reachable only through the relay) and one durable
pilot-registryd on 127.0.0.1 take random handshake requests, approvals, rejections and
untrusts while daemons are SIGKILLed and restarted, SIGSTOPped and continued, SIGHUPped, and
the registry is killed and restarted. At the end it checks that no acknowledged change was
lost (also after a final SIGKILL and restart of every daemon), that every approved pair
trusts both ways (and how long that took), that no log holds an ERROR or a
traceback and that nothing died. What it does and checks: ``tests/integration/chaos.py``;
``tests/integration/test_chaos.py`` runs a short one in the suite.

    python scripts/chaos.py --seed 1 --minutes 5
    python scripts/chaos.py --seed 7 --minutes 10 --keep   # keep the logs for reading

Needs the test extra (``pip install -e '.[test]'``). Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from integration import chaos  # noqa: E402
from integration.conftest import Fleet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="fixes every random choice")
    parser.add_argument("--minutes", type=float, default=5.0, help="how long faults go on")
    parser.add_argument("--nodes", type=int, default=8, help="daemons in the fleet")
    parser.add_argument("--private", type=int, default=3, help="of them, private ones")
    parser.add_argument("--keep", action="store_true", help="keep the fleet's directory")
    options = parser.parse_args()
    if not 0 <= options.private < options.nodes or options.minutes <= 0:
        parser.error("need 0 <= --private < --nodes and --minutes > 0")
    root = tempfile.mkdtemp(prefix="ph-chaos-")
    fleet = Fleet(Path(root))
    try:
        report = chaos.run(
            fleet,
            chaos.Options(
                seed=options.seed,
                seconds=options.minutes * 60,
                nodes=options.nodes,
                private=options.private,
            ),
        )
    finally:
        with open(Path(root) / "close.log", "w") as out:
            stdout, sys.stdout = sys.stdout, out  # the processes' log tails go to a file
            try:
                fleet.close()
            finally:
                sys.stdout = stdout
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(report.lines()))
    if options.keep:
        print(f"logs: {root}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
