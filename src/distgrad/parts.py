"""What is trained: the frozen :class:`Job`, and the :class:`RunParts` built from it.

``Job`` describes *what* (algorithm and its hyperparameters, model, data, inner
optimizer, epochs, seed) and, for now, the ``local``/``sim`` engine settings the
engines read from it (see :mod:`distgrad.engines.options` for *how/where*).
:func:`build_parts` turns a job (plus an optional custom model and data) into the
``RunParts`` every engine builds its server and workers from.

This module imports no engine and no run machinery, so the engines, the transport and
the run lifecycle (:mod:`distgrad.run`) can all depend on it.
:mod:`distgrad.job` re-exports everything here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distgrad.algorithms import RunInfo, get_algorithm, names
from distgrad.algorithms.base import Algorithm, AlgorithmConfig
from distgrad.compression import CODECS, Compressor
from distgrad.data import DATASETS, SHARDINGS, Dataset, load_dataset, make_shards
from distgrad.engines.options import (
    DEFAULT_ENGINE,
    DEVICES,
    ENGINE_OPTIONS,
    ENGINES,
    LocalOptions,
    options_for,
)
from distgrad.engines.timing import Timing
from distgrad.errors import (
    ConfigError,
    choose,
    nonnegative_int,
    positive_float,
    positive_int,
)
from distgrad.models import MODELS, build_model
from distgrad.optim import INNER_OPTIMIZERS, compensate_inner_options
from distgrad.replica import LossFn, Replica, flatten_parameters
from distgrad.server import ParameterServer
from distgrad.worker import BatchSource, Worker

__all__ = ["DEVICES", "ENGINE_FIELDS", "Job", "RunParts", "build_parts", "load_data",
           "worker_seed"]


def _what(default: Any = None, help: str = "", *, factory: Any = None,
          **cli: Any) -> Any:
    """A Job field with its CLI metadata (``help``; optional ``flag``, ``metavar``,
    ``choices`` (a callable), ``group``, ``negate`` for a ``--no-...`` flag)."""
    metadata = {"help": help, "group": cli.pop("group", "what to train"), **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _how(default: Any) -> Any:
    """A Job field that is an engine option (the CLI takes it from the options class)."""
    return field(default=default, metadata={"engine_option": True})


ENGINE_FIELDS = ("threads", "device", "on_failure", "checkpoint_every", "deferred_eval")
"""Job fields that are ``local``/``sim`` engine options (:class:`LocalOptions` fields)."""


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
    snapshots after training, so evaluation takes no CPU from the workers); they are
    the fields of :class:`~distgrad.engines.options.LocalOptions` (see
    :meth:`engine_options`). ``engine`` defaults to ``local`` (worker processes on
    this machine), as on the command line; ``sim`` is the deterministic simulator.

    ``compression`` (``none``, ``fp32``, ``fp16``, ``bf16``, ``int8``) compresses every
    commit, with ``error_feedback`` (see :mod:`distgrad.compression`).
    ``momentum_target`` (EXPERIMENTAL, asynchronous algorithms only) lowers the inner
    optimizer's momentum (SGD ``momentum``, Adam ``beta1``) to
    ``max(target − (1 − 1/n), 0)``, compensating the implicit momentum of asynchrony.

    Field metadata holds each field's command-line help: ``distgrad train``'s flags are
    generated from it (:mod:`distgrad.cli`).
    """

    algorithm: str = _what("adag", "one of: {choices}", metavar="NAME", choices=names)
    params: Mapping[str, Any] = _what(
        help="algorithm hyperparameter, repeatable (e.g. --set gamma=1e-4, --set rho=5)",
        factory=dict, flag="--set", metavar="KEY=VALUE")
    engine: str = _what(
        DEFAULT_ENGINE, "one of: {choices} (local: one process per worker on this machine; "
                        "sim: deterministic simulator)", metavar="NAME", choices=lambda: ENGINES)
    workers: int | None = _what(None, "number of workers n (default 2; sequential: 1)",
                                metavar="N")
    window: int | None = _what(None, "communication window λ: local steps per commit (default: "
                                     "the algorithm's, see `distgrad algorithms -v`)",
                               metavar="L")
    epochs: int = _what(1, "passes over the training set, split over the workers", metavar="E")
    batch_size: int = _what(128, "mini-batch size per worker step", metavar="B")
    lr: float = _what(1e-3, "learning rate of the inner optimizer", metavar="X")
    inner_optimizer: str = _what("adam", "worker optimizer: {choices}", metavar="NAME",
                                 choices=lambda: INNER_OPTIMIZERS)
    inner_options: Mapping[str, float] = field(default_factory=dict)
    dataset: str = _what("mnist", "one of: {choices}", metavar="NAME", choices=lambda: DATASETS)
    model: str = _what("mlp", "{choices}: the thesis MLP 784-1000-2000-1000-10 or a small CNN",
                       metavar="NAME", choices=lambda: MODELS)
    sharding: str = _what("shuffled", "how the data is split over workers: {choices}",
                          metavar="HOW", choices=lambda: SHARDINGS)
    train_samples: int | None = _what(
        None, "use only the first N training samples (quick runs; the test set stays "
              "complete)", metavar="N")
    seed: int = _what(0, "seed", metavar="S")
    eval_every: float = _what(
        0.5, "evaluate the center on the test set every this many epochs of committed "
             "samples, and at the end", metavar="EPOCHS", group="output")
    timing: Timing = field(default_factory=Timing)
    track_distance: bool = _what(
        True, "do not record ‖θ̃_t − θ̃_{t−τ}‖ per commit (saves one model copy per worker)",
        group="output", flag="--no-distance")
    record_batches: bool = _what(
        True, "do not log every mini-batch (smaller events.jsonl; no notebook-style temporal "
              "efficiency)", group="output", flag="--no-batch-log")
    threads: int | None = _how(None)
    device: str = _how("cpu")
    on_failure: str = _how("reassign")
    checkpoint_every: float | None = _how(None)
    deferred_eval: bool = _how(False)
    compression: str = _what(
        "none", "compress every commit: {choices} (int8 has one scale per parameter tensor); "
                "bytes per commit go to the events and summary.json", group="commits",
        flag="--compress", metavar="CODEC", choices=lambda: CODECS)
    error_feedback: bool = _what(
        True, "do not carry what compression lost into the next commit", group="commits",
        flag="--no-error-feedback")
    momentum_target: float | None = _what(
        None, "EXPERIMENTAL, asynchronous algorithms: set the inner optimizer's momentum (sgd "
              "momentum, adam beta1) to max(MU - (1 - 1/n), 0) so explicit + implicit "
              "momentum stays near MU", group="commits", metavar="MU")

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
        LocalOptions(**{f: getattr(self, f) for f in ENGINE_FIELDS})  # validates them
        if self.device != "cpu" and self.engine == "sim":
            raise ConfigError(f"device {self.device!r} needs the local engine; sim runs on cpu")
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

    def engine_options(self) -> Any:
        """This job's ``local``/``sim`` settings as its engine's options dataclass
        (:class:`LocalOptions` or :class:`SimOptions`; other engines: their defaults)."""
        return options_for(self.engine, **{f: getattr(self, f) for f in ENGINE_FIELDS})

    def with_options(self, options: Any) -> Job:
        """This job with the ``local``/``sim`` settings of ``options`` (a LocalOptions or
        SimOptions); the fields other options classes have are not job fields."""
        if not isinstance(options, tuple(ENGINE_OPTIONS.values())):
            raise ConfigError(f"expected an engine options dataclass, got "
                              f"{type(options).__name__}")
        values = {f.name: getattr(options, f.name) for f in fields(options)
                  if f.name in ENGINE_FIELDS}
        return replace(self, **values)

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


def worker_seed(seed: int, worker: int) -> list[int]:
    """Seed material of worker ``worker``'s data order."""
    return [seed, worker, 0xDA7A]


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


def load_data(job: Job, data: Any = None, test_data: Any = None) -> Dataset:
    """The job's dataset (or ``data``/``test_data``: ``(X, y)`` tensors or a torch
    ``Dataset``), cut to ``job.train_samples``."""
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
    return dataset


def build_parts(job: Job, *, model: nn.Module | None = None, data: Any = None,
                test_data: Any = None, loss_fn: LossFn | None = None) -> RunParts:
    """The :class:`RunParts` of ``job``: its data split into one shard per worker, and its
    model (``model``, used with its initial weights, or the job's named one, seeded)."""
    dataset = load_data(job, data, test_data)
    shards = make_shards(dataset.y_train.numpy(), int(job.workers),  # type: ignore[arg-type]
                         job.sharding, job.seed)
    template = model if model is not None else build_model(job.model, job.seed)
    return RunParts(job=job, dataset=dataset, shards=shards, template=template,
                    loss_fn=loss_fn or F.cross_entropy)
