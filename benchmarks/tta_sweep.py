"""Which distgrad configuration needs the fewest samples to 98 %? (picks time_to_accuracy's default)

Runs each ALGO:WINDOW given on the command line (default: the six below) in the
simulator with the time-to-accuracy setting — thesis MLP, 2 workers, Adam lr 1e-3,
batch 128, seed 0, 4 epochs — evaluating the center on the full test set every
quarter epoch, and prints the committed samples at the first evaluation at or
above 98 %. Every finished configuration is appended to ``--results`` (JSON lines:
the configuration, samples to 98 %, final accuracy, the evaluation curve, the code
fingerprint); configurations already there with this code's fingerprint are not run
again, so an interrupted sweep resumes. The simulator is deterministic, so the
figures do not depend on the machine's load; one run takes a few minutes on one core.

    python benchmarks/tta_sweep.py [ALGO:WINDOW ...] [--results benchmarks/results/tta_sweep.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_rows
from distgrad import train
from distgrad.reproduce.provenance import code_fingerprint, code_version

DEFAULT = ["downpour:1", "downpour:4", "agn:2", "agn:4", "adag:4", "adag:8"]


def run_one(cfg: str) -> dict:
    algorithm, window = cfg.split(":")
    r = train(algorithm=algorithm, engine="sim", workers=2, window=int(window), epochs=4,
              batch_size=128, lr=1e-3, inner_optimizer="adam", seed=0, eval_every=0.25,
              record_batches=False, threads=1)
    curve = [[e["samples"], e["test_acc"]] for e in r.events if e["type"] == "eval"]
    first = next((s for s, acc in curve if acc is not None and acc >= 0.98), None)
    return {"config": cfg, "samples_to_98": first, "test_accuracy": r.test_accuracy,
            "curve": curve, "params_sha256": r.params_sha256,
            "code_fingerprint": code_fingerprint(), "code_version": code_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", metavar="ALGO:WINDOW")
    ap.add_argument("--results", default="benchmarks/results/tta_sweep.jsonl")
    args = ap.parse_args()
    path = Path(args.results)
    done = {row["config"]: row for row in load_rows(path)
            if row.get("code_fingerprint") == code_fingerprint()}
    print("config       samples to 98 %  final test accuracy")
    for cfg in args.configs or DEFAULT:
        row = done.get(cfg)
        if row is None:
            row = run_one(cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        first = row["samples_to_98"]
        print(f"{cfg:<12} {first if first is not None else '—':>15}  "
              f"{row['test_accuracy']:.4f}", flush=True)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
