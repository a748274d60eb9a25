"""Implicit momentum of asynchronous DOWNPOUR (Mitliagkas et al. 2016; thesis §3.2).

Claim: with n asynchronous workers, E[θ̃_{t+1} − θ̃_t] = (1 − 1/n)·E[θ̃_t − θ̃_{t−1}] −
(η/n)·∇L(θ̃_t), i.e. heavy-ball momentum μ = 1 − 1/n with step η/n, when staleness is
geometric with mean n − 1 (the queueing model of the paper).

Measurement: DOWNPOUR with λ = 1 and plain SGD on the quadratic 0.5·Σ h_i θ_i² with
curvatures h = (0.5, 1, 2) and exact gradients, in the simulator. Every run starts at
θ = (1, 1, 1); the center is recorded after every commit. On a quadratic the gradient is
linear, so the expectation over the random commit order of the center's trajectory obeys
the formula exactly if the staleness is geometric and independent of the past. We average
the trajectory over R seeds (different commit orders), drop the first 2n commits (all
workers start from the same pull), and fit the heavy-ball model to it (output error, see
:func:`distgrad.reproduce.analysis.fit_heavy_ball`). η = 0.25/n, so that the delay matters
(η·h·n = 0.125–0.5) and the momentum can be told apart from a smaller step; each run makes
60·n commits.

Two timing models: ``exponential`` step times make each commit's staleness geometric with
mean n − 1 (memoryless service, the paper's model); the simulator's default ``lognormal``
(σ = 0.25) makes staleness nearly constant at n − 1, a delay rather than a momentum.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distgrad.engines.timing import Timing
from distgrad.job import Job
from distgrad.reproduce.analysis import fit_heavy_ball
from distgrad.reproduce.figures import plt, save
from distgrad.reproduce.spec import (
    Claim,
    Experiment,
    Figure,
    Results,
    Table,
    Verdict,
    cached_results,
)
from distgrad.reproduce.toy import Vector, simulate

CURVATURES = (0.5, 1.0, 2.0)
KAPPA = 0.25  # η = KAPPA / n
COMMITS_PER_WORKER = 60
TIMINGS = ("exponential", "lognormal")
SCALE_KNOBS: dict[str, dict[str, Any]] = {
    "full": {"workers": tuple(range(1, 41)), "seeds": 48},
    "quick": {"workers": (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40), "seeds": 24},
    "tiny": {"workers": (1, 2, 4), "seeds": 3},
}
TOLERANCE = 0.25
"""The fitted 1/(1 − μ) ("effective n") must be within 25 % of n."""


class _CurvedQuadratic:
    """0.5·Σ h_i (θ_i − y_i)², batch mean."""

    def __init__(self, curvatures: tuple[float, ...]) -> None:
        self.h = torch.tensor(curvatures)

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out - target) ** 2 * self.h).sum(dim=-1).mean()


def mean_trajectory(n: int, timing: str, seeds: int) -> tuple[np.ndarray, float]:
    """Center after every commit, averaged over ``seeds`` runs; and the mean staleness."""
    d = len(CURVATURES)
    steps = COMMITS_PER_WORKER * n
    loss = _CurvedQuadratic(CURVATURES)
    trajs, stale = [], []
    for seed in range(seeds):
        job = Job(engine="sim", algorithm="downpour", workers=n, window=1, lr=KAPPA / n,
                  inner_optimizer="sgd", batch_size=1, epochs=1, seed=seed,
                  sharding="contiguous", timing=Timing(model=timing),  # type: ignore[arg-type]
                  track_distance=False, record_batches=False)
        sim = simulate(job, Vector((1.0,) * d), loss, torch.zeros(steps, 1),
                       torch.zeros(steps, d))
        trajs.append(sim.centers.double().numpy())
        stale += [e["staleness"] for e in sim.events if e["type"] == "commit"]
    length = min(len(t) for t in trajs)
    return np.mean([t[:length] for t in trajs], axis=0), float(np.mean(stale))


def execute(exp: Experiment, scale: str, out: Path, seed: int) -> Results:
    knobs = {**SCALE_KNOBS[scale], "curvatures": CURVATURES, "kappa": KAPPA,
             "commits_per_worker": COMMITS_PER_WORKER}

    def compute() -> dict[str, Any]:
        fits: dict[str, list[dict[str, float]]] = {}
        for timing in TIMINGS:
            rows = []
            for n in knobs["workers"]:
                traj, tau = mean_trajectory(n, timing, knobs["seeds"])
                lr = KAPPA / n
                fit = fit_heavy_ball(traj[2 * n:], CURVATURES, lr)
                rows.append({"n": n, "mu": fit["mu"], "c_n_over_lr": fit["c_over_lr"] * n,
                             "r2": fit["r2"], "staleness_mean": tau})
            fits[timing] = rows
        return {"fits": fits}

    return cached_results(exp, scale, out, knobs, compute, indent=1)


def effective_n(mu: float) -> float:
    return 1.0 / (1.0 - mu) if mu < 1 else float("inf")


def _check(timing: str) -> Callable[[Results], Verdict]:
    def check(r: Results) -> Verdict:
        rows = [row for row in r.data["fits"][timing] if row["n"] >= 2]
        errs = [abs(effective_n(row["mu"]) - row["n"]) / row["n"] for row in rows]
        show = [row for row in rows if row["n"] in (2, 5, 10, 20, 30, 40)] or rows
        ours = ", ".join(f"n={row['n']}: μ {row['mu']:.3f} (1−1/n {1 - 1 / row['n']:.3f})"
                         for row in show)
        ours += f"; median |n_eff − n|/n {100 * float(np.median(errs)):.0f} %"
        return Verdict(ours, bool(errs) and max(errs) <= TOLERANCE,
                       f"n_eff = 1/(1 − μ) within {100 * TOLERANCE:.0f} % of n for every n ≥ 2")

    return check


def _check_step(r: Results) -> Verdict:
    rows = [row for row in r.data["fits"]["exponential"] if row["n"] >= 2]
    vals = [row["c_n_over_lr"] for row in rows]
    return Verdict(f"c·n/η from {min(vals):.2f} to {max(vals):.2f}",
                   bool(vals) and all(abs(v - 1) <= TOLERANCE for v in vals),
                   f"within {100 * TOLERANCE:.0f} % of 1")


def _table(r: Results) -> str:
    head = ["| n | 1 − 1/n | " + " | ".join(f"μ ({t}) | c·n/η ({t}) | R² ({t}) | mean τ ({t})"
                                            for t in TIMINGS) + " |",
            "|---|---|" + "---|" * (4 * len(TIMINGS))]
    by = {t: {row["n"]: row for row in r.data["fits"][t]} for t in TIMINGS}
    for n in sorted(by[TIMINGS[0]]):
        cells = []
        for t in TIMINGS:
            row = by[t][n]
            cells.append(f"{row['mu']:.3f} | {row['c_n_over_lr']:.2f} | {row['r2']:.4f} | "
                         f"{row['staleness_mean']:.1f}")
        rows_n = f"| {n} | {1 - 1 / n:.3f} | " + " | ".join(cells) + " |"
        head.append(rows_n)
    return "\n".join(head)


def _figure(r: Results, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ns = np.arange(1, max(row["n"] for row in r.data["fits"][TIMINGS[0]]) + 1)
    for t in TIMINGS:
        rows = r.data["fits"][t]
        axes[0].plot([row["n"] for row in rows], [row["mu"] for row in rows], "o-", ms=3,
                     label=f"fitted μ, {t} step times")
        axes[1].plot([row["n"] for row in rows], [row["c_n_over_lr"] for row in rows], "o-",
                     ms=3, label=t)
    axes[0].plot(ns, 1 - 1 / ns, "k--", lw=1.2, label="1 − 1/n", zorder=5)
    axes[1].axhline(1, color="k", ls="--", lw=1.2, label="η/n", zorder=5)
    axes[0].set_ylabel("momentum μ")
    axes[1].set_ylabel("fitted step c, in units of η/n")
    for ax in axes:
        ax.set_xlabel("workers n")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)


def describe(scale: str) -> str:
    k = SCALE_KNOBS[scale]
    ns = k["workers"]
    shown = (f"{ns[0]}..{ns[-1]}" if list(ns) == list(range(ns[0], ns[-1] + 1))
             else ", ".join(map(str, ns)))
    return (f"n ∈ {{{shown}}}, {k['seeds']} seeds per n, η = {KAPPA:g}/n, "
            f"{COMMITS_PER_WORKER}·n commits per run, curvatures {CURVATURES}")


MOMENTUM = Experiment(
    name="implicit-momentum",
    shows="asynchronous DOWNPOUR behaves like heavy-ball momentum μ = 1 − 1/n "
          "(when staleness is geometric)",
    thesis="§3.2 (Mitliagkas et al. 2016, \"Asynchrony begets momentum\")",
    execute=execute,
    describe=describe,
    claims=(
        Claim(id="M1", text="Fitted implicit momentum ≈ 1 − 1/n, geometric staleness "
              "(exponential step times)", thesis="μ = 1 − 1/n (n=10: 0.90, 20: 0.95, "
              "30: 0.967, 40: 0.975)", check=_check("exponential")),
        Claim(id="M2", text="Fitted implicit momentum ≈ 1 − 1/n, the simulator's default "
              "near-constant staleness (lognormal, σ = 0.25)", thesis="μ = 1 − 1/n (the "
              "thesis assumes the formula holds for homogeneous workers)",
              check=_check("lognormal")),
        Claim(id="M3", text="Fitted step ≈ η/n (geometric staleness)", thesis="η/n",
              check=_check_step),
    ),
    tables=(Table(title="Heavy-ball fit per n", render=_table),),
    figures=(Figure(file="momentum.png", caption="Implicit momentum and step fitted to the "
                    "mean center trajectory", draw=_figure),),
    notes=tuple(p.strip().replace("\n", " ") for p in (__doc__ or "").split("\n\n")[1:]),
)
