"""A training job and :func:`train`, which runs it.

``train`` resolves the job (fields, ``replay=DIR`` or ``resume=DIR``), builds its parts
(:func:`distgrad.parts.build_parts`: data, shards, model), picks the engine and hands
everything to the run lifecycle (:mod:`distgrad.run`), which writes the run directory
(``config.json``, ``events.jsonl``, ``summary.json``, plots).

The job itself lives in :mod:`distgrad.parts` (below the engines, which use it) and
is re-exported here, with the lifecycle's result types.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from distgrad.engines import make_engine
from distgrad.engines.options import ENGINES, EngineOptions, LocalOptions, SimOptions
from distgrad.errors import ConfigError
from distgrad.models import MODELS
from distgrad.parts import (
    DEVICES,
    Job,
    RunParts,
    _as_tensors,  # noqa: F401
    build_parts,
    check_same_identity,
    worker_seed,
)
from distgrad.replica import LossFn
from distgrad.run import Ensemble as _Ensemble  # noqa: F401
from distgrad.run import Run, TrainResult, resolve_job
from distgrad.run import load_replay as _load_replay  # noqa: F401
from distgrad.run import load_resume as _load_resume  # noqa: F401
from distgrad.run import model_with as _model_with  # noqa: F401
from distgrad.run import summarize as _summarize  # noqa: F401
from distgrad.rundir import CHECKPOINT, prepare_out, read_run_config
from distgrad.rundir import prepare_out as _prepare_out  # noqa: F401
from distgrad.rundir import read_run_config as _read_run_config  # noqa: F401
from distgrad.rundir import truncate_lines as _truncate_lines  # noqa: F401
from distgrad.rundir import write_json as _write_json  # noqa: F401

# The `noqa: F401` names above are the old private names of this module, kept for callers
# of the earlier layout (scripts, notebooks); new code imports them from parts/run/rundir.

__all__ = ["DEVICES", "ENGINES", "Job", "RunParts", "TrainResult", "known_models", "train",
           "worker_seed"]


def train(
    job: Job | None = None,
    *,
    model: nn.Module | str | None = None,
    data: Any = None,
    test_data: Any = None,
    loss_fn: LossFn | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | bool | None = None,
    replay: str | Path | None = None,
    resume: str | Path | None = None,
    engine: str | Any = None,
    options: EngineOptions | None = None,
    figures: bool = True,
    **job_fields: Any,
) -> TrainResult:
    """Train and return a :class:`TrainResult` (summary fields as attributes, ``.model``).

    Either pass a :class:`Job` or its fields as keywords::

        distgrad.train(algorithm="adag", workers=8, window=10, epochs=3, seed=1)

    ``model`` (a name, an import path ``"pkg.module:factory"``, or any ``nn.Module``,
    used with its initial weights), ``data``/``test_data`` (``(X, y)`` tensors or arrays,
    a torch ``Dataset`` or ``DataLoader``; ``test_data`` is optional) and ``loss_fn``
    (default: cross-entropy for integer labels, MSE for float targets) replace the
    named model and dataset. Objects passed here stay in this process (``sim``) or are
    pickled to ``local`` worker processes, Ray and Spark; ``net`` workers and other hosts
    rebuild the model and data from import paths only (``model="pkg.module:factory"``,
    ``dataset="pkg.module:factory"``, with ``model_args``/``data_args``). The inputs are
    checked before training (a ConfigError names the problem).
    ``out`` is the run directory to write. ``progress`` is ``True`` (a tqdm bar on
    stderr) or called as ``progress(samples_done, samples_total)``. ``engine`` is an
    engine name or an engine instance configured beyond the job (e.g.
    ``RayEngine(address="auto")``); by default the job's ``engine`` name is built from
    ``options``, the engine's options dataclass (:mod:`distgrad.engines.options`, e.g.
    ``RayOptions(address="auto")``; default: its defaults). ``figures=False`` writes
    no plots into ``out``.

    ``replay=DIR`` runs the job recorded in DIR on the ``local`` engine, applying
    initial pulls and commits in the recorded order (and with the recorded torch
    thread count), which reproduces the recorded parameters bit for bit.
    ``resume=DIR`` continues the ``local`` run in DIR from its last checkpoint. Both
    refuse another model or other data than the run recorded (its ``config.json`` holds
    the model's class and parameter count and the data's fingerprint); a run trained on
    objects (``model=``, ``data=``) needs the same objects passed again.
    """
    if isinstance(model, str):
        job_fields["model"] = model
        model = None
    if isinstance(engine, str):
        job_fields["engine"] = engine
        engine = None
    job, snapshot, schedule = resolve_job(job, job_fields, replay=replay, resume=resume)
    if resume is not None:
        out, overwrite = resume, True
    if isinstance(options, LocalOptions | SimOptions):
        job = job.with_options(options)  # local/sim settings are still job fields
        options = None
    parts = build_parts(job, model=model, data=data, test_data=test_data, loss_fn=loss_fn)
    job = parts.job  # with the engine settings build_parts chose (sim: threads)
    recorded_dir = resume if resume is not None else replay
    if recorded_dir is not None:
        check_same_identity(read_run_config(Path(recorded_dir)), parts.identity,
                            str(recorded_dir))
    out_dir = prepare_out(out, overwrite)
    if engine is None:
        engine = make_engine(job, options=options, replay=schedule, resume=snapshot,
                             checkpoint_path=(out_dir / CHECKPOINT
                                              if out_dir is not None and job.checkpoint_every
                                              else None))
    elif getattr(engine, "name", None) != job.engine:
        raise ConfigError(f"engine instance {getattr(engine, 'name', engine)!r} does not "
                          f"match job.engine={job.engine!r}")
    elif options is not None:
        raise ConfigError("pass either an engine instance or options, not both")
    bar = None
    if progress is True:
        progress, bar = progress_bar(f"{job.algorithm} n={job.workers}")
    elif progress is False:
        progress = None
    try:
        run = Run.prepare(parts, out=out_dir, progress=progress, snapshot=snapshot,
                          replay_of=replay, epoch_samples=parts.epoch_samples())
        outcome = run.execute(engine)
        extra = {"model": type(model).__name__} if model is not None else {}
        train_metrics = None
        if parts.streams is not None:  # the training data is nowhere in one piece
            extra["train_note"] = ("per-worker streams: train_loss is the mean of the "
                                   "workers' last mini-batch losses")

            def train_metrics(_: nn.Module) -> dict[str, float | None]:
                last = [s.loss for s in run.recorder.last_batch.values()]
                return {"acc": None, "loss": sum(last) / len(last) if last else None}

        return run.finalize(outcome, extra=extra, figures=figures,
                            train_metrics=train_metrics)
    finally:
        if bar is not None:
            bar.close()


def progress_bar(label: str) -> tuple[Callable[[int, int], None], Any]:
    """A tqdm bar on stderr and the ``progress(done, total)`` callback that moves it."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=None, unit="sample", unit_scale=True, dynamic_ncols=True,
               mininterval=1.0, desc=label, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar.total is None:
            bar.total = total
        bar.update(done - bar.n)

    return progress, bar


def known_models() -> list[str]:
    return sorted(MODELS)
