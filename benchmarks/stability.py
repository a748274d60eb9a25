"""Stability of every asynchronous algorithm as the number of workers grows (simulator).

Every asynchronous algorithm in the registry trains the small CNN on MNIST at
n = 1, 5, 10, 20, 40, 100 simulated workers, for several seeds, on one footing:
the GEM reference setting (plain SGD, η = 0.05, batch 64, one commit per step,
λ = 1) except for the algorithms whose point is a window (see ``WINDOWS``), and a
fixed budget of samples split over the workers (the thesis' convention: more
workers means more staleness, not more data): one pass over the first 30,000
training images — half of GEM's one epoch, to fit a small shared machine. At
this budget plain SGD does not reach 97 %, while the methods that add momentum
(GEM's proxy, or the implicit momentum of asynchrony) can. Reported per
(algorithm, n):

* final test accuracy of the center on the full 10,000-image test set (median
  and range over seeds);
* divergence rate: runs whose final loss is not finite or whose accuracy is at
  most twice chance (≤ 0.2);
* updates to 97 % (and to 95 %, which more runs reach at this budget): the first
  evaluation (every ``--eval-every`` epochs, on the first ``--curve-test`` test
  images) at which the center reaches it, counted in center updates (commits);
  "—" if never within the schedule;
* training samples to 95 % relative to DOWNPOUR at the same n and seed (median
  ratio, < 1 is sooner). Samples, not updates, because the windowed algorithms
  commit once per λ steps.

Each run is a separate process with one torch thread; finished runs are appended
to ``--results`` (JSON lines) so an interrupted benchmark resumes where it
stopped. The table (Markdown) and the figure are rebuilt from that file::

    python benchmarks/stability.py                       # the docs table (216 runs)
    python benchmarks/stability.py --quick               # n ∈ {1, 10}, 1 seed, 6,000 samples
    python benchmarks/stability.py --report-only         # table + plot from --results
    python benchmarks/stability.py --algorithms downpour,gem --workers 100 \
        --train-samples 60000 --epochs 3 \
        --results benchmarks/results/stability-n100.jsonl  # GEM's claim, a larger budget

A run costs about 6 s of one idle core (469 CNN steps plus evaluations), so the
216 runs of the docs table take about 12 minutes on an idle 2-core machine, and
proportionally longer on a loaded one. The simulator is deterministic for a
seed, so the same command gives the same table on the same platform (float
kernels may differ across CPUs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import load_rows, run_missing

#: the asynchronous algorithms, DOWNPOUR first (the baseline)
ALGORITHMS = ["downpour", "dynsgd", "agn", "adag", "aeasgd", "eamsgd", "gem", "dcasgd",
              "staleness-lr", "ssp", "hogwild", "diloco-async"]
#: algorithms whose point is a window of local steps; the others commit every step
WINDOWS = {"agn": 4, "adag": 4, "aeasgd": 4, "eamsgd": 4, "diloco-async": 8}
WORKERS = [1, 5, 10, 20, 40, 100]
TARGETS = (0.97, 0.95)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration in this process; return its row."""
    import torch

    torch.set_num_threads(1)
    from distgrad import train
    from distgrad.data import load_mnist
    from distgrad.metrics.evaluate import Evaluator
    from distgrad.models import build_model

    d = load_mnist()
    n_train, n_curve = spec["train_samples"], spec["curve_test"]
    model = build_model("cnn", spec["seed"])
    start = time.perf_counter()
    res = train(engine="sim", algorithm=spec["algorithm"], workers=spec["workers"],
                window=spec["window"],
                epochs=spec.get("epochs", 1), batch_size=spec["batch_size"], lr=spec["lr"],
                inner_optimizer="sgd", seed=spec["seed"], model=model,
                data=(d.x_train[:n_train], d.y_train[:n_train]),
                test_data=(d.x_test[:n_curve], d.y_test[:n_curve]),
                eval_every=spec["eval_every"], record_batches=False)
    final = Evaluator(model, torch.nn.functional.cross_entropy).evaluate(
        [torch.nn.utils.parameters_to_vector(res.model.parameters()).detach()],
        d.x_test, d.y_test)
    curve = [[e["version"], e["samples"], e.get("test_acc") or 0.0]
             for e in res.events if e["type"] == "eval"]
    loss, acc = final["loss"], final["acc"] or 0.0
    return {
        **spec,
        "test_accuracy": acc,
        "test_loss": loss if math.isfinite(loss) else None,
        "diverged": (not math.isfinite(loss)) or acc <= 0.2,
        "curve": curve,
        "updates": res.versions,
        "staleness_mean": res.staleness_mean,
        "scale_mean": res.scale_mean,
        "wall_seconds": time.perf_counter() - start,
    }


