"""The run lifecycle, written once: prepare -> execute -> finalize.

Every way of training goes through it — :func:`distgrad.train`, ``distgrad train`` /
``serve`` (which call ``train``), :meth:`distgrad.spark.SparkTrainer.fit` and
``distgrad reproduce`` — so a run directory, an evaluation schedule and a summary mean
the same thing everywhere:

* :meth:`Run.prepare` builds the server (restoring a checkpoint when resuming), the
  event recorder, the evaluation schedule and writes ``config.json``;
* :meth:`Run.execute` hands them to an engine and measures the wall time (Ctrl-C
  ends the run as ``interrupted``, still finalized);
* :meth:`Run.finalize` evaluates the final center (test and training set), writes
  ``summary.json`` and the figures, and returns the :class:`TrainResult`.

:func:`resolve_job` turns ``train``'s arguments (a job, job fields, ``replay=DIR`` or
``resume=DIR``) into the job to run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distgrad.algorithms.base import AlgorithmConfig
from distgrad.data import Dataset
from distgrad.engines.timing import Timing
from distgrad.errors import ConfigError
from distgrad.metrics.evaluate import Evaluator
from distgrad.metrics.events import Recorder, read_events
from distgrad.metrics.schedule import EvalSchedule
from distgrad.parts import Job, RunParts
from distgrad.rundir import (
    CHECKPOINT,
    CONFIG,
    EVENTS,
    SUMMARY,
    read_checkpoint,
    read_run_config,
    truncate_lines,
    write_json,
)
from distgrad.server import ParameterServer

Progress = Callable[[int, int], None]


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary fields, the trained model and the event log."""

    summary: dict[str, Any]
    model: nn.Module
    events: list[dict[str, Any]]
    out: Path | None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["summary"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Outcome:
    """How :meth:`Run.execute` ended: the engine's clock, wall seconds, and ``completed``
    or ``interrupted``."""

    end_t: float
    wall: float
    status: str


# --------------------------------------------------------------------------- job resolution


def resolve_job(job: Job | None, job_fields: Mapping[str, Any], *,
                replay: str | Path | None = None, resume: str | Path | None = None
                ) -> tuple[Job, dict[str, Any] | None, list[tuple[str, int]] | None]:
    """The job to run, and the checkpoint (``resume``) or commit schedule (``replay``)."""
    if resume is not None:
        if job is not None or job_fields or replay is not None:
            raise ConfigError("resume continues the job recorded in its directory; "
                              "pass no other job settings")
        job, snapshot = load_resume(Path(resume))
        return job, snapshot, None
    if replay is not None:
        if job is not None or job_fields:
            raise ConfigError("replay runs the job recorded in its directory; "
                              "pass no other job settings")
        job, schedule = load_replay(Path(replay))
        return job, None, schedule
    if job is None:
        return Job(**job_fields), None, None
    return (replace(job, **job_fields) if job_fields else job), None, None


def load_resume(run_dir: Path) -> tuple[Job, dict[str, Any]]:
    """The job recorded in ``run_dir`` and its last checkpoint (local and sim runs)."""
    job = Job.from_dict(read_run_config(run_dir))
    ckpt = run_dir / CHECKPOINT
    if job.engine not in ("local", "sim"):
        raise ConfigError(f"only local- and sim-engine runs can be resumed; "
                          f"{str(run_dir)!r} ran on {job.engine!r}")
    if not ckpt.exists():
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint.pt (run it with "
                          "--checkpoint-every SECONDS)")
    return job, read_checkpoint(ckpt)


def load_replay(run_dir: Path) -> tuple[Job, list[tuple[str, int]]]:
    """The job recorded in ``run_dir`` moved to the local engine (with the recorded thread
    count), and its order of initial pulls and commits."""
    from distgrad.protocol.core import replay_schedule

    config = read_run_config(run_dir)
    events_path = run_dir / EVENTS
    if not events_path.exists():
        raise ConfigError(f"{str(run_dir)!r} has no events.jsonl to replay")
    recorded = Job.from_dict(config)
    job = replace(recorded, engine="local", timing=Timing(),
                  threads=int(config.get("threads_used") or 1))
    return job, replay_schedule(read_events(events_path))


# --------------------------------------------------------------------------- the run


class Run:
    """One run of a job: its server, recorder and evaluation schedule, and where it writes.

    Build it with :meth:`prepare`; then :meth:`execute` and :meth:`finalize`.
    """

    def __init__(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
                 out: Path | None, eval_x: torch.Tensor, eval_y: torch.Tensor,
                 total_samples: int) -> None:
        self.parts = parts
        self.job = parts.job
        self.server = server
        self.recorder = recorder
        self.out = out
        self.eval_x, self.eval_y = eval_x, eval_y
        self.total_samples = total_samples
        self.evaluator = Evaluator(parts.template, parts.loss_fn)
        self.evals = EvalSchedule(1, self.evaluate)  # replaced by prepare
        self.threads_used = self.job.threads or (
            1 if self.job.engine == "local" else torch.get_num_threads())

    # ------------------------------------------------------------------ prepare
    @classmethod
    def prepare(cls, parts: RunParts, *, out: Path | None = None,
                progress: Progress | None = None, snapshot: dict[str, Any] | None = None,
                replay_of: str | Path | None = None, epoch_samples: int | None = None,
                eval_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Run:
        """Build the server, recorder and evaluation schedule of ``parts`` and write
        ``out/config.json`` (``out`` already checked by :func:`distgrad.rundir.prepare_out`).

        ``snapshot`` resumes from a checkpoint (the events after it are undone).
        ``epoch_samples`` is the size of one epoch where the shards do not hold the data
        (Spark); ``eval_data`` the ``(X, y)`` the center is evaluated on (default: the
        dataset's test set).
        """
        job = parts.job
        server = parts.make_server()
        if snapshot is not None:
            # no worker waits at a gate after a resume (a whole local checkpoint is taken
            # with every worker between steps; an older one restarts them with fresh pulls)
            server.load_state_dict({**snapshot["server"], "held": []})
        per_epoch = (epoch_samples if epoch_samples is not None
                     else len(parts.dataset.y_train))
        total = (job.epochs * epoch_samples if epoch_samples is not None
                 else parts.total_samples())
        done = [int(snapshot["samples"]) if snapshot else 0]

        def on_batch(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        events_path = out / EVENTS if out is not None else None
        if snapshot is not None and events_path is not None:
            truncate_lines(events_path, int(snapshot["events"]))
        recorder = Recorder(events_path, record_batches=job.record_batches, on_batch=on_batch,
                            append=snapshot is not None)
        if snapshot is not None:
            if events_path is not None:
                recorder.events = read_events(events_path)
            recorder.samples = int(snapshot["samples"])
            recorder.samples_committed = int(snapshot["samples_committed"])
            recorder.commits = int(snapshot["commits"])
            recorder.bytes_committed = int(snapshot.get("bytes_committed", 0))
            recorder.note(float(snapshot["t"]), "resume", version=server.version,
                          center_sha256=server.params_sha256())
        x, y = eval_data if eval_data is not None else (parts.dataset.x_test,
                                                        parts.dataset.y_test)
        run = cls(parts, server, recorder, out, x, y, total)
        run.evals = EvalSchedule(max(1, int(job.eval_every * per_epoch)), run.evaluate)
        if snapshot is not None:
            run.evals.skip_to(recorder.samples_committed)
        if out is not None and snapshot is None:
            write_json(out / CONFIG, {**job.to_dict(), "parameters": len(server.center),
                                      "samples_total": total,
                                      "threads_used": run.threads_used,
                                      "replay_of": str(replay_of) if replay_of else None})
        return run

    def evaluate(self, t: float, version: int, vectors: list[torch.Tensor] | None = None,
                 samples: int | None = None) -> None:
        """Evaluate the center (or ``vectors``, a snapshot) and record an ``eval`` event."""
        m = self.evaluator.evaluate(vectors if vectors is not None else self.server.models(),
                                    self.eval_x, self.eval_y)
        self.recorder.evaluation(t, version, {"test_loss": m["loss"], "test_acc": m["acc"]},
                                 samples=samples)

    # ------------------------------------------------------------------ execute
    def execute(self, engine: Any, run: Callable[[], float] | None = None) -> Outcome:
        """Run ``engine`` (``engine.run(parts, server, recorder, evals)``, or ``run()`` for
        engines with another entry point); Ctrl-C ends the run as ``interrupted``."""
        start = time.perf_counter()
        status = "completed"
        try:
            if run is not None:
                end_t = run()
            else:
                end_t = engine.run(self.parts, self.server, self.recorder, self.evals)
        except KeyboardInterrupt:
            status = "interrupted"
            end_t = engine.now
        return Outcome(end_t=end_t, wall=time.perf_counter() - start, status=status)

    # ------------------------------------------------------------------ finalize
    def finalize(self, outcome: Outcome, *,
                 train_metrics: Callable[[nn.Module], Mapping[str, float | None]] | None = None,
                 extra: Mapping[str, Any] | None = None, figures: bool = True) -> TrainResult:
        """Evaluate the final center, write ``summary.json`` (and the figures) and return the
        result; re-raise an interruption once the partial run is written.

        ``train_metrics(model)`` gives ``{"acc", "loss"}`` on the training data (default:
        the center evaluated on the dataset's training set). ``extra`` joins the summary.
        """
        job, server, recorder = self.job, self.server, self.recorder
        evals_done = recorder.of_type("eval")
        if not evals_done or evals_done[-1]["version"] != server.version:
            self.evaluate(outcome.end_t, server.version)
        final_test = recorder.of_type("eval")[-1]
        vectors = server.models()
        template = self.parts.template
        trained = (model_with(template, vectors[0]) if len(vectors) == 1
                   else Ensemble([model_with(template, v) for v in vectors]))
        if train_metrics is None:
            train_m = dict(self.evaluator.evaluate(vectors, self.parts.dataset.x_train,
                                                   self.parts.dataset.y_train))
        else:
            train_m = dict(train_metrics(trained))
        recorder.close()
        # the engine's clock (real time, continued across a resume); sim: the host's time
        wall = outcome.wall if job.engine == "sim" else outcome.end_t
        summary = summarize(job, self.parts.config, recorder, server, final_test, train_m,
                            wall, outcome.end_t, self.parts.dataset, outcome.status)
        summary["threads"] = self.threads_used
        summary.update(extra or {})
        if self.out is not None:
            write_json(self.out / SUMMARY, summary)
            if figures:
                from distgrad.report.plots import write_plots

                write_plots(recorder.events, self.out,
                            title=f"{job.algorithm}, n={job.workers}")
        if outcome.status == "interrupted":
            raise KeyboardInterrupt(f"interrupted; partial run written to {self.out}")
        return TrainResult(summary=summary, model=trained, events=recorder.events, out=self.out)


# --------------------------------------------------------------------------- the trained model


class Ensemble(nn.Module):
    """Averages the softmax outputs of its members (the trained model of ``ensemble``)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([F.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-30))


def model_with(template: nn.Module, vector: torch.Tensor) -> nn.Module:
    """A copy of ``template`` holding the flat parameter ``vector`` (aliasing nothing)."""
    m = copy.deepcopy(template)
    trainable = [p for p in m.parameters() if p.requires_grad]
    torch.nn.utils.vector_to_parameters(vector.detach().clone(), trainable)
    # vector_to_parameters makes the parameters views of its argument; give each
    # parameter storage of its own so the returned model aliases nothing.
    for p in trainable:
        p.data = p.data.clone()
    return m


# --------------------------------------------------------------------------- summary


def summarize(job: Job, config: AlgorithmConfig, rec: Recorder, server: ParameterServer,
              final_test: Mapping[str, Any], train_m: Mapping[str, float | None], wall: float,
              end_t: float, dataset: Dataset, status: str) -> dict[str, Any]:
    """``summary.json``: the job, counts, staleness, final accuracies, the center's hash."""
    commits = rec.of_type("commit")
    stal = np.array([c["staleness"] for c in commits], dtype=float)
    dist = np.array([c["distance"] for c in commits if c.get("distance") is not None])
    scales = np.array([c["scale"] for c in commits if c.get("scale") is not None])
    faults = rec.of_type("fault")
    last = list(rec.last_batch.values())
    test_loss = final_test.get("test_loss")
    test_acc = final_test.get("test_acc")
    chance = 1.0 / dataset.classes
    diverged = test_loss is None or not math.isfinite(test_loss) or (
        test_acc is not None and test_acc <= 2 * chance)

    def fin(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    return {
        "status": status,
        "algorithm": job.algorithm,
        "engine": job.engine,
        "workers": job.workers,
        "window": config.window,
        "seed": job.seed,
        "epochs": job.epochs,
        "batch_size": job.batch_size,
        "lr": job.lr,
        "inner_optimizer": job.inner_optimizer,
        "dataset": dataset.name,
        "model": job.model,
        "hyperparameters": config.to_dict(),
        "samples": rec.samples,
        "commits": rec.commits,
        "versions": server.version,
        "wall_seconds": wall,
        "virtual_seconds": end_t if job.engine == "sim" else None,
        "samples_per_second": rec.samples / wall if wall > 0 else None,
        "staleness_mean": float(stal.mean()) if len(stal) else 0.0,
        "staleness_max": int(stal.max()) if len(stal) else 0,
        "distance_mean": float(dist.mean()) if len(dist) else None,
        "scale_mean": float(scales.mean()) if len(scales) else None,
        "test_accuracy": test_acc,
        "test_loss": fin(test_loss),
        "train_accuracy": train_m["acc"],
        "train_loss": fin(train_m["loss"]),
        "last_batch_train_accuracy": (
            float(np.mean([s.correct / s.samples for s in last])) if last else None),
        "last_batch_train_accuracy_note": (
            "the thesis' 'training accuracy': mean over workers of each worker's last "
            "mini-batch accuracy, not an evaluation of the center"),
        "diverged": bool(diverged),
        "faults": len(faults),
        "samples_lost": int(sum(f["samples_lost"] for f in faults)),
        "compression": job.compression,
        "bytes_committed": rec.bytes_committed,
        "bytes_per_commit": rec.bytes_committed / rec.commits if rec.commits else None,
        "inner_options": job.effective_inner_options(),
        "params_sha256": server.params_sha256(),
        "parameters": len(server.center),
    }
