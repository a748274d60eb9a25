"""Run an experiment's MNIST runs (each once: finished runs are reused) and read them back."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from distgrad.job import train
from distgrad.models import MLP, initialize
from distgrad.reproduce.archive import archive_run, read_events_any
from distgrad.reproduce.provenance import (
    METHOD,
    code_fingerprint,
    code_version,
    file_hashes,
    loaded_files,
    machine,
)
from distgrad.reproduce.spec import REPRO_MODELS, Experiment, Results, RunData, RunSpec, Setup

Log = Callable[[str], None]

MARKER = "reproduce.json"
"""Written into a run directory once the run has finished: what ran, to reuse it safely."""


def _stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def build_model(name: str, seed: int) -> nn.Module | None:
    """The module for a model name of :data:`REPRO_MODELS` (None: the thesis MLP by name)."""
    hidden = REPRO_MODELS[name]
    return None if hidden is None else initialize(MLP(hidden=hidden), seed)


def run_key(spec: RunSpec, setup: Setup, seed: int, engine: str) -> dict[str, Any]:
    """Everything that determines a run's result (compared before reusing a run)."""
    job = spec.job(setup, seed=seed, engine=engine)
    return {"job": json.loads(json.dumps(job.to_dict())), "model": spec.model_name(setup)}


def read_marker(out: Path) -> dict[str, Any] | None:
    """The marker of a finished run directory (None: no finished run there)."""
    marker = out / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def is_stale(marker: dict[str, Any]) -> bool:
    """Was the run made by code whose result-affecting source differs from this code's
    (over the files the run's process had loaded, or over every file for a run that did
    not list them; a run with no fingerprint is stale)?"""
    return marker.get("code_fingerprint") != this_fingerprint(marker)


def this_fingerprint(marker: dict[str, Any]) -> str:
    """This code's fingerprint over the files a run loaded, by the run's method."""
    return code_fingerprint(files=marker.get("code_files"),
                            method=marker.get("fingerprint_method", 1))


def this_code() -> dict[str, Any]:
    """What a marker records of the code that made a run (or a replay): the fingerprint of
    the result-affecting files this process loaded, its method, those files, the code
    version and the machine."""
    files = loaded_files()
    return {"code_fingerprint": code_fingerprint(files=files), "fingerprint_method": METHOD,
            "code_files": files, "code_version": code_version(), "machine": machine()}


def replay_matches(marker: dict[str, Any]) -> dict[str, Any] | None:
    """The replay recorded in a stale run's marker (:mod:`distgrad.reproduce.replay`) that
    was made by this code and found the run's events identical; None if there is none."""
    for r in reversed(marker.get("replays") or []):
        if r.get("identical") and r.get("code_fingerprint") == code_fingerprint(
                files=r.get("code_files"), method=r.get("fingerprint_method", 1)):
            return r
    return None


def execute_runs(exp: Experiment, scale: str, runs_dir: Path, *, engine: str = "sim",
                 log: Log = _stderr, reuse_stale: bool = False,
                 archive: Path | None = None) -> None:
    """Train every run of ``exp`` at ``scale`` that ``runs_dir`` (or ``archive``, compact
    copies) does not already hold, one after the other: an interrupted experiment resumes
    at its first unfinished run.

    A finished run of the same job is reused; one made by code with another
    :func:`~distgrad.reproduce.provenance.code_fingerprint` is stale and is run again,
    unless ``reuse_stale`` (then the report marks it stale). With ``archive``, every run
    finished here is also copied there in compact form."""
    file_hashes(), code_version()  # taken now, once: this code, not later edits
    setup = exp.setup(scale)
    specs = exp.run_specs(scale)
    for i, spec in enumerate(specs, 1):
        out = runs_dir / spec.dirname(setup, exp.seed)
        key = run_key(spec, setup, exp.seed, engine)
        saved = read_marker(out)
        if saved is None and archive is not None:
            saved = read_marker(archive / out.name)
            out_shown = archive / out.name
        else:
            out_shown = out
        if saved is not None and {k: saved.get(k) for k in key} == key:
            if not is_stale(saved):
                log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: reusing {out_shown}")
                continue
            if reuse_stale:
                log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: reusing {out_shown} although it "
                    f"is STALE (made by code {saved.get('code_version')}, fingerprint "
                    f"{saved.get('code_fingerprint')}; this code: "
                    f"{this_fingerprint(saved)})")
                continue
            log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: {out} is stale (code changed "
                f"since it ran: fingerprint {saved.get('code_fingerprint')} -> "
                f"{this_fingerprint(saved)}); running it again")
        if not _claim(out):
            log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: another process is running "
                f"{out}; skipping it")
            continue
        try:
            _train_one(exp, spec, setup, engine, out, key, archive, log, f"{i}/{len(specs)}")
        finally:
            (out / LOCK).unlink(missing_ok=True)


