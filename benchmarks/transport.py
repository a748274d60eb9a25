"""Network transport vs its peers: parameter-server round trips per second, same run.

One round trip = what a worker does per window with a DOWNPOUR-family rule: send a
commit of n float32 parameters and get the new center back (commit with pull), i.e.
2 x 4n bytes moved (the thesis MLP: n = 4,798,010, 19.2 MB each way). ``--workers``
worker processes (default 2) do it at once against one server; a repetition is
``--rounds`` round trips per worker started together, and its rate is
``workers x rounds / (slowest worker's time)``. Medians over ``--repeats`` repetitions,
after a warm-up. The paths, measured one after the other in this run:

* ``shared memory``: the workers and the center in one machine's shared memory (the
  ``local`` engine's center): ``center += payload; into.copy_(center)`` under a lock,
  before any signalling — the ceiling for one host;
* ``distgrad net <protection>``: a real ``NetServer`` (``distgrad serve``) in its own
  process and ``NetClient`` workers, TCP over loopback, in each ``--protection`` mode
  (encrypt: AES-256-GCM; integrity: every byte authenticated; header);
* ``distgrad net int8``: the same with ``--compress int8`` commits (pulls stay float32);
* ``distgrad net <fastest protection> S=2``: ``serve --shards 2`` (two shard processes
  over a shared-memory center, :mod:`distgrad.transport.shard_proc`), workers on
  ``ShardedChannel``; compare with ``distgrad net <fastest protection>`` (one server);
* ``Ray actor PS``: a Ray actor holding the center as a numpy array, workers as Ray actors
  calling it with ``ray.put`` and method calls, as Ray's parameter-server example does;
* ``torch RPC PS``: a parameter-server object behind an ``RRef`` on rank 0, trainers
  calling it with ``rpc_sync`` (TensorPipe), as PyTorch's parameter-server tutorial does.

Ratios against the peers, and against shared memory, are printed as a markdown table
and written with the raw times to ``--json``.

    python benchmarks/transport.py [--sizes 4798010] [--repeats 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json

SECRET = b"benchmark-secret-benchmark-secret-0123"
RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"
#: seconds any one path may take before it is stopped and reported as failed
PATH_TIMEOUT = 600.0
_CTX = tmp.get_context("spawn")


# --------------------------------------------------------------------------- shared memory


def _shm_worker(center: torch.Tensor, lock: Any, rounds: int, repeats: int, barrier: Any,
                out: Any) -> None:
    torch.set_num_threads(1)
    payload, into = torch.full_like(center, 1e-6), torch.empty_like(center)

    def trip() -> None:
        with lock:
            center.add_(payload)
            into.copy_(center)

    out.put(_timed(trip, rounds, repeats, barrier))


def shared_memory(n: int, workers: int, rounds: int, repeats: int) -> dict[str, Any]:
    center = torch.zeros(n).share_memory_()
    lock = _CTX.Lock()
    return _run_workers(_shm_worker, (center, lock), workers, rounds, repeats)


# --------------------------------------------------------------------------- distgrad net


def _downpour_core(workers: int, index: int, view: torch.Tensor, sink: Any,
                   clock: Callable[[], float]) -> Any:
    """A DOWNPOUR (window 1) protocol core over ``view``: the server of every net path
    (in a shard process for ``S=2``)."""
    from distgrad.algorithms import RunInfo, get_algorithm
    from distgrad.protocol.core import ProtocolCore
    from distgrad.server import ParameterServer

    algo = get_algorithm("downpour")
    rule = algo.server_rule(algo.make_config({"window": 1}), RunInfo(workers, 0.1, "sgd"))
    server = ParameterServer(view, rule, workers=workers, track_distance=False)
    return ProtocolCore(server, sink, clock)


def _net_server(n: int, workers: int, protection: str, codec: str, shards: int,
                queue: Any, stop: Any) -> None:
    """One ``NetServer`` in this process, or (``shards`` > 1) ``serve --shards``' shard
    processes over a shared-memory center, their events merged here."""
    torch.set_num_threads(1)
    import functools

    from distgrad.metrics.events import Recorder
    from distgrad.transport.server import NetServer
    from distgrad.transport.shard_proc import ShardProcesses
    from distgrad.transport.sharded import ShardMerger, shard_bounds

    recorder = Recorder()
    if shards == 1:
        core = _downpour_core(workers, 0, torch.zeros(n), recorder, time.perf_counter)
        net = NetServer(core, SECRET, protection=protection, worker_timeout=3600,
                        codec=codec, sizes=[n])
        thread = net.serve_in_thread(until=stop.is_set)
        queue.put(net.address)
        thread.join()
        net.close()
    else:
        bounds = shard_bounds(n, shards)
        merger = ShardMerger(recorder, None, bounds)
        with ShardProcesses(torch.zeros(n), bounds, functools.partial(_downpour_core, workers),
                            SECRET, until_finished=False, protection=protection,
                            worker_timeout=3600) as group:
            queue.put(group.start()[0])
            group.serve(merger.handle, until=stop.is_set)
    queue.put(recorder.bytes_committed / max(recorder.commits, 1))


def _net_worker(address: str, n: int, codec: str, rounds: int, repeats: int, barrier: Any,
                out: Any) -> None:
    torch.set_num_threads(1)
    from distgrad.compression import Compressor
    from distgrad.protocol.messages import CommitRequest, PullRequest
    from distgrad.transport.sharded import connect

    ch = connect(address, SECRET, timeout=300, retries=2)
    payload, into = torch.full((n,), 1e-6), torch.empty(n)
    comp = Compressor(codec, [n], error_feedback=False) if codec != "none" else None
    state: dict[str, Any] = {"seq": 1, "position": 0, "encoded": None}

    def take(r: Any) -> None:
        if r.pulled.data_ptr() != into.data_ptr():
            into.copy_(r.pulled)
        state["base"] = r.base_version

    take(ch.call(PullRequest(ch.worker, ch.attempt, 1, into=into)))

    def trip() -> None:
        if comp is not None:
            payload.fill_(1e-6)
            state["encoded"] = comp.compress(payload)  # travels as the codec's bytes
        state["seq"] += 1
        state["position"] += 1
        take(ch.call(CommitRequest(ch.worker, ch.attempt, state["seq"],
                                   base_version=state["base"], steps=1, samples=1,
                                   position=state["position"], payload=payload,
                                   want_pull=True, pull_into=into,
                                   encoded=state["encoded"])))

    try:
        out.put(_timed(trip, rounds, repeats, barrier))
    finally:
        ch.close()


def distgrad_net(n: int, workers: int, rounds: int, repeats: int, protection: str,
                 codec: str = "none", shards: int = 1) -> dict[str, Any]:
    queue, stop = _CTX.Queue(), _CTX.Event()
    server = _CTX.Process(target=_net_server,
                          args=(n, workers, protection, codec, shards, queue, stop))
    server.start()
    try:
        address = queue.get(timeout=120)
        result = _run_workers(_net_worker, (address, n, codec), workers, rounds, repeats)
        stop.set()
        result["bytes_per_commit"] = queue.get(timeout=120)
        return result
    finally:
        stop.set()
        server.join(30)
        if server.is_alive():
            server.kill()


# --------------------------------------------------------------------------- Ray


def ray_actor(n: int, workers: int, rounds: int, repeats: int) -> dict[str, Any]:
    """A Ray actor parameter server (Ray's own example: ``ray.put`` and method calls)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    @ray.remote
    class ParameterServer:
        def __init__(self, n: int) -> None:
            self.center = np.zeros(n, dtype=np.float32)

        def apply(self, delta: np.ndarray) -> np.ndarray:
            self.center += delta
            return self.center

    @ray.remote
    class Worker:
        def __init__(self, ps: Any, n: int) -> None:
            self.ps = ps
            self.delta = np.full(n, 1e-6, dtype=np.float32)
            self.into = np.empty(n, dtype=np.float32)

        def run(self, rounds: int) -> float:
            start = time.perf_counter()
            for _ in range(rounds):
                ref = ray.put(self.delta)
                self.into[:] = ray.get(self.ps.apply.remote(ref))
            return time.perf_counter() - start

    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        ps = ParameterServer.remote(n)
        ws = [Worker.remote(ps, n) for _ in range(workers)]
        ray.get([w.run.remote(2) for w in ws])  # warm-up
        per_worker: list[list[float]] = [[] for _ in ws]
        for _ in range(repeats):
            for k, t in enumerate(ray.get([w.run.remote(rounds) for w in ws])):
                per_worker[k].append(t)
        return _summary(per_worker, workers, rounds)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- torch RPC

_PS: Any = None


class _TorchPS:
    """The parameter server of PyTorch's RPC tutorial, reduced to commit + pull."""

    def __init__(self, n: int) -> None:
        import threading

        self.center = torch.zeros(n)
        self.lock = threading.Lock()

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.center.add_(delta)
            return self.center.clone()


def _get_ps(n: int) -> _TorchPS:
    global _PS
    if _PS is None:
        _PS = _TorchPS(n)
    return _PS


def _ps_apply(ps_rref: Any, delta: torch.Tensor) -> torch.Tensor:
    return ps_rref.local_value().apply(delta)


def _rpc_rank(rank: int, world: int, port: int, n: int, rounds: int, repeats: int,
              barrier: Any, out: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      TP_SOCKET_IFNAME="lo")
    from torch.distributed import rpc

    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=PATH_TIMEOUT,
                                           init_method=f"tcp://127.0.0.1:{port}")
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=opts)
    try:
        if rank == 0:
            return  # the PS object lives here, built by the first trainer's rpc.remote
        ps_rref = rpc.remote("ps", _get_ps, args=(n,))
        delta, into = torch.full((n,), 1e-6), torch.empty(n)

        def trip() -> None:
            into.copy_(rpc.rpc_sync("ps", _ps_apply, args=(ps_rref, delta)))

        out.put(_timed(trip, rounds, repeats, barrier))
    finally:
        rpc.shutdown()


