"""The benchmark scripts run end to end on a tiny configuration (so they cannot rot)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stability_run_one_is_a_deterministic_simulator_run():
    """640 samples in batches of 64 over 2 workers committing every step (λ = 1) are 10
    center updates, evaluated every half pass (updates 0, 5, 10); on the simulator every
    commit but the first is one update stale (mean 0.9), and one spec gives one row."""
    stab = load("stability")
    spec = dict(workers=2, seed=0, window=1, train_samples=640, curve_test=200,
                eval_every=0.5, batch_size=64, lr=0.05)
    rows = [stab.run_one(dict(spec, algorithm=a)) for a in ("downpour", "downpour", "gem")]
    for r in rows:
        assert r["updates"] == 10
        assert [c[:2] for c in r["curve"]] == [[0, 0], [5, 320], [10, 640]]
        assert r["staleness_mean"] == pytest.approx(0.9)
    same = [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows[:2]]
    assert same[0] == same[1]
    assert rows[2]["test_accuracy"] != rows[0]["test_accuracy"]  # gem is not downpour


def _cells(text: str, column: int = 3) -> list[dict[str, str]]:
    """{algorithm: its cell in ``column``} of each Markdown table in ``text``."""
    blocks = text.strip().split("\n\n")
    return [{line.split("|")[1].strip(" `"): line.split("|")[column].strip()
             for line in block.splitlines()[2:]}
            for block in blocks if block.startswith("| algorithm |")]


def test_stability_report_on_fixed_rows():
    stab = load("stability")

    def row(algorithm, seed, acc, diverged, curve):
        return dict(algorithm=algorithm, workers=2, seed=seed, test_accuracy=acc,
                    diverged=diverged, curve=[[0, 0, 0.1], *curve])

    rows = [row("downpour", 0, 0.9, False, [[5, 320, 0.96], [7, 640, 0.99]]),
            row("downpour", 1, 0.8, False, [[10, 640, 0.95]]),
            row("gem", 0, 0.1, True, [[4, 160, 0.97]]),
            row("gem", 1, 0.9, False, [[6, 320, 0.95]])]
    acc, div, to97, to95 = _cells(stab.table(rows, ["downpour", "gem"], [2]))
    assert acc == {"downpour": "0.8500 (0.800–0.900)", "gem": "0.5000 (0.100–0.900)"}
    assert div == {"downpour": "0/2", "gem": "1/2"}
    assert to97 == {"downpour": "7 (1/2)", "gem": "4 (1/2)"}  # updates, seeds that reached it
    assert to95 == {"downpour": "8", "gem": "5"}  # medians of (5, 10) and (4, 6)
    # samples to 95 % over DOWNPOUR's at the same seed: 160/320 and 320/640
    (ratio,) = _cells(stab.ratios(rows, ["downpour", "gem", "agn"], [2], 0.95), column=2)
    assert ratio == {"downpour": "1.00", "gem": "0.50", "agn": "—"}


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
