"""The ``spark`` engine: workers are tasks of a barrier stage over a DataFrame's partitions.

The parameter server runs in the Spark driver (a :class:`~distgrad.transport.server.NetServer`
thread, the dist-keras deployment done right); each partition is one worker, run as a
task of a *barrier* stage (all tasks start together, so synchronous algorithms work)
with ``mapInArrow``: the task reads its partition as Arrow record batches (never row
by row), builds its replica, and talks to the driver through the authenticated network
transport. A random secret is made per run and travels to the tasks inside the task
closure (Spark's own channel: enable ``spark.authenticate`` on shared clusters).

**Task retries** do not double-apply anything: a retried task is a new *attempt* (its
Spark task attempt id) that fences the old one; it resumes its partition at the first
sample whose commit the server already applied, with the current center. The
partition is read again in the same order (the DataFrame is checkpointed once
before the stage, so every attempt reads the same rows in the same order).

**Data types.** The training rows keep their dtypes and shapes: float features stay
float32, integer features (a language model's tokens) stay integers, class labels are
longs, regression targets floats, a language model's targets one array per row; the
task restores each sample's shape (:func:`frame_layout`).

**Per-worker streams** (:class:`~distgrad.data.streams.WorkerStreams` from a data
factory): no rows cross Spark; the stage runs over one row per worker (its id), and each
task opens its worker's stream itself from the job's data import path, as a ``distgrad
work`` process or a Ray actor does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distgrad.errors import ConfigError, choose, positive_int

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

log = logging.getLogger("distgrad.spark")


def check_parts(*, model: Any, loss_fn: Any, streams: Any) -> None:
    """What the ``spark`` engine refuses before training, beyond the common checks:
    nothing. Objects travel in the task closure (Spark's own channel), per-worker streams
    are opened by each task from the job's data import path."""


def import_pyspark() -> Any:
    try:
        import pyspark
    except ImportError:
        raise ConfigError("the spark engine needs PySpark: pip install 'distgrad[spark]'"
                          ) from None
    return pyspark


def task_slots(spark: Any) -> int | None:
    """Concurrent task slots of the session (``defaultParallelism`` / ``spark.task.cpus``),
    or None where they can grow (dynamic allocation)."""
    conf = spark.sparkContext.getConf()
    if conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        return None
    cpus = max(1, int(conf.get("spark.task.cpus", "1")))
    return int(spark.sparkContext.defaultParallelism) // cpus


def check_slots(spark: Any, workers: int) -> None:
    """A barrier stage needs one slot per worker at once: refuse more workers than slots
    before Spark waits for slots that never come."""
    slots = task_slots(spark)
    if slots is not None and workers > slots:
        raise ConfigError(f"{workers} workers need {workers} concurrent Spark task slots; "
                          f"this session has {slots} (master "
                          f"{spark.sparkContext.master!r}): use at most {slots} workers, or "
                          f"more executors/cores")


def use_driver_python(spark: Any) -> None:
    """On a local master, run the Python workers with this interpreter (which has distgrad)
    unless the user chose one (``PYSPARK_PYTHON`` or ``spark.pyspark.python``) — a session
    the user built before importing distgrad would otherwise start ``python3`` from PATH."""
    sc = spark.sparkContext
    if not sc.master.startswith("local") or os.environ.get("PYSPARK_PYTHON"):
        return
    if sc.getConf().get("spark.pyspark.python", None):
        return
    sc.pythonExec = sys.executable


def local_session(master: str, app: str = "distgrad") -> Any:
    """A SparkSession on this machine, bound to the loopback interface."""
    import_pyspark()
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (SparkSession.builder.master(master).appName(app)
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate())


#: Spark SQL type of a ``label`` column by kind: class labels or regression targets
LABEL_TYPES = {"long": "long", "float": "float"}


def as_feature_frame(df: Any, features_col: str, label_col: str | None,
                     label_type: str = "long") -> Any:
    """``features`` as an array column (Spark ML vectors go through Spark's own
    ``vector_to_array``) and ``label``, renamed to the engine's column names; the label
    is cast to ``label_type`` (``long``: class labels, as Spark ML's double-typed
    indices become; ``float``: regression targets)."""
    choose("label_type", label_type, tuple(LABEL_TYPES))
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F

    if features_col not in df.columns:
        raise ConfigError(f"no features column {features_col!r}; columns: {df.columns}")
    feats = F.col(features_col)
    if isinstance(df.schema[features_col].dataType, VectorUDT):
        feats = vector_to_array(feats, dtype="float32")
    cols = [feats.cast("array<float>").alias("features")]
    if label_col is not None:
        if label_col not in df.columns:
            raise ConfigError(f"no label column {label_col!r}; columns: {df.columns}")
        cols.append(F.col(label_col).cast(LABEL_TYPES[label_type]).alias("label"))
    return df.select(*cols)


def _spark_type(t: torch.Tensor) -> str:
    """The Spark SQL element type a tensor's values travel as: floats as ``float``
    (float32), integers and booleans as ``long``."""
    return "float" if t.is_floating_point() else "long"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def frame_layout(x: Any, y: torch.Tensor) -> dict[str, Any]:
    """What a task needs to rebuild the tensors of its rows exactly: each column's torch
    dtype and per-sample shape (rows travel flattened)."""
    return {"features": [_dtype_name(x), list(x.shape[1:])],
            "label": [_dtype_name(y), list(y.shape[1:])]}


def _column(batch: Any, name: str) -> np.ndarray:
    """A column of an Arrow record batch as an array ``(rows,)`` (scalars) or ``(rows, w)``
    (list columns: every row must have the same length)."""
    import pyarrow as pa

    col = batch.column(name)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        return col.to_numpy(zero_copy_only=False)
    values = col.flatten().to_numpy(zero_copy_only=False)
    w = len(values) // batch.num_rows
    if w * batch.num_rows != len(values):
        raise ValueError(f"all rows of the {name} column must have the same length")
    return values.reshape(batch.num_rows, w)


def _restore(a: np.ndarray, layout: list[Any] | None, features: bool) -> torch.Tensor:
    """The tensor of a column's values: its recorded dtype and per-sample shape, or (rows
    of a user's DataFrame) float32 features and the label's own type (integers as
    int64 class labels, floats as float32 targets)."""
    if layout is not None:
        dtype, shape = getattr(torch, layout[0]), tuple(layout[1])
        return torch.from_numpy(np.ascontiguousarray(a)).reshape(len(a), *shape).to(dtype)
    if features or a.dtype.kind == "f":
        return torch.from_numpy(a.astype(np.float32, copy=False))
    return torch.from_numpy(a.astype(np.int64, copy=False))


def arrow_to_tensors(batches: Iterator[Any], layout: dict[str, Any] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate Arrow record batches (``features`` list, ``label``) into tensors, in the
    dtypes and shapes of ``layout`` (:func:`frame_layout`) when given."""
    xs, ys = [], []
    for b in batches:
        if b.num_rows == 0:
            continue
        xs.append(_column(b, "features"))
        ys.append(_column(b, "label"))
        if xs[-1].ndim != 2 or xs[-1].shape[1:] != xs[0].shape[1:]:
            raise ValueError("all rows of the features column must have the same length")
    if not xs:
        raise ValueError("empty partition: every worker needs at least one row")
    layout = layout or {}
    return (_restore(np.concatenate(xs), layout.get("features"), True),
            _restore(np.concatenate(ys), layout.get("label"), False))


def _task(spec: dict[str, Any]) -> Any:
    """The function each barrier task runs (over its partition's Arrow batches)."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import BarrierTaskContext

        torch.set_num_threads(1)
        from distgrad.data import Dataset
        from distgrad.parts import RunParts, with_job_code
        from distgrad.transport.client import NetClient, run_worker

        ctx = BarrierTaskContext.get()
        attempt = ctx.taskAttemptId()  # unique and increasing within the application
        batches = [b for b in batches if b.num_rows]
        k = _partition_worker(batches, ctx.partitionId())
        job = spec["job"]
        if isinstance(job, str):  # the job as JSON: model and loss by import path
            from distgrad.transport.jobspec import job_from_dict

            job = job_from_dict(json.loads(job))
        n = job.workers
        if spec.get("streams"):  # this task opens its worker's stream itself
            dataset, shards, streams = _stream_data(job)
        else:
            x, y = arrow_to_tensors(iter(batches), spec.get("layout"))
            dataset, streams = Dataset("spark", x, y, x[:0], y[:0]), None
            shards = [np.arange(len(y)) if i == k else np.empty(0, np.int64)
                      for i in range(n)]
        parts = with_job_code(RunParts(
            job=job, dataset=dataset, shards=shards, template=spec["template"],
            loss_fn=spec["loss_fn"], streams=streams))
        if parts.step_fn is None and job.step is not None:
            from distgrad.entry import resolve

            parts.step_fn = resolve(job.step, "step")
        worker = parts.make_worker(k)
        with NetClient(spec["address"], spec["secret"], worker=k, attempt=attempt,
                       total=worker.batches.total, timeout=spec["timeout"]) as client:
            fail = spec.get("inject_failure")
            if fail is not None and fail[0] == k and client.position == 0:  # first attempt
                _fail_after(client, fail[1])
            position = run_worker(client, worker, pipeline=job.pipeline)
            yield pa.RecordBatch.from_pydict({
                "worker": pa.array([k], pa.int64()), "attempt": pa.array([attempt], pa.int64()),
                "samples": pa.array([position], pa.int64())})

    return run


def _stream_data(job: Any) -> tuple[Any, list[np.ndarray], Any]:
    """The stand-in data set, virtual shards and streams of a job whose data factory returns
    per-worker streams, built in the task from the job's data import path (the streams
    object itself, functions and generators, never travels)."""
    from distgrad.parts import load_data

    dataset = load_data(job)
    streams = getattr(dataset, "streams", None)
    if streams is None:
        raise RuntimeError(f"the data factory {job.dataset!r} returned per-worker streams on "
                           f"the driver but not in this Spark task (a different version of "
                           f"the module on the executors?)")
    shards = [np.arange(c, dtype=np.int64) for c in streams.per_worker(int(job.workers))]
    return dataset, shards, streams


def streams_frame(spark: Any, workers: int) -> Any:
    """One row per worker (its id), one partition each: the stage of per-worker streams."""
    rdd = spark.sparkContext.parallelize([(k,) for k in range(workers)], workers)
    return spark.createDataFrame(rdd, "worker long")


def _partition_worker(batches: list[Any], partition: int) -> int:
    """The worker a partition belongs to: its rows' ``worker`` column when the frame has one
    (:func:`shards_frame`), else the partition's index."""
    if not batches or "worker" not in batches[0].schema.names:
        return partition
    ids = np.unique(np.concatenate([b.column("worker").to_numpy(zero_copy_only=False)
                                    for b in batches]))
    if len(ids) != 1:
        raise ValueError(f"partition {partition} holds rows of workers {ids.tolist()}")
    return int(ids[0])


def _fail_after(client: Any, commits: int) -> None:
    """Fault injection: this attempt raises after ``commits`` commits (a crashing task)."""
    from distgrad.protocol.messages import CommitRequest

    real = client.call
    done = [0]

    def call(req: Any) -> Any:
        if isinstance(req, CommitRequest):
            if done[0] == commits:
                raise RuntimeError(f"injected failure of worker {client.worker} after "
                                   f"{commits} commits")
            done[0] += 1
        return real(req)

    client.call = call


RESULT_SCHEMA = "worker long, attempt long, samples long"


class SparkEngine:
    """Train over a Spark DataFrame (see the module docstring).

    ``master`` is used only when no SparkSession is active (default ``local[n,f]``:
    n = workers, f = ``max_failures`` task attempts). ``inject_failure=(worker,
    commits)`` makes that worker's first attempt raise after that many commits
    (fault injection for tests and drills).
    """

    name = "spark"

    def __init__(self, master: str | None = None, *, max_failures: int = 4,
                 timeout: float = 120.0, inject_failure: tuple[int, int] | None = None,
                 dataframe: Any = None, replay: list[tuple[str, int]] | None = None) -> None:
        positive_int("max_failures", max_failures)
        self.replay = replay
        self.master = master
        self.max_failures = max_failures
        self.timeout = timeout
        self.inject_failure = inject_failure
        self.dataframe = dataframe
        self.now = 0.0
        self.results: list[Any] = []

    def session(self, workers: int) -> tuple[Any, bool]:
        """The active SparkSession, or a new local one (True: this engine made it)."""
        import_pyspark()
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            return active, False
        if self.master is None and os.environ.get("PYSPARK_GATEWAY_PORT"):
            # launched by spark-submit: its --master and --conf hold; the session is theirs
            return SparkSession.builder.appName("distgrad").getOrCreate(), False
        master = self.master or f"local[{workers},{self.max_failures}]"
        return local_session(master), True

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        streams = parts.streams is not None
        if streams and self.dataframe is not None:
            raise ConfigError("per-worker streams and a training DataFrame exclude each other")
        spark, made = self.session(len(parts.shards))
        try:
            layout = None
            if streams:
                df = streams_frame(spark, len(parts.shards))
            elif self.dataframe is not None:
                df = self.dataframe
            else:
                df = shards_frame(spark, parts)
                layout = frame_layout(parts.dataset.x_train, parts.dataset.y_train)
            return self.train_frame(spark, df, parts.job, parts.template, parts.loss_fn,
                                    server, recorder, evals, portable=parts.portable,
                                    layout=layout, streams=streams)
        finally:
            if made:
                spark.stop()

    def train_frame(self, spark: Any, df: Any, job: Any, template: Any, loss_fn: Any,
                    server: ParameterServer, recorder: Recorder, evals: EvalSchedule, *,
                    portable: bool = False, layout: dict[str, Any] | None = None,
                    streams: bool = False) -> float:
        """Run the barrier stage over ``df`` (columns ``features`` array<float>, ``label``),
        one partition per worker, serving the commits on this driver.

        ``portable``: the job names its model and loss (import paths or built-in names), so
        the tasks receive the job as JSON and build them themselves; otherwise the
        ``template`` and ``loss_fn`` objects travel in the task closure (Spark pickles it).
        ``layout``: the rows' dtypes and sample shapes (:func:`frame_layout`; None: float32
        features, labels as their column's type). ``streams``: ``df`` holds one row per
        worker and each task opens its worker's stream (:func:`streams_frame`)."""
        from distgrad.protocol.pipeline import make_core
        from distgrad.transport.auth import new_secret
        from distgrad.transport.server import NetServer

        workers = int(job.workers)
        check_slots(spark, workers)
        use_driver_python(spark)
        if df.rdd.getNumPartitions() != workers:
            df = df.repartition(workers)
        # Materialise the partitions once: a barrier stage may not contain unions or
        # coalesces, and a retried task must read its partition in the same order (a
        # shuffle read's order may change between attempts; checkpointed blocks do not).
        df = df.localCheckpoint(eager=True)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        host = spark.conf.get("spark.driver.host", "127.0.0.1")
        local = spark.sparkContext.master.startswith("local")
        secret = new_secret()
        core = make_core(job, server, recorder, clock, on_update=evals.maybe,
                         schedule=self.replay)
        net = NetServer(core, secret, bind="127.0.0.1" if local else "0.0.0.0",
                        advertise="127.0.0.1" if local else host,
                        worker_timeout=max(self.timeout * 4, 600.0))
        spec = {"job": json.dumps(job.to_dict()) if portable else job,
                "template": None if portable else template,
                "loss_fn": None if portable else loss_fn, "address": net.address,
                "secret": secret, "timeout": self.timeout,
                "inject_failure": self.inject_failure, "layout": layout, "streams": streams}
        thread = net.serve_in_thread()
        try:
            evals.maybe(0.0, server.version, 0)
            # The shuffle after the barrier stage makes it a ShuffleMapStage, which Spark
            # re-runs as a whole when a task fails (a failed barrier ResultStage is final).
            self.results = (df.mapInArrow(_task(spec), RESULT_SCHEMA, barrier=True)
                            .repartition(1).collect())
        finally:
            net.stop()
            thread.join(60)
            net.close()
        if net.error is not None:
            raise RuntimeError(f"the parameter server failed: {net.error}") from net.error
        unfinished = [k for k, s in enumerate(core.slots) if s.state != "done"]
        if unfinished:
            raise RuntimeError(f"the Spark job ended but workers {unfinished} did not finish")
        self.now = clock()
        return self.now


def shards_frame(spark: Any, parts: RunParts) -> Any:
    """The job's training shards as a DataFrame with exactly one partition per worker, in
    shard order, so each task trains on the same samples in the same order as in ``sim``.

    Rows carry their ``worker`` and their ``pos`` in the shard: the frame is range-
    partitioned on ``worker`` and sorted on ``pos`` within each partition, and a task
    takes its worker id from its rows (a union of per-shard frames, as before, may be
    merged into fewer partitions by Spark's planner).

    Features and labels keep their kind (:func:`frame_layout` restores dtypes and shapes
    in the task): float values travel as ``float``, integers (tokens, class labels) as
    ``long``; a sample of more than one value as an array."""
    import pandas as pd

    x, y = parts.dataset.x_train, parts.dataset.y_train
    x_type, y_type = _spark_type(x), _spark_type(y)
    multi = y.dim() > 1
    frames = []
    for k, shard in enumerate(parts.shards):
        idx = torch.from_numpy(np.asarray(shard, dtype=np.int64))
        xs, ys = _values(x[idx], x_type), _values(y[idx], y_type)
        frames.append(pd.DataFrame({"worker": np.full(len(shard), k, dtype=np.int64),
                                    "pos": np.arange(len(shard), dtype=np.int64),
                                    "features": list(_rows(xs)),
                                    "label": list(_rows(ys)) if multi else ys}))
    label = f"array<{y_type}>" if multi else y_type
    df = spark.createDataFrame(pd.concat(frames, ignore_index=True),
                               f"worker long, pos long, features array<{x_type}>, "
                               f"label {label}")
    return df.repartitionByRange(len(parts.shards), "worker").sortWithinPartitions("pos")


def _values(t: torch.Tensor, spark_type: str) -> np.ndarray:
    """A tensor's values as the numpy dtype of their Spark type (float32 or int64)."""
    return t.to(torch.float32 if spark_type == "float" else torch.int64).numpy()


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` as one flat row per sample."""
    return a.reshape(len(a), int(np.prod(a.shape[1:], dtype=np.int64)))
