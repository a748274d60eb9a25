"""Pure functions over event logs and trajectories used to check the thesis' claims.

Nothing here runs training; everything takes lists of events (as in ``events.jsonl``)
or arrays, so it can be tested on fixed inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from distgrad.metrics.efficiency import center_curve, notebook_curve, temporal_efficiency

Events = list[dict[str, Any]]

NOTEBOOK_STEPS = 10
"""Window of the notebook-style curve in mini-batch steps per worker.

The thesis notebook pooled mini-batch accuracies over 5-second windows (1 s stride).
Its cluster took ≈0.55 s per step (Table 3.2: AGN time / steps per worker), so 5 s
spanned ≈9–10 steps per worker. The simulator's virtual step takes ``step_time``
(0.05 s by default), so the equivalent window is 10 × step_time with a stride of a
fifth of it."""


def notebook_window(step_time: float) -> tuple[float, float]:
    """(window, stride) in virtual seconds equivalent to the thesis' (5 s, 1 s)."""
    window = NOTEBOOK_STEPS * step_time
    return window, window / 5


def batch_curve(events: Events, step_time: float) -> tuple[list[float], list[float]]:
    """The thesis' training-accuracy curve: windowed mean of pooled mini-batch accuracies."""
    window, stride = notebook_window(step_time)
    return notebook_curve(events, window=window, stride=stride)


def batch_loss_curve(events: Events, step_time: float) -> tuple[list[float], list[float]]:
    """As :func:`batch_curve`, for the mini-batch loss (non-finite losses are skipped)."""
    rewritten = [{"type": "batch", "t": e["t"], "acc": e["loss"]} for e in events
                 if e["type"] == "batch" and e.get("loss") is not None]
    window, stride = notebook_window(step_time)
    return notebook_curve(rewritten, window=window, stride=stride)


