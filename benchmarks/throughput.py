"""Aggregate training throughput of the thesis MLP (batch 128): distgrad ``local`` vs baselines.

Every configuration runs the same model, batch size, inner optimizer (Adam) and
one torch thread per process, on real MNIST batches:

* ``ideal``: n independent processes that train with no communication at all —
  the hardware limit for n processes on this machine;
* ``ddp``: PyTorch DistributedDataParallel, gloo backend, 2 processes on 127.0.0.1
  (gradient allreduce every step);
* ``local``: ``distgrad train --engine local`` with AGN, n workers, window λ
  (defaults otherwise: distance tracking on, events logged).

Throughput is measured in steady state: every process records when each step
ends; the first ``--warmup`` steps of every process are dropped and the rate is
the number of steps that end in the window where all processes are past warm-up
and none has finished, times 128, divided by the window's length. Each figure is
the median over ``--repeats`` runs; ratios are against baselines from the same run.

    python benchmarks/throughput.py [--steps 80] [--warmup 15] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _common import table, write_json

BATCH = 128


def _batches(seed: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from distgrad.data import load_mnist

    d = load_mnist()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d.y_train), (steps, BATCH), generator=g)
    return [(d.x_train[i], d.y_train[i]) for i in idx]


def _train_loop(rank: int, world: int, steps: int, ddp: bool, port: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    from distgrad.models import build_model

    model = build_model("mlp", 0)
    if ddp:
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    batches = _batches(rank, steps)
    ends = []
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ends.append(time.perf_counter())
    if ddp:
        torch.distributed.destroy_process_group()
    out.put((rank, ends))


def steady_rate(ends_per_proc: list[list[float]], warmup: int) -> float:
    """Samples/s over the window where every process is past warm-up and none has finished."""
    start = max(e[warmup] for e in ends_per_proc)
    stop = min(e[-1] for e in ends_per_proc)
    if stop <= start:
        raise RuntimeError("no common steady-state window; raise --steps")
    count = sum(int(np.sum((np.asarray(e) > start) & (np.asarray(e) <= stop)))
                for e in ends_per_proc)
    return count * BATCH / (stop - start)


def run_processes(world: int, steps: int, ddp: bool, warmup: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_train_loop, args=(r, world, steps, ddp, port, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return steady_rate([results[r] for r in range(world)], warmup)


def run_local(workers: int, window: int, steps: int, warmup: int) -> float:
    from distgrad import train

    res = train(algorithm="agn", engine="local", workers=workers, window=window, epochs=1,
                batch_size=BATCH, train_samples=steps * BATCH * workers, eval_every=1000.0,
                record_batches=True, deferred_eval=True, seed=0)
    ends: dict[int, list[float]] = {}
    for e in res.events:
        if e["type"] == "batch":
            ends.setdefault(e["worker"], []).append(e["t"])
    return steady_rate(list(ends.values()), warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80, help="steps per process (default 80)")
    ap.add_argument("--warmup", type=int, default=15, help="steps dropped per process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/throughput.json")
    args = ap.parse_args()

    configs = [
        ("ideal, 1 process", lambda: run_processes(1, args.steps, False, args.warmup)),
        ("ideal, 2 processes", lambda: run_processes(2, args.steps, False, args.warmup)),
        ("ddp gloo, 2 processes", lambda: run_processes(2, args.steps, True, args.warmup)),
        ("local n=1 λ=1", lambda: run_local(1, 1, args.steps, args.warmup)),
        ("local n=1 λ=10", lambda: run_local(1, 10, args.steps, args.warmup)),
        ("local n=2 λ=1", lambda: run_local(2, 1, args.steps, args.warmup)),
        ("local n=2 λ=10", lambda: run_local(2, 10, args.steps, args.warmup)),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in configs}
    for rep in range(args.repeats):  # interleave configurations so drift hits all alike
        for name, fn in configs:
            rate = fn()
            samples[name].append(rate)
            print(f"  repeat {rep + 1}/{args.repeats}  {name:<24} {rate:8.0f} samples/s",
                  flush=True)
    med = {name: statistics.median(v) for name, v in samples.items()}
    ideal1, ideal2, ddp = med["ideal, 1 process"], med["ideal, 2 processes"], \
        med["ddp gloo, 2 processes"]
    rows = []
    for name, _ in configs:
        two = "2" in name.split(",")[-1] or "n=2" in name
        rows.append({"configuration": name, "samples/s": med[name],
                     "vs ideal": med[name] / (ideal2 if two else ideal1),
                     "vs ddp": med[name] / ddp if two else None,
                     "runs": ", ".join(f"{v:.0f}" for v in samples[name])})
    print(f"\nthesis MLP, batch {BATCH}, Adam, 1 torch thread per process; median of "
          f"{args.repeats}; 'vs ideal' against the same number of independent processes")
    print(table(rows, ["configuration", "samples/s", "vs ideal", "vs ddp", "runs"]))
    write_json(args.json, {"steps": args.steps, "warmup": args.warmup,
                           "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
