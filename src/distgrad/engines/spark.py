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

from distgrad.errors import ConfigError, positive_int

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

log = logging.getLogger("distgrad.spark")


def check_parts(*, model: Any, loss_fn: Any, streams: Any) -> None:
    """What the ``spark`` engine refuses before training (a ConfigError): per-worker
    streams (its tasks are handed indices of in-memory data)."""
    if streams is not None:
        raise ConfigError("per-worker streams run on the sim, net and ray engines; the spark "
                          "engine hands out indices of in-memory data (return (X, y) tensors "
                          "or a map-style Dataset from the data factory)")


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


def as_feature_frame(df: Any, features_col: str, label_col: str | None) -> Any:
    """``features`` as an array column (Spark ML vectors go through Spark's own
    ``vector_to_array``) and ``label``, renamed to the engine's column names."""
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
        cols.append(F.col(label_col).cast("long").alias("label"))
    return df.select(*cols)


def arrow_to_tensors(batches: Iterator[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate Arrow record batches (``features`` list<float>, ``label``) into tensors."""
    xs, ys = [], []
    width = None
    for b in batches:
        if b.num_rows == 0:
            continue
        feats = b.column("features")
        values = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        w = len(values) // b.num_rows
        if w * b.num_rows != len(values) or (width is not None and w != width):
            raise ValueError("all rows of the features column must have the same length")
        width = w
        xs.append(values.reshape(b.num_rows, w))
        ys.append(b.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
    if not xs:
        raise ValueError("empty partition: every worker needs at least one row")
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


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
        x, y = arrow_to_tensors(iter(batches))
        job = spec["job"]
        if isinstance(job, str):  # the job as JSON: model and loss by import path
            from distgrad.transport.jobspec import job_from_dict

            job = job_from_dict(json.loads(job))
        n = job.workers
        parts = with_job_code(RunParts(
            job=job, dataset=Dataset("spark", x, y, x[:0], y[:0]),
            shards=[np.arange(len(y)) if i == k else np.empty(0, np.int64) for i in range(n)],
            template=spec["template"], loss_fn=spec["loss_fn"]))
        if parts.step_fn is None and job.step is not None:
            from distgrad.entry import resolve

            parts.step_fn = resolve(job.step, "step")
        worker = parts.make_worker(k)
        with NetClient(spec["address"], spec["secret"], worker=k, attempt=attempt,
                       total=job.epochs * len(y), timeout=spec["timeout"]) as client:
            fail = spec.get("inject_failure")
            if fail is not None and fail[0] == k and client.position == 0:  # first attempt
                _fail_after(client, fail[1])
            position = run_worker(client, worker)
            yield pa.RecordBatch.from_pydict({
                "worker": pa.array([k], pa.int64()), "attempt": pa.array([attempt], pa.int64()),
                "samples": pa.array([position], pa.int64())})

    return run


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
        spark, made = self.session(len(parts.shards))
        try:
            df = self.dataframe if self.dataframe is not None else shards_frame(spark, parts)
            return self.train_frame(spark, df, parts.job, parts.template, parts.loss_fn,
                                    server, recorder, evals, portable=parts.portable)
        finally:
            if made:
                spark.stop()

    def train_frame(self, spark: Any, df: Any, job: Any, template: Any, loss_fn: Any,
                    server: ParameterServer, recorder: Recorder, evals: EvalSchedule, *,
                    portable: bool = False) -> float:
        """Run the barrier stage over ``df`` (columns ``features`` array<float>, ``label``),
        one partition per worker, serving the commits on this driver.

        ``portable``: the job names its model and loss (import paths or built-in names), so
        the tasks receive the job as JSON and build them themselves; otherwise the
        ``template`` and ``loss_fn`` objects travel in the task closure (Spark pickles it)."""
        from distgrad.protocol.core import ProtocolCore
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
        core = ProtocolCore(server, recorder, clock, on_update=evals.maybe,
                            schedule=self.replay)
        net = NetServer(core, secret, bind="127.0.0.1" if local else "0.0.0.0",
                        advertise="127.0.0.1" if local else host,
                        worker_timeout=max(self.timeout * 4, 600.0))
        spec = {"job": json.dumps(job.to_dict()) if portable else job,
                "template": None if portable else template,
                "loss_fn": None if portable else loss_fn, "address": net.address,
                "secret": secret, "timeout": self.timeout,
                "inject_failure": self.inject_failure}
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
    merged into fewer partitions by Spark's planner)."""
    import pandas as pd

    x, y = parts.dataset.x_train.numpy(), parts.dataset.y_train.numpy()
    frames = []
    for k, shard in enumerate(parts.shards):
        frames.append(pd.DataFrame({"worker": np.full(len(shard), k, dtype=np.int64),
                                    "pos": np.arange(len(shard), dtype=np.int64),
                                    "features": list(x[shard].astype(np.float32)),
                                    "label": y[shard].astype(np.int64)}))
    df = spark.createDataFrame(pd.concat(frames, ignore_index=True),
                               "worker long, pos long, features array<float>, label long")
    return df.repartitionByRange(len(parts.shards), "worker").sortWithinPartitions("pos")
