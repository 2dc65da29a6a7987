"""The demo driver (scripts/demo.sh runs it) completes against real processes."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, process_env


def test_demo_walks_through_request_approve_and_revoke_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pilothandshake.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=process_env(),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("handshake", "pending", "approve", "wait", "untrust", "demo OK"):
        assert step in out
    assert "no trusted peers" in out.split("untrust")[-1]  # B saw the revoke
