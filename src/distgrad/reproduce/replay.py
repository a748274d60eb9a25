"""Checking a stale run without training it again: replay its first epochs at this code and
compare the events.

A run is *stale* when a file it loaded has changed since it ran (:mod:`~distgrad.reproduce.
provenance`); the change may or may not touch what the run computed. The simulator is
deterministic for a seed, so this code, trained on the same job for a few epochs, gives the
stale run's own events over those epochs exactly when the change did not touch them.
:func:`replay_stale` does that for every stale run of an experiment and writes the outcome
into the run's marker (``replays``); a report then says "replayed identically" beside the
run. It is evidence about the epochs replayed, not a proof about the rest of the run: the
page says how many epochs were compared, and only a rerun makes a stale run fresh.

Where the comparison stops: a replay of E epochs ends where the run went on, so from the
moment one of the replay's workers reaches the end of its data (its last mini-batch, which
may be short, and its last commit, which may be a partial window) the two may part. Every
event before the earliest worker's last mini-batch is compared (its last commit, for runs
recorded without mini-batches), as archived (:func:`~distgrad.reproduce.archive.
compact_event`). A replay doubles its epochs until each worker has committed at least
:data:`MIN_COMMITS` times before that point.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from distgrad.job import train
from distgrad.reproduce.archive import compact_event, read_events_any
from distgrad.reproduce.provenance import code_version, file_hashes
from distgrad.reproduce.runner import (
    MARKER,
    Log,
    _stderr,
    build_model,
    is_stale,
    read_marker,
    replay_matches,
    this_code,
)
from distgrad.reproduce.spec import Experiment

MIN_COMMITS = 2
"""Commits every worker makes inside the compared prefix of a replay."""


def compare_prefix(replay: list[dict[str, Any]], saved: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    """Compare a replay's events with a run's over the replay's clean prefix (before its
    first worker's last mini-batch): ``{"identical", "events", "until", "min_commits",
    "difference"}``, the last the first differing event of each side (by time) or None."""
    replay = [compact_event(e) for e in replay]
    saved = [compact_event(e) for e in saved]
    # where the replay's data ends: each worker's last mini-batch, which may be a short one
    # (runs recorded without mini-batches: its last commit); the earliest ends the comparison
    kind = "batch" if any(e["type"] == "batch" for e in replay) else "commit"
    last: dict[int, float] = {}
    for e in replay:
        if e["type"] == kind:
            last[e["worker"]] = max(last.get(e["worker"], e["t"]), e["t"])
    until = min(last.values()) if last else 0.0

    def prefix(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        head = [e for e in events if isinstance(e.get("t"), float | int) and e["t"] < until]
        return sorted(head, key=lambda e: (e["t"], json.dumps(e, sort_keys=True)))

    a, b = prefix(replay), prefix(saved)
    commits = Counter(e["worker"] for e in a if e["type"] == "commit")
    difference = None
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
        difference = {"replay": a[i] if i < len(a) else None,
                      "run": b[i] if i < len(b) else None}
    return {"identical": difference is None, "events": len(a), "until": until,
            "min_commits": min(commits.get(k, 0) for k in last) if last else 0,
            "difference": difference}


def _replay_one(exp: Experiment, spec: Any, setup: Any, path: Path, scratch: Path
                ) -> dict[str, Any]:
    """Replay one run, doubling its epochs until the prefix holds enough commits."""
    job = spec.job(setup, seed=exp.seed, engine="sim")
    saved = read_events_any(path)
    out, epochs, start = scratch / path.name, 1, time.perf_counter()
    while True:
        train(dataclasses.replace(job, epochs=epochs),
              model=build_model(spec.model_name(setup), exp.seed), out=out, overwrite=True,
              figures=False)
        with (out / "events.jsonl").open() as f:
            mine = [json.loads(line) for line in f if line.strip()]
        result = compare_prefix(mine, saved)
        if result["min_commits"] >= MIN_COMMITS or epochs >= job.epochs \
                or not result["identical"]:
            break
        epochs = min(2 * epochs, job.epochs)
    shutil.rmtree(out, ignore_errors=True)
    return {"identical": result["identical"], "epochs": epochs,
            "events_compared": result["events"], "until_t": result["until"],
            "min_commits_per_worker": result["min_commits"],
            "first_difference": result["difference"], **this_code(),
            "compute_seconds": time.perf_counter() - start}  # every try, the shorter too


def replay_stale(exp: Experiment, scale: str, runs_dir: Path, *,
                 archive: Path | None = None, log: Log = _stderr) -> list[dict[str, Any]]:
    """Replay every finished, stale run of ``exp`` at ``scale`` (in ``runs_dir`` or
    ``archive``) that has no replay at this code yet; write each outcome into the run's
    marker, in both places it is kept. Returns the outcomes (label and replay record)."""
    if exp.execute is not None:
        return []  # a simulation of its own: no runs to replay
    file_hashes(), code_version()  # taken now, once: this code, not later edits
    setup = exp.setup(scale)
    specs = exp.run_specs(scale)
    done = []
    for i, spec in enumerate(specs, 1):
        name = spec.dirname(setup, exp.seed)
        places = [p for p in (runs_dir / name, archive / name if archive else None)
                  if p is not None and read_marker(p) is not None]
        tag = f"[{exp.name} {i}/{len(specs)}] {spec.label}"
        if not places:
            log(f"{tag}: not finished; nothing to replay")
            continue
        marker = read_marker(places[0])
        assert marker is not None
        if not is_stale(marker):
            log(f"{tag}: made by this code; nothing to replay")
            continue
        if replay_matches(marker):
            log(f"{tag}: already replayed identically at this code")
            continue
        log(f"{tag}: stale (made by code {marker.get('code_version')}); replaying ...")
        record = _replay_one(exp, spec, setup, places[0], runs_dir / ".replay")
        for place in places:
            m = read_marker(place)
            assert m is not None
            m["replays"] = [*m.get("replays", []), record]
            (place / MARKER).write_text(json.dumps(m, indent=1) + "\n")
        verdict = ("identical" if record["identical"] else
                   f"DIFFERENT (first difference: {record['first_difference']})")
        log(f"{tag}: {record['epochs']} epoch(s) replayed, {record['events_compared']} events "
            f"before t = {record['until_t']:.4g} compared: {verdict}, "
            f"{record['compute_seconds']:.0f} s")
        done.append({"label": spec.label, **record})
    return done
