"""The figures of a run follow its task: real short ``sim`` runs, then the files written
and the data drawn in each figure (its lines' and bars' values, never pixels)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

import distgrad
from distgrad.report.plots import METRICS, figures, task_of_run, write_plots

USER_CODE = '''
import numpy as np
from torch import nn


def make_regression(n=400, test=True):
    """Float targets (a regression); without test data when test=False."""
    g = np.random.default_rng(3)
    x = g.normal(0.0, 1.0, (n, 5)).astype(np.float32)
    y = (x @ np.linspace(0.2, 1.0, 5)).astype(np.float32)
    cut = n * 3 // 4
    return (x[:cut], y[:cut]), ((x[cut:], y[cut:]) if test else None)


def make_regressor():
    return nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))
'''

SMALL = dict(engine="sim", algorithm="agn", workers=2, window=2, batch_size=25, epochs=2,
             eval_every=0.25, seed=0)
FILES = {m.file for ms in METRICS.values() for m in ms} | {"staleness.png"}


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    code = tmp_path / "code"
    code.mkdir()
    (code / "plots_user_code.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(code))
    return "plots_user_code"


def written(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} & FILES


def drawn(out: Path, task: str) -> dict[str, list[tuple[str, list[float]]]]:
    """For each figure of the run in ``out``: every axis' y label and the values drawn."""
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    found = {}
    for name, fig in figures(events, task).items():
        axes = []
        for ax in fig.axes:
            values = [float(v) for line in ax.get_lines() for v in line.get_ydata()
                      if ax.get_legend() is None]  # the staleness' mean line aside
            values += [float(p.get_height()) for p in ax.patches]
            axes.append((ax.get_ylabel(), values))
        found[name] = axes
        plt.close(fig)
    return found


def test_a_classification_run_draws_accuracy_and_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    distgrad.train(model="examples.user_model:make_model",
                   dataset="examples.user_model:make_data", data_args={"n": 600}, lr=0.01,
                   out=out, **SMALL)
    assert written(out) == {"accuracy.png", "loss.png", "staleness.png"}
    assert task_of_run([], out) == "classification"
    figs = drawn(out, "classification")
    assert set(figs) == written(out)
    labels = [label for label, _ in figs["accuracy.png"]]
    assert "test accuracy" in labels or "test accuracy (zoomed)" in labels
    for name, axes in figs.items():
        assert all(values for _, values in axes), name  # every axis draws data
    accs = figs["accuracy.png"][0][1]
    assert all(0.0 <= a <= 1.0 for a in accs) and max(accs) > 0.9


def test_a_regression_run_draws_r2_and_its_mse_loss_but_no_accuracy(tmp_path: Path,
                                                                      user_module: str
                                                                      ) -> None:
    out = tmp_path / "run"
    res = distgrad.train(model=f"{user_module}:make_regressor",
                         dataset=f"{user_module}:make_regression", lr=0.1, out=out, **SMALL)
    assert res.summary["task"] == "regression"
    assert written(out) == {"r2.png", "loss.png", "staleness.png"}
    figs = drawn(out, task_of_run([], out))
    r2_labels = {label for label, _ in figs["r2.png"]}
    assert r2_labels & {"test R²", "test R² (zoomed)"}
    assert {label for label, _ in figs["loss.png"]} <= {"test loss (MSE)",
                                                       "test loss (MSE) (log scale)"}
    r2 = figs["r2.png"][0][1]
    assert r2 and r2[-1] > max(r2[0], 0.5) and all(math.isfinite(v) for v in r2)
    assert all(values for _, values in figs["loss.png"])


def test_a_run_without_test_data_writes_no_empty_curves(tmp_path: Path,
                                                        user_module: str) -> None:
    out = tmp_path / "run"
    res = distgrad.train(model=f"{user_module}:make_regressor",
                         dataset=f"{user_module}:make_regression", data_args={"test": False},
                         lr=0.03, out=out, **SMALL)
    assert "no test data" in res.summary["test_note"]
    assert written(out) == {"staleness.png"}  # no test curve to draw: no file at all
    figs = drawn(out, "regression")
    assert list(figs) == ["staleness.png"] and figs["staleness.png"][0][1]


def test_a_language_model_run_draws_perplexity(tmp_path: Path) -> None:
    out = tmp_path / "run"
    distgrad.train(engine="sim", workers=2, model="gpt",
                   model_args={"n_layer": 1, "n_embd": 32, "n_head": 2}, dataset="pystdlib",
                   data_args={"block": 32}, train_samples=256, batch_size=32, window=2,
                   algorithm="agn", lr=3e-3, threads=1, eval_every=0.5, out=out)
    assert written(out) == {"perplexity.png", "accuracy.png", "loss.png", "staleness.png"}
    figs = drawn(out, "language_model")
    ppl_labels = {label for label, _ in figs["perplexity.png"]}
    assert ppl_labels & {"test perplexity", "test perplexity (log scale)"}
    ppl = figs["perplexity.png"][0][1]
    assert len(ppl) >= 2 and ppl[-1] < ppl[0] <= 400  # from ~256 (uniform bytes) down
    assert {label for label, _ in figs["accuracy.png"]} & {"test token accuracy",
                                                          "test token accuracy (zoomed)"}


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    """Events of a run that evaluated nothing and committed nothing: no file."""
    events = [{"type": "eval", "t": 0.0, "version": 0, "samples": 0, "test_loss": None,
               "test_acc": None}]
    for task in METRICS:
        assert write_plots(events, tmp_path, task=task) == []
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        figures(events, "ranking")
