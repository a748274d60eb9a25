"""The ``spark`` engine with the user's own code: per-worker streams opened in each task,
and data that keeps its dtypes (float regression targets, a language model's tokens).

A user module is written into a temporary directory on ``PYTHONPATH`` (the driver's and
the Spark Python workers'), as a user installs their code on every executor. One real
``local[2]`` session serves the whole module.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed")

from distgrad import train  # noqa: E402
from distgrad.engines.spark import (  # noqa: E402
    SparkEngine,
    arrow_to_tensors,
    frame_layout,
    local_session,
    shards_frame,
)
from distgrad.job import Job, build_parts  # noqa: E402
from distgrad.spark import SparkEvaluator, SparkTrainer  # noqa: E402

MODULE = "spark_user_code"
USER_CODE = '''
"""A user's module: a classifier fed by per-worker streams, and a regression."""
import numpy as np
from torch import nn

from distgrad.data.streams import WorkerStreams

FEATURES, CLASSES = 6, 3


def make_model(hidden=16):
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def _blobs(g, centers, n):
    y = g.integers(0, CLASSES, n)
    return (centers[y] + g.normal(0.0, 1.0, (n, FEATURES))).astype(np.float32), y


def make_streams(samples=(120, 80), batch=20):
    """Worker k generates its own batches (as it would read its own files), seeded by
    (seed, worker, epoch); the workers declare different sample counts."""
    centers = np.random.default_rng(11).normal(0.0, 2.5, (CLASSES, FEATURES))

    def make(worker, workers, epoch, seed):
        g = np.random.default_rng([seed, worker, epoch])
        n = samples[worker]
        for start in range(0, n, batch):
            yield _blobs(g, centers, min(batch, n - start))

    return WorkerStreams(make=make, samples=tuple(samples),
                         test=_blobs(np.random.default_rng(5), centers, 200))


def make_regression(n=400):
    """Float targets mostly inside (-1, 1): cast to integers they would be nearly all 0."""
    g = np.random.default_rng(3)
    x = g.normal(0.0, 1.0, (n, FEATURES)).astype(np.float32)
    y = (0.3 * x @ np.linspace(0.2, 1.0, FEATURES)).astype(np.float32)
    cut = n * 3 // 4
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def make_regressor():
    return nn.Sequential(nn.Linear(FEATURES, 1), nn.Flatten(0))
