"""A training job: its frozen description, and :func:`train`, which runs it.

``train`` builds the data, model, algorithm rules, server and workers from a
:class:`Job`, hands them to an engine, evaluates the result and writes the run
directory (``config.json``, ``events.jsonl``, ``summary.json``, plots).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distgrad.algorithms import RunInfo, get_algorithm
from distgrad.algorithms.base import Algorithm, AlgorithmConfig
from distgrad.compression import CODECS, Compressor
from distgrad.data import SHARDINGS, Dataset, load_dataset, make_shards
from distgrad.engines import ENGINES, make_engine
from distgrad.engines.sim import EvalSchedule
from distgrad.engines.timing import Timing
from distgrad.errors import (
    ConfigError,
    choose,
    nonnegative_int,
    positive_float,
    positive_int,
)
from distgrad.metrics.evaluate import Evaluator
from distgrad.metrics.events import Recorder, read_events
from distgrad.models import MODELS, build_model
from distgrad.optim import INNER_OPTIMIZERS, compensate_inner_options
from distgrad.server import ParameterServer
from distgrad.worker import BatchSource, LossFn, Replica, Worker, flatten_parameters

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything that defines a run. Frozen and validated on construction.

    ``workers``/``window`` left as None take the algorithm's defaults (1 worker for
    ``sequential``, else 2; the algorithm's own λ). ``params`` are the algorithm's
    hyperparameters (``gamma``, ``rho``, ...). ``eval_every`` is in epochs of
    committed samples. ``train_samples`` keeps only the first N training samples
    (quick experiments); the test set is always complete. Engine settings:
    ``threads`` (torch threads: whole simulator, or each worker process),
    ``device``, ``on_failure`` (reassign|drop), ``checkpoint_every`` (seconds) and
    ``deferred_eval`` (local: snapshot the center on schedule but evaluate the
    snapshots after training, so evaluation takes no CPU from the workers).

    ``compression`` (``none``, ``fp32``, ``fp16``, ``bf16``, ``int8``) compresses every
    commit, with ``error_feedback`` (see :mod:`distgrad.compression`).
    ``momentum_target`` (EXPERIMENTAL, asynchronous algorithms only) lowers the inner
    optimizer's momentum (SGD ``momentum``, Adam ``beta1``) to
    ``max(target − (1 − 1/n), 0)``, compensating the implicit momentum of asynchrony.
    """

    algorithm: str = "adag"
    params: Mapping[str, Any] = field(default_factory=dict)
    engine: str = "sim"
    workers: int | None = None
    window: int | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    inner_optimizer: str = "adam"
    inner_options: Mapping[str, float] = field(default_factory=dict)
    dataset: str = "mnist"
    model: str = "mlp"
    sharding: str = "shuffled"
    train_samples: int | None = None
    seed: int = 0
    eval_every: float = 0.5
    timing: Timing = field(default_factory=Timing)
    track_distance: bool = True
    record_batches: bool = True
    threads: int | None = None
    device: str = "cpu"
    on_failure: str = "reassign"
    checkpoint_every: float | None = None
    deferred_eval: bool = False
    compression: str = "none"
    error_feedback: bool = True
    momentum_target: float | None = None

    def __post_init__(self) -> None:
        algo = get_algorithm(self.algorithm)
        choose("engine", self.engine, ENGINES)
        if self.workers is None:
            object.__setattr__(self, "workers", algo.exact_workers or 2)
        positive_int("workers", self.workers)
        if self.window is not None:
            positive_int("window", self.window)
        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_float("lr", self.lr)
        choose("inner optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        choose("sharding", self.sharding, SHARDINGS)
        choose("model", self.model, MODELS)
        nonnegative_int("seed", self.seed)
        if self.train_samples is not None:
            positive_int("train_samples", self.train_samples)
        positive_float("eval_every", self.eval_every)
        if self.threads is not None:
            positive_int("threads", self.threads)
        choose("device", self.device, DEVICES)
        if self.device != "cpu" and self.engine == "sim":
            raise ConfigError(f"device {self.device!r} needs the local engine; sim runs on cpu")
        choose("on_failure", self.on_failure, ("reassign", "drop"))
        if self.checkpoint_every is not None:
            positive_float("checkpoint_every", self.checkpoint_every)
        if "window" in self.params:
            raise ConfigError("pass the window as window=..., not inside params")
        choose("compression", self.compression, CODECS)
        if self.momentum_target is not None:
            if algo.synchronous:
                raise ConfigError(f"momentum_target compensates the implicit momentum of "
                                  f"asynchrony; {self.algorithm!r} is synchronous")
            if not 0.0 <= self.momentum_target < 1.0:
                raise ConfigError(f"momentum_target must lie in [0, 1), "
                                  f"got {self.momentum_target!r}")
        self.algorithm_config()  # validates the hyperparameters
        self.run_info()  # validates the worker count for the algorithm
        self.timing.check_workers(self.workers)  # type: ignore[arg-type]

    def algorithm_config(self) -> AlgorithmConfig:
        params = dict(self.params)
        if self.window is not None:
            params["window"] = self.window
        return get_algorithm(self.algorithm).make_config(params)

    def effective_inner_options(self) -> dict[str, float]:
        """The inner optimizer's options after the momentum compensation, if any."""
        if self.momentum_target is None:
            return dict(self.inner_options)
        return compensate_inner_options(self.inner_optimizer, dict(self.inner_options),
                                        self.momentum_target, int(self.workers))  # type: ignore[arg-type]

    def run_info(self) -> RunInfo:
        info = RunInfo(workers=self.workers, lr=self.lr,  # type: ignore[arg-type]
                       inner_optimizer=self.inner_optimizer,
                       inner_options=self.effective_inner_options(), seed=self.seed)
        get_algorithm(self.algorithm).check(info)
        return info

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = self.algorithm_config().to_dict()
        d["window"] = d["params"]["window"]
        d["timing"]["crashes"] = [list(c) for c in self.timing.crashes]
        d["inner_options"] = dict(self.inner_options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Job:
        """Inverse of :meth:`to_dict` (e.g. a run directory's ``config.json``)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        params = dict(values.pop("params", {}))
        params.pop("window", None)
        timing = dict(values.pop("timing", {}))
        timing["crashes"] = tuple(tuple(c) for c in timing.get("crashes", ()))
        return cls(params=params, timing=Timing(**timing), **values)


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


class _Ensemble(nn.Module):
    """Averages the softmax outputs of its members (the trained model of ``ensemble``)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([F.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-30))


def _model_with(template: nn.Module, vector: torch.Tensor) -> nn.Module:
    m = copy.deepcopy(template)
    trainable = [p for p in m.parameters() if p.requires_grad]
    torch.nn.utils.vector_to_parameters(vector.detach().clone(), trainable)
    # vector_to_parameters makes the parameters views of its argument; give each
    # parameter storage of its own so the returned model aliases nothing.
    for p in trainable:
        p.data = p.data.clone()
    return m


def _as_tensors(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
    elif isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(data, batch_size=4096, shuffle=False)
        xs, ys = zip(*loader, strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise ConfigError(f"{name} must be an (X, y) pair of tensors or a torch Dataset, "
                          f"got {type(data).__name__}")
    if len(x) != len(y):
        raise ConfigError(f"{name}: {len(x)} inputs but {len(y)} targets")
    if len(x) == 0:
        raise ConfigError(f"{name} is empty")
    if x.dtype == torch.float64:
        x = x.float()
    return x, y


@dataclass
class RunParts:
    """What any engine needs to build the server and each worker; picklable, so a worker
    process can build its own worker from it (tensors go through shared memory)."""

    job: Job
    dataset: Dataset
    shards: list[np.ndarray]
    template: nn.Module
    loss_fn: LossFn

    @property
    def algorithm(self) -> Algorithm:
        return get_algorithm(self.job.algorithm)

    @property
    def config(self) -> AlgorithmConfig:
        return self.job.algorithm_config()

    @property
    def info(self) -> RunInfo:
        return self.job.run_info()

    def total_samples(self) -> int:
        return self.job.epochs * sum(len(s) for s in self.shards)

    def initial_center(self) -> torch.Tensor:
        center = flatten_parameters(copy.deepcopy(self.template))
        return center.detach().clone()

    def make_server(self, center: torch.Tensor | None = None) -> ParameterServer:
        """The server with its rule, over ``center`` (default: a fresh copy of the initial one)."""
        center = self.initial_center() if center is None else center
        return ParameterServer(center, self.algorithm.server_rule(self.config, self.info),
                               len(self.shards), track_distance=self.job.track_distance)

    def make_worker(self, k: int, device: str | torch.device = "cpu") -> Worker:
        """Worker k: its replica, rule and batches (shard k, the job's epochs and seed)."""
        job = self.job
        rep = Replica(k, self.template, self.loss_fn, job.inner_optimizer, job.lr,
                      job.effective_inner_options(), seed=job.seed, device=device)
        batches = BatchSource(self.dataset.x_train, self.dataset.y_train, self.shards[k],
                              job.batch_size, job.epochs, seed=worker_seed(job.seed, k),
                              device=device)
        compressor = (None if job.compression == "none"
                      else Compressor(job.compression, rep.sizes, job.error_feedback))
        return Worker(k, rep, self.algorithm.worker_rule(self.config, self.info), batches,
                      compressor=compressor)


def train(
    job: Job | None = None,
    *,
    model: nn.Module | str | None = None,
    data: Any = None,
    test_data: Any = None,
    loss_fn: LossFn | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    replay: str | Path | None = None,
    resume: str | Path | None = None,
    engine: str | Any = None,
    **job_fields: Any,
) -> TrainResult:
    """Train and return a :class:`TrainResult` (summary fields as attributes, ``.model``).

    Either pass a :class:`Job` or its fields as keywords::

        distgrad.train(algorithm="adag", workers=8, window=10, epochs=3, seed=1)

    ``model`` (a name, or any ``nn.Module``, used with its initial weights),
    ``data``/``test_data`` (``(X, y)`` tensors or a torch ``Dataset``) and
    ``loss_fn`` (default cross-entropy) replace the named model and dataset.
    ``out`` is the run directory to write. ``progress`` is called as
    ``progress(samples_done, samples_total)``. ``engine`` is an engine name or an
    engine instance configured beyond the job (e.g. ``RayEngine(address="auto")``);
    by default the job's ``engine`` name is built with its defaults.

    ``replay=DIR`` runs the job recorded in DIR on the ``local`` engine, applying
    initial pulls and commits in the recorded order (and with the recorded torch
    thread count), which reproduces the recorded parameters bit for bit.
    ``resume=DIR`` continues the ``local`` run in DIR from its last checkpoint.
    """
    if isinstance(model, str):
        job_fields["model"] = model
        model = None
    if isinstance(engine, str):
        job_fields["engine"] = engine
        engine = None
    snapshot = schedule = None
    if resume is not None:
        if job is not None or job_fields or replay is not None:
            raise ConfigError("resume continues the job recorded in its directory; "
                              "pass no other job settings")
        out, overwrite = resume, True
        job, snapshot = _load_resume(Path(resume))
    elif replay is not None:
        if job is not None or job_fields:
            raise ConfigError("replay runs the job recorded in its directory; "
                              "pass no other job settings")
        job, schedule = _load_replay(Path(replay))
    elif job is None:
        job = Job(**job_fields)
    elif job_fields:
        job = replace(job, **job_fields)
    out_dir = _prepare_out(out, overwrite)
    loss_fn = loss_fn or F.cross_entropy

    # data
    if data is not None:
        x_train, y_train = _as_tensors(data, "data")
        if test_data is None:
            raise ConfigError("test_data is required with data (the center is evaluated on it)")
        x_test, y_test = _as_tensors(test_data, "test_data")
        dataset = Dataset("custom", x_train, y_train, x_test, y_test)
    else:
        dataset = load_dataset(job.dataset)
    if job.train_samples is not None:
        if job.train_samples > len(dataset.y_train):
            raise ConfigError(f"train_samples={job.train_samples} exceeds the "
                              f"{len(dataset.y_train)} training samples of {dataset.name}")
        dataset = replace(dataset, x_train=dataset.x_train[: job.train_samples],
                          y_train=dataset.y_train[: job.train_samples])
    workers = int(job.workers)  # type: ignore[arg-type]
    shards = make_shards(dataset.y_train.numpy(), workers, job.sharding, job.seed)

    template = model if model is not None else build_model(job.model, job.seed)
    parts = RunParts(job=job, dataset=dataset, shards=shards, template=template, loss_fn=loss_fn)
    server = parts.make_server()
    if snapshot is not None:
        # the workers restart with fresh pulls: none of them is waiting at a gate any more
        server.load_state_dict({**snapshot["server"], "held": []})
    center = server.center
    total_samples = parts.total_samples()

    evaluator = Evaluator(template, loss_fn)
    done = [snapshot["samples"] if snapshot else 0]

    def on_batch(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total_samples)

    events_path = out_dir / "events.jsonl" if out_dir else None
    if snapshot is not None and events_path is not None:
        _truncate_lines(events_path, int(snapshot["events"]))
    recorder = Recorder(events_path, record_batches=job.record_batches, on_batch=on_batch,
                        append=snapshot is not None)
    if snapshot is not None and events_path is not None:
        recorder.events = read_events(events_path)
        recorder.samples = int(snapshot["samples"])
        recorder.samples_committed = int(snapshot["samples_committed"])
        recorder.commits = int(snapshot["commits"])
        recorder.note(float(snapshot["t"]), "resume", version=server.version,
                      center_sha256=server.params_sha256())

    def evaluate(t: float, version: int, vectors: list[torch.Tensor] | None = None,
                 samples: int | None = None) -> None:
        m = evaluator.evaluate(vectors if vectors is not None else server.models(),
                               dataset.x_test, dataset.y_test)
        recorder.evaluation(t, version, {"test_loss": m["loss"], "test_acc": m["acc"]},
                            samples=samples)

    evals = EvalSchedule(max(1, int(job.eval_every * len(dataset.y_train))), evaluate)
    if snapshot is not None:
        while evals.next_at <= recorder.samples_committed:
            evals.next_at += evals.every_samples
    threads_used = job.threads or (1 if job.engine == "local" else torch.get_num_threads())
    if out_dir is not None and snapshot is None:
        _write_json(out_dir / "config.json", {**job.to_dict(), "parameters": len(center),
                                               "samples_total": total_samples,
                                               "threads_used": threads_used,
                                               "replay_of": str(replay) if replay else None})
    if engine is None:
        engine = make_engine(job, replay=schedule, resume=snapshot,
                             checkpoint_path=(out_dir / "checkpoint.pt"
                                              if out_dir is not None and job.checkpoint_every
                                              else None))
    elif getattr(engine, "name", None) != job.engine:
        raise ConfigError(f"engine instance {getattr(engine, 'name', engine)!r} does not "
                          f"match job.engine={job.engine!r}")
    start = time.perf_counter()
    status = "completed"
    try:
        end_t = engine.run(parts, server, recorder, evals)
    except KeyboardInterrupt:
        status = "interrupted"
        end_t = engine.now
    wall = time.perf_counter() - start

    # final evaluation: test set (recorded as an event unless the schedule just did) and the
    # full training set
    evals_done = recorder.of_type("eval")
    if not evals_done or evals_done[-1]["version"] != server.version:
        evaluate(end_t, server.version)
    final_test = recorder.of_type("eval")[-1]
    train_m = evaluator.evaluate(server.models(), dataset.x_train, dataset.y_train)
    recorder.close()
    if job.engine != "sim":
        wall = end_t  # the engine's clock: real time, continued across a resume
    summary = _summarize(job, parts.config, recorder, server, final_test, train_m, wall, end_t,
                         dataset, status)
    summary["threads"] = threads_used
    if model is not None:
        summary["model"] = type(model).__name__
    vectors = server.models()
    trained = (_model_with(template, vectors[0]) if len(vectors) == 1
               else _Ensemble([_model_with(template, v) for v in vectors]))
    if out_dir is not None:
        _write_json(out_dir / "summary.json", summary)
        from distgrad.report.plots import write_plots

        write_plots(recorder.events, out_dir, title=f"{job.algorithm}, n={workers}")
    if status == "interrupted":
        raise KeyboardInterrupt(f"interrupted; partial run written to {out_dir}")
    return TrainResult(summary=summary, model=trained, events=recorder.events, out=out_dir)


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    return json.loads(path.read_text())


def _load_resume(run_dir: Path) -> tuple[Job, dict[str, Any]]:
    from distgrad.engines.local import read_checkpoint

    job = Job.from_dict(_read_run_config(run_dir))
    ckpt = run_dir / "checkpoint.pt"
    if job.engine != "local":
        raise ConfigError(f"only local-engine runs can be resumed; {str(run_dir)!r} ran on "
                          f"{job.engine!r}")
    if not ckpt.exists():
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint.pt (run it with "
                          "--checkpoint-every SECONDS)")
    return job, read_checkpoint(ckpt)


def _load_replay(run_dir: Path) -> tuple[Job, list[tuple[str, int]]]:
    from distgrad.engines.local import replay_schedule

    config = _read_run_config(run_dir)
    events_path = run_dir / "events.jsonl"
    if not events_path.exists():
        raise ConfigError(f"{str(run_dir)!r} has no events.jsonl to replay")
    recorded = Job.from_dict(config)
    job = replace(recorded, engine="local", timing=Timing(),
                  threads=int(config.get("threads_used") or 1))
    return job, replay_schedule(read_events(events_path))


def _truncate_lines(path: Path, lines: int) -> None:
    """Keep the first ``lines`` lines of a file (events after a checkpoint are undone)."""
    with path.open("rb") as f:
        kept = [next(f, b"") for _ in range(lines)]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


def worker_seed(seed: int, worker: int) -> list[int]:
    """Seed material of worker ``worker``'s data order."""
    return [seed, worker, 0xDA7A]


def _prepare_out(out: str | Path | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} exists and is not a directory")
    if (path / "events.jsonl").exists() and not overwrite:
        raise ConfigError(f"--out {str(path)!r} already holds a run; choose another directory "
                          "or pass --overwrite")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {str(path)!r} is not writable: {exc.strerror}") from None
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _summarize(job: Job, config: AlgorithmConfig, rec: Recorder, server: ParameterServer,
               final_test: dict[str, Any], train_m: dict[str, float | None], wall: float,
               end_t: float, dataset: Dataset, status: str) -> dict[str, Any]:
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


def known_models() -> list[str]:
    return sorted(MODELS)
