"""Which distgrad configuration needs the fewest samples to 98 %? (picks time_to_accuracy's default)

Runs each ALGO:WINDOW given on the command line (default: the six below) in the
simulator with the time-to-accuracy setting — thesis MLP, 2 workers, Adam lr 1e-3,
batch 128, seed 0, 4 epochs — evaluating the center on the full test set every
quarter epoch, and prints the committed samples at the first evaluation at or
above 98 %. The simulator is deterministic, so the figures do not depend on the
machine's load; one run takes a few minutes on one core.

    python benchmarks/tta_sweep.py [ALGO:WINDOW ...]
"""

from __future__ import annotations

import sys

from distgrad import train

DEFAULT = ["downpour:1", "downpour:4", "agn:2", "agn:4", "adag:4", "adag:8"]


def main(configs: list[str]) -> None:
    print("config       samples to 98 %  final test accuracy")
    for cfg in configs or DEFAULT:
        algorithm, window = cfg.split(":")
        r = train(algorithm=algorithm, engine="sim", workers=2, window=int(window), epochs=4,
                  batch_size=128, lr=1e-3, inner_optimizer="adam", seed=0, eval_every=0.25,
                  record_batches=False, threads=1)
        curve = [(e["samples"], e["test_acc"]) for e in r.events if e["type"] == "eval"]
        first = next((s for s, acc in curve if acc is not None and acc >= 0.98), None)
        print(f"{cfg:<12} {first if first is not None else '—':>15}  {r.test_accuracy:.4f}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
