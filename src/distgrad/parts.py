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
import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from distgrad.algorithms import RunInfo, get_algorithm, names
from distgrad.algorithms.base import Algorithm, AlgorithmConfig
from distgrad.compression import CODECS, Compressor
from distgrad.data import DATASETS, SHARDINGS, Dataset, load_dataset, make_shards
from distgrad.data.lazy import LazyRows, targets_of
from distgrad.data.streams import StreamSource, WorkerStreams
from distgrad.data.tasks import LOSSES, check_inputs, loss_for, task_of
from distgrad.data.text import CORPORA, load_text
from distgrad.engines.options import (
    DEFAULT_ENGINE,
    DEVICES,
    ENGINE_OPTIONS,
    ENGINES,
    LocalOptions,
    options_for,
)
from distgrad.engines.timing import Timing
from distgrad.entry import call_factory, check_json_args, is_path
from distgrad.entry import resolve as resolve_path
from distgrad.errors import (
    ConfigError,
    choose,
    nonnegative_int,
    positive_float,
    positive_int,
)
from distgrad.models import MODELS, build_model, initialize
from distgrad.optim import INNER_OPTIMIZERS, compensate_inner_options
from distgrad.replica import LossFn, Replica, check_optimizer, flatten_parameters, parameter_count
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

    ``model`` and ``dataset`` are built-in names or import paths of the user's factories
    (``"pkg.module:factory"``, called with ``model_args`` / ``data_args``, JSON values), so a
    job stays JSON and every process rebuilds the same model and data (see
    :mod:`distgrad.entry` and ``docs/extending.md``); ``loss``, ``step`` and
    ``lr_scheduler`` name functions the same way, ``inner_optimizer`` may be any
    ``torch.optim`` class or a factory, ``autocast`` runs the forward pass in bf16.

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
    inner_optimizer: str = _what(
        "adam", "worker optimizer: {choices}, any torch.optim class (AdamW, RMSprop, ...) or "
                "a factory's import path 'pkg.module:factory' called as factory(params, lr=LR)",
        metavar="NAME", choices=lambda: INNER_OPTIMIZERS)
    inner_options: Mapping[str, float] = field(default_factory=dict)
    dataset: str = _what(
        "mnist", "one of: {choices} (a text corpus, for --model gpt), or the import path of "
                 "your data factory 'pkg.module:factory' (see docs/extending.md)",
        metavar="NAME", choices=lambda: (*DATASETS, *CORPORA), short=("--data",))
    data_args: Mapping[str, Any] = _what(
        help="keyword argument of the data factory (or of a corpus: block=N), repeatable; "
             "JSON values (--data-arg n=1000)", factory=dict, flag="--data-arg",
        metavar="KEY=VALUE")
    model: str = _what(
        "mlp", "{choices} (the thesis MLP 784-1000-2000-1000-10, a small CNN, a byte-level "
               "GPT), or the import path of your model factory 'pkg.module:factory' "
               "(no required arguments, returns an nn.Module)",
        metavar="NAME", choices=lambda: MODELS)
    model_args: Mapping[str, Any] = _what(
        help="keyword argument of the model factory, repeatable; JSON values "
             "(--model-arg n_layer=6)", factory=dict, flag="--model-arg", metavar="KEY=VALUE")
    loss: str = _what(
        "auto", "auto (cross-entropy for integer labels, MSE for float targets), "
                "cross_entropy, mse, or an import path 'pkg.module:fn' of fn(outputs, targets)",
        metavar="NAME")
    step: str | None = _what(
        None, "import path of a custom step fn(model, x, y) returning the loss or (loss, "
              "{'correct': n}); replaces loss(model(x), y)", metavar="PKG.MOD:FN")
    lr_scheduler: str | None = _what(
        None, "import path of factory(optimizer) returning a torch LR scheduler, stepped "
              "after every local step", metavar="PKG.MOD:FACTORY")
    autocast: bool = _what(
        False, "run forward and loss under bf16 autocast where the device supports it",
        flag="--bf16")
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
    pipeline: bool = _what(
        False, "send each commit and compute the next window while it travels; the center "
               "it pulls is taken at the next commit (one more window of staleness, counted "
               "in the commits' base versions); asynchronous algorithms that pull after a "
               "commit, on net, ray and spark",
        group="commits")
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
        check_optimizer(self.inner_optimizer)
        choose("sharding", self.sharding, SHARDINGS)
        for kind, name, known in (("model", self.model, MODELS),
                                  ("dataset", self.dataset, (*DATASETS, *CORPORA))):
            if not is_path(name):
                try:
                    choose(kind, name, known)
                except ConfigError as exc:
                    raise ConfigError(f"{exc}; or the import path of your factory "
                                      f"'pkg.module:factory'") from None
        object.__setattr__(self, "model_args", check_json_args("model_args", self.model_args))
        object.__setattr__(self, "data_args", check_json_args("data_args", self.data_args))
        for name in ("step", "lr_scheduler"):
            value = getattr(self, name)
            if value is not None and not is_path(value):
                raise ConfigError(f"{name} is an import path 'pkg.module:attr', got {value!r}")
        if not is_path(self.loss) and self.loss not in ("auto", *LOSSES):
            raise ConfigError(f"unknown loss {self.loss!r}; choose from: auto, "
                              f"{', '.join(sorted(LOSSES))}, or an import path 'pkg.module:fn'")
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
        if self.pipeline:  # before any engine starts: see distgrad.protocol.pipeline
            from distgrad.protocol.pipeline import check as check_pipeline

            check_pipeline(self)
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
        d["model_args"] = dict(self.model_args)
        d["data_args"] = dict(self.data_args)
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


