"""PNG figures of a run: accuracy and loss of the center (vs time and vs commits), staleness.

Figures people read: the accuracy axis is zoomed on the range that matters (the later
part of the run, e.g. 0.96 → 0.98) with the full range in a panel below; the loss axis
is logarithmic where the loss spans a decade or more; staleness, an integer, has integer
ticks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

_TIME = ("t", "time (s; virtual in sim)")
_COMMITS = ("version", "center updates (commits)")


def _curve(events: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    pts = [(e[x], e[key]) for e in events if e["type"] == "eval" and e.get(key) is not None]
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


def _accuracy_figure(events: list[dict[str, Any]], path: Path, title: str) -> None:
    series = [_curve(events, "test_acc", x) for x, _ in (_TIME, _COMMITS)]
    zoom = zoom_range(series[0][1])
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
            if zoom is not None and row == 0:
                ax.set_ylim(*zoom)
                ax.set_ylabel("test accuracy (zoomed)")
            else:
                ax.set_ylabel("test accuracy" if rows == 1 else "full range")
    fig.suptitle(f"{title}: center on the test set" if title else "center on the test set")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_figure(events: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (x, xlabel) in zip(axes, (_TIME, _COMMITS), strict=True):
        xs, ys = _curve(events, "test_loss", x)
        ax.plot(xs, ys, marker=".", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if spans_decades(ys):
            ax.set_yscale("log")
            ax.set_ylabel("test loss (log scale)")
        else:
            ax.set_ylabel("test loss")
    fig.suptitle(f"{title}: center on the test set" if title else "center on the test set")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _staleness_figure(events: list[dict[str, Any]], path: Path, title: str) -> None:
    stal = [e["staleness"] for e in events if e["type"] == "commit"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if stal:
        top = max(stal)
        ax.hist(stal, bins=range(0, top + 2), align="left", rwidth=0.9)
        mean = sum(stal) / len(stal)
        ax.axvline(mean, color="k", ls="--", lw=1, label=f"mean τ = {mean:.2f}")
        ax.legend()
        ax.set_xlim(-0.6, top + 0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no asynchronous commits\n(synchronous: τ = 0)", ha="center",
                va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness τ (center updates between pull and commit)")
    ax.set_ylabel("commits")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(events: list[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """Write accuracy.png, loss.png and staleness.png into ``out``; return their paths."""
    paths = [out / "accuracy.png", out / "loss.png", out / "staleness.png"]
    _accuracy_figure(events, paths[0], title)
    _loss_figure(events, paths[1], title)
    _staleness_figure(events, paths[2], title)
    return paths
