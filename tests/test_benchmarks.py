"""The benchmark scripts run end to end on a tiny configuration (so they cannot rot)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stability_runs_and_reports():
    stab = load("stability")
    rows = []
    for algorithm in ("downpour", "gem"):
        for seed in (0, 1):
            rows.append(stab.run_one(dict(algorithm=algorithm, workers=2, seed=seed, window=1,
                                          train_samples=640, curve_test=200, eval_every=0.5,
                                          batch_size=64, lr=0.05)))
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["curve"][0][0] == 0
    rows[0]["curve"].append([7, 640, 0.99])  # pretend downpour seed 0 reached 97 % late
    text = stab.table(rows, ["downpour", "gem"], [2])
    assert "| `downpour` | 1 | 7 (1/2) |" in text
    assert re.search(r"\| `gem` \| 1 \| [0-2]/2 \|", text)  # the divergence table
    assert "| `downpour` | " in stab.ratios(rows, ["downpour", "gem"], [2], 0.95)


def test_situations_runs_and_reports():
    sit = load("situations")
    row = sit.run_one(dict(condition="stragglers", algorithm="ssp", seed=0, workers=2, window=1,
                           train_samples=640, lr=0.05))
    assert row["virtual_seconds"] > 0 and row["commits"] > 0
    assert "| `ssp` | 1 |" in sit.report([row], ["ssp"], ["stragglers"])


def test_stability_rejects_synchronous_algorithms():
    stab = load("stability")
    with pytest.raises(SystemExit):
        stab.main(["--algorithms", "diloco", "--report-only"])