def torch_rpc(n: int, workers: int, rounds: int, repeats: int) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    barrier, out = _CTX.Barrier(workers), _CTX.Queue()
    procs = [_CTX.Process(target=_rpc_rank, args=(r, workers + 1, port, n, rounds, repeats,
                                                  barrier, out))
             for r in range(workers + 1)]
    return _collect(procs, out, workers, rounds)


# --------------------------------------------------------------------------- plumbing


def _timed(trip: Callable[[], None], rounds: int, repeats: int, barrier: Any) -> list[float]:
    """Warm up, then per repetition: wait for every worker, time ``rounds`` round trips."""
    for _ in range(2):
        trip()
    times = []
    for _ in range(repeats):
        barrier.wait(PATH_TIMEOUT)
        start = time.perf_counter()
        for _ in range(rounds):
            trip()
        times.append(time.perf_counter() - start)
    return times


def _run_workers(target: Callable[..., None], args: tuple, workers: int, rounds: int,
                 repeats: int) -> dict[str, Any]:
    barrier, out = _CTX.Barrier(workers), _CTX.Queue()
    procs = [_CTX.Process(target=target, args=(*args, rounds, repeats, barrier, out))
             for _ in range(workers)]
    return _collect(procs, out, workers, rounds)


def _collect(procs: list[Any], out: Any, workers: int, rounds: int) -> dict[str, Any]:
    """Start ``procs``, gather ``workers`` lists of times; every process ends here."""
    for p in procs:
        p.start()
    try:
        per_worker = [out.get(timeout=PATH_TIMEOUT) for _ in range(workers)]
        for p in procs:
            p.join(60)
        return _summary(per_worker, workers, rounds)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


