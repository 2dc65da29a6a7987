"""benchmarks/bench_fleet.py's picture is optional: without matplotlib it says so and the
run (whose results are saved before) ends normally."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")


def test_the_fleet_plot_without_matplotlib_says_so_instead_of_crashing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(BENCHMARKS)
    import bench_fleet

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    result = {"size": 10, "mesh_s": 1.0, "idle_cpu_pct": 0.5}
    assert bench_fleet._plot({"pilot-registryd": [result]}) is False
    assert "matplotlib not installed: no picture" in capsys.readouterr().out