SIM_ONE_THREAD_UP_TO = 1_000_000
"""On ``sim``, :func:`build_parts` gives a model of at most this many parameters one torch
thread when the job leaves ``threads`` unset: its operations are too small to gain from
more threads, which only add synchronisation. Measured on a 2-core machine shared with
other jobs, 4 simulated workers: a 419-parameter MLP 0.6 s with one thread vs 5.9 s with
torch's default of 2; the 26k-parameter CNN 17.5 s vs 70.8 s; the 0.83 M-parameter GPT
45 s vs 142 s (the 4.8 M-parameter thesis MLP, which keeps torch's default: 36.9 s vs
45.5 s on that loaded machine; on an idle one its larger products gain from threads).
``RunParts.job`` then holds ``threads=1``, which the sim engine reads."""


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
    #: model, data and loss all come from the job (names or import paths): a remote
    #: worker rebuilds them from the job's JSON alone
    portable: bool = True
    #: what config.json records about the model and data (see :func:`identity_of`)
    identity: dict[str, Any] = field(default_factory=dict)
    step_fn: Any = None
    #: per-worker streams (:mod:`distgrad.data.streams`): the shards are virtual indices
    streams: WorkerStreams | None = None

    @property
    def algorithm(self) -> Algorithm:
        return get_algorithm(self.job.algorithm)

    @property
    def config(self) -> AlgorithmConfig:
        return self.job.algorithm_config()

    @property
    def info(self) -> RunInfo:
        return self.job.run_info()

    def epoch_samples(self) -> int:
        """Samples in one epoch (over every worker)."""
        return sum(len(s) for s in self.shards)

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
                      job.effective_inner_options(), seed=job.seed, device=device,
                      step_fn=self.step_fn, scheduler=job.lr_scheduler,
                      autocast=job.autocast)
        batches: BatchSource | StreamSource
        if self.streams is not None:
            batches = StreamSource(self.streams, k, len(self.shards), job.epochs, job.seed,
                                   job.batch_size, device=device)
        else:
            batches = BatchSource(self.dataset.x_train, self.dataset.y_train, self.shards[k],
                                  job.batch_size, job.epochs, seed=worker_seed(job.seed, k),
                                  device=device)
        compressor = (None if job.compression == "none"
                      else Compressor(job.compression, rep.sizes, job.error_feedback))
        return Worker(k, rep, self.algorithm.worker_rule(self.config, self.info), batches,
                      compressor=compressor)


def _is_pair(data: Any) -> bool:
    """``(X, y)``: two array-likes (not two data sets)."""
    return (isinstance(data, tuple | list) and len(data) == 2
            and all(isinstance(v, torch.Tensor | np.ndarray) for v in data))


