"""Server apply rate: how fast the parameter server absorbs commits on a thesis-MLP-sized center.

Baseline: a plain ``copy_`` of the same 4.8M-float buffer (this machine's memory
bandwidth for one read + one write stream). For each rule we time the full
``ParameterServer.commit`` (staleness, distance ‖θ̃_t − θ̃_{t−τ}‖, the rule's
arithmetic) and commit + pull (the unit a DOWNPOUR/AGN/ADAG worker needs), and
report commit bytes absorbed per second and the ratio to the copy's bytes/s.

Also measures pull+commit round trips per second from 2 worker processes
through the local engine's real serving loop (shared-memory buffers, pipes),
with workers that do no computing at all.

    python benchmarks/server.py [--repeats 30] [--json benchmarks/results/server.json]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default="benchmarks/results/server.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = apply_benchmarks(args.repeats)
    print(f"center: {N:,} float32 ({N * 4 / 1e6:.1f} MB); median of {args.repeats}; "
          "GB/s = commit bytes absorbed per second (copy: bytes copied per second)")
    print(table(rows, ["operation", "path", "ms", "GB/s", "vs copy"]))
    write_json(args.json, {"center_floats": N, "repeats": args.repeats, "apply": rows})


if __name__ == "__main__":
    t0 = time.time()
    main()
