"""Wall time until the center first reaches a test accuracy (98 %): distgrad ``local`` vs DDP.

Thesis MLP on full MNIST, 2 workers / 2 processes, Adam (lr 1e-3), batch 128 per
worker, one torch thread per process. Two situations:

* homogeneous: both processes run at full speed;
* one straggler: process 0 sleeps after each step for as long as the step took
  (2 × slower) — the same slowdown in both systems (distgrad: ``Timing(stragglers=1,
  straggler_factor=2)`` on the local engine; DDP: rank 0 sleeps). Asynchrony exists
  for this case: DDP's allreduce makes the fast process wait every step.

Accuracy is measured on snapshots of the center taken every ``--snapshot-every``
epochs and evaluated after training (distgrad: ``deferred_eval``), so evaluation
takes no CPU from the training processes. Time counts from launch (process
start-up included, for both). Reported separately: samples needed to reach the
target (statistical efficiency) and samples/s (hardware efficiency). Each figure
is the median of ``--repeats`` runs.

    python benchmarks/time_to_accuracy.py [--target 0.98] [--max-epochs 8] [--repeats 3]
        [--config adag:4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _common import table, write_json

BATCH = 128


# --------------------------------------------------------------------------- DDP


def _ddp_rank(rank: int, epochs: int, snapshot_samples: int, slow: float, port: int,
              t_launch: float, out: mp.Queue) -> None:
    import torch.distributed as dist

    from distgrad.data import load_mnist, make_shards
    from distgrad.models import build_model

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    d = load_mnist()
    shard = torch.from_numpy(make_shards(d.y_train.numpy(), 2, "shuffled", 0)[rank])
    model = torch.nn.parallel.DistributedDataParallel(build_model("mlp", 0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(rank)
    snaps: list[tuple[float, int, torch.Tensor]] = []
    samples = 0  # global samples, both ranks
    next_snap = 0
    steps_per_epoch = (len(shard) + BATCH - 1) // BATCH
    steps_total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = shard[torch.randperm(len(shard), generator=g)]
        for i in range(0, len(order), BATCH):
            if step >= steps_total:
                break
            t0 = time.perf_counter()
            idx = order[i:i + BATCH]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
            opt.step()
            if slow:
                time.sleep(slow * (time.perf_counter() - t0))
            samples += 2 * len(idx)
            step += 1
            if rank == 0 and samples >= next_snap:
                vec = torch.nn.utils.parameters_to_vector(model.module.parameters()).detach()
                snaps.append((time.perf_counter() - t_launch, samples, vec.clone()))
                next_snap += snapshot_samples
    dist.destroy_process_group()
    if rank == 0:
        out.put([(t, s, v.numpy()) for t, s, v in snaps])


def run_ddp(epochs: int, snapshot_samples: int, straggler: bool) -> list[tuple[float, int, float]]:
    from distgrad.data import load_mnist
    from distgrad.metrics.evaluate import Evaluator
    from distgrad.models import build_model

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29600 + os.getpid() % 1000
    t_launch = time.perf_counter()
    procs = [ctx.Process(target=_ddp_rank, args=(r, epochs, snapshot_samples,
                                                 1.0 if (straggler and r == 0) else 0.0,
                                                 port, t_launch, out)) for r in range(2)]
    for p in procs:
        p.start()
    snaps = out.get(timeout=3600)
    for p in procs:
        p.join()
    d = load_mnist()
    ev = Evaluator(build_model("mlp", 0), torch.nn.functional.cross_entropy)
    return [(t, s, ev.evaluate([torch.from_numpy(v)], d.x_test, d.y_test)["acc"])
            for t, s, v in snaps]


# --------------------------------------------------------------------------- distgrad


def run_distgrad(algorithm: str, window: int, epochs: int, snapshot_epochs: float,
                 straggler: bool) -> tuple[list[tuple[float, int, float]], float]:
    from distgrad import Timing, train

    timing = Timing(stragglers=1, straggler_factor=2.0) if straggler else Timing()
    res = train(algorithm=algorithm, engine="local", workers=2, window=window, epochs=epochs,
                batch_size=BATCH, lr=1e-3, inner_optimizer="adam", seed=0,
                eval_every=snapshot_epochs, deferred_eval=True, timing=timing,
                record_batches=False)
    curve = [(e["t"], e["samples"], e["test_acc"]) for e in res.events if e["type"] == "eval"]
    return sorted(curve), res.samples / res.wall_seconds


def first_reaching(curve: list[tuple[float, int, float]], target: float
                   ) -> tuple[float, int] | None:
    for t, s, acc in curve:
        if acc is not None and acc >= target:
            return t, s
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--snapshot-every", type=float, default=0.25, metavar="EPOCHS")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default="adag:4", metavar="ALGO:WINDOW",
                    help="distgrad configuration to compare (default adag:4, the fewest "
                         "samples to 98 %% among downpour:1, downpour:4, agn:2, agn:4, adag:4 "
                         "and adag:8 in a 2-worker sim sweep, seed 0)")
    ap.add_argument("--json", default="benchmarks/results/time_to_accuracy.json")
    args = ap.parse_args()
    algo, window = args.config.split(":")
    snapshot_samples = int(args.snapshot_every * 60_000)
    rows = []
    raw: dict[str, list] = {}
    for straggler in (False, True):
        case = "one 2x straggler" if straggler else "homogeneous"
        results: dict[str, list[tuple[float | None, int | None, float, float]]] = {
            "ddp": [], "distgrad": []}
        for rep in range(args.repeats):
            t = time.perf_counter()
            curve = run_ddp(args.max_epochs, snapshot_samples, straggler)
            wall = time.perf_counter() - t
            hit = first_reaching(curve, args.target)
            last_t, last_s, _ = curve[-1]
            results["ddp"].append((hit[0] if hit else None, hit[1] if hit else None,
                                   last_s / last_t, max(a for _, _, a in curve)))
            raw.setdefault(f"ddp/{case}", []).append(curve)
            print(f"  {case} ddp run {rep + 1}: reached {args.target} at "
                  f"{'never' if hit is None else f'{hit[0]:.1f} s, {hit[1]} samples'} "
                  f"({wall:.0f} s total)", flush=True)
            curve, rate = run_distgrad(algo, int(window), args.max_epochs, args.snapshot_every,
                                       straggler)
            hit = first_reaching(curve, args.target)
            results["distgrad"].append((hit[0] if hit else None, hit[1] if hit else None,
                                        rate, max(a for _, _, a in curve)))
            raw.setdefault(f"distgrad/{case}", []).append(curve)
            print(f"  {case} distgrad {args.config} run {rep + 1}: reached {args.target} at "
                  f"{'never' if hit is None else f'{hit[0]:.1f} s, {hit[1]} samples'}",
                  flush=True)
        med: dict[str, dict] = {}
        for system, runs in results.items():
            times = [r[0] for r in runs if r[0] is not None]
            med[system] = {
                "time": statistics.median(times) if len(times) == len(runs) else None,
                "samples": statistics.median([r[1] for r in runs if r[1] is not None])
                if len(times) == len(runs) else None,
                "samples/s": statistics.median([r[2] for r in runs]),
                "best acc": statistics.median([r[3] for r in runs]),
            }
        for system in ("ddp", "distgrad"):
            m = med[system]
            ratio = (m["time"] / med["ddp"]["time"]
                     if m["time"] is not None and med["ddp"]["time"] else None)
            rows.append({"case": case,
                         "system": "ddp gloo" if system == "ddp" else f"distgrad {args.config}",
                         f"s to {args.target:g}": m["time"], "samples needed": m["samples"],
                         "samples/s": m["samples/s"], "best acc": m["best acc"],
                         "time vs ddp": ratio})
    print(f"\nthesis MLP, 2 workers, Adam lr 1e-3, batch 128 per worker; median of "
          f"{args.repeats}; time from launch")
    print(table(rows, ["case", "system", f"s to {args.target:g}", "samples needed", "samples/s",
                       "best acc", "time vs ddp"]))
    write_json(args.json, {"target": args.target, "config": args.config,
                           "repeats": args.repeats, "rows": rows,
                           "curves": {k: [[list(p) for p in c] for c in v]
                                      for k, v in raw.items()}})


if __name__ == "__main__":
    main()
