"""The run lifecycle, written once: prepare -> execute -> finalize.

Every way of training goes through it — :func:`distgrad.train`, ``distgrad train`` /
``serve`` (which call ``train``), :meth:`distgrad.spark.SparkTrainer.fit` and
``distgrad reproduce`` — so a run directory, an evaluation schedule and a summary mean
the same thing everywhere:

* :meth:`Run.prepare` builds the server (restoring a checkpoint when resuming), the
  event recorder, the evaluation schedule and writes ``config.json``;
* :meth:`Run.execute` hands them to an engine and measures the wall time (SIGINT or
  SIGTERM ends the run as ``interrupted`` — the ``local`` engine first writes a final
  checkpoint into the run directory —, an engine's error as ``failed``; both are still
  finalized);
* :meth:`Run.finalize` evaluates the final center (test and training set), writes
  ``summary.json`` and the figures, and returns the :class:`TrainResult`; a run in which
  every worker died or nothing was committed is ``failed`` (:class:`RunFailed`).

Faults and failed checkpoints are logged (logger ``distgrad.run``, WARNING) as they
happen, one line each; the CLI prints them above its progress bar.

:func:`resolve_job` turns ``train``'s arguments (a job, job fields, ``replay=DIR`` or
``resume=DIR``) into the job to run.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import threading
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
from distgrad.data.tasks import chance_accuracy, task_summary
from distgrad.engines.timing import Timing
from distgrad.errors import ConfigError
from distgrad.metrics.evaluate import Evaluator
from distgrad.metrics.events import EventLogError, Recorder, describe_fault, read_events
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
    write_json_somewhere,
)
from distgrad.server import ParameterServer

Progress = Callable[[int, int], None]
"""``progress(samples_done, samples_total)``; the total follows reassignment and losses. A
progress object may also have ``phase(name)``, told when the run moves past training
(``"evaluating"``, ``"writing figures"``)."""

log = logging.getLogger("distgrad.run")


class RunFailed(RuntimeError):
    """The run ended without training what it was asked to (a worker's error, every
    worker dead, nothing committed, the event log unwritable); ``summary.json`` holds
    ``status: failed`` and the ``error``. ``out`` is the run directory."""

    def __init__(self, message: str, out: Path | None = None) -> None:
        super().__init__(message)
        self.out = out


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
    """How :meth:`Run.execute` ended: the engine's clock, wall seconds, ``completed``,
    ``interrupted`` or ``failed`` (with the ``error`` that ended it)."""

    end_t: float
    wall: float
    status: str
    error: BaseException | None = None


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
    """The job recorded in ``run_dir`` and its last checkpoint (local, sim and net runs; a
    net run is resumed by ``distgrad serve --resume``, which builds its engine)."""
    job = Job.from_dict(read_run_config(run_dir))
    ckpt = run_dir / CHECKPOINT
    if job.engine not in ("local", "sim", "net"):
        raise ConfigError(f"only local-, sim- and net-engine runs can be resumed; "
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
        self.progress: Progress | None = None
        self.snapshot: dict[str, Any] | None = None  # the checkpoint resumed from
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
        expected = [total]  # what the run will process: follows reassignment and losses

        def on_batch(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], expected[0])

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "fault":
                # redone: computed, never committed; lost: never to be processed
                expected[0] += int(event.get("wasted") or 0) - int(event["samples_lost"])
                log.warning("%s", describe_fault(event))
            elif event["type"] == "checkpoint_failed":
                log.warning("checkpoint not written (%s): training goes on; the previous "
                            "checkpoint, if any, stands", event.get("error"))

        events_path = out / EVENTS if out is not None else None
        if snapshot is not None and events_path is not None:
            # an evaluation of a center from before the checkpoint that finished after it
            # (a background evaluation in flight) is kept
            committed = int(snapshot["samples_committed"])
            truncate_lines(events_path, int(snapshot["events"]),
                           keep=lambda e: e.get("type") == "eval"
                           and int(e.get("samples") or 0) <= committed)
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
        run.snapshot = snapshot  # an engine instance given by the caller gets it (execute)
        run.progress = progress
        recorder.on_event = on_event
        run.evals = EvalSchedule(max(1, int(job.eval_every * per_epoch)), run.evaluate)
        if snapshot is not None:
            run.evals.skip_to(recorder.samples_committed)
        if out is not None and snapshot is None:
            write_json(out / CONFIG, {**job.to_dict(), **parts.identity,
                                      "parameters": len(server.center),
                                      "samples_total": total,
                                      "threads_used": run.threads_used,
                                      "replay_of": str(replay_of) if replay_of else None})
        return run

    def evaluate(self, t: float, version: int, vectors: list[torch.Tensor] | None = None,
                 samples: int | None = None) -> None:
        """Evaluate the center (or ``vectors``, a snapshot) and record an ``eval`` event."""
        m = self.evaluator.evaluate(vectors if vectors is not None else self.server.models(),
                                    self.eval_x, self.eval_y)
        self.recorder.evaluation(t, version, {"test_loss": m["loss"], "test_acc": m["acc"],
                                              **{f"test_{k}": v for k, v in m.items()
                                                 if k not in ("loss", "acc")}},
                                 samples=samples)

    # ------------------------------------------------------------------ execute
    def execute(self, engine: Any, run: Callable[[], float] | None = None) -> Outcome:
        """Run ``engine`` (``engine.run(parts, server, recorder, evals)``, or ``run()`` for
        engines with another entry point).

        SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send) end the run as
        ``interrupted``; an engine that checkpoints (``local``, ``sim``) is given the run
        directory's ``checkpoint.pt`` so that it writes a final checkpoint first, with or
        without ``checkpoint_every``. An engine's error ends it as ``failed`` (a
        :class:`~distgrad.errors.ConfigError` is raised as it is)."""
        if (self.out is not None and getattr(engine, "checkpoint_path", False) is None
                and getattr(engine, "name", None) in ("local", "sim", "net")):
            engine.checkpoint_path = self.out / CHECKPOINT
        if (self.snapshot is not None and getattr(engine, "name", None) == "net"
                and engine.resume is None):  # `serve --resume`: the engine is built by hand
            engine.resume = self.snapshot
        start = time.perf_counter()
        status, error = "completed", None
        with _interrupts(engine):
            try:
                if run is not None:
                    end_t = run()
                else:
                    end_t = engine.run(self.parts, self.server, self.recorder, self.evals)
            except KeyboardInterrupt:
                status = "interrupted"
                end_t = engine.now
            except ConfigError:
                raise
            except Exception as exc:  # finalized as failed, then raised as RunFailed
                status, error = "failed", exc
                end_t = getattr(engine, "now", 0.0) or 0.0
        return Outcome(end_t=end_t, wall=time.perf_counter() - start, status=status,
                       error=error)

    def _phase(self, name: str) -> None:
        phase = getattr(self.progress, "phase", None)
        if phase is not None:
            phase(name)

    # ------------------------------------------------------------------ finalize
    def finalize(self, outcome: Outcome, *,
                 train_metrics: Callable[[nn.Module], Mapping[str, float | None]] | None = None,
                 extra: Mapping[str, Any] | None = None, figures: bool = True) -> TrainResult:
        """Evaluate the final center, write ``summary.json`` (and the figures) and return the
        result; re-raise an interruption once the partial run is written, and raise
        :class:`RunFailed` for a failed one (an engine error, every worker dead, nothing
        committed, an unwritable event log) once its summary is written.

        ``train_metrics(model)`` gives ``{"acc", "loss"}`` on the training data (default:
        the center evaluated on the dataset's training set). ``extra`` joins the summary.
        A summary that cannot be written into the run directory (a full disk) is written
        to the system's temporary directory, or logged.
        """
        job, server, recorder = self.job, self.server, self.recorder
        status, error = outcome.status, outcome.error
        if recorder.write_error is not None:  # the log stopped the run: keep going in memory
            error = error if isinstance(error, EventLogError) else recorder.write_error
            status = "failed"
            recorder.detach()
        self._phase("evaluating")
        try:
            evals_done = recorder.of_type("eval")
            if not evals_done or evals_done[-1]["version"] != server.version:
                self.evaluate(outcome.end_t, server.version)
            final_test = recorder.of_type("eval")[-1]
            vectors = server.models()
            template = self.parts.template
            trained = (model_with(template, vectors[0]) if len(vectors) == 1
                       else Ensemble([model_with(template, v) for v in vectors]))
            if status == "interrupted":  # stop soon (SIGTERM has a grace period): the
                train_m = {"acc": None, "loss": None}  # training-set pass waits for the end
            elif train_metrics is None:
                train_m = dict(self.evaluator.evaluate(vectors, self.parts.dataset.x_train,
                                                       self.parts.dataset.y_train))
            else:
                train_m = dict(train_metrics(trained))
        except Exception as exc:
            if status != "failed":
                raise
            log.warning("the center of the failed run could not be evaluated: %s", exc)
            final_test, train_m = {}, {"acc": None, "loss": None}
        try:
            recorder.close()
        except EventLogError as exc:
            status, error = "failed", error or exc
        message = None
        if status == "failed":
            message = _error_text(error)
        elif status == "completed":
            message = self._failed_because()
            if message is not None:
                status = "failed"
        # the engine's clock (real time, continued across a resume); sim: the host's time
        wall = outcome.wall if job.engine == "sim" else outcome.end_t
        summary = summarize(job, self.parts.config, recorder, server, final_test, train_m,
                            wall, outcome.end_t, self.parts.dataset, status)
        summary["threads"] = self.threads_used
        summary.update(extra or {})
        if message is not None:
            summary["error"] = message
        if self.out is not None:
            self._write_summary(summary)
            if figures:
                self._phase("writing figures")
                from distgrad.report.plots import write_plots

                try:
                    write_plots(recorder.events, self.out,
                                title=f"{job.algorithm}, n={job.workers}")
                except OSError as exc:
                    from distgrad.rundir import describe_os_error

                    log.warning("figures not written to %s: %s", self.out,
                                describe_os_error(exc))
        if status == "interrupted":
            raise KeyboardInterrupt(f"interrupted; partial run written to {self.out}")
        if status == "failed":
            raise RunFailed(message or "the run failed", self.out) from error
        return TrainResult(summary=summary, model=trained, events=recorder.events, out=self.out)

    def _failed_because(self) -> str | None:
        """Why a run the engine ended normally trained nothing (every worker died, nothing
        committed), or None."""
        rec = self.recorder
        faults = rec.of_type("fault")
        if faults and not rec.of_type("done"):
            return "every worker died: " + "; ".join(describe_fault(f) for f in faults)
        if rec.commits == 0:
            return "no worker committed anything"
        return None

    def _write_summary(self, summary: dict[str, Any]) -> None:
        assert self.out is not None
        where = write_json_somewhere(self.out / SUMMARY, summary)
        if where is None:
            import json

            log.error("summary.json could not be written anywhere; it is:\n%s",
                      json.dumps(summary, indent=2))
        elif where != self.out / SUMMARY:
            log.warning("summary.json could not be written to %s; written to %s instead",
                        self.out, where)


def _error_text(error: BaseException | None) -> str:
    """The message of a failed run: the error's own text, with its type where the type
    says something the text does not."""
    if error is None:
        return "the run failed"
    text = str(error)
    if isinstance(error, EventLogError) or type(error).__name__ == "WorkerFailed":
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _interrupts:
    """While a run executes (in the main thread), SIGINT and SIGTERM end it as
    ``interrupted``: an engine with a ``stop_requested`` flag (``sim``) is asked to stop
    (after a final checkpoint), others get KeyboardInterrupt; a second signal raises it
    at once. Handlers the application installed itself are left alone; the ``local``
    engine installs its own while its workers run."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.old: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if getattr(self.engine, "stop_requested", True) is False:
            self.engine.stop_requested = True
            return
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


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
    chance = chance_accuracy(dataset.y_train, dataset.classes)  # None: regression
    if not len(dataset.y_test):  # no test data: judge divergence on the training loss
        test_loss = train_m["loss"]
    # diverged: the final loss is not finite or exploded (> 10 x max(first evaluation's
    # loss, ln classes)); not_learned: accuracy <= 2 x chance. A run can be both.
    evals = [e["test_loss"] for e in rec.of_type("eval") if e.get("test_loss") is not None]
    exploded = (test_loss is not None and math.isfinite(test_loss) and bool(evals)
                and test_loss > 10 * max(evals[0], math.log(max(dataset.classes, 2))))
    diverged = test_loss is None or not math.isfinite(test_loss) or exploded
    not_learned = test_acc is not None and chance is not None and test_acc <= 2 * chance
    # samples: each sample once. A dead worker's computed but uncommitted samples
    # (its fault's "wasted") that went to other workers (on_failure="reassign") are
    # processed twice: counted once here.
    redone = sum(int(f.get("wasted") or 0) for f in faults if f.get("reassigned"))
    host_rate = rec.samples / wall if wall > 0 else None
    virtual_rate = rec.samples / end_t if job.engine == "sim" and end_t > 0 else None

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
        "samples": rec.samples - redone,
        "samples_processed": rec.samples,
        "samples_committed": rec.samples_committed,
        "samples_redone": redone,
        "commits": rec.commits,
        "versions": server.version,
        "wall_seconds": wall,
        "virtual_seconds": end_t if job.engine == "sim" else None,
        "samples_per_wall_second": host_rate,
        "samples_per_virtual_second": virtual_rate,
        "samples_per_second": host_rate,  # deprecated alias of samples_per_wall_second
        "staleness_mean": float(stal.mean()) if len(stal) else 0.0,
        "staleness_max": int(stal.max()) if len(stal) else 0,
        "distance_mean": float(dist.mean()) if len(dist) else None,
        "scale_mean": float(scales.mean()) if len(scales) else None,
        "test_accuracy": test_acc,
        "test_loss": fin(test_loss) if len(dataset.y_test) else None,
        "train_accuracy": train_m["acc"],
        "train_loss": fin(train_m["loss"]),
        "last_batch_train_accuracy": (
            float(np.mean([s.correct / s.samples for s in last])) if last else None),
        "last_batch_train_accuracy_note": (
            "the thesis' 'training accuracy': mean over workers of each worker's last "
            "mini-batch accuracy, not an evaluation of the center"),
        "diverged": bool(diverged),
        "not_learned": bool(not_learned),
        "faults": len(faults),
        "samples_lost": int(sum(f["samples_lost"] for f in faults)),
        "compression": job.compression,
        "bytes_committed": rec.bytes_committed,
        "bytes_per_commit": rec.bytes_committed / rec.commits if rec.commits else None,
        "inner_options": job.effective_inner_options(),
        "params_sha256": server.params_sha256(),
        "parameters": len(server.center),
        **task_summary(dataset.y_train, dict(final_test), dict(train_m), len(dataset.y_test) > 0),
    }