'''


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    code = tmp_path_factory.mktemp("usercode")
    (code / f"{MODULE}.py").write_text(textwrap.dedent(USER_CODE))
    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "PYTHONPATH")}
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), saved["PYTHONPATH"]) if p)
    sys.path.insert(0, str(code))
    session = local_session("local[2,4]", app="distgrad-stream-tests")
    session.sparkContext.setLogLevel("ERROR")
    # the Python workers' PYTHONPATH, also where this process started Spark's JVM earlier
    session.sparkContext.environment["PYTHONPATH"] = os.environ["PYTHONPATH"]
    try:
        yield session
    finally:
        session.stop()
        sys.path.remove(str(code))
        sys.modules.pop(MODULE, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def committed(res) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in res.events:
        if e["type"] == "commit":
            out[e["worker"]] = out.get(e["worker"], 0) + e["samples"]
    return out


STREAMS_JOB = dict(engine="spark", workers=2, model=f"{MODULE}:make_model",
                   dataset=f"{MODULE}:make_streams", algorithm="agn", window=2,
                   batch_size=20, epochs=2, lr=0.02, seed=1)


def test_per_worker_streams_train_on_spark_each_sample_committed_once(spark):
    """Each task opens its own worker's stream from the job's import path (workers
    declaring 120 and 80 samples): every declared sample is committed exactly once."""
    engine = SparkEngine()
    res = train(Job(**STREAMS_JOB), engine=engine)
    assert res.summary["status"] == "completed" and res.engine == "spark"
    assert committed(res) == {0: 2 * 120, 1: 2 * 80}  # declared samples x epochs, once
    assert sorted(r["samples"] for r in engine.results) == [160, 240]
    assert res.test_accuracy > 0.8


@pytest.mark.slow
def test_a_retried_stream_task_resumes_where_the_commits_stopped(spark):
    """A task that fails after 3 commits is retried (Spark re-runs the stage) and reopens
    its stream, skipping the samples the server already applied: still exactly once."""
    engine = SparkEngine(inject_failure=(0, 3))
    res = train(Job(**STREAMS_JOB), engine=engine)
    assert res.summary["status"] == "completed"
    assert committed(res) == {0: 2 * 120, 1: 2 * 80}
    assert (0, "error") in [(f["worker"], f["kind"]) for f in res.events
                            if f["type"] == "fault"]
    assert sorted(r["samples"] for r in engine.results) == [160, 240]
    assert min(r["attempt"] for r in engine.results) > 1  # the stage ran again


def test_float_targets_stay_float_and_the_regression_trains_on_spark(spark):
    res = train(engine="spark", workers=2, model=f"{MODULE}:make_regressor",
                dataset=f"{MODULE}:make_regression", algorithm="agn", window=2,
                batch_size=20, epochs=4, lr=0.03, seed=0)
    s = res.summary
    assert s["status"] == "completed" and s["task"] == "regression"
    assert math.isfinite(s["test_mse"]) and s["test_r2"] > 0.8  # cast to long: r2 ~ 0
    assert committed(res) == {0: 4 * 150, 1: 4 * 150}


def test_rows_keep_their_dtypes_and_shapes_through_spark(spark):
    """The training rows of a regression, a language model (int64 tokens, (N, T)
    targets) and images (N, 1, 4, 4) come back from Spark's Arrow batches unchanged."""
    regression = build_parts(Job(engine="spark", workers=2, model=f"{MODULE}:make_regressor",
                                 dataset=f"{MODULE}:make_regression"))
    lm = build_parts(Job(engine="spark", workers=2, model="gpt",
                         model_args={"n_layer": 1, "n_embd": 16, "n_head": 2},
                         dataset="pystdlib", data_args={"block": 16}, train_samples=64))
    x = torch.arange(40 * 16, dtype=torch.float32).reshape(40, 1, 4, 4) / 7
    images = build_parts(Job(engine="spark", workers=2, model="cnn"),
                         model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)),
                         data=(x, torch.arange(40) % 3))
    for parts in (regression, lm, images):
        d = parts.dataset
        layout = frame_layout(d.x_train, d.y_train)
        table = shards_frame(spark, parts).toArrow()
        got_x, got_y = arrow_to_tensors(iter(table.to_batches()), layout)
        order = torch.from_numpy(np.concatenate(parts.shards))
        assert got_x.dtype == d.x_train.dtype and got_y.dtype == d.y_train.dtype
        assert torch.equal(got_x, d.x_train[order]) and torch.equal(got_y, d.y_train[order])


@pytest.mark.slow  # the dtypes' round trip above is the default suite's check
def test_a_tiny_language_model_trains_on_spark(spark):
    res = train(engine="spark", workers=2, model="gpt",
                model_args={"n_layer": 1, "n_embd": 32, "n_head": 2}, dataset="pystdlib",
                data_args={"block": 32}, train_samples=256, batch_size=32, window=2,
                algorithm="agn", lr=3e-3, eval_every=1.0)
    s = res.summary
    assert s["status"] == "completed" and s["task"] == "language_model"
    assert s["test_perplexity"] < 200  # from ~256 (uniform over bytes)


def test_sparktrainer_keeps_float_labels_for_a_regression_loss(spark):
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (300, 4)).astype(np.float32)
    y = 0.3 * x @ np.array([0.5, -1.0, 0.25, 1.0])
    df = spark.createDataFrame([(row.tolist(), float(t)) for row, t in zip(x, y, strict=True)],
                               "features array<float>, label double")
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))
    trained, result = SparkTrainer(model, algorithm="agn", workers=2, window=2, epochs=5,
                                   batch_size=20, lr=0.03, seed=0, loss_fn=F.mse_loss).fit(df)
    assert result.summary["task"] == "regression"
    assert result.summary["test_r2"] > 0.8 and math.isfinite(result.summary["train_mse"])
    ev = SparkEvaluator(trained, loss_fn=F.mse_loss).evaluate(df)
    assert ev["accuracy"] is None and ev["r2"] > 0.8
    assert ev["mse"] == pytest.approx(ev["loss"], rel=1e-5)
