"""PNG figures of a run: accuracy and loss of the center (vs time and vs commits), staleness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _curve(events: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    pts = [(e[x], e[key]) for e in events if e["type"] == "eval" and e.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(events: list[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """Write accuracy.png, loss.png and staleness.png into ``out``; return their paths."""
    paths = []
    for key, label, name in (("test_acc", "test accuracy", "accuracy.png"),
                             ("test_loss", "test loss", "loss.png")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, x, xlabel in ((axes[0], "t", "time (s; virtual in sim)"),
                              (axes[1], "version", "center updates (commits)")):
            xs, ys = _curve(events, key, x)
            ax.plot(xs, ys, marker=".", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if key == "test_loss" and ys and min(ys) > 0:
                ax.set_yscale("log")
        fig.suptitle(f"{title}: center on the test set" if title else "center on the test set")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)

    stal = [e["staleness"] for e in events if e["type"] == "commit"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if stal:
        top = max(stal)
        ax.hist(stal, bins=range(0, top + 2), align="left", rwidth=0.9)
        mean = sum(stal) / len(stal)
        ax.axvline(mean, color="k", ls="--", lw=1, label=f"mean τ = {mean:.2f}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no asynchronous commits\n(synchronous: τ = 0)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("staleness τ (center updates between pull and commit)")
    ax.set_ylabel("commits")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "staleness.png", dpi=100)
    plt.close(fig)
    paths.append(out / "staleness.png")
    return paths
