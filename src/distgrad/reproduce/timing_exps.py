"""Experiments about time: the commit order (lockstep vs random) and the thesis' wall-time
claims under a cost model measured on this machine.

``timing-order``: AGN, n = 20, λ = 15, served in lockstep round-robin (every step takes
exactly ``step_time``, every commit exactly n − 1 stale) against the default random order
(lognormal step times with random start offsets), compared by the mean of the center's
test accuracy over the last quarter of training. The README's early probe (93.6 % against
98.45 % at 40 epochs, single final evaluations, its script not kept) was this comparison
at ``full``.

``wall-time``: the simulator's virtual clock counts compute only, so the thesis' wall-time
claims (E4-time: AEASGD < AGN < DynSGD; claim 6: AGN's time falls ∝ 1/n) are equal by
construction there. Here the runs carry the costs of :data:`PROFILE` — the server's apply +
pull per algorithm and the local engine's commit transfer, measured with ``distgrad
reproduce --measure-costs`` for the thesis MLP — as ``server_time`` (commits queue at a
one-lock server) and ``commit_time``. A run's virtual time depends only on its schedule
(steps, commits, step-time draws, costs), never on the values it trains, so these runs use
a 784-64-10 MLP with the thesis MLP's costs: the times are the thesis MLP's, the
accuracies are not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distgrad.engines.timing import Timing, profile_costs, read_cost_profile
from distgrad.reproduce.report import pct
from distgrad.reproduce.spec import (
    Claim,
    Experiment,
    Figure,
    Results,
    RunSpec,
    Setup,
    Table,
    Verdict,
)

R = RunSpec

# --------------------------------------------------------------------------- timing order


def _late_accuracy(run: Any) -> tuple[float, float]:
    """Mean and standard deviation of the center's test accuracy over the evaluations in
    the last quarter of training: one final evaluation swings by about a point from one
    evaluation to the next late in an AGN run (n = 20), more than the effect under test."""
    from distgrad.metrics.efficiency import center_curve

    _, ys = center_curve(run.events)
    late = np.asarray(ys[-max(2, len(ys) // 4):], dtype=float)
    return float(late.mean()), float(late.std(ddof=1))


def _order_claim(r: Results) -> Verdict:
    lock, rand = r["lockstep"], r["random"]
    (a, sa), (b, sb) = _late_accuracy(lock), _late_accuracy(rand)
    return Verdict(f"last quarter of training: lockstep {pct(a)} ± {100 * sa:.2f}, random "
                   f"order {pct(b)} ± {100 * sb:.2f} (center test accuracy, mean ± sd of its "
                   f"evaluations; final {pct(lock.summary['test_accuracy'])} vs "
                   f"{pct(rand.summary['test_accuracy'])}; mean τ "
                   f"{lock.summary['staleness_mean']:.1f} vs "
                   f"{rand.summary['staleness_mean']:.1f})",
                   a < b - 0.01,
                   "lockstep's mean over the last quarter of training is > 1 point below the "
                   "random order's")


def _accuracy_figure() -> Any:
    from distgrad.reproduce.figures import accuracy_curves

    return accuracy_curves(["lockstep", "random"], title="AGN, n = 20, λ = 15")


TIMING_ORDER = Experiment(
    name="timing-order",
    shows="whether the commit order changes results: AGN (n=20, λ=15) in lockstep vs a "
          "random order",
    thesis="not in the thesis: the simulator's timing model (README, \"The simulator and its "
           "timing models\")",
    setups={"full": Setup(epochs=40), "quick": Setup(epochs=5)},
    runs={scale: (R(label="lockstep", algorithm="agn", workers=20, window=15,
                    timing=Timing(model="constant")),
                  R(label="random", algorithm="agn", workers=20, window=15))
          for scale in ("quick", "full")},
    claims=(Claim(id="T1", text="AGN, n=20, λ=15: workers served in lockstep round-robin end "
                  "below the same run in a random commit order",
                  thesis="(simulator property; an earlier probe: 93.6 % vs 98.45 % at 40 "
                         "epochs)", check=_order_claim),),
    figures=(Figure(file="accuracy.png", caption="AGN, n = 20, λ = 15: lockstep against a "
                    "random commit order",
                    draw=lambda r, p: _accuracy_figure()(r, p)),),
    notes=("`constant` timing: every step takes exactly `step_time` and every worker starts "
           "at t = 0, so the workers commit in a fixed round-robin order and every commit is "
           "exactly n − 1 stale; the default `lognormal` timing (σ = 0.25, random start "
           "offsets) gives a random order with the same mean staleness.",),
)

# --------------------------------------------------------------------------- wall time

PROFILES = {"": Path(__file__).with_name("cost_profile.json"),
            "-dk": Path(__file__).with_name("cost_profile_distkeras.json")}
"""The cost profiles the wall-time runs use, by label suffix: this machine's ``local``
engine (shared memory) and dist-keras' transport modelled from measured parts (pickled
weights over TCP, a GIL-serialized server). ``distgrad reproduce --measure-costs FILE
[--cost-engine distkeras]`` writes them; they are committed with the code so that a rerun
uses the same costs."""

PROFILE_PATH = PROFILES[""]

THESIS_MLP_PARAMETERS = 4_798_010
_E4_RUNS = (("agn-l15", "agn", 15), ("aeasgd-l30", "aeasgd", 30), ("dynsgd-l10", "dynsgd", 10))
_SPEEDUP_N = (10, 20, 30, 40)
_SPEEDUP_L = (20, 40)


def _profile(suffix: str) -> dict[str, Any] | None:
    path = PROFILES[suffix]
    return read_cost_profile(path) if path.exists() else None


def _timing(algorithm: str, suffix: str) -> Timing:
    """The default timing with the profile's costs for ``algorithm`` on the thesis MLP."""
    profile = _profile(suffix)
    if profile is None:
        return Timing()
    server, commit = profile_costs(profile, algorithm, THESIS_MLP_PARAMETERS,
                                   Timing().step_time)
    return Timing(server_time=round(server, 7), commit_time=round(commit, 7))


