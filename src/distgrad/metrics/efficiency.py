"""Temporal efficiency E(a, b) (Hermans 2017 §3.6) and the curves it is computed on.

    E(a, b) = ∫_0^M f_a(t) dt / ∫_0^M f_b(t) dt,   M = min(end of a, end of b)

f is an accuracy-versus-time curve, linearly interpolated between its points
(and linearly extrapolated beyond the first or last segment, as the thesis
notebook's ``InterpolatedUnivariateSpline(k=1)`` does). E > 1 means a is better.

Two ways to get f from a run:

* :func:`center_curve` — the event-based curve: the center's test accuracy at
  every evaluation (the honest metric);
* :func:`notebook_curve` — the thesis notebook's: pool every worker's mini-batch
  accuracy records; for each integer second i, the mean over records with
  i ≤ t < i + window (5 s, stride 1 s); empty windows are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _interp(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """Piecewise-linear value at ``at`` with linear extrapolation beyond the ends."""
    if len(x) == 1:
        return float(y[0])
    if at <= x[0]:
        i = 0
    elif at >= x[-1]:
        i = len(x) - 2
    else:
        i = int(np.searchsorted(x, at, side="right")) - 1
    x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
    return float(y0 + (y1 - y0) * (at - x0) / (x1 - x0)) if x1 != x0 else float(y1)


def area(x: Sequence[float], y: Sequence[float], upto: float) -> float:
    """∫_0^upto of the piecewise-linear (extrapolated) curve through (x, y)."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if len(xs) == 0:
        raise ValueError("empty curve")
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    inner = xs[(xs > 0) & (xs < upto)]
    knots = np.concatenate([[0.0], inner, [upto]])
    vals = np.array([_interp(xs, ys, k) for k in knots])
    return float(np.sum((vals[1:] + vals[:-1]) * np.diff(knots) / 2))


def temporal_efficiency(a: tuple[Sequence[float], Sequence[float]],
                        b: tuple[Sequence[float], Sequence[float]]) -> float:
    """E(a, b) for two (times, accuracies) curves."""
    m = min(max(a[0]), max(b[0]))
    if m <= 0:
        raise ValueError("a curve must extend beyond t = 0")
    den = area(*b, upto=m)
    return area(*a, upto=m) / den if den != 0 else math.inf


def center_curve(events: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(t, test accuracy) of the center at each evaluation."""
    pts = [(e["t"], e["test_acc"]) for e in events
           if e["type"] == "eval" and e.get("test_acc") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def notebook_curve(events: list[dict[str, Any]], window: float = 5.0, stride: float = 1.0
                   ) -> tuple[list[float], list[float]]:
    """The notebook's sliding-window mean of pooled mini-batch accuracies."""
    rec = [(e["t"], e["acc"]) for e in events if e["type"] == "batch"]
    if not rec:
        raise ValueError("no batch events: the run was recorded without --record-batches")
    t = np.array([r[0] for r in rec])
    acc = np.array([r[1] for r in rec])
    t = t - t.min()
    order = np.argsort(t, kind="stable")
    t, acc = t[order], acc[order]
    if t.max() < stride:
        raise ValueError(f"the run lasts {t.max():.3g} s, less than one {stride:g} s stride")
    xs, ys = [], []
    for i in np.arange(0.0, math.floor(t.max() / stride) * stride + stride / 2, stride):
        lo, hi = np.searchsorted(t, i, "left"), np.searchsorted(t, i + window, "left")
        if hi > lo:
            xs.append(float(i))
            ys.append(float(acc[lo:hi].mean()))
    return xs, ys
