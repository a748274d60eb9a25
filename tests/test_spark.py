"""The ``spark`` engine and the Spark API on a real local[2] SparkSession (loopback only)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed")

from distgrad import train  # noqa: E402
from distgrad.engines.spark import SparkEngine, local_session  # noqa: E402
from distgrad.errors import ConfigError  # noqa: E402
from distgrad.job import Job  # noqa: E402
from distgrad.models import initialize  # noqa: E402
from distgrad.spark import SparkEvaluator, SparkPredictor, SparkTrainer, accuracy  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = local_session("local[2,4]", app="distgrad-tests")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def small_model(inputs: int = 784, classes: int = 10) -> nn.Module:
    return initialize(nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, classes)),
                      0)


def mnist_frame(spark, x: torch.Tensor, y: torch.Tensor, partitions: int = 2):
    import pandas as pd

    pdf = pd.DataFrame({"features": list(x.numpy()), "label": y.numpy()})
    return spark.createDataFrame(pdf, "features array<float>, label long").repartition(
        partitions)


def sim_single_threaded(job: Job, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each Spark task
    try:
        return train(Job(**{**job.__dict__, "engine": "sim"}), model=small_model(), **kw)
    finally:
        torch.set_num_threads(threads)


def test_one_spark_task_gives_the_sim_parameters_bit_for_bit(spark, mnist_small):
    job = Job(algorithm="agn", engine="spark", workers=1, window=3, batch_size=32, seed=1)
    on_spark = train(job, model=small_model(), engine=SparkEngine(), **mnist_small)
    on_sim = sim_single_threaded(job, **mnist_small)
    assert on_spark.params_sha256 == on_sim.params_sha256
    assert on_spark.samples == 3000


def test_sparktrainer_adag_reaches_the_sim_accuracy_band(spark, mnist_small):
    (x, y), (xt, yt) = mnist_small["data"], mnist_small["test_data"]
    trainer = SparkTrainer(small_model(), algorithm="adag", workers=2, window=3, epochs=2,
                           batch_size=32, seed=1)
    model, result = trainer.fit(mnist_frame(spark, x, y), validation=mnist_frame(spark, xt, yt))
    job = Job(algorithm="adag", workers=2, window=3, epochs=2, batch_size=32, seed=1)
    on_sim = sim_single_threaded(job, **mnist_small)
    assert result.samples == 6000 and result.engine == "spark"
    assert result.test_accuracy > 0.75
    assert abs(result.test_accuracy - on_sim.test_accuracy) < 0.05
    # the returned model is the trained center
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert acc == pytest.approx(result.test_accuracy, abs=1e-6)
    # distributed prediction and evaluation agree with torch on the driver
    scored = SparkPredictor(model, probability_col="probability").transform(
        mnist_frame(spark, xt, yt))
    assert accuracy(scored) == pytest.approx(acc, abs=1e-6)
    assert {"prediction", "probability"} <= set(scored.columns)
    ev = SparkEvaluator(model).evaluate(mnist_frame(spark, xt, yt))
    assert ev["accuracy"] == pytest.approx(acc, abs=1e-6) and ev["count"] == 1000


def test_spark_task_retry_does_not_double_apply(spark, mnist_small):
    engine = SparkEngine(inject_failure=(0, 6))
    job = Job(algorithm="agn", engine="spark", workers=2, window=2, batch_size=32, seed=1)
    res = train(job, model=small_model(), engine=engine, **mnist_small)
    commits = [e for e in res.events if e["type"] == "commit"]
    per_worker = {k: sum(c["samples"] for c in commits if c["worker"] == k) for k in (0, 1)}
    assert per_worker == {0: 1500, 1: 1500}  # every window applied exactly once
    faults = [e for e in res.events if e["type"] == "fault"]
    assert (0, "error") in [(f["worker"], f["kind"]) for f in faults]
    assert res.samples > 3000  # the failed attempt's uncommitted steps were trained again
    assert sorted(r["samples"] for r in engine.results) == [1500, 1500]
    assert min(r["attempt"] for r in engine.results) > 1  # the stage ran again


def test_spark_ml_transformers_feed_the_trainer(spark, tmp_path):
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import (
        MinMaxScaler,
        OneHotEncoder,
        StandardScaler,
        StringIndexer,
        VectorAssembler,
    )

    rng = np.random.default_rng(0)
    n = 600
    cls = rng.integers(0, 3, n)
    centers = np.array([[0, 0], [4, 4], [0, 5]])
    pts = centers[cls] + rng.normal(0, 0.7, (n, 2))
    rows = [(float(a), float(b), ["red", "green"][i % 2], ["x", "y", "z"][c])
            for i, ((a, b), c) in enumerate(zip(pts, cls, strict=True))]
    raw = spark.createDataFrame(rows, "a double, b double, colour string, kind string")
    pipeline = Pipeline(stages=[
        StringIndexer(inputCol="kind", outputCol="label"),
        StringIndexer(inputCol="colour", outputCol="colour_idx"),
        OneHotEncoder(inputCols=["colour_idx"], outputCols=["colour_vec"]),
        VectorAssembler(inputCols=["a", "b"], outputCol="ab"),
        StandardScaler(inputCol="ab", outputCol="ab_std", withMean=True),
        MinMaxScaler(inputCol="ab_std", outputCol="ab_mm"),
        VectorAssembler(inputCols=["ab_mm", "colour_vec"], outputCol="features"),
    ])
    df = pipeline.fit(raw).transform(raw).select("features", "label")
    path = str(tmp_path / "train.parquet")
    df.write.parquet(path)
    width = len(df.first()["features"])
    trainer = SparkTrainer(small_model(width, 3), algorithm="agn", workers=2, window=2,
                           epochs=5, batch_size=16, lr=0.01, seed=0)
    _, result = trainer.fit(path)  # a Parquet path works as well as a DataFrame
    assert result.rows == n and "training rows" in result.evaluated_on
    assert result.test_accuracy > 0.9


def test_predictor_on_a_structured_stream(spark, mnist_small, tmp_path):
    (xt, yt) = mnist_small["test_data"]
    model = small_model()
    source = tmp_path / "incoming"
    mnist_frame(spark, xt[:200], yt[:200], partitions=2).write.parquet(str(source))
    schema = spark.read.parquet(str(source)).schema
    stream = spark.readStream.schema(schema).parquet(str(source))
    scored = SparkPredictor(model).transform(stream)
    query = (scored.writeStream.format("memory").queryName("distgrad_scored")
             .outputMode("append").trigger(availableNow=True).start())
    query.awaitTermination(120)
    got = spark.sql("select * from distgrad_scored").toPandas()
    assert len(got) == 200
    feats = torch.from_numpy(np.stack(got["features"].to_numpy()).astype(np.float32))
    with torch.no_grad():
        expected = model(feats).argmax(1).double().numpy()
    np.testing.assert_array_equal(got["prediction"].to_numpy(), expected)


def test_missing_columns_are_named(spark):
    df = spark.createDataFrame([([1.0, 2.0], 1)], "x array<float>, label long")
    with pytest.raises(Exception, match="no features column 'features'"):
        SparkTrainer(small_model(2, 2), workers=1).fit(df)


def test_vector_columns_in_predict_and_evaluate_and_user_code_by_import_path(spark):
    """A Spark ML vector column passes through predict untouched (once: 'cannot serialize
    dict'); the model and data of a user module train on the spark engine."""
    from pyspark.ml.linalg import Vectors

    res = train(engine="spark", workers=2, model="examples.user_model:make_model",
                dataset="examples.user_model:make_data", data_args={"n": 600},
                algorithm="downpour", window=2, batch_size=25, epochs=2, lr=0.01)
    assert res.summary["status"] == "completed" and res.test_accuracy > 0.9
    from examples.user_model import make_data

    (x, y), _ = make_data(n=120)
    rows = [(Vectors.dense(r.tolist()), int(c)) for r, c in zip(x, y, strict=True)]
    df = spark.createDataFrame(rows, ["features", "label"])
    pred = SparkPredictor(res.model, probability_col="p").transform(df)
    assert pred.columns == ["features", "label", "prediction", "p"]
    assert accuracy(pred) > 0.9 and pred.first()["features"].size == 8
    assert SparkEvaluator(res.model).evaluate(df)["accuracy"] > 0.9


def test_fit_overwrite_no_partial_run_dir_and_too_many_workers(spark, mnist_small, tmp_path):
    (x, y) = mnist_small["data"]
    df = mnist_frame(spark, x[:200], y[:200])
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="3 workers need 3 concurrent Spark task slots; "
                                          "this session has 2"):
        SparkTrainer(small_model(), workers=3, out=out, batch_size=50).fit(df)
    assert not out.exists()  # nothing left behind that would block the rerun
    SparkTrainer(small_model(), workers=2, out=out, batch_size=50).fit(df)
    with pytest.raises(ConfigError, match="already holds a run"):
        SparkTrainer(small_model(), workers=2, out=out, batch_size=50).fit(df)
    _, result = SparkTrainer(small_model(), workers=2, out=out, batch_size=50,
                             overwrite=True).fit(df)
    assert result.samples == 200 and (out / "summary.json").exists()