def _wall_runs() -> tuple[RunSpec, ...]:
    runs = []
    for sfx in PROFILES:
        runs += [R(label=label + sfx, algorithm=alg, workers=20, window=lam,
                   timing=_timing(alg, sfx)) for label, alg, lam in _E4_RUNS]
        runs += [R(label=f"agn-n{n}-l{lam}{sfx}", algorithm="agn", workers=n, window=lam,
                   timing=_timing("agn", sfx)) for lam in _SPEEDUP_L for n in _SPEEDUP_N]
    return tuple(runs)


def _t(r: Results, label: str) -> float:
    return float(r[label].summary["virtual_seconds"])


def _thesis_t(label: str) -> float:
    from distgrad.reproduce import thesis_data as T

    return float(T.E4[label][0])


def _no_profile(suffix: str) -> Verdict:
    return Verdict("no cost profile", None, f"{PROFILES[suffix].name} is missing: run "
                   "`distgrad reproduce --measure-costs` first")


def _e4_time(suffix: str) -> Callable[[Results], Verdict]:
    def check(r: Results) -> Verdict:
        if _profile(suffix) is None:
            return _no_profile(suffix)
        t = {label: _t(r, label + suffix) for label, _, _ in _E4_RUNS}
        ours = " ≤ ".join(f"{lab} {t[lab]:,.3f} s" for lab in sorted(t, key=t.__getitem__))
        a, g, d = t["aeasgd-l30"], t["agn-l15"], t["dynsgd-l10"]
        ta, tg, td = (_thesis_t(lab) for lab in ("aeasgd-l30", "agn-l15", "dynsgd-l10"))
        return Verdict(f"virtual time: {ours}; AGN/AEASGD = {g / a:.4f}, DynSGD/AGN = "
                       f"{d / g:.4f} (thesis: {tg / ta:.2f}, {td / tg:.2f})",
                       g > 1.01 * a and d > 1.01 * g, "each step of the order by more than 1 %")

    return check


def _speedup(suffix: str) -> Callable[[Results], Verdict]:
    def check(r: Results) -> Verdict:
        if _profile(suffix) is None:
            return _no_profile(suffix)
        parts, holds = [], True
        for lam in _SPEEDUP_L:
            t = {n: _t(r, f"agn-n{n}-l{lam}{suffix}") for n in _SPEEDUP_N}
            s30, s40 = t[10] / t[30], t[10] / t[40]
            parts.append(f"λ={lam}: t(10)/t(30) = {s30:.2f}, t(10)/t(40) = {s40:.2f}")
            holds = holds and s30 >= 0.75 * 3
        return Verdict("; ".join(parts) + " (1/n: 3.00, 4.00)", holds,
                       "t(10)/t(30) ≥ 0.75 × 3 at every λ")

    return check