LOCK = ".running"
"""A run directory's lock file (the pid of the process training it): two ``reproduce``
processes sharing a runs directory never train the same run at once."""


def _claim(out: Path) -> bool:
    """Take ``out``'s lock; False if a live process holds it (a dead holder's is taken)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # its holder died: take it over
                continue
            except PermissionError:
                return False
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _train_one(exp: Experiment, spec: RunSpec, setup: Setup, engine: str, out: Path,
               key: dict[str, Any], archive: Path | None, log: Log, pos: str) -> None:
    """Train one run into ``out`` and mark it finished (and archive it)."""
    marker = out / MARKER
    job = spec.job(setup, seed=exp.seed, engine=engine)
    log(f"[{exp.name} {pos}] {spec.label}: {job.algorithm} n={job.workers} "
        f"λ={job.window} {job.epochs} epoch(s) ...")
    start = time.perf_counter()
    model = build_model(spec.model_name(setup), exp.seed)
    marker.unlink(missing_ok=True)  # the marker goes back only once the run has finished
    # the run directory as `distgrad train --out` writes it, without the per-run plots:
    # the experiment's figures show the runs
    res = train(job, model=model, out=out, overwrite=True, figures=False)
    marker.write_text(json.dumps({**key, **this_code(),
                                  "compute_seconds": time.perf_counter() - start},
                                 indent=1) + "\n")
    if archive is not None:
        archive_run(out, archive / out.name)
    acc = res.summary["test_accuracy"]
    log(f"[{exp.name} {pos}] {spec.label}: test accuracy "
        f"{'n/a' if acc is None else f'{acc:.4f}'}, {time.perf_counter() - start:.0f} s")


def export_runs(exp: Experiment, scale: str, runs_dir: Path, archive: Path) -> list[Path]:
    """Write compact copies (:mod:`distgrad.reproduce.archive`) of ``exp``'s finished runs
    at ``scale`` into ``archive``; return the directories written."""
    setup = exp.setup(scale)
    written = []
    for spec in exp.run_specs(scale):
        path = runs_dir / spec.dirname(setup, exp.seed)
        if read_marker(path) is not None and (path / "events.jsonl").exists():
            written.append(archive_run(path, archive / path.name))
    return written


def load_runs(exp: Experiment, scale: str, runs_dir: Path, *,
              allow_missing: bool = False, archive: Path | None = None) -> Results:
    """Read every run of ``exp`` at ``scale`` back from ``runs_dir``, or from its compact
    copy in ``archive`` (``allow_missing``: skip runs not finished yet and list their
    labels in ``results.data["missing"]``)."""
    setup = exp.setup(scale)
    results = Results(experiment=exp, scale=scale)
    for spec in exp.run_specs(scale):
        path = runs_dir / spec.dirname(setup, exp.seed)
        if read_marker(path) is None and archive is not None and \
                read_marker(archive / path.name) is not None:
            path = archive / path.name
        summary_path = path / "summary.json"
        if not summary_path.exists() or read_marker(path) is None:
            if allow_missing:
                results.data.setdefault("missing", []).append(spec.label)
                continue
            raise FileNotFoundError(f"run {spec.label!r} of {exp.name!r} is missing: "
                                    f"no finished run in {path}")
        summary = json.loads(summary_path.read_text())
        saved = read_marker(path)
        assert saved is not None  # checked above
        stale = is_stale(saved)
        replay = replay_matches(saved) if stale else None
        results.runs[spec.label] = RunData(label=spec.label, spec=spec, summary=summary,
                                           events=read_events_any(path),
                                           path=path, stale=stale,
                                           replayed=replay["epochs"] if replay else None,
                                           machine=saved.get("machine"))
        results.wall_seconds += float(summary.get("wall_seconds") or 0.0)
    return results


def train_command(spec: RunSpec, setup: Setup, seed: int, engine: str) -> str | None:
    """The ``distgrad train`` command of one run (None when its model has no CLI name)."""
    if spec.model_name(setup) != "mlp":
        return None
    job = spec.job(setup, seed=seed, engine=engine)
    parts = ["distgrad train", f"--algorithm {job.algorithm}", f"--engine {engine}",
             f"--workers {job.workers}", f"--window {job.window}", f"--epochs {job.epochs}",
             f"--batch-size {job.batch_size}", f"--lr {job.lr:g}",
             f"--inner-optimizer {job.inner_optimizer}", f"--seed {seed}",
             f"--eval-every {job.eval_every:g}"]
    if job.train_samples:
        parts.append(f"--train-samples {job.train_samples}")
    parts += [f"--set {k}={_cli_value(v)}" for k, v in spec.params]
    if job.timing.model != "lognormal":
        parts.append(f"--timing {job.timing.model}")
    if not job.track_distance:
        parts.append("--no-distance")
    if not job.record_batches:
        parts.append("--no-batch-log")
    parts.append("--out DIR")
    return " ".join(parts)


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
