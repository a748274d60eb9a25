"""Compact copies of finished runs, small enough to commit, that rebuild a report.

A run directory holds ``events.jsonl`` (every mini-batch, commit and evaluation: tens of
MB for a 40-epoch run), ``summary.json`` and the marker ``reproduce.json``. An archive
keeps, per run, the summary, the marker and ``events.jsonl.gz``: the events with the
fields the claims and figures read, floats rounded to 5 significant digits, gzipped
(about 1/20 of the original). :func:`distgrad.reproduce.runner.load_runs` reads a run from
the archive when the runs directory does not hold it, so ``distgrad reproduce ...
--archive DIR --available-only`` rebuilds the page from committed results without
training anything.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path
from typing import Any

EVENTS_GZ = "events.jsonl.gz"

#: the fields each event type keeps (the claims, tables and figures read no others)
KEEP = {
    "batch": ("t", "worker", "loss", "acc"),
    "commit": ("t", "worker", "version", "base_version", "staleness", "distance", "steps",
               "samples", "scale"),
    "round": ("t", "version", "workers", "steps", "samples"),
    "eval": ("t", "version", "samples", "test_loss", "test_acc"),
    "pull": ("t", "worker", "version"),
}


def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v) and v != 0.0:
        return float(f"{v:.5g}")
    return v


def compact_event(e: dict[str, Any]) -> dict[str, Any]:
    """The archived form of an event (other types than :data:`KEEP`'s keep every field)."""
    kind = e.get("type")
    keys = KEEP.get(kind)  # type: ignore[arg-type]
    out = {"type": kind}
    for k, v in e.items():
        if k != "type" and (keys is None or k in keys) and v is not None:
            out[k] = _round(v)
    return out


def archive_run(run_dir: Path, dest: Path) -> Path:
    """Write the compact copy of the finished run in ``run_dir`` to ``dest`` (a directory
    named like the run); return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "reproduce.json", "config.json"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, dest / name)
    with (run_dir / "events.jsonl").open() as src, \
            gzip.open(dest / EVENTS_GZ, "wt", compresslevel=9) as out:
        for line in src:
            if line.strip():
                out.write(json.dumps(compact_event(json.loads(line)),
                                     separators=(",", ":")) + "\n")
    return dest


def read_events_any(run_dir: Path) -> list[dict[str, Any]]:
    """The events of a run directory or of its archived copy."""
    plain = run_dir / "events.jsonl"
    if plain.exists():
        with plain.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    with gzip.open(run_dir / EVENTS_GZ, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]
