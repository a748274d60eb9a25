"""Cost of the simulator: a ``sim`` run with 40 workers against a plain training loop.

Both do the same number of Adam steps on the thesis MLP with batches of 128 real
MNIST images, with the same torch thread count, and both evaluate the initial model
once on the 10,000 test images (the simulator evaluates the center at t = 0; without
it in the loop the comparison charged an evaluation to the simulator). The plain loop
is one model and one optimizer; the simulator keeps 40 replicas with their own
optimizer state, applies every commit on the server (AGN, λ=10, distance tracking on),
keeps the event heap and logs every mini-batch. Measured: the engine's run (data
loading, worker construction outside it and the final evaluation are outside both),
in CPU seconds of this process (one torch thread: what other processes competing for
the cores do not inflate) and in wall seconds; repeats alternate, medians reported.

``--batched K`` also times what batching the local steps of K simulated workers into
one vectorized call could give: forward + backward of K thesis MLPs as a Python loop
against ``torch.func.vmap`` over the stacked replicas, and K separate matmuls of the
largest layer against one ``torch.bmm``.

    nice -n 10 python benchmarks/simulator.py [--steps-per-worker 10] [--repeats 3]
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
from distgrad import Job, train
from distgrad.data import load_mnist
from distgrad.engines.sim import SimEngine
from distgrad.models import build_model

BATCH = 128


def plain_loop(steps: int, evaluate: bool = True) -> tuple[float, float]:
    """(CPU s, wall s) of ``steps`` Adam steps on one model (and one test evaluation)."""
    d = load_mnist()
    model = build_model("mlp", 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(d.y_train), generator=g)
    cpu, wall = time.process_time(), time.perf_counter()
    if evaluate:
        with torch.no_grad():
            for i in range(0, len(d.y_test), 2000):
                torch.nn.functional.cross_entropy(model(d.x_test[i:i + 2000]),
                                                  d.y_test[i:i + 2000])
    for i in range(steps):
        idx = order[(i * BATCH) % 59_904:(i * BATCH) % 59_904 + BATCH]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
        opt.step()
    return time.process_time() - cpu, time.perf_counter() - wall


class _TimedSim(SimEngine):
    """The sim engine, timing its own run in CPU and wall seconds."""

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return super().run(*args, **kwargs)
        finally:
            self.cpu, self.wall = time.process_time() - cpu, time.perf_counter() - wall


def sim_run(workers: int, steps_per_worker: int, window: int) -> tuple[float, float]:
    """(CPU s, wall s) of the simulator's run."""
    job = Job(algorithm="agn", engine="sim", workers=workers, window=window, epochs=1,
              batch_size=BATCH, train_samples=workers * steps_per_worker * BATCH,
              eval_every=1000.0, seed=0)
    engine = _TimedSim(job.timing, job.seed)
    train(job, engine=engine, figures=False)
    return engine.cpu, engine.wall


def _median_cpu(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def batched_probe(k: int, repeats: int) -> list[dict]:
    """Loop vs vmap over k stacked thesis MLPs (forward + backward), loop vs bmm."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [build_model("mlp", i) for i in range(k)]
    params, bufs = stack_module_state(models)
    meta = build_model("mlp", 0).to("meta")
    x, y = torch.randn(k, BATCH, 784), torch.randint(0, 10, (k, BATCH))

    def loss(p, b, xi, yi):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(functional_call(meta, (p, b), (xi,)), yi)

    vgrad = vmap(grad(loss))

    def loop() -> None:
        for i, m in enumerate(models):
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()

    t_loop = _median_cpu(loop, repeats)
    t_vmap = _median_cpu(lambda: vgrad(params, bufs, x, y), repeats)
    a, w = torch.randn(k, BATCH, 1000), torch.randn(k, 1000, 2000)
    t_mm = _median_cpu(lambda: [a[i] @ w[i] for i in range(k)], repeats)
    t_bmm = _median_cpu(lambda: torch.bmm(a, w), repeats)
    return [{"probe": f"fwd+bwd of {k} MLPs, loop", "ms": t_loop * 1e3, "vs loop": 1.0},
            {"probe": f"fwd+bwd of {k} MLPs, vmap", "ms": t_vmap * 1e3,
             "vs loop": t_loop / t_vmap},
            {"probe": f"{k} x (128x1000 @ 1000x2000), loop", "ms": t_mm * 1e3, "vs loop": 1.0},
            {"probe": f"{k} x (128x1000 @ 1000x2000), bmm", "ms": t_bmm * 1e3,
             "vs loop": t_mm / t_bmm}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=40)
    ap.add_argument("--steps-per-worker", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batched", type=int, default=8, metavar="K",
                   help="replicas in the batching probe (0: skip it)")
    ap.add_argument("--json", default="benchmarks/results/simulator.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.workers * args.steps_per_worker
    plain_loop(20)  # warm up allocator and kernels
    plain, bare, sim = [], [], []
    for rep in range(args.repeats):
        plain.append(plain_loop(steps))
        bare.append(plain_loop(steps, evaluate=False))
        sim.append(sim_run(args.workers, args.steps_per_worker, args.window))
        print(f"  repeat {rep + 1}: plain {plain[-1][0]:.2f} CPU s ({plain[-1][1]:.2f} wall), "
              f"sim {sim[-1][0]:.2f} CPU s ({sim[-1][1]:.2f} wall)", flush=True)
    pc, bc, sc = (statistics.median(r[0] for r in runs) for runs in (plain, bare, sim))
    pw, bw, sw = (statistics.median(r[1] for r in runs) for runs in (plain, bare, sim))
    rows = [{"run": "plain loop, 1 model", "steps": steps, "CPU s": pc,
             "ms/step": pc / steps * 1e3, "ratio (CPU)": 1.0, "wall s": pw, "ratio (wall)": 1.0},
            {"run": f"sim, {args.workers} workers, AGN λ={args.window}", "steps": steps,
             "CPU s": sc, "ms/step": sc / steps * 1e3, "ratio (CPU)": sc / pc,
             "wall s": sw, "ratio (wall)": sw / pw},
            {"run": "sim vs a plain loop without the evaluation (the old baseline)",
             "steps": steps, "CPU s": bc, "ms/step": bc / steps * 1e3, "ratio (CPU)": sc / bc,
             "wall s": bw, "ratio (wall)": sw / bw}]
    print(f"\nthesis MLP, batch {BATCH}, Adam, {args.threads} torch thread(s); "
          f"median of {args.repeats}; both evaluate the initial model once")
    print(table(rows, ["run", "steps", "CPU s", "ms/step", "ratio (CPU)", "wall s",
                       "ratio (wall)"]))
    probe = batched_probe(args.batched, max(3, args.repeats)) if args.batched else []
    if probe:
        print("\nbatching the local steps of several workers (CPU s, median):")
        print(table(probe, ["probe", "ms", "vs loop"]))
    write_json(args.json, {"workers": args.workers, "steps": steps, "repeats": args.repeats,
                           "threads": args.threads, "rows": rows, "batched": probe,
                           "plain_runs": plain, "plain_runs_without_eval": bare,
                           "sim_runs": sim})


if __name__ == "__main__":
    main()
