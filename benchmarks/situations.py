"""Which algorithm for which situation: n = 8 simulated workers under four conditions.

The evidence behind the guide in ``docs/algorithms.md``. Every algorithm trains
the small CNN on MNIST with the stability benchmark's footing (plain SGD,
η = 0.05, batch 64, 30,000 training samples split over the workers) under:

* ``iid``        — homogeneous workers (lognormal step times), shuffled shards;
* ``stragglers`` — 2 of the 8 workers are 4× slower;
* ``slow-net``   — every commit costs a 0.5 s round trip (10 mean step times);
* ``non-iid``    — label-skewed shards: each worker sees one or two classes.

Reported per (condition, algorithm): final test accuracy (10,000 images, median
over seeds) and the virtual time at which the center first reached 95 % on the
first 1,000 test images ("—" if never; 97 % is out of reach for plain SGD at
this budget), plus that time relative to DOWNPOUR in the same condition and seed
(median ratio; < 1 is sooner). Virtual
time is the simulator's clock: what a cluster with these step and network times
would take, independent of this machine's load.

    python benchmarks/situations.py                  # 2 seeds, 96 runs
    python benchmarks/situations.py --report-only    # table from --results
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

ALGORITHMS = ["downpour", "adag", "gem", "dcasgd", "ssp", "diloco-async", "sync", "localsgd",
              "slowmo", "diloco", "easgd", "aeasgd"]
WINDOWS = {"adag": 4, "diloco-async": 8, "localsgd": 8, "slowmo": 8, "diloco": 8, "easgd": 8,
           "aeasgd": 8}
CONDITIONS = {
    "iid": {},
    "stragglers": {"timing": {"stragglers": 2, "straggler_factor": 4.0}},
    "slow-net": {"timing": {"commit_time": 0.5}},
    "non-iid": {"sharding": "label_skewed"},
}
TARGET = 0.95


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from distgrad import Timing, train
    from distgrad.data import load_mnist
    from distgrad.metrics.evaluate import Evaluator
    from distgrad.models import build_model

    d = load_mnist()
    cond = CONDITIONS[spec["condition"]]
    model = build_model("cnn", spec["seed"])
    n_train = spec["train_samples"]
    start = time.perf_counter()
    res = train(engine="sim", algorithm=spec["algorithm"], workers=spec["workers"],
                window=spec["window"],
                epochs=1, batch_size=64, lr=spec["lr"], inner_optimizer="sgd",
                seed=spec["seed"], model=model, data=(d.x_train[:n_train], d.y_train[:n_train]),
                test_data=(d.x_test[:1000], d.y_test[:1000]), eval_every=0.1,
                record_batches=False, sharding=cond.get("sharding", "shuffled"),
                timing=Timing(**cond.get("timing", {})))
    final = Evaluator(model, torch.nn.functional.cross_entropy).evaluate(
        [torch.nn.utils.parameters_to_vector(res.model.parameters()).detach()],
        d.x_test, d.y_test)
    curve = [[e["t"], e["version"], e.get("test_acc") or 0.0]
             for e in res.events if e["type"] == "eval"]
    return {**spec, "test_accuracy": final["acc"] or 0.0,
            "diverged": not math.isfinite(final["loss"]) or (final["acc"] or 0.0) <= 0.2,
            "curve": curve,
            "virtual_seconds": res.virtual_seconds, "commits": res.commits,
            "bytes_committed": res.bytes_committed, "staleness_mean": res.staleness_mean,
            "wall_seconds": time.perf_counter() - start}


def time_to(row: dict[str, Any], target: float = TARGET) -> float | None:
    """Virtual time of the first evaluation with accuracy >= target, or None."""
    return next((t for t, _, acc in row["curve"] if acc >= target), None)


def key(r: dict[str, Any]) -> tuple:
    return (r["condition"], r["algorithm"], r["seed"])


def report(rows: list[dict[str, Any]], algorithms: list[str], conditions: list[str]) -> str:
    by = {key(r): r for r in rows}
    head = ("| algorithm | λ | " + " | ".join(conditions) + " |\n|---|---|"
            + "---|" * len(conditions))
    acc_lines, time_lines, ratio_lines = [head], [head], [head]
    for a in algorithms:
        accs, times, ratios = [], [], []
        for c in conditions:
            rs = [r for r in rows if r["algorithm"] == a and r["condition"] == c]
            if not rs:
                accs.append("")
                times.append("")
                ratios.append("")
                continue
            accs.append(f"{statistics.median(r['test_accuracy'] for r in rs):.4f}")
            hits = [t for r in rs if (t := time_to(r)) is not None]
            cell = f"{statistics.median(hits):.1f} s" if hits else "—"
            if hits and len(hits) < len(rs):
                cell += f" ({len(hits)}/{len(rs)})"
            times.append(cell)
            rel = []
            for r in rs:
                base = by.get((c, "downpour", r["seed"]))
                tb = time_to(base) if base else None
                tr = time_to(r)
                if tb and tr:
                    rel.append(tr / tb)
            ratios.append(f"{statistics.median(rel):.2f}" if rel else "—")
        w = WINDOWS.get(a, 1)
        acc_lines.append(f"| `{a}` | {w} | " + " | ".join(accs) + " |")
        time_lines.append(f"| `{a}` | {w} | " + " | ".join(times) + " |")
        ratio_lines.append(f"| `{a}` | {w} | " + " | ".join(ratios) + " |")
    return ("**Final test accuracy (10,000 images), median over seeds**\n\n"
            + "\n".join(acc_lines)
            + f"\n\n**Virtual time to {TARGET:.0%} (median over the seeds that reached it)**\n\n"
            + "\n".join(time_lines)
            + f"\n\n**Virtual time to {TARGET:.0%} relative to DOWNPOUR, same condition and "
              "seed (median ratio; < 1 is sooner)**\n\n"
            + "\n".join(ratio_lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=30000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path,
                   default=ROOT / "benchmarks" / "results" / "situations.jsonl")
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    conditions = [c for c in args.conditions.split(",") if c]
    for c in conditions:
        if c not in CONDITIONS:
            p.error(f"unknown condition {c!r}; choose from {', '.join(CONDITIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {key(r) for r in load_rows(args.results)}
    specs = [dict(condition=c, algorithm=a, seed=s, workers=args.workers,
                  window=WINDOWS.get(a, 1), train_samples=args.train_samples, lr=args.lr)
             for s in seeds for c in conditions for a in algorithms]
    todo = [s for s in specs if key(s) not in done] if not args.report_only else []
    if todo:
        print(f"{len(todo)} runs to do, {args.jobs} processes", file=sys.stderr)
        run_missing(run_one, todo, args.results, args.jobs,
                    lambda row: f"{row['condition']} {row['algorithm']} seed={row['seed']}: "
                                f"acc {row['test_accuracy']:.4f} t95 {time_to(row)}")
    wanted = {key(s) for s in specs}
    rows = [r for r in load_rows(args.results) if key(r) in wanted]
    text = report(rows, algorithms, conditions)
    text += (f"\nSchedule: n={args.workers}, {args.train_samples} training samples split over "
             f"the workers, CNN, plain SGD η={args.lr}, batch 64, seeds {seeds}; step time "
             "0.05 s (lognormal σ=0.25).\n")
    print(text)
    if args.table:
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