def _summary(per_worker: list[list[float]], workers: int, rounds: int) -> dict[str, Any]:
    walls = [max(ts) for ts in zip(*per_worker, strict=True)]
    rates = [workers * rounds / w for w in walls]
    return {"round_trips_per_s": statistics.median(rates), "rates": rates,
            "worker_times": per_worker}


def protections() -> list[str]:
    try:
        from distgrad.transport.frames import PROTECTIONS
    except ImportError:  # an older transport: integrity modes only
        return ["full", "header"]
    return list(PROTECTIONS)


def paths(n: int, args: argparse.Namespace) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    w, r, k = args.workers, args.rounds, args.repeats
    out: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("shared memory", lambda: shared_memory(n, w, r, k))]
    for p in protections():
        out.append((f"distgrad net {p}", lambda p=p: distgrad_net(n, w, r, k, p)))
    fast = protections()[-1]
    out.append(("distgrad net int8", lambda: distgrad_net(n, w, r, k, fast, "int8")))
    out.append((f"distgrad net {fast} S=2", lambda: distgrad_net(n, w, r, k, fast, shards=2)))
    if not args.no_peers:
        out.append(("Ray actor PS", lambda: ray_actor(n, w, r, k)))
        out.append(("torch RPC PS", lambda: torch_rpc(n, w, r, k)))
    wanted = [s.strip() for s in args.only.split(",")] if args.only else None
    return [(name, fn) for name, fn in out if wanted is None or any(x in name for x in wanted)]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| parameters | path | round trips/s | GB/s | x Ray | x torch RPC | x shm | "
             "bytes/commit |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}" if r.get(key) is not None else "-"
        bpc = r.get("bytes_per_commit")
        lines.append(f"| {r['parameters']:,} | {r['path']} | {r.get('round_trips_per_s', 0):.1f} "
                     f"| {r.get('gb_per_s', 0):.2f} | {ratio('vs_ray')} | "
                     f"{ratio('vs_torch_rpc')} | {ratio('vs_shm')} | "
                     f"{f'{bpc:,.0f}' if bpc else '-'} |" if "error" not in r else
                     f"| {r['parameters']:,} | {r['path']} | failed: {r['error'][:60]} "
                     "| | | | | |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> str:
    """The issue's loopback targets, each with the ratio measured in this run."""
    out = []
    for n in sorted({r["parameters"] for r in rows}):
        by = {r["path"]: r for r in rows if r["parameters"] == n and "error" not in r}
        checks = []
        enc = by.get("distgrad net encrypt", {})
        for key, peer in (("vs_ray", "Ray"), ("vs_torch_rpc", "torch RPC")):
            if enc.get(key) is not None:
                checks.append((f"encrypt >= 1.0 x {peer}", enc[key], enc[key] >= 1.0))
        integ = by.get("distgrad net integrity", {})
        if integ.get("vs_shm") is not None:
            checks.append(("integrity >= 0.5 x shared memory", integ["vs_shm"],
                           integ["vs_shm"] >= 0.5))
        f32 = next((r.get("bytes_per_commit") for p, r in by.items()
                    if p.startswith("distgrad net") and "int8" not in p and "S=" not in p), None)
        i8 = by.get("distgrad net int8", {}).get("bytes_per_commit")
        if f32 and i8:
            checks.append(("int8 bytes <= 0.26 x float32", i8 / f32, i8 / f32 <= 0.26))
        out += [f"{n:,} parameters: {name}: {value:.2f} ({'met' if ok else 'missed'})"
                for name, value, ok in checks]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4798010",
                        help="parameter counts, comma-separated (default: the thesis MLP's "
                             "4,798,010)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repetitions per path; the median is reported (default 5)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="round trips per worker per repetition (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--only", default="",
                        help="run only the paths whose name contains one of these words "
                             "(comma-separated, e.g. 'shared,encrypt,Ray')")
    parser.add_argument("--no-peers", action="store_true", help="skip Ray and torch RPC")
    parser.add_argument("--json", default=str(RESULTS), help=f"output (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        measured: dict[str, dict[str, Any]] = {}
        for name, fn in paths(n, args):
            print(f"measuring {name} ({n:,} parameters)...", flush=True)
            try:
                measured[name] = fn()
            except Exception as exc:  # a peer that is not installed or fails: say so
                measured[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  failed: {measured[name]['error']}", flush=True)
        ref = {key: measured.get(name, {}).get("round_trips_per_s") for key, name in
               (("vs_ray", "Ray actor PS"), ("vs_torch_rpc", "torch RPC PS"),
                ("vs_shm", "shared memory"))}
        for name, m in measured.items():
            row: dict[str, Any] = {"parameters": n, "path": name, **m}
            rate = m.get("round_trips_per_s")
            if rate is not None:
                row["gb_per_s"] = rate * 2 * 4 * n / 1e9
                for key, base in ref.items():
                    row[key] = rate / base if base else None
            rows.append(row)
    print()
    print(markdown(rows))
    print()
    print(targets(rows))
    write_json(args.json, {"benchmark": "transport", "workers": args.workers,
                           "rounds": args.rounds, "repeats": args.repeats,
                           "command": "python benchmarks/transport.py " + " ".join(sys.argv[1:]),
                           "rows": rows})


if __name__ == "__main__":
    main()
