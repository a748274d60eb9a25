"""A second workload: the byte-level GPT on the shipped ``pystdlib`` corpus (simulator).

The small GPT (:mod:`distgrad.models.gpt`: 4 layers, width 128, context 64 bytes,
0.83 M parameters) trains on a fixed budget of byte windows split over the workers,
with Adam (η = 1e-3, batch 32) as the inner optimizer, on the ``sim`` engine with one
torch thread. Reported per (algorithm, n): the final test perplexity of the center
(``exp`` of the mean cross-entropy per byte over the ~880 test windows of the last 5 %
of the corpus), its test token accuracy, the commits, and whether the run diverged.
The baseline is the same model trained by one process over the same samples
(``sequential``, n = 1). A byte-level model that learned nothing has perplexity ≈ 256
(uniform) or ≈ 20–30 (byte unigram statistics).

    python benchmarks/lm_stability.py                    # the docs table
    python benchmarks/lm_stability.py --quick            # 1,600 windows, n = 4 only

Each run is a separate process (``python -m distgrad train``); the Markdown table goes
to stdout and the rows to ``--results`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [("sequential", 1, {}), ("diloco", 4, {}), ("adag", 4, {}), ("agn", 4, {}),
           ("diloco", 8, {}), ("adag", 8, {}), ("agn", 8, {})]
"""(algorithm, workers, --set parameters); every one at the same window (``--window``)."""


def run(algorithm: str, workers: int, params: dict[str, object], args: argparse.Namespace,
        out: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "distgrad", "train", "--engine", "sim", "--model", "gpt",
           "--dataset", "pystdlib", "--algorithm", algorithm, "--workers", str(workers),
           "--train-samples", str(args.train_samples), "--epochs", str(args.epochs),
           "--batch-size", "32", "--lr", "1e-3", "--inner-optimizer", "adam",
           "--threads", "1", "--seed", str(args.seed), "--eval-every", "1",
           "--no-batch-log", "--out", str(out), "--overwrite", "--quiet"]
    if algorithm != "sequential":
        cmd += ["--window", str(args.window)]
    for k, v in params.items():
        cmd += ["--set", f"{k}={v}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    s = json.loads((out / "summary.json").read_text())
    return {"algorithm": algorithm, "workers": workers, "window": s["window"],
            "test_perplexity": s["test_perplexity"], "test_accuracy": s["test_accuracy"],
            "commits": s["commits"], "diverged": s["diverged"], "samples": s["samples"],
            "host_seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict[str, object]]) -> str:
    base = next((r for r in rows if r["algorithm"] == "sequential"), None)
    lines = ["| algorithm | n | λ | test perplexity | vs 1 process | token accuracy | "
             "commits | diverged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = r["test_perplexity"]
        ratio = (f"{ppl / base['test_perplexity']:.2f}×" if base and ppl is not None
                 else "—")
        window = "—" if r["algorithm"] == "sequential" else r["window"]
        lines.append(f"| {r['algorithm']} | {r['workers']} | {window} | "
                     f"{'—' if ppl is None else f'{ppl:.2f}'} | {ratio} | "
                     f"{r['test_accuracy']:.3f} | {r['commits']} | "
                     f"{'yes' if r['diverged'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-samples", type=int, default=3200,
                   help="training windows of 64 bytes (default 3200: 205 KB, 100 steps of 32)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--window", type=int, default=10, help="λ of every distributed run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1,600 windows, n = 4 only")
    p.add_argument("--workers", default="1,4,8", help="the n of the table (default 1,4,8)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/lm_stability.jsonl"))
    args = p.parse_args(argv)
    wanted = {int(n) for n in args.workers.split(",")}
    configs = [c for c in CONFIGS if c[1] in wanted]
    if args.quick:
        args.train_samples = 1600
        configs = [c for c in configs if c[1] in (1, 4)]
    rows = []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (algorithm, workers, params) in enumerate(configs):
            row = run(algorithm, workers, params, args, Path(tmp) / f"run{i}")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            with args.results.open("a") as f:
                f.write(json.dumps({**row, "train_samples": args.train_samples,
                                    "epochs": args.epochs, "seed": args.seed}) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