def center_loss_curve(events: Events) -> tuple[list[float], list[float]]:
    pts = [(e["t"], e["test_loss"]) for e in events
           if e["type"] == "eval" and e.get("test_loss") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def max_drop_after(xs: Sequence[float], ys: Sequence[float], threshold: float
                   ) -> tuple[float | None, float]:
    """Largest fall of ``ys`` below its running maximum after ``ys`` first reaches
    ``threshold``. Returns (time it first reached the threshold or None, drop); the drop
    is 0 when the threshold is never reached."""
    start = next((i for i, y in enumerate(ys) if y >= threshold), None)
    if start is None:
        return None, 0.0
    peak, drop = -math.inf, 0.0
    for y in ys[start:]:
        peak = max(peak, y)
        drop = max(drop, peak - y)
    return float(xs[start]), float(drop)


def max_rise_after_min(ys: Sequence[float]) -> float:
    """Largest rise of ``ys`` above its running minimum (loss spikes)."""
    low, rise = math.inf, 0.0
    for y in ys:
        low = min(low, y)
        rise = max(rise, y - low)
    return float(rise)


def first_time_at(xs: Sequence[float], ys: Sequence[float], level: float) -> float | None:
    """First x at which y ≥ level, or None."""
    return next((float(x) for x, y in zip(xs, ys, strict=True) if y >= level), None)


def te_pair(a: Events, b: Events, step_time: float) -> dict[str, float | None]:
    """E(a, b) on the center's test accuracy and on the notebook-style batch curve."""
    out: dict[str, float | None] = {"center": None, "notebook": None}
    ca, cb = center_curve(a), center_curve(b)
    if len(ca[0]) >= 2 and len(cb[0]) >= 2:
        out["center"] = temporal_efficiency(ca, cb)
    with contextlib.suppress(ValueError):
        out["notebook"] = temporal_efficiency(batch_curve(a, step_time), batch_curve(b, step_time))
    return out


# --------------------------------------------------------------------------- staleness


def staleness_stats(events: Events) -> dict[str, float]:
    """Mean, mode, median and 95th percentile of τ over the commits of a run."""
    tau = np.array([e["staleness"] for e in events if e["type"] == "commit"], dtype=int)
    if len(tau) == 0:
        raise ValueError("no commits in the event log")
    counts = np.bincount(tau)
    return {"mean": float(tau.mean()), "mode": int(counts.argmax()),
            "median": float(np.median(tau)), "p95": float(np.percentile(tau, 95)),
            "max": int(tau.max()), "commits": len(tau)}


def per_worker_series(events: Events, key: str) -> dict[int, list[float]]:
    """For each worker, ``key`` of its commits in commit order (e.g. "scale", "staleness")."""
    out: dict[int, list[float]] = {}
    for e in events:
        if e["type"] == "commit" and e.get(key) is not None:
            out.setdefault(int(e["worker"]), []).append(float(e[key]))
    return out


def early_late_mean(series: dict[int, list[float]], fraction: float = 0.1
                    ) -> tuple[float, float]:
    """Mean over workers of the mean of their first and last ``fraction`` of commits."""
    first, last = [], []
    for values in series.values():
        k = max(1, round(len(values) * fraction))
        first.append(float(np.mean(values[:k])))
        last.append(float(np.mean(values[-k:])))
    if not first:
        raise ValueError("no series")
    return float(np.mean(first)), float(np.mean(last))


# --------------------------------------------------------------------------- momentum


def _heavy_ball_sse(z: np.ndarray, mu: np.ndarray, ch: np.ndarray) -> np.ndarray:
    """Residual sum of squares of the best fit of ``z`` (one mode, length T) by a solution
    of y_{t+1} = (1 + μ − c·h) y_t − μ y_{t−1} with a free initial state, for every
    (μ, c·h) pair of the broadcast grids. Streams over t, so memory is O(grid)."""
    mu, ch = np.broadcast_arrays(np.asarray(mu, float), np.asarray(ch, float))
    a = 1.0 + mu - ch
    # two fundamental solutions: p starts (1, 0), q starts (0, 1)
    p0, p1 = np.ones(mu.shape), np.zeros(mu.shape)
    q0, q1 = np.zeros(mu.shape), np.ones(mu.shape)
    pp = p0 * p0 + p1 * p1
    qq = q0 * q0 + q1 * q1
    pq = p0 * q0 + p1 * q1
    pz = p0 * z[0] + p1 * z[1]
    qz = q0 * z[0] + q1 * z[1]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(2, len(z)):
            p0, p1 = p1, a * p1 - mu * p0
            q0, q1 = q1, a * q1 - mu * q0
            pp += p1 * p1
            qq += q1 * q1
            pq += p1 * q1
            pz += p1 * z[t]
            qz += q1 * z[t]
        det = pp * qq - pq * pq
        explained = (qq * pz * pz - 2 * pq * pz * qz + pp * qz * qz) / det
    sse = float(np.dot(z, z)) - explained
    return np.where(np.isfinite(sse), np.maximum(sse, 0.0), np.inf)


def fit_heavy_ball(traj: np.ndarray, curvatures: Sequence[float], lr: float
                   ) -> dict[str, float]:
    """Fit θ_{t+1} − θ_t = μ(θ_t − θ_{t−1}) − c·∇L(θ_t) to a trajectory on a quadratic.

    ``traj`` (T, d) holds the center after every update; column i is a mode of the
    quadratic 0.5·Σ h_i θ_i² with curvature ``curvatures[i]``. The fit is output-error:
    the model's trajectory against the data, each mode with a free initial state and
    scaled to unit RMS, so noise in the data does not bias μ as it would in a
    regression of each update on the previous one. Grid over μ ∈ [0, 0.999] and
    c ∈ lr·[1e-3, 3], refined twice. Returns μ, c, c/lr and R² over all modes.
    """
    traj = np.asarray(traj, dtype=float)
    curv = np.asarray(curvatures, dtype=float)
    if traj.ndim != 2 or traj.shape[1] != len(curv) or len(traj) < 4:
        raise ValueError(f"traj must have shape (T >= 4, {len(curv)}), got {traj.shape}")
    modes = []
    for k in range(traj.shape[1]):
        rms = float(np.sqrt(np.mean(traj[:, k] ** 2)))
        modes.append(traj[:, k] / rms if rms > 0 else traj[:, k])

    def sse(mu: np.ndarray, c: np.ndarray) -> np.ndarray:
        return sum(_heavy_ball_sse(z, mu, c * h) for z, h in zip(modes, curv, strict=True))

    mus = np.linspace(0.0, 0.999, 201)
    cs = lr * np.logspace(-3, math.log10(3.0), 121)
    best_mu, best_c = 0.0, lr
    for _ in range(3):
        mu, c = np.meshgrid(mus, cs, indexing="ij")
        grid = sse(mu, c)
        i, j = np.unravel_index(np.argmin(grid), grid.shape)
        best_mu, best_c = float(mus[i]), float(cs[j])
        dm = 2 * (mus[1] - mus[0])
        mus = np.clip(np.linspace(best_mu - dm, best_mu + dm, 41), 0.0, 0.9999)
        dl = 2 * (math.log(cs[1]) - math.log(cs[0]))
        cs = np.exp(np.linspace(math.log(best_c) - dl, math.log(best_c) + dl, 41))
    residual = float(sse(np.array(best_mu), np.array(best_c)))
    total = sum(float(np.sum((z - z.mean()) ** 2)) for z in modes)
    return {"mu": best_mu, "c": best_c, "c_over_lr": best_c / lr,
            "r2": 1.0 - residual / total if total > 0 else 1.0}
