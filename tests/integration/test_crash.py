"""Crash consistency (SPEC 10): SIGKILL at random moments while changes are acknowledged.

A few seeded trials of ``scripts/crash-trials.py`` (which runs 200 by hand): the daemon's
``trust.json`` and the embedded registry's ``--store`` must parse after every kill, hold
every change that was acknowledged before it, and a restart must read only the real file.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from fakeruntime import seed_trust

from pilothandshake.registry.server import RegistryServer
from pilothandshake.store import TrustRecord, TrustStore, encode_state, load_state

from .conftest import ROOT

CI_TRIALS = 20


def real_time() -> datetime:
    return datetime.now(timezone.utc)


def _crash_trials() -> ModuleType:
    path = ROOT / "scripts" / "crash-trials.py"
    spec = importlib.util.spec_from_file_location("crash_trials", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def test_sigkilled_daemon_keeps_every_acknowledged_approval_and_a_parsable_trust_file() -> None:
    report = _crash_trials().daemon_trials(CI_TRIALS, seed=4)
    assert report.ok, "\n".join(report.problems)
    assert report.trials == CI_TRIALS
    assert report.restarts >= CI_TRIALS
    # The trials proved something only if kills landed while approvals were in flight.
    assert report.interrupted >= CI_TRIALS // 4, report.summary()
    assert report.acknowledged > CI_TRIALS


def test_sigkilled_registry_keeps_every_acknowledged_node_and_pair_in_its_store() -> None:
    report = _crash_trials().registry_trials(CI_TRIALS, seed=5)
    assert report.ok, "\n".join(report.problems)
    assert report.trials == CI_TRIALS
    assert report.interrupted >= CI_TRIALS // 2, report.summary()
    assert report.acknowledged > CI_TRIALS


def test_temporary_files_left_by_a_killed_writer_are_removed_and_never_loaded() -> None:
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        seed_trust(root)
        trust = os.path.join(root, "trust.json")
        real = load_state(trust)
        # What a writer killed between mkstemp and rename leaves: a state never acknowledged.
        newer = real.copy()
        newer.trusted[5] = TrustRecord(5, "", real_time())
        litter = Path(root, ".trust.json.abc123.tmp")
        litter.write_bytes(encode_state(newer))
        unrelated = Path(root, ".other.json.abc123.tmp")
        unrelated.write_bytes(b"{}")
        store = TrustStore(trust, threading.RLock(), lambda changes: None)
        try:
            assert store.visible == real
            assert 5 not in store.working.trusted
            assert not litter.exists()
            assert unrelated.exists(), "only trust.json's own temporary files go"
        finally:
            store.close()


def test_registry_start_removes_its_own_stale_temporary_files() -> None:
    with tempfile.TemporaryDirectory(prefix="ph-") as root:
        litter = Path(root, ".registry.json.x1y2.tmp")
        litter.write_bytes(b'{"version": 1, "next_id": 99, "nodes": [], "trust": []}')
        other = Path(root, ".elsewhere.json.x1y2.tmp")
        other.write_bytes(b"{}")
        RegistryServer("127.0.0.1", 0, store_path=os.path.join(root, "registry.json")).stop()
        assert not litter.exists()
        assert other.exists()
