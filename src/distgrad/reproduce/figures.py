"""Figure helpers for the reports: small PNGs (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from distgrad.metrics.efficiency import center_curve
from distgrad.reproduce.analysis import (
    batch_curve,
    batch_loss_curve,
    center_loss_curve,
    per_worker_series,
)
from distgrad.reproduce.spec import Results

DPI = 72


def save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def accuracy_curves(labels: Sequence[str] | None = None, *, title: str = ""
                    ) -> Callable[[Results, Path], None]:
    """Two panels against virtual time: the center's test accuracy (honest) and the thesis'
    windowed mini-batch accuracy of the workers."""

    def draw(results: Results, path: Path) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for label in labels or list(results.runs):
            run = results[label]
            xs, ys = center_curve(run.events)
            axes[0].plot(xs, ys, marker=".", ms=3, lw=1, label=label)
            try:
                bx, by = batch_curve(run.events, run.step_time)
                axes[1].plot(bx, by, lw=0.8, label=label)
            except ValueError:
                pass
        axes[0].set_title("center, 10k test images")
        axes[1].set_title("workers' mini-batches (thesis' training accuracy)")
        for ax in axes:
            ax.set_xlabel("virtual time (s)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy")
        axes[0].set_ylim(0, 1.0)
        axes[1].legend(fontsize=7, loc="lower right")
        if title:
            fig.suptitle(title, fontsize=10)
        save(fig, path)

    return draw


def loss_curves(labels: Sequence[str], *, title: str = "") -> Callable[[Results, Path], None]:
    """The workers' windowed mini-batch loss and the center's test loss against time."""

    def draw(results: Results, path: Path) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for label in labels:
            run = results[label]
            try:
                bx, by = batch_loss_curve(run.events, run.step_time)
                axes[0].plot(bx, by, lw=0.8, label=label)
            except ValueError:
                pass
            xs, ys = center_loss_curve(run.events)
            axes[1].plot(xs, ys, marker=".", ms=3, lw=1, label=label)
        axes[0].set_title("workers' mini-batch loss (windowed)")
        axes[1].set_title("center, test loss")
        for ax in axes:
            ax.set_xlabel("virtual time (s)")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
        save(fig, path)

    return draw


def staleness_histograms(labels: Sequence[str], workers: Sequence[int]
                         ) -> Callable[[Results, Path], None]:
    def draw(results: Results, path: Path) -> None:
        fig, axes = plt.subplots(1, len(labels), figsize=(3.0 * len(labels), 2.8))
        axes = np.atleast_1d(axes)
        for ax, label, n in zip(axes, labels, workers, strict=True):
            tau = [e["staleness"] for e in results[label].events if e["type"] == "commit"]
            ax.hist(tau, bins=range(0, max(tau) + 2), align="left", color="C0")
            ax.axvline(n - 1, color="k", ls="--", lw=1, label="n − 1")
            ax.axvline(float(np.mean(tau)), color="C3", lw=1, label="mean")
            ax.set_title(f"n = {n}", fontsize=9)
            ax.set_xlabel("staleness τ")
        axes[0].set_ylabel("commits")
        axes[0].legend(fontsize=7)
        save(fig, path)

    return draw


def per_worker(labels: Sequence[str], key: str, ylabel: str, *, title: str = ""
               ) -> Callable[[Results, Path], None]:
    """``key`` of every commit against the worker's commit index, one thin line per worker,
    the mean over workers in bold; one panel per run."""

    def draw(results: Results, path: Path) -> None:
        fig, axes = plt.subplots(1, len(labels), figsize=(3.4 * len(labels), 3.0), sharey=True)
        axes = np.atleast_1d(axes)
        for ax, label in zip(axes, labels, strict=True):
            series = per_worker_series(results[label].events, key)
            length = max((len(v) for v in series.values()), default=0)
            for values in series.values():
                ax.plot(range(len(values)), values, lw=0.5, alpha=0.4)
            if length:
                mean = [np.mean([v[i] for v in series.values() if len(v) > i])
                        for i in range(length)]
                ax.plot(range(length), mean, color="k", lw=1.5, label="mean over workers")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("commit index of the worker")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[0].legend(fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
        save(fig, path)

    return draw
