"""Pipelined commits vs plain ones on the net engine: training samples per second, same run.

The same job twice per repetition, once plain and once with ``--pipeline``: ``distgrad
serve`` (``--protection encrypt``) and one ``distgrad work --processes W`` (default 2) on
loopback, DOWNPOUR on the thesis MLP (4.8M parameters: 19.2 MB each way per commit) or
``--model cnn``, each worker doing ``--windows`` windows of ``--window`` steps. The rate of
a run is its samples over its training time, from the first pull to the last commit in
``events.jsonl`` (process start-up, data loading and the final evaluation excluded). The
median over ``--repeats`` repetitions of each, their ratio, and the mean staleness τ of
the commits (pipelining adds about one window of it) are printed and written to ``--json``.

    nice -n 10 python benchmarks/pipeline.py [--repeats 3] [--windows 6] [--model mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"
DISTGRAD = [sys.executable, "-m", "distgrad"]
#: seconds one run may take before it is killed
RUN_LIMIT = 900.0


def one_run(args: argparse.Namespace, pipelined: bool, tmp: Path, tag: str) -> dict[str, Any]:
    """Serve the job and let ``args.workers`` worker processes train it; the run's rate."""
    out = tmp / tag
    address_file = tmp / f"{tag}.address"
    secret = tmp / "secret"
    samples = args.workers * args.windows * args.window * args.batch_size
    serve = [*DISTGRAD, "serve", "--algorithm", "downpour", "--model", args.model,
             "--workers", str(args.workers), "--window", str(args.window),
             "--batch-size", str(args.batch_size), "--epochs", "1",
             "--train-samples", str(samples), "--eval-every", "100", "--seed", "1",
             "--protection", "encrypt", "--secret-file", str(secret),
             "--address-file", str(address_file), "--out", str(out), "-q",
             *(["--pipeline"] if pipelined else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(serve, env=env, stdout=subprocess.DEVNULL)
    work = None
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit {server.poll()})")
            time.sleep(0.1)
        address = address_file.read_text().strip()
        work = subprocess.Popen([*DISTGRAD, "work", "--connect", address, "--secret-file",
                                 str(secret), "--processes", str(args.workers),
                                 "--protection", "encrypt"], env=env,
                                stdout=subprocess.DEVNULL)
        if work.wait(RUN_LIMIT) != 0 or server.wait(RUN_LIMIT) != 0:
            raise RuntimeError(f"run {tag} failed: work exit {work.returncode}, serve exit "
                               f"{server.returncode}")
    finally:
        for p in (work, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()
              if line.strip()]
    pulls = [e["t"] for e in events if e["type"] == "pull"]
    commits = [e for e in events if e["type"] == "commit"]
    done = sum(c["samples"] for c in commits)
    if done != samples:
        raise RuntimeError(f"run {tag} committed {done} samples of {samples}")
    seconds = commits[-1]["t"] - min(pulls)
    return {"pipeline": pipelined, "seconds": seconds, "samples_per_second": done / seconds,
            "staleness_mean": statistics.mean(c["staleness"] for c in commits),
            "commits": len(commits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--windows", type=int, default=6,
                        help="windows (commits) per worker (default 6)")
    parser.add_argument("--window", type=int, default=4, help="steps per window (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"),
                        help="the thesis MLP (default) or the small CNN")
    parser.add_argument("--json", default=str(RESULTS), help=f"default {RESULTS}")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distgrad-pipeline-") as d:
        tmp = Path(d)
        for i in range(args.repeats):
            for pipelined in (False, True):  # alternated: the same machine state for both
                r = one_run(args, pipelined, tmp, f"r{i}-{'pipe' if pipelined else 'plain'}")
                r["repeat"] = i
                runs.append(r)
                print(f"repeat {i} {'pipelined' if pipelined else 'plain    '}: "
                      f"{r['samples_per_second']:.1f} samples/s, τ {r['staleness_mean']:.2f}",
                      flush=True)
    rows = []
    for pipelined in (False, True):
        mine = [r for r in runs if r["pipeline"] == pipelined]
        rows.append({"path": "pipelined" if pipelined else "plain",
                     "samples/s": statistics.median(r["samples_per_second"] for r in mine),
                     "mean τ": statistics.median(r["staleness_mean"] for r in mine)})
    ratio = rows[1]["samples/s"] / rows[0]["samples/s"]
    rows[0]["× plain"], rows[1]["× plain"] = 1.0, ratio
    print(table(rows, ["path", "samples/s", "× plain", "mean τ"]))
    print(f"pipelined / plain = {ratio:.2f}x (median of {args.repeats}, same run)")
    write_json(args.json, {"args": vars(args), "runs": runs, "table": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
