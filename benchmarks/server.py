"""Server apply rate: how fast the parameter server absorbs commits on a thesis-MLP-sized center.

Baseline: a plain ``copy_`` of the same 4.8M-float buffer (this machine's memory
bandwidth for one read + one write stream). For each rule we time the full
``ParameterServer.commit`` (staleness, distance ‖θ̃_t − θ̃_{t−τ}‖, the rule's
arithmetic) and commit + pull (the unit a DOWNPOUR/AGN/ADAG worker needs), and
report commit bytes absorbed per second and the ratio to the copy's bytes/s.

Then the real serving loop: commit+pull round trips per second of the ``local``
engine with 2 worker processes (shared-memory buffers, pipes, DOWNPOUR λ = 1,
distance tracking on), on a model that is one 4.8M-float parameter with almost
no computing (``Wide``: a batch of one image; the gradient is a dense 4.8M vector,
so each step still allocates it and takes an SGD step over it). Baseline from the
same run: the server's own commit + pull time in this process, i.e. the highest
round-trip rate one server thread could sustain; the ratio says how much of it
the real loop reaches with workers that compete for the same 2 cores.

    python benchmarks/server.py [--repeats 30] [--roundtrips 400]
        [--json benchmarks/results/server.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import median_time, table, write_json
from distgrad import fast
from distgrad.algorithms import RunInfo, get_algorithm
from distgrad.server import ParameterServer

N = 4_798_010  # thesis MLP


def server_for(name: str, track_distance: bool = True, **params) -> ParameterServer:
    """A server as the local engine builds it: the stale center is the worker's pull buffer."""
    algo = get_algorithm(name)
    cfg = algo.make_config(params)
    g = torch.Generator().manual_seed(0)
    center = torch.randn(N, generator=g)
    return ParameterServer(center, algo.server_rule(cfg, RunInfo(workers=2, lr=1e-3,
                                                                  inner_optimizer="adam")),
                           2, track_distance=track_distance, keep_stale=False)


def apply_benchmarks(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    payload = torch.randn(N, generator=g) * 1e-3
    scratch = torch.empty(N)
    base = torch.empty(N)
    src = torch.randn(N, generator=g)
    nbytes = N * 4
    t_copy = median_time(lambda: scratch.copy_(src), repeats)
    rows = [{"operation": "copy_ (baseline)", "path": "torch", "ms": t_copy * 1e3,
             "GB/s": nbytes / t_copy / 1e9, "vs copy": 1.0}]
    cases = [
        ("agn/downpour commit", "agn", True),
        ("agn/downpour commit, --no-distance", "agn", False),
        ("dynsgd commit", "dynsgd", True),
        ("adag commit", "adag", True),
    ]
    paths = [("C kernel", True), ("torch reference", False)] if fast.kernels_available() \
        else [("torch reference", False)]
    for label, name, track in cases:
        for path, use in paths:
            fast.USE_KERNELS = use
            server = server_for(name, track_distance=track)
            server.pull(0, base)
            work = payload.clone()

            def commit(server=server, work=work):
                server.commit(0, work, steps=1, samples=1, stale_center=base)
                server.base_version[0] = server.version - 1  # τ = 1 every time

            def commit_pull(server=server, work=work):
                commit()
                server.pull(0, base)

            for op, fn in ((label, commit), (label + " + pull", commit_pull)):
                t = median_time(fn, repeats)
                rows.append({"operation": op, "path": path, "ms": t * 1e3,
                             "GB/s": nbytes / t / 1e9, "vs copy": t_copy / t})
    fast.USE_KERNELS = True
    return rows


class Wide(torch.nn.Module):
    """A thesis-MLP-sized parameter vector whose forward pass costs almost nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :10] + self.w[:10]


def roundtrips(steps: int, warmup: int = 20) -> tuple[float, int]:
    """Commits per second of the local engine, 2 workers, ``steps`` commits each (steady
    state: from each worker's ``warmup``-th commit to the first worker's last)."""
    from distgrad import train

    res = train(algorithm="downpour", engine="local", workers=2, window=1, epochs=1,
                batch_size=1, train_samples=2 * steps, inner_optimizer="sgd", lr=1e-6,
                model=Wide(), eval_every=1000.0, deferred_eval=True, record_batches=False,
                seed=0)
    per: dict[int, list[float]] = {}
    for e in res.events:
        if e["type"] == "commit":
            per.setdefault(e["worker"], []).append(e["t"])
    start = max(ts[warmup] for ts in per.values())
    stop = min(ts[-1] for ts in per.values())
    count = sum(1 for ts in per.values() for t in ts if start < t <= stop)
    return count / (stop - start), res.commits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--roundtrips", type=int, default=400, metavar="STEPS",
                    help="commits per worker in the serving-loop measurement (0: skip it)")
    ap.add_argument("--json", default="benchmarks/results/server.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = apply_benchmarks(args.repeats)
    print(f"center: {N:,} float32 ({N * 4 / 1e6:.1f} MB); median of {args.repeats}; "
          "GB/s = commit bytes absorbed per second (copy: bytes copied per second)")
    print(table(rows, ["operation", "path", "ms", "GB/s", "vs copy"]))
    loop: list[dict] = []
    if args.roundtrips:
        limit_ms = next(r["ms"] for r in rows
                        if r["operation"] == "agn/downpour commit + pull" and r["path"] ==
                        ("C kernel" if fast.kernels_available() else "torch reference"))
        rates = [roundtrips(args.roundtrips)[0] for _ in range(3)]
        rate = sorted(rates)[1]
        loop = [{"measure": "server commit + pull, one thread (baseline)",
                 "round trips/s": 1e3 / limit_ms, "vs baseline": 1.0},
                {"measure": "local engine, 2 worker processes (median of 3)",
                 "round trips/s": rate, "vs baseline": rate * limit_ms / 1e3}]
        print("\nserving loop (DOWNPOUR λ=1, 4.8M-float Wide model, batch 1, runs: "
              + ", ".join(f"{r:.0f}/s" for r in rates) + ")")
        print(table(loop, ["measure", "round trips/s", "vs baseline"]))
    write_json(args.json, {"center_floats": N, "repeats": args.repeats, "apply": rows,
                           "serving_loop": loop})


if __name__ == "__main__":
    t0 = time.time()
    main()