def _wall_table(r: Results) -> str:
    from distgrad.reproduce import thesis_data as T

    rows = [*(_describe_costs(sfx) + "." for sfx in PROFILES), "",
            "| run | costs | n | λ | commits | server s/commit | commit s | virtual t | "
            "thesis t |", "|---|---|---|---|---|---|---|---|---|"]
    thesis = {label: T.E4[label][0] for label, _, _ in _E4_RUNS}
    for label, run in r.runs.items():
        s, tm = run.summary, run.spec.timing
        base = label.removesuffix("-dk")
        th = thesis.get(base)
        if th is None and base.startswith("agn-n"):
            cell = T.TABLE_3_2.get((run.spec.workers, run.spec.window))
            th = None if cell is None else cell["agn"]["time"]
        rows.append(f"| {label} | {'dist-keras' if label.endswith('-dk') else 'local'} | "
                    f"{s['workers']} | {s['window']} | {s['commits']} | "
                    f"{tm.server_time:.5f} | {tm.commit_time:.5f} | "
                    f"{s['virtual_seconds']:,.2f} s | "
                    f"{'–' if th is None else f'{th:,.0f} s'} |")
    return "\n".join(rows)


def _describe_costs(suffix: str) -> str:
    profile = _profile(suffix)
    if profile is None:
        return f"No cost profile {PROFILES[suffix].name}"
    m = profile.get("machine", {})
    return (f"`{PROFILES[suffix].name}` ({profile.get('engine', 'local')}), measured on "
            f"{m.get('cpu', '?')} with 1 thread: step {1e3 * profile['step_seconds']:.1f} ms, "
            "server apply + pull "
            + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in
                        sorted(profile["server_seconds"].items()))
            + f", the worker's transfer {1e3 * profile['commit_seconds']:.2f} ms; virtual "
            "step time 0.05 s")


_COSTS = {"": "this machine's local engine (shared memory)",
          "-dk": "dist-keras' transport (pickled weights over TCP, serialized server)"}

WALL_TIME = Experiment(
    name="wall-time",
    shows="the thesis' wall-time claims under cost models measured on this machine",
    thesis="Figs. agn_experiment_1/2 (E4 times), Table 3.2 (claim 6)",
    setups={"full": Setup(epochs=40, model="small", record_batches=False, eval_every=10.0),
            "quick": Setup(epochs=3, model="small", record_batches=False, eval_every=3.0)},
    runs={"quick": _wall_runs(), "full": _wall_runs()},
    claims=tuple(c for sfx in PROFILES for c in (
        Claim(id=f"E4-time{sfx}", text="Wall time: AEASGD (λ=30) < AGN (λ=15) < DynSGD "
              f"(λ=10), n=20, with the costs of {_COSTS[sfx]}",
              thesis="444 s < 545 s < 1,625 s", check=_e4_time(sfx)),
        Claim(id=f"6{sfx}", text="At fixed λ ∈ {20, 40}, AGN's wall time falls ∝ 1/n up to "
              f"n ≈ 30, with the costs of {_COSTS[sfx]}",
              thesis="×3.28 from n=10 to 40 at λ=40, ×2.31 at λ=20", check=_speedup(sfx)),
    )),
    tables=(Table(title="Virtual times with the measured costs", render=_wall_table),),
    notes=("Costs (`src/distgrad/reproduce/cost_profile*.json`, written by `distgrad "
           "reproduce --measure-costs FILE [--cost-engine distkeras]`): `server_time` = what "
           "the server does per commit, serialized (its apply + pull; for dist-keras also "
           "unpickling the commit, pickling the center and two TCP transfers), "
           "`commit_time` = the worker's own share (local: two copies of the parameter "
           "vector and a pipe round trip; dist-keras: pickling and unpickling), both in "
           "units of the measured thesis-MLP step (virtual step 0.05 s). The dist-keras "
           "costs are a model built from measured parts, not a run of dist-keras; Spark's "
           "own overheads are not in it.",
           "A run's virtual time depends only on its schedule, not on the values trained, so "
           "the runs use a 784-64-10 MLP with the thesis MLP's costs (its accuracies are not "
           "the thesis MLP's and are not compared).",
           "On `local` with real processes the 2 cores of this machine cannot run 20 workers "
           "in parallel, so the claims are tested in the simulator only."),
)
