"""The communication-bound regime: a parameter server behind capped network links vs DDP.

Three hosts of a :class:`~distgrad.testing.netns.Cluster` (network namespaces on this
machine, root needed): the server on host 0, one worker on each of hosts 1 and 2, one
torch thread per process; every host's link capped at 10 Gbit/s, 1 Gbit/s or 100 Mbit/s
(``tc tbf`` both ways). The thesis MLP (4,798,010 parameters) on MNIST, Adam lr 1e-3,
batch 128 per worker:

* ``ddp``: PyTorch DistributedDataParallel, gloo over the hosts' ``eth0``
  (``GLOO_SOCKET_IFNAME``), one rank per worker host, the same shards; rank 0 snapshots
  the parameters on the evaluation schedule and evaluates them after training (the
  evaluation costs DDP no time);
* ``distgrad serve``/``work``: DOWNPOUR λ=1, AGN and ADAG at λ ∈ {1, 4, 16}, DiLoCo
  (the server evaluates while training, on host 0's share of the 2 cores).

Per run: samples/s, bytes that crossed the links (the hosts' ``eth0`` counters), and the
seconds from the first training step to the first evaluation at ``--target`` test
accuracy (median over ``--repeats``). Plus a commit-and-pull loop (one worker on host 1
against a server on host 0, every ``--protection``, and int8 commits) that measures the
transport's throughput against the cap. Writes ``--json`` and a plot of time-to-target against
bandwidth. ``--quick`` is a smoke test (one rate, two configurations, a small subset).

All hosts share this machine's CPU cores: compute is bounded by them, not by a host.

    sudo python benchmarks/cluster.py --quick
    sudo nice -n 10 python benchmarks/cluster.py            # the full grid
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json

RESULTS = Path(__file__).resolve().parent / "results"
RATES = ["10gbit", "1gbit", "100mbit"]
#: (label, algorithm, window); "ddp" is PyTorch DDP
CONFIGS = [("ddp", "ddp", 1), ("downpour λ=1", "downpour", 1),
           *[(f"agn λ={w}", "agn", w) for w in (1, 4, 16)],
           *[(f"adag λ={w}", "adag", w) for w in (1, 4, 16)],
           ("diloco λ=16", "diloco", 16),
           # --pipeline: each commit travels while the worker computes its next window
           *[(f"adag λ={w} pipelined", "adag+pipeline", w) for w in (4, 16)]]
QUICK_CONFIGS = [("ddp", "ddp", 1), ("adag λ=16", "adag", 16)]
PARAMS = 4_798_010


def pick_config(spec: str, p: argparse.ArgumentParser) -> tuple[str, str, int]:
    """``ddp`` or ``ALGORITHM:WINDOW`` as one of :data:`CONFIGS` (an error names the bad one)."""
    algorithm, _, window = spec.strip().partition(":")
    for config in CONFIGS:
        if config[1] == algorithm and (algorithm == "ddp" or str(config[2]) == window):
            return config
    known = ", ".join("ddp" if a == "ddp" else f"{a}:{w}" for _, a, w in CONFIGS)
    p.error(f"unknown configuration {spec!r}; choose from: {known}")
    raise AssertionError  # p.error exits


# ---------------------------------------------------------------- DDP rank (runs on a host)


def ddp_rank(args: argparse.Namespace) -> None:
    """One DDP rank: train its shard, snapshot on the eval schedule, evaluate at the end."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from distgrad.data import load_mnist
    from distgrad.data.shards import make_shards
    from distgrad.models import build_model

    torch.set_num_threads(1)
    d = load_mnist()
    n = args.train_samples
    x, y = d.x_train[:n], d.y_train[:n]
    shard = make_shards(y.numpy(), args.world, "shuffled", args.seed)[args.rank]
    model = build_model("mlp", args.seed)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:29500",
                            rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=600))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed + args.rank)
    every = max(1, int(args.eval_every * n / (args.batch_size * args.world)))
    snaps: list[tuple[float, int, torch.Tensor]] = []
    dist.barrier()
    t0 = time.perf_counter()
    step = 0
    for _ in range(args.epochs):
        order = torch.from_numpy(shard)[torch.randperm(len(shard), generator=g)]
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            opt.zero_grad()
            F.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if args.rank == 0 and step % every == 0:
                snaps.append((time.perf_counter() - t0, step,
                              torch.nn.utils.parameters_to_vector(model.parameters()).clone()))
            if time.perf_counter() - t0 > args.max_seconds:
                break
        else:
            continue
        break
    wall = time.perf_counter() - t0
    samples = step * args.batch_size * args.world
    dist.destroy_process_group()
    if args.rank != 0:
        return
    snaps.append((wall, step, torch.nn.utils.parameters_to_vector(model.parameters()).clone()))
    evals = []
    with torch.no_grad():
        for t, s, vec in snaps:
            torch.nn.utils.vector_to_parameters(vec, model.parameters())
            acc = float((model(d.x_test).argmax(1) == d.y_test).float().mean())
            evals.append({"t": t, "samples": s * args.batch_size * args.world, "test_acc": acc})
    Path(args.out).write_text(json.dumps({"wall": wall, "samples": samples, "evals": evals}))