def _as_tensors(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` of ``data``: an ``(X, y)`` pair of tensors or arrays; a map-style torch
    ``Dataset`` (or a ``DataLoader`` over one, whose batching is not used: the job's
    ``batch_size`` is), whose features are read batch by batch (:class:`LazyRows`; a
    ``TensorDataset`` gives its tensors); an ``IterableDataset`` (read once, whole)."""
    if isinstance(data, tuple | list) and len(data) == 2 and not isinstance(
            data[0], torch.utils.data.Dataset | torch.utils.data.DataLoader):
        x, y = data
        try:
            x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
            y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{name}: cannot make tensors of the (X, y) pair: {exc}") from None
    elif isinstance(data, torch.utils.data.DataLoader | torch.utils.data.Dataset):
        ds = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
        if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
            return _as_tensors(tuple(ds.tensors), name)
        if not isinstance(ds, torch.utils.data.IterableDataset):
            if len(ds) == 0:
                raise ConfigError(f"{name} is empty")
            item = ds[0]
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise ConfigError(f"{name}: every item must be an (x, y) pair")
            return LazyRows(ds), targets_of(ds)  # type: ignore[return-value]
        if isinstance(data, torch.utils.data.IterableDataset) or (
                isinstance(data, torch.utils.data.DataLoader)
                and isinstance(data.dataset, torch.utils.data.IterableDataset)):
            loader = data if isinstance(data, torch.utils.data.DataLoader) else (
                torch.utils.data.DataLoader(data, batch_size=None))
        else:
            ds = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
            loader = torch.utils.data.DataLoader(ds, batch_size=4096, shuffle=False)
        batches = list(loader)
        if not batches:
            raise ConfigError(f"{name} is empty")
        if not all(isinstance(b, tuple | list) and len(b) == 2 for b in batches):
            raise ConfigError(f"{name}: every item must be an (x, y) pair")
        xs, ys = zip(*batches, strict=True)
        if xs[0].dim() == 0 or (batches and isinstance(data, torch.utils.data.IterableDataset)
                                and xs[0].dim() == 1 and ys[0].dim() == 0):
            x, y = torch.stack(xs), torch.stack(ys)  # an IterableDataset of single samples
        else:
            x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise ConfigError(f"{name} must be an (X, y) pair of tensors or arrays, a torch "
                          f"Dataset or a DataLoader, got {type(data).__name__}")
    if len(x) != len(y):
        raise ConfigError(f"{name}: {len(x)} inputs but {len(y)} targets")
    if len(x) == 0:
        raise ConfigError(f"{name} is empty")
    if x.dtype == torch.float64:
        x = x.float()
    if y.dtype == torch.float64:
        y = y.float()
    return x, y


def _split_factory_result(result: Any, path: str) -> tuple[Any, Any]:
    """``(train, test)`` of what a data factory returned: ``((X, y), (X_test, y_test))``,
    ``((X, y), None)``, ``(train, test)`` data sets or loaders, or train data alone."""
    if _is_pair(result):
        return result, None
    if isinstance(result, tuple | list) and len(result) == 2:
        return result[0], result[1]
    if isinstance(result, torch.utils.data.Dataset | torch.utils.data.DataLoader):
        return result, None
    raise ConfigError(f"data factory {path!r} returned a {type(result).__name__}; expected "
                      f"((X, y), (X_test, y_test)), (train, test) Datasets or DataLoaders, "
                      f"or the training data alone")


def _seeded(seed: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the global torch RNG seeded by ``seed`` and restored afterwards, so
    a user factory builds the same thing in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def load_data(job: Job, data: Any = None, test_data: Any = None) -> Dataset:
    """The job's dataset (or ``data``/``test_data``: ``(X, y)`` tensors or arrays, a torch
    ``Dataset`` or ``DataLoader``), cut to ``job.train_samples``. Without test data the
    test set is empty (no test metrics; the summary says so)."""
    if data is None and test_data is not None:
        raise ConfigError("test_data needs data (the training data) too")
    label = "custom"
    if data is None and is_path(job.dataset):
        result = _seeded(job.seed, call_factory, job.dataset, job.data_args, "data")
        label = job.dataset
        if isinstance(result, WorkerStreams):
            return _streams_dataset(job, result)
        data, test_data = _split_factory_result(result, job.dataset)
    if data is not None:
        x_train, y_train = _as_tensors(data, "data")
        if test_data is None:
            x_test, y_test = x_train[:0], y_train[:0]
        else:
            x_test, y_test = _as_tensors(test_data, "test_data")
        dataset = Dataset(label, x_train, y_train, x_test, y_test)
    elif job.dataset in CORPORA:
        dataset = load_text(job.dataset, **dict(job.data_args))
    else:
        if job.data_args:
            raise ConfigError(f"dataset {job.dataset!r} takes no --data-arg")
        dataset = load_dataset(job.dataset)
    if job.train_samples is not None:
        if job.train_samples > len(dataset.y_train):
            raise ConfigError(f"train_samples={job.train_samples} exceeds the "
                              f"{len(dataset.y_train)} training samples of {dataset.name}")
        x = dataset.x_train
        dataset = replace(dataset, x_train=(x.head(job.train_samples)
                                            if isinstance(x, LazyRows)
                                            else x[: job.train_samples]),
                          y_train=dataset.y_train[: job.train_samples])
    return dataset


def _streams_dataset(job: Job, streams: WorkerStreams) -> Dataset:
    """A stand-in :class:`Dataset` of per-worker streams: the training part is worker 0's
    first batch (for the checks, the task and the classes; ``streams`` is kept on it)."""
    workers = int(job.workers)  # type: ignore[arg-type]
    x, y = streams.first_batch(workers, job.seed)
    if streams.test is not None:
        x_test, y_test = _as_tensors(streams.test, "the streams' test data")
    else:
        x_test, y_test = x[:0], y[:0]
    dataset = Dataset(job.dataset, x, y, x_test, y_test)
    object.__setattr__(dataset, "streams", streams)
    return dataset


def build_model_of(job: Job, y: torch.Tensor | None = None) -> nn.Module:
    """The job's model: a named one (seeded), or its factory's (called under the job's seed).
    The GPT's context follows the corpus' ``block`` unless ``--model-arg block`` is set."""
    if is_path(job.model):
        module = _seeded(job.seed, call_factory, job.model, job.model_args, "model")
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model factory {job.model!r} returned a "
                              f"{type(module).__name__}, not a torch nn.Module")
        return module
    args = dict(job.model_args)
    if job.model == "gpt" and "block" not in args and y is not None and y.dim() == 2:
        args["block"] = int(y.shape[1])
    if not args:
        return build_model(job.model, job.seed)
    try:
        module = MODELS[job.model](**args)
    except TypeError as exc:
        raise ConfigError(f"model {job.model!r}: {exc}") from None
    return initialize(module, job.seed)


def fingerprint(dataset: Dataset) -> str:
    """sha256 over the data's shapes, dtypes and bytes (the first 16 hex digits)."""
    h = hashlib.sha256()
    for t in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        if isinstance(t, LazyRows):  # read lazily: its first and last 16 samples
            t = torch.cat([t[:16], t[-16:]])
        h.update(t.contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


_FINGERPRINTS: dict[tuple[str, str, int], str] = {}


def _named_fingerprint(job: Job, dataset: Dataset) -> str:
    """:func:`fingerprint` of a shipped data set, computed once per process (MNIST: 0.4 s)."""
    key = (job.dataset, json.dumps(dict(job.data_args), sort_keys=True), len(dataset.y_train))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint(dataset)
    return _FINGERPRINTS[key]


def identity_of(job: Job, template: nn.Module, dataset: Dataset, *, custom_model: bool,
                custom_data: bool, custom_loss: bool) -> dict[str, Any]:
    """What ``config.json`` records about the model and data actually trained."""
    cls = type(template)
    return {
        "model_ref": None if custom_model else job.model,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": parameter_count(template),
        "data_ref": None if custom_data else job.dataset,
        "data_fingerprint": (fingerprint(dataset) if custom_data or is_path(job.dataset)
                             else _named_fingerprint(job, dataset)),
        "train_samples_seen": len(dataset.y_train),
        "task": task_of(dataset.y_train),
        "custom_loss": custom_loss,
    }


def check_same_identity(recorded: Mapping[str, Any], now: Mapping[str, Any],
                        run_dir: str) -> None:
    """Refuse to resume or replay ``run_dir`` with another model or other data."""
    for key, what in (("model_class", "model"), ("parameters", "parameter count"),
                      ("data_fingerprint", "data (fingerprint)")):
        if key in recorded and recorded[key] != now.get(key):
            raise ConfigError(f"{run_dir!r} was trained with {what} {recorded[key]!r}, this run "
                              f"would use {now.get(key)!r}: pass the same model and data "
                              f"(model=..., data=...) to resume or replay it")


def build_parts(job: Job, *, model: nn.Module | None = None, data: Any = None,
                test_data: Any = None, loss_fn: LossFn | None = None,
                check: bool = True) -> RunParts:
    """The :class:`RunParts` of ``job``: its data split into one shard per worker, and its
    model (``model``, used with its initial weights, or the job's, seeded).

    ``check`` validates the data against the model and the loss before anything starts
    (:func:`distgrad.data.tasks.check_inputs`), and refuses objects a ``local`` worker
    process could not import (defined in a notebook, ``python -c`` or stdin).
    """
    dataset = load_data(job, data, test_data)
    streams = getattr(dataset, "streams", None)
    if streams is not None:  # virtual indices: what each worker's stream declares
        shards = [np.arange(n, dtype=np.int64)
                  for n in streams.per_worker(int(job.workers))]  # type: ignore[arg-type]
        return _finish_parts(job, dataset, shards, model, loss_fn, check, data, streams)
    shards = make_shards(dataset.y_train.numpy() if job.sharding == "label_skewed"
                         else np.zeros(len(dataset.y_train), dtype=np.int64),
                         int(job.workers),  # type: ignore[arg-type]
                         job.sharding, job.seed)
    return _finish_parts(job, dataset, shards, model, loss_fn, check, data, None)


def _finish_parts(job: Job, dataset: Dataset, shards: list[np.ndarray],
                  model: nn.Module | None, loss_fn: LossFn | None, check: bool, data: Any,
                  streams: WorkerStreams | None) -> RunParts:
    template = model if model is not None else build_model_of(job, dataset.y_train)
    if (job.engine == "sim" and job.threads is None
            and parameter_count(template) <= SIM_ONE_THREAD_UP_TO):
        job = replace(job, threads=1)  # see SIM_ONE_THREAD_UP_TO
    if loss_fn is None:
        loss_fn = loss_for(job.loss, dataset.y_train)
    step_fn = resolve_path(job.step, "step") if job.step is not None else None
    if check:
        if step_fn is None:
            check_inputs(template, dataset.x_train, dataset.y_train, loss_fn, name="data",
                         classes=_classes(dataset))
            if len(dataset.y_test):
                check_inputs(template, dataset.x_test, dataset.y_test, loss_fn,
                             name="test_data", classes=_classes(dataset))
        if job.engine in ("local", "spark"):  # what only these engines refuse (imported
            # here, not above: a sim or net process never loads them)
            engine_module = importlib.import_module(f"distgrad.engines.{job.engine}")
            engine_module.check_parts(model=model, loss_fn=loss_fn, streams=streams)
    identity = identity_of(job, template, dataset, custom_model=model is not None,
                           custom_data=data is not None,
                           custom_loss=loss_fn is not None and job.loss == "auto"
                           and loss_fn is not loss_for("auto", dataset.y_train))
    portable = model is None and data is None and not identity["custom_loss"]
    return RunParts(job=job, dataset=dataset, shards=shards, template=template,
                    loss_fn=loss_fn, portable=portable, identity=identity, step_fn=step_fn,
                    streams=streams)


def without_code(parts: RunParts) -> RunParts:
    """``parts`` less the model, loss and step objects when the job names them (import paths
    or built-in names): what Ray actors receive; :func:`with_job_code` rebuilds them there."""
    if not parts.portable:
        return parts
    return replace(parts, template=None, loss_fn=None, step_fn=None)  # type: ignore[arg-type]


def with_job_code(parts: RunParts) -> RunParts:
    """``parts`` with the model, loss and step built from the job (in the process that runs
    the worker: it imports the user's modules itself); unchanged if they are there."""
    if parts.template is not None:
        return parts
    job, y = parts.job, parts.dataset.y_train
    return replace(parts, template=build_model_of(job, y), loss_fn=loss_for(job.loss, y),
                   step_fn=resolve_path(job.step, "step") if job.step is not None else None)


def _classes(dataset: Dataset) -> int | None:
    y = dataset.y_train
    if y.is_floating_point() or y.dim() != 1:
        return None
    return dataset.classes