def reached(row: dict[str, Any], target: float) -> tuple[int, int] | None:
    """(updates, samples) at the first evaluation with accuracy >= target, or None."""
    return next(((v, n) for v, n, acc in row["curve"] if acc >= target), None)


def key(row: dict[str, Any]) -> tuple:
    return (row["algorithm"], row["workers"], row["seed"])


# --------------------------------------------------------------------------- report


def _acc(rows: list[dict[str, Any]]) -> str:
    accs = sorted(r["test_accuracy"] for r in rows)
    cell = f"{statistics.median(accs):.4f}"
    if len(accs) > 1:
        cell += f" ({accs[0]:.3f}–{accs[-1]:.3f})"
    return cell


def _div(rows: list[dict[str, Any]]) -> str:
    return f"{sum(r['diverged'] for r in rows)}/{len(rows)}"


def _updates(rows: list[dict[str, Any]], target: float) -> str:
    hits = [h[0] for r in rows if (h := reached(r, target)) is not None]
    if not hits:
        return "—"
    cell = f"{statistics.median(hits):.0f}"
    return cell + (f" ({len(hits)}/{len(rows)})" if len(hits) < len(rows) else "")


def table(rows: list[dict[str, Any]], algorithms: list[str], workers: list[int]) -> str:
    """Markdown tables: final accuracy, divergence rate, updates to each target."""
    by: dict[tuple, list] = {}
    for r in rows:
        by.setdefault((r["algorithm"], r["workers"]), []).append(r)
    head = "| algorithm | λ | " + " | ".join(f"n={n}" for n in workers) + " |\n"
    head += "|---|---|" + "---|" * len(workers) + "\n"
    sections = [("Final test accuracy (10,000 images), median (min–max) over seeds", _acc),
                ("Divergence rate (final loss not finite or accuracy ≤ 0.2)", _div)]
    for target in TARGETS:
        sections.append((f"Center updates to {target:.0%} test accuracy, median over the seeds "
                         "that reached it (how many did, if not all); — never",
                         lambda rs, t=target: _updates(rs, t)))
    out = []
    for title, fmt in sections:
        lines = [f"**{title}**\n", head.rstrip("\n")]
        for a in algorithms:
            cells = [fmt(by[(a, n)]) if (a, n) in by else "" for n in workers]
            lines.append(f"| `{a}` | {WINDOWS.get(a, 1)} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def ratios(rows: list[dict[str, Any]], algorithms: list[str], workers: list[int],
           target: float) -> str:
    """Median samples-to-target relative to DOWNPOUR at the same n and seed (< 1: sooner)."""
    by = {key(r): r for r in rows}
    lines = ["| algorithm | " + " | ".join(f"n={n}" for n in workers) + " |",
             "|---|" + "---|" * len(workers)]
    for a in algorithms:
        cells = []
        for n in workers:
            rs = []
            for r in rows:
                if r["algorithm"] != a or r["workers"] != n:
                    continue
                base = by.get(("downpour", n, r["seed"]))
                hb = reached(base, target) if base else None
                hr = reached(r, target)
                if hb and hr:
                    rs.append(hr[1] / hb[1])
            cells.append(f"{statistics.median(rs):.2f}" if rs else "—")
        lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], algorithms: list[str], workers: list[int],
         path: Path) -> None:
    """Final accuracy (median, min–max) and divergence rate against n, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, a in enumerate(algorithms):
        xs, med, lo, hi, div = [], [], [], [], []
        for n in workers:
            rs = [r for r in rows if r["algorithm"] == a and r["workers"] == n]
            if not rs:
                continue
            accs = [r["test_accuracy"] for r in rs]
            xs.append(n)
            med.append(statistics.median(accs))
            lo.append(statistics.median(accs) - min(accs))
            hi.append(max(accs) - statistics.median(accs))
            div.append(100.0 * sum(r["diverged"] for r in rs) / len(rs))
        base = a == "downpour"
        style = dict(marker="os^vD<>ph*XP"[i % 12], lw=2.4 if base else 1.2,
                     color="k" if base else cmap(i % 20), label=a)
        axes[0].errorbar(xs, med, yerr=[lo, hi], capsize=2, **style)
        axes[1].plot(xs, div, **style)
    axes[0].set_ylabel("final test accuracy (median, min–max over seeds)")
    axes[0].set_ylim(0.0, 1.0)
    axes[1].set_ylabel("runs diverged (%)")
    axes[1].set_ylim(-5, 105)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(workers)
        ax.set_xticklabels([str(n) for n in workers])
        ax.set_xlabel("asynchronous workers n (simulated)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle("MNIST CNN, SGD η=0.05, batch 64, fixed sample budget split over n workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--workers", default=",".join(map(str, WORKERS)))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-samples", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=1,
                   help="passes over the training samples, split over the workers")
    p.add_argument("--curve-test", type=int, default=1000,
                   help="test images for the in-run curve (updates to 97%%)")
    p.add_argument("--eval-every", type=float, default=0.1, metavar="EPOCHS")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" /
                   "stability.jsonl")
    p.add_argument("--table", type=Path, default=None, help="also write the tables here")
    p.add_argument("--plot", type=Path, default=None,
                   help="figure to write (default: docs/stability.png for the default "
                        "--results, else the results path with .png)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: n in {1, 10}, seed 0, 6,000 samples, separate results file")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.seeds, args.train_samples = "1,10", "0", 6000
        args.results = args.results.with_name("stability-quick.jsonl")
    if args.plot is None:
        default = ROOT / "benchmarks" / "results" / "stability.jsonl"
        args.plot = (ROOT / "docs" / "stability.png" if args.results.resolve() == default
                     else args.results.with_suffix(".png"))
    algorithms = [a for a in args.algorithms.split(",") if a]
    workers = [int(n) for n in args.workers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    from distgrad.algorithms import get_algorithm

    for a in algorithms:
        if get_algorithm(a).synchronous:
            p.error(f"{a} is synchronous; this benchmark compares asynchronous algorithms")

    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {key(r) for r in load_rows(args.results)}
    specs = [dict(algorithm=a, workers=n, seed=s, window=WINDOWS.get(a, 1),
                  train_samples=args.train_samples, epochs=args.epochs,
                  curve_test=args.curve_test,
                  eval_every=args.eval_every, batch_size=args.batch_size, lr=args.lr)
             for s in seeds for n in workers for a in algorithms]  # a seed at a time
    todo = [s for s in specs if key(s) not in done] if not args.report_only else []
    if todo:
        print(f"{len(todo)} runs to do ({len(specs) - len(todo)} already in {args.results}), "
              f"{args.jobs} processes", file=sys.stderr)
        run_missing(run_one, todo, args.results, args.jobs,
                    lambda row: f"{row['algorithm']} n={row['workers']} seed={row['seed']}: "
                                f"acc {row['test_accuracy']:.4f} to95 {reached(row, 0.95)}")
    wanted = {key(s) for s in specs}
    rows = [r for r in load_rows(args.results) if key(r) in wanted]
    text = table(rows, algorithms, workers)
    text += (f"\n**Training samples to {TARGETS[-1]:.0%} relative to DOWNPOUR at the same n "
             "and seed** (median ratio; < 1 reaches it sooner; — if either never did)\n\n")
    text += ratios(rows, algorithms, workers, TARGETS[-1])
    passes = "one pass" if args.epochs == 1 else f"{args.epochs} passes"
    settings = (f"\nSchedule: {args.train_samples} training samples, {passes} split over the "
                f"workers; CNN; plain SGD η={args.lr}; batch {args.batch_size}; seeds {seeds}; "
                f"curve on {args.curve_test} test images every {args.eval_every} epochs; final "
                f"accuracy on all 10,000.\n")
    text += settings
    print(text)
    if args.table:
        args.table.write_text(text)
    if rows:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, algorithms, workers, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
