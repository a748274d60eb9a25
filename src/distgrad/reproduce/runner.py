"""Run an experiment's MNIST runs (each once: finished runs are reused) and read them back."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from distgrad.job import train
from distgrad.metrics.events import read_events
from distgrad.models import MLP, initialize
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


def execute_runs(exp: Experiment, scale: str, runs_dir: Path, *, engine: str = "sim",
                 log: Log = _stderr) -> None:
    """Train every run of ``exp`` at ``scale`` that ``runs_dir`` does not already hold."""
    setup = exp.setup(scale)
    specs = exp.run_specs(scale)
    for i, spec in enumerate(specs, 1):
        out = runs_dir / spec.dirname(setup, exp.seed)
        key = run_key(spec, setup, exp.seed, engine)
        marker = out / MARKER
        if marker.exists() and json.loads(marker.read_text()) == key:
            log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: reusing {out}")
            continue
        job = spec.job(setup, seed=exp.seed, engine=engine)
        log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: {job.algorithm} n={job.workers} "
            f"λ={job.window} {job.epochs} epoch(s) ...")
        start = time.perf_counter()
        model = build_model(spec.model_name(setup), exp.seed)
        marker.unlink(missing_ok=True)  # the marker goes back only once the run has finished
        # the run directory as `distgrad train --out` writes it, without the per-run plots:
        # the experiment's figures show the runs
        res = train(job, model=model, out=out, overwrite=True, figures=False)
        marker.write_text(json.dumps(key, indent=1) + "\n")
        acc = res.summary["test_accuracy"]
        log(f"[{exp.name} {i}/{len(specs)}] {spec.label}: test accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'}, {time.perf_counter() - start:.0f} s")


def load_runs(exp: Experiment, scale: str, runs_dir: Path) -> Results:
    """Read every run of ``exp`` at ``scale`` back from ``runs_dir``."""
    setup = exp.setup(scale)
    results = Results(experiment=exp, scale=scale)
    for spec in exp.run_specs(scale):
        path = runs_dir / spec.dirname(setup, exp.seed)
        summary_path = path / "summary.json"
        if not summary_path.exists():
            raise FileNotFoundError(f"run {spec.label!r} of {exp.name!r} is missing: "
                                    f"no {summary_path}")
        summary = json.loads(summary_path.read_text())
        results.runs[spec.label] = RunData(label=spec.label, spec=spec, summary=summary,
                                           events=read_events(path / "events.jsonl"),
                                           path=path)
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
