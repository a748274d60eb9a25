"""Helpers shared by the benchmark scripts: medians, tables, JSON output."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": torch.get_num_threads(), "platform": platform.platform()}


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The finished runs of a JSON-lines results file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_missing(run_one: Callable[[dict[str, Any]], dict[str, Any]],
                todo: list[dict[str, Any]], results: Path, jobs: int,
                describe: Callable[[dict[str, Any]], str]) -> None:
    """Run ``todo`` in ``jobs`` spawned processes, appending each finished row to
    ``results`` at once (an interrupted benchmark resumes where it stopped) and printing
    ``describe(row)`` as progress on stderr."""
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs) as pool, results.open("a") as f:
        for i, row in enumerate(pool.imap_unordered(run_one, todo), 1):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[{i}/{len(todo)} {time.perf_counter() - start:.0f}s] {describe(row)}",
                  file=sys.stderr, flush=True)