# ---------------------------------------------------------------- runs (from the root)


def time_to(evals: list[dict[str, Any]], target: float) -> float | None:
    for e in evals:
        if e["test_acc"] >= target:
            return float(e["t"])
    return None


def run_ddp(c: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from distgrad.testing.recipes import wait_all

    out = work / "ddp.json"
    out.unlink(missing_ok=True)
    procs = [c.popen(k, [sys.executable, __file__, "_ddp", "--rank", str(k - 1), "--world",
                         "2", "--master", c.ip(1), "--out", str(out),
                         "--train-samples", str(args.train_samples), "--epochs",
                         str(args.epochs), "--eval-every", str(args.eval_every),
                         "--max-seconds", str(args.max_seconds)],
                     env={"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"})
             for k in (1, 2)]
    codes = wait_all(procs, args.max_seconds + 600)
    if codes != [0, 0]:
        raise RuntimeError(f"DDP ranks exited with {codes}: see {procs[0].log}")
    r = json.loads(out.read_text())
    return {"evals": r["evals"], "train_seconds": r["wall"], "samples": r["samples"]}


def run_distgrad(c: Any, args: argparse.Namespace, work: Path, algorithm: str, window: int
                 ) -> dict[str, Any]:
    from distgrad.testing.recipes import start_serve, start_work, wait_all, write_secret

    secret = write_secret(work / "secret")
    run = work / f"{algorithm}-{window}"
    algorithm, _, flag = algorithm.partition("+")
    server, address = start_serve(
        c, 0, ["--algorithm", algorithm, "--workers", "2", "--window", str(window),
               *(["--pipeline"] if flag == "pipeline" else []),
               "--epochs", str(args.epochs), "--train-samples", str(args.train_samples),
               "--eval-every", str(args.eval_every), "--no-batch-log", "--no-distance",
               "--threads", "1", "--worker-timeout", "600", "--out", str(run), "--overwrite",
               "-q"], secret_file=secret, workdir=work)
    workers = [start_work(c, k, address, secret_file=secret, args=("--timeout", "600"))
               for k in (1, 2)]
    codes = wait_all([server, *workers], args.max_seconds + 600)
    if codes != [0, 0, 0]:
        raise RuntimeError(f"{algorithm} exited with {codes}: see {server.log}")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    t0 = min(e["t"] for e in events if e["type"] == "pull")
    t_end = max(e["t"] for e in events if e["type"] == "commit")
    evals = [{"t": e["t"] - t0, "samples": e["samples"], "test_acc": e["test_acc"]}
             for e in events if e["type"] == "eval" and e["t"] >= t0]
    s = json.loads((run / "summary.json").read_text())
    return {"evals": evals, "train_seconds": t_end - t0, "samples": s["samples_committed"]}


def measure(c: Any, args: argparse.Namespace, work: Path, algorithm: str, window: int
            ) -> dict[str, Any]:
    before = [c.link_bytes(k)["tx"] for k in range(3)]
    r = run_ddp(c, args, work) if algorithm == "ddp" else \
        run_distgrad(c, args, work, algorithm, window)
    after = [c.link_bytes(k)["tx"] for k in range(3)]
    r["bytes"] = sum(after) - sum(before)
    r["samples_per_s"] = r["samples"] / r["train_seconds"]
    r["time_to_target"] = time_to(r["evals"], args.target)
    r["final_acc"] = r["evals"][-1]["test_acc"] if r["evals"] else None
    return r


# ---------------------------------------------------------------- commit-and-pull loop


LOOP = r"""
import sys, time, torch
from distgrad.protocol.messages import CommitRequest, PullRequest
from distgrad.transport.client import NetClient
address, secret, n, seconds = sys.argv[1], open(sys.argv[2], "rb").read().strip(), \
    int(sys.argv[3]), float(sys.argv[4])
protection, codec = sys.argv[5], sys.argv[6]
torch.set_num_threads(1)
comp = None
if codec != "none":
    from distgrad.compression import Compressor
    comp = Compressor(codec, [n], error_feedback=False)
with NetClient(address, secret, timeout=120, protection=protection) as ch:
    into, payload = torch.empty(n), torch.full((n,), 1e-9)
    r = ch.call(PullRequest(ch.worker, ch.attempt, 1, into=into))
    base, seq, trips, t0 = r.base_version, 1, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and trips < 50000:
        seq += 1
        encoded = comp.compress(payload) if comp is not None else None  # the codec's bytes
        r = ch.call(CommitRequest(ch.worker, ch.attempt, seq, base_version=base, steps=1,
                                  samples=1, position=trips + 1, payload=payload,
                                  want_pull=True, pull_into=into, encoded=encoded))
        base, trips = r.base_version, trips + 1
    wall = time.perf_counter() - t0
print("TRIPS", trips, wall)
"""


def commit_pull_loop(c: Any, rate: str, protection: str, work: Path, seconds: float,
                     codec: str = "none") -> dict[str, Any]:
    """One worker on host 1 commits the whole thesis MLP and pulls the center back, for
    ``seconds``, against a ``distgrad serve`` of a DOWNPOUR job on host 0 (one worker,
    so the server only applies and replies). Payload bytes (commit + pull) per second
    against the cap; with ``codec`` the commits travel compressed, the pulls as float32."""
    from distgrad.testing.netns import rate_bits
    from distgrad.testing.recipes import start_serve, write_secret

    secret = write_secret(work / "secret")
    server, address = start_serve(
        c, 0, ["--algorithm", "downpour", "--workers", "1", "--window", "1",
               "--train-samples", "60000", "--eval-every", "100", "--no-batch-log",
               "--no-distance", "--protection", protection, "--worker-timeout", "600",
               "--compress", codec, "--out", str(work / f"loop-{protection}-{codec}"),
               "--overwrite", "-q"],
        secret_file=secret, workdir=work)
    script = work / "loop.py"
    script.write_text(LOOP)
    try:
        r = c.run(1, [sys.executable, str(script), address, str(secret), str(PARAMS),
                      str(seconds), protection, codec], timeout=seconds + 300)
    finally:
        server.kill()
        server.wait(30)
    trips, wall = r.stdout.split("TRIPS")[-1].split()
    # a round trip is a commit one way, then the pull back: each direction is busy half of
    # the time, so the link is used fully when commit + pull bytes per second reach the cap
    per_trip = (BYTES_PER_VALUE[codec] + 4) * PARAMS
    gbit = int(trips) * per_trip * 8 / float(wall) / 1e9
    return {"rate": rate, "protection": protection, "codec": codec, "round_trips": int(trips),
            "round_trips_per_s": int(trips) / float(wall), "seconds": float(wall),
            "payload_bytes_per_trip": per_trip, "payload_gbit_per_s": gbit,
            "fraction_of_cap": gbit / (rate_bits(rate) / 1e9)}


#: a commit's bytes per parameter with each codec (pulls are float32: 4)
BYTES_PER_VALUE = {"none": 4, "fp16": 2, "bf16": 2, "int8": 1}


# ---------------------------------------------------------------- main


def plot(results: dict[str, Any], path: Path) -> bool:
    """Time to target against bandwidth, a line per configuration; False (and no file) when
    no configuration reached the target at any rate: an empty plot would say nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[tuple[float, float]]] = {}
    from distgrad.testing.netns import rate_bits
    for row in results["runs"]:
        if row["time_to_target_median"] is not None:
            by_label.setdefault(row["config"], []).append(
                (rate_bits(row["rate"]) / 1e9, row["time_to_target_median"]))
    if not by_label:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(by_label.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                linestyle="--" if label == "ddp" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth per host (Gbit/s)")
    ax.set_ylabel(f"seconds to {results['target']:.0%} test accuracy")
    ax.set_title("thesis MLP, 2 worker hosts + server host (one machine, 2 cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def markdown(results: dict[str, Any]) -> str:
    """The README's tables: one row per rate and configuration (medians), then the
    commit-and-pull loop against the cap."""
    target = f"{results['target']:.0%}"
    lines = [f"| link | configuration | samples/s | MB over the links | s to {target} | "
             f"× DDP's time | final test accuracy |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["runs"]:
        ddp = next((r["time_to_target_median"] for r in results["runs"]
                    if r["rate"] == row["rate"] and r["config"] == "ddp"), None)
        tt = row["time_to_target_median"]
        ratio = f"{tt / ddp:.2f}" if tt is not None and ddp else "—"
        lines.append(f"| {row['rate']} | {row['config']} | {row['samples_per_s_median']:.0f} | "
                     f"{row['bytes_median'] / 1e6:.0f} | "
                     f"{'not reached' if tt is None else f'{tt:.0f}'} | {ratio} | "
                     f"{row['final_acc_median']:.3f} |")
    lines += ["", "| link | protection | commits | round trips/s | payload Gbit/s (commit "
                  "+ pull) | × cap |", "|---|---|---|---:|---:|---:|"]
    for row in results["loop"]:
        lines.append(f"| {row['rate']} | {row['protection']} | {row['codec']} | "
                     f"{row['round_trips_per_s']:.2f} | {row['payload_gbit_per_s']:.3f} | "
                     f"{row['fraction_of_cap']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_ddp"]:
        q = argparse.ArgumentParser()
        for flag, typ in (("--rank", int), ("--world", int), ("--master", str),
                          ("--out", str), ("--train-samples", int), ("--epochs", int),
                          ("--eval-every", float), ("--max-seconds", float)):
            q.add_argument(flag, type=typ, required=True)
        q.add_argument("--batch-size", type=int, default=128)
        q.add_argument("--seed", type=int, default=0)
        ddp_rank(q.parse_args(argv[1:]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1gbit only, ddp and adag λ=16, 6,000 samples, 80 %% "
                        "target, one repeat, short bandwidth loop")
    p.add_argument("--rates", default=",".join(RATES), help="comma-separated link caps")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=float, default=0.1, help="epochs between evaluations")
    p.add_argument("--target", type=float, default=0.97, help="test accuracy to reach")
    p.add_argument("--max-seconds", type=float, default=900,
                   help="stop DDP after this long (distgrad runs finish their epochs)")
    p.add_argument("--loop-seconds", type=float, default=10.0)
    p.add_argument("--protections", default="encrypt,integrity,header")
    p.add_argument("--loop-codecs", default="int8", metavar="LIST",
                   help="also run the commit-and-pull loop with these --compress codecs "
                        "(first protection), beside float32")
    p.add_argument("--configs", default=None, metavar="LIST",
                   help="only these configurations, comma-separated ALGORITHM:WINDOW "
                        "(ddp for DDP; adag+pipeline:W with --pipeline), e.g. "
                        "ddp,adag:16,adag+pipeline:16 (default: all)")
    p.add_argument("--json", type=Path, default=RESULTS / "cluster.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "cluster.png")
    args = p.parse_args(argv)
    configs = CONFIGS
    if args.quick:
        args.rates, args.repeats, args.train_samples, args.epochs = "1gbit", 1, 6000, 1
        args.target, args.eval_every, args.loop_seconds = 0.8, 0.25, 3.0
        args.protections = "encrypt"
        configs = QUICK_CONFIGS
        if args.json == RESULTS / "cluster.json":
            args.json, args.plot = RESULTS / "cluster-quick.json", RESULTS / "cluster-quick.png"

    if args.configs is not None:
        configs = [pick_config(c, p) for c in args.configs.split(",") if c.strip()]
    from distgrad.testing.netns import Cluster, unavailable

    reason = unavailable()
    if reason is not None:
        p.error(reason)
    results: dict[str, Any] = {"target": args.target, "train_samples": args.train_samples,
                               "epochs": args.epochs, "repeats": args.repeats, "runs": [],
                               "loop": []}
    for rate in args.rates.split(","):
        with Cluster(3, rate=rate) as c:
            work = c.workdir
            loops = [(p, "none") for p in args.protections.split(",") if p]
            loops += [(args.protections.split(",")[0], codec)
                      for codec in args.loop_codecs.split(",") if codec and codec != "none"]
            for protection, codec in loops:
                row = commit_pull_loop(c, rate, protection, work, args.loop_seconds, codec)
                print(json.dumps(row), flush=True)
                results["loop"].append(row)
            for label, algorithm, window in configs:
                reps = [measure(c, args, work, algorithm, window) for _ in range(args.repeats)]
                tts = [r["time_to_target"] for r in reps]
                row = {"rate": rate, "config": label,
                       "samples_per_s_median": statistics.median(r["samples_per_s"]
                                                                 for r in reps),
                       "bytes_median": statistics.median(r["bytes"] for r in reps),
                       "time_to_target_median": (statistics.median(tts)
                                                 if all(t is not None for t in tts) else None),
                       "final_acc_median": statistics.median(r["final_acc"] or 0 for r in reps),
                       "repeats": reps}
                print(json.dumps({k: v for k, v in row.items() if k != "repeats"}), flush=True)
                results["runs"].append(row)
    ratios = {}
    for rate in args.rates.split(","):
        rows = {r["config"]: r for r in results["runs"] if r["rate"] == rate}
        ddp = rows.get("ddp", {}).get("time_to_target_median")
        adag = [r["time_to_target_median"] for k, r in rows.items()
                if k.startswith("adag") and r["time_to_target_median"] is not None]
        if ddp and adag:
            ratios[rate] = min(adag) / ddp
    results["best_adag_over_ddp_time"] = ratios
    write_json(args.json, results)
    plotted = plot(results, args.plot)
    print("\n" + markdown(results))
    print(f"\nbest ADAG / DDP time to {args.target:.0%}: {ratios}")
    print(f"wrote {args.plot}" if plotted else
          f"no plot: no configuration reached {args.target:.0%} (see {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
