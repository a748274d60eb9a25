"""Cost of the simulator: a ``sim`` run with 40 workers against a plain training loop.

Both do the same number of Adam steps on the thesis MLP with batches of 128 real
MNIST images, with the same torch thread count. The plain loop is one model and
one optimizer; the simulator keeps 40 replicas with their own optimizer state,
applies every commit on the server (AGN, λ=10, distance tracking on), keeps the
event heap and logs every mini-batch. The time compared is the engine's
(``summary.json``'s ``wall_seconds``): data loading and final evaluation are
outside both measurements.

    python benchmarks/simulator.py [--steps-per-worker 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import table, write_json
from distgrad import train
from distgrad.data import load_mnist
from distgrad.models import build_model

BATCH = 128


def plain_loop(steps: int) -> float:
    d = load_mnist()
    model = build_model("mlp", 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(d.y_train), generator=g)
    start = time.perf_counter()
    for i in range(steps):
        idx = order[(i * BATCH) % 59_904:(i * BATCH) % 59_904 + BATCH]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
        opt.step()
    return time.perf_counter() - start


def sim_run(workers: int, steps_per_worker: int, window: int) -> float:
    res = train(algorithm="agn", engine="sim", workers=workers, window=window, epochs=1,
                batch_size=BATCH, train_samples=workers * steps_per_worker * BATCH,
                eval_every=1000.0, seed=0)
    return res.wall_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=40)
    ap.add_argument("--steps-per-worker", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/simulator.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.workers * args.steps_per_worker
    plain_loop(20)  # warm up allocator and kernels
    plain, sim = [], []
    for rep in range(args.repeats):
        plain.append(plain_loop(steps))
        sim.append(sim_run(args.workers, args.steps_per_worker, args.window))
        print(f"  repeat {rep + 1}: plain {plain[-1]:.2f} s, sim {sim[-1]:.2f} s", flush=True)
    p, s = statistics.median(plain), statistics.median(sim)
    rows = [{"run": "plain loop, 1 model", "steps": steps, "seconds": p, "ms/step": p / steps * 1e3,
             "ratio": 1.0},
            {"run": f"sim, {args.workers} workers, AGN λ={args.window}", "steps": steps,
             "seconds": s, "ms/step": s / steps * 1e3, "ratio": s / p}]
    print(f"\nthesis MLP, batch {BATCH}, Adam, {args.threads} torch thread(s); "
          f"median of {args.repeats}")
    print(table(rows, ["run", "steps", "seconds", "ms/step", "ratio"]))
    write_json(args.json, {"workers": args.workers, "steps": steps, "repeats": args.repeats,
                           "threads": args.threads, "rows": rows,
                           "plain_runs": plain, "sim_runs": sim})


if __name__ == "__main__":
    main()
