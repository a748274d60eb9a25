"""PNG figures of a run: the task's metrics of the center (vs time and vs commits), staleness.

Which figures a run gets follows its task (``config.json``'s ``task``, see
:mod:`distgrad.data.tasks`), from the metrics its ``eval`` events carry:

* classification — ``accuracy.png`` (test accuracy), ``loss.png``;
* regression — ``r2.png`` (test R²), ``loss.png`` (the test MSE where that is the loss);
* language model — ``perplexity.png``, ``accuracy.png`` (token accuracy), ``loss.png``
  (cross-entropy per token);

and every task ``staleness.png`` (the staleness of each commit). A figure with nothing
to draw is not written (a run without test data has no test curves; a run without a
commit no staleness histogram), so a file that exists always shows data.

Figures people read: an accuracy-like axis (accuracy, R²) is zoomed on the range that
matters (the later part of the run, e.g. 0.96 → 0.98) with the full range in a panel
below; a loss or perplexity axis is logarithmic where it spans a decade or more;
staleness, an integer, has integer ticks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_TIME = ("t", "time (s; virtual in sim)")
_COMMITS = ("version", "center updates (commits)")
_TASKS = ("classification", "regression", "language_model")


@dataclass(frozen=True)
class Metric:
    """One curve figure: the ``eval`` event key it draws, its axis label and file name;
    ``zoom`` (an accuracy-like metric: a zoomed panel) or else a log axis where the
    values span a decade."""

    key: str
    label: str
    file: str
    zoom: bool = False


#: the curve figures of each task (see the module docstring), in the order written
METRICS: dict[str, tuple[Metric, ...]] = {
    "classification": (Metric("test_acc", "test accuracy", "accuracy.png", zoom=True),
                       Metric("test_loss", "test loss", "loss.png")),
    "regression": (Metric("test_r2", "test R²", "r2.png", zoom=True),
                   Metric("test_loss", "test loss", "loss.png")),
    "language_model": (Metric("test_perplexity", "test perplexity", "perplexity.png"),
                       Metric("test_acc", "test token accuracy", "accuracy.png", zoom=True),
                       Metric("test_loss", "test loss (cross-entropy per token)",
                              "loss.png")),
}
STALENESS = "staleness.png"


def curve(events: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the ``eval`` events that carry a finite ``key``."""
    pts = [(e[x], e[key]) for e in events if e["type"] == "eval"
           and isinstance(e.get(key), int | float) and math.isfinite(e[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def zoom_range(ys: list[float]) -> tuple[float, float] | None:
    """The y-range that shows what matters of an accuracy curve: from the lowest value of
    its last two thirds to its highest, padded; None where the full range shows it as well
    (the zoomed range would be more than half of it)."""
    if len(ys) < 3:
        return None
    tail = ys[len(ys) // 3:]
    lo, hi = min(tail), max(ys)
    full = max(ys) - min(ys)
    if full <= 0 or (hi - lo) > 0.5 * full:
        return None
    pad = max(0.1 * (hi - lo), 0.002)
    return lo - pad, min(hi + pad, 1.0 + pad)


def spans_decades(ys: list[float]) -> bool:
    """Positive values whose largest is at least 10 times the smallest: a log axis."""
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) >= 10


def task_of_run(events: list[dict[str, Any]], out: Path | None = None) -> str:
    """The run's task: ``out/config.json``'s ``task`` where recorded, else what its
    evaluations measured (perplexity: a language model; R² or MSE: a regression)."""
    if out is not None:
        try:
            task = json.loads((Path(out) / "config.json").read_text()).get("task")
        except (OSError, ValueError):
            task = None
        if task in _TASKS:
            return str(task)
    keys = {k for e in events if e["type"] == "eval" for k, v in e.items() if v is not None}
    if "test_perplexity" in keys:
        return "language_model"
    if keys & {"test_r2", "test_mse"}:
        return "regression"
    return "classification"


def _loss_label(events: list[dict[str, Any]], metric: Metric) -> str:
    """A regression's loss axis says MSE where the loss is the MSE (every point equal)."""
    pairs = [(e["test_loss"], e.get("test_mse")) for e in events
             if e["type"] == "eval" and e.get("test_loss") is not None]
    if pairs and all(m is not None and math.isclose(loss, m, rel_tol=1e-5, abs_tol=1e-9)
                     for loss, m in pairs):
        return "test loss (MSE)"
    return metric.label


def metric_figure(events: list[dict[str, Any]], metric: Metric, title: str = ""
                  ) -> Figure | None:
    """The figure of ``metric`` (vs time and vs commits), or None without a point."""
    series = [curve(events, metric.key, x) for x, _ in (_TIME, _COMMITS)]
    if not series[0][1]:
        return None
    label = _loss_label(events, metric) if metric.key == "test_loss" else metric.label
    zoom = zoom_range(series[0][1]) if metric.zoom else None
    rows = 2 if zoom is not None else 1
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.8 if rows == 1 else 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] if rows == 2 else [1]})
    for col, ((xs, ys), (_, xlabel)) in enumerate(zip(series, (_TIME, _COMMITS), strict=True)):
        for row in range(rows):
            ax = axes[row][col]
            ax.plot(xs, ys, marker=".", lw=1)
            ax.grid(alpha=0.3)
            if row == rows - 1:
                ax.set_xlabel(xlabel)
            if zoom is not None:
                if row == 0:
                    ax.set_ylim(*zoom)
                ax.set_ylabel(f"{label} (zoomed)" if row == 0 else "full range")
            elif not metric.zoom and spans_decades(ys):
                ax.set_yscale("log")
                ax.set_ylabel(f"{label} (log scale)")
            else:
                ax.set_ylabel(label)
    fig.suptitle(f"{title}: center on the test set" if title else "center on the test set")
    fig.tight_layout()
    return fig


def staleness_figure(events: list[dict[str, Any]], title: str = "") -> Figure | None:
    """The histogram of the commits' staleness, or None without a commit."""
    stal = [e["staleness"] for e in events if e["type"] == "commit"]
    if not stal:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    top = max(stal)
    ax.hist(stal, bins=range(0, top + 2), align="left", rwidth=0.9)
    mean = sum(stal) / len(stal)
    ax.axvline(mean, color="k", ls="--", lw=1, label=f"mean τ = {mean:.2f}")
    ax.legend()
    ax.set_xlim(-0.6, top + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness τ (center updates between pull and commit)")
    ax.set_ylabel("commits")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def figures(events: list[dict[str, Any]], task: str, title: str = "") -> dict[str, Figure]:
    """The run's figures by file name: the curves of ``task``'s metrics and the staleness
    histogram, each only where it has data (close them with ``plt.close``)."""
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(METRICS)}")
    made: dict[str, Figure | None] = {m.file: metric_figure(events, m, title)
                                      for m in METRICS[task]}
    made[STALENESS] = staleness_figure(events, title)
    return {name: fig for name, fig in made.items() if fig is not None}


def write_plots(events: list[dict[str, Any]], out: Path, title: str = "",
                task: str | None = None) -> list[Path]:
    """Write the run's figures into ``out`` (see the module docstring; ``task`` defaults
    to :func:`task_of_run`); return the paths written."""
    made = figures(events, task or task_of_run(events, out), title)
    paths = []
    try:
        for name, fig in made.items():
            fig.savefig(out / name, dpi=100)
            paths.append(out / name)
    finally:
        for fig in made.values():
            plt.close(fig)
    return paths
