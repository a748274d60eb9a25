"""Spark API in the spirit of dist-keras: train from a DataFrame, predict and evaluate on one.

::

    from distgrad.spark import SparkTrainer, SparkPredictor, SparkEvaluator

    trainer = SparkTrainer(model, algorithm="adag", workers=4, window=12, epochs=3)
    model, result = trainer.fit(train_df, validation=test_df)     # or a Parquet path
    scored = SparkPredictor(model).transform(test_df)             # adds "prediction"
    SparkEvaluator(model).evaluate(test_df)                        # {"accuracy", "loss", ...}

The DataFrame has a ``features`` column — an array of numbers, or a Spark ML vector
made by Spark ML's own transformers (``VectorAssembler``, ``StandardScaler``,
``MinMaxScaler``, ``OneHotEncoder``...) — and a numeric ``label`` column (e.g. from
``StringIndexer``), or float regression targets (``label_type="float"``, or a regression
``loss_fn`` such as ``F.mse_loss``). distgrad writes no feature transformers of its own.
Training runs on the ``spark`` engine (:mod:`distgrad.engines.spark`); prediction and evaluation run
the model over Arrow/pandas batches in each partition (never row by row), and the
predictor works on streaming DataFrames too.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distgrad.data.tasks import mse
from distgrad.engines.spark import (
    SparkEngine,
    as_feature_frame,
    import_pyspark,
    use_driver_python,
)
from distgrad.errors import ConfigError, positive_int


def _frame(spark: Any, data: Any) -> Any:
    if isinstance(data, str | Path):
        return spark.read.parquet(str(data))
    return data


def _session() -> Any:
    import_pyspark()
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None:
        raise ConfigError("no active SparkSession: create one (SparkSession.builder...) "
                          "before using the distgrad Spark API")
    use_driver_python(spark)
    return spark


def _model_fn(model: nn.Module, batch_size: int) -> Callable[[np.ndarray], torch.Tensor]:
    model = copy.deepcopy(model).cpu().eval()

    @torch.no_grad()
    def outputs(x: np.ndarray) -> torch.Tensor:
        torch.set_num_threads(1)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return torch.cat([model(t[i:i + batch_size]) for i in range(0, len(t), batch_size)])

    return outputs


def _features(series: Any) -> np.ndarray:
    return np.stack(series.to_numpy()).astype(np.float32, copy=False)


class SparkTrainer:
    """Train ``model`` data-parallel on a Spark DataFrame with any distgrad algorithm.

    ``workers`` partitions are trained as the workers of a barrier stage; the server
    runs in this driver. Other keywords are :class:`distgrad.Job` fields
    (``window``, ``epochs``, ``batch_size``, ``lr``, ``inner_optimizer``, ``params``,
    ``seed``, ``eval_every``...). ``out`` writes a run directory like ``distgrad train``
    (``overwrite=True`` replaces an existing one); a fit that fails removes the run
    directory it created, so the same call can simply be repeated.

    ``label_type``: ``long`` (class labels; Spark ML's double-typed indices are cast) or
    ``float`` (regression targets, kept as floats); ``auto`` (default) takes ``float``
    for a regression loss (MSE, L1, Huber, smooth L1) and ``long`` otherwise. The loss
    defaults to cross-entropy, or MSE for ``label_type="float"``.
    """

    def __init__(self, model: nn.Module, algorithm: str = "adag", workers: int = 2, *,
                 features_col: str = "features", label_col: str = "label",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 label_type: str = "auto",
                 out: str | Path | None = None, overwrite: bool = False,
                 max_failures: int = 4,
                 eval_rows: int = 2000, engine: SparkEngine | None = None,
                 **job_fields: Any) -> None:
        from distgrad.job import Job

        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self.model = model
        self.features_col, self.label_col = features_col, label_col
        self.label_type = label_type_of(label_type, loss_fn)
        self.loss_fn = loss_fn or (mse if self.label_type == "float" else F.cross_entropy)
        self.out, self.overwrite = out, overwrite
        self.eval_rows = positive_int("eval_rows", eval_rows)
        self.job = Job(algorithm=algorithm, workers=workers, engine="spark", **job_fields)
        self.engine = engine or SparkEngine(max_failures=max_failures)

    def fit(self, data: Any, validation: Any = None) -> tuple[nn.Module, Any]:
        """Train on ``data`` (a DataFrame or a Parquet path); return (trained model, result).

        ``validation`` (DataFrame or path) is collected to the driver to evaluate the
        center during training; without it the first ``eval_rows`` training rows are
        used, and the summary says so.
        """
        from distgrad.data import Dataset
        from distgrad.rundir import prepare_out

        spark = _session()
        df = as_feature_frame(_frame(spark, data), self.features_col, self.label_col,
                              self.label_type)
        rows = df.count()
        if rows < int(self.job.workers):  # type: ignore[arg-type]
            raise ConfigError(f"{rows} training rows for {self.job.workers} workers")
        evaluated_on = "validation DataFrame"
        if validation is None:
            val = df.limit(self.eval_rows)
            evaluated_on = f"first {self.eval_rows} training rows (no validation DataFrame)"
        else:
            val = as_feature_frame(_frame(spark, validation), self.features_col,
                                   self.label_col, self.label_type)
        pdf = val.toPandas()
        x_val = torch.from_numpy(_features(pdf["features"]))
        y_val = _labels(pdf["label"], self.label_type)
        dataset = Dataset("spark", x_val[:1], y_val[:1], x_val, y_val)  # (classes: labels)
        existed = self.out is not None and Path(self.out).exists()
        out_dir = prepare_out(self.out, overwrite=self.overwrite)
        try:
            return self._fit(spark, df, rows, dataset, out_dir, evaluated_on)
        except BaseException:
            if out_dir is not None and not existed:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise

    def _fit(self, spark: Any, df: Any, rows: int, dataset: Any, out_dir: Path | None,
             evaluated_on: str) -> tuple[nn.Module, Any]:
        from distgrad.parts import RunParts
        from distgrad.run import Run

        parts = RunParts(job=self.job, dataset=dataset,
                         shards=[np.empty(0, np.int64)] * int(self.job.workers),  # type: ignore[arg-type]
                         template=self.model, loss_fn=self.loss_fn)
        # the shards are empty (the rows stay in Spark): an epoch is the DataFrame's rows
        run = Run.prepare(parts, out=out_dir, epoch_samples=rows)
        outcome = run.execute(self.engine, lambda: self.engine.train_frame(
            spark, df, self.job, self.model, self.loss_fn, run.server, run.recorder, run.evals))

        def train_metrics(trained: nn.Module) -> dict[str, float | None]:
            m = SparkEvaluator(trained, loss_fn=self.loss_fn,
                               label_type=self.label_type).evaluate(df)
            return {"acc": m["accuracy"], "loss": m["loss"],
                    **{k: m[k] for k in ("mse", "r2") if k in m}}

        result = run.finalize(outcome, train_metrics=train_metrics,
                              extra={"model": type(self.model).__name__, "rows": rows,
                                     "evaluated_on": evaluated_on})
        return result.model, result


class SparkPredictor:
    """Adds ``output_col`` (the predicted class, as Spark ML writes it: a double) and, with
    ``probability_col``, the softmax probabilities; batch and streaming DataFrames alike."""

    def __init__(self, model: nn.Module, *, features_col: str = "features",
                 output_col: str = "prediction", probability_col: str | None = None,
                 batch_size: int = 1024) -> None:
        self.model = model
        self.features_col = features_col
        self.output_col = output_col
        self.probability_col = probability_col
        self.batch_size = positive_int("batch_size", batch_size)

    def transform(self, df: Any) -> Any:
        import pandas as pd
        from pyspark.ml.functions import vector_to_array
        from pyspark.ml.linalg import VectorUDT
        from pyspark.sql import functions as sf
        from pyspark.sql.types import ArrayType, DoubleType, StructField, StructType

        if self.features_col not in df.columns:
            raise ConfigError(f"no features column {self.features_col!r}; columns: "
                              f"{df.columns}")
        tmp = "__distgrad_features"
        feats = sf.col(self.features_col)
        if isinstance(df.schema[self.features_col].dataType, VectorUDT):
            feats = vector_to_array(feats, dtype="float32")
        fields = [StructField("prediction", DoubleType())]
        if self.probability_col:
            fields.append(StructField("probability", ArrayType(DoubleType())))
        outputs = _model_fn(self.model, self.batch_size)
        with_prob = self.probability_col is not None

        def predict(features: pd.Series) -> pd.DataFrame:
            if len(features) == 0:
                return pd.DataFrame({f.name: [] for f in fields})
            out = outputs(_features(features))
            res = pd.DataFrame({"prediction": out.argmax(dim=1).double().numpy()})
            if with_prob:
                res["probability"] = list(F.softmax(out, dim=1).double().numpy())
            return res

        # a scalar pandas UDF: every other column (Spark ML vectors included) stays as it is;
        # Spark reads the kind of UDF from the hints, which must be objects, not strings
        predict.__annotations__ = {"features": pd.Series, "return": pd.DataFrame}
        udf = sf.pandas_udf(predict, StructType(fields))  # type: ignore[call-overload]
        df2 = df.withColumn(tmp, udf(feats.cast("array<float>")))
        df2 = df2.withColumn(self.output_col, sf.col(f"{tmp}.prediction"))
        if self.probability_col:
            df2 = df2.withColumn(self.probability_col, sf.col(f"{tmp}.probability"))
        return df2.drop(tmp)


def label_type_of(label_type: str, loss_fn: Any) -> str:
    """``long`` or ``float``: the kind of labels (see :class:`SparkTrainer`)."""
    from distgrad.errors import choose

    choose("label_type", label_type, ("auto", "long", "float"))
    if label_type != "auto":
        return label_type
    return "float" if loss_fn is not None and loss_fn in REGRESSION_LOSSES else "long"


#: losses that compare float targets: ``label_type="auto"`` keeps the labels as floats
REGRESSION_LOSSES = (mse, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)


def _labels(series: Any, label_type: str) -> torch.Tensor:
    """A pandas label column as class labels (int64) or regression targets (float32)."""
    values = series.to_numpy()
    return torch.from_numpy(values.astype(np.int64 if label_type == "long" else np.float32))


class SparkEvaluator:
    """Accuracy and mean loss of ``model`` over a DataFrame, computed in the partitions
    (batches of ``batch_size``) and summed on the driver: one Spark job.

    With ``label_type="float"`` (regression targets; ``auto`` as in :class:`SparkTrainer`)
    ``accuracy`` is None and ``mse`` and ``r2`` are given instead."""

    def __init__(self, model: nn.Module, *, features_col: str = "features",
                 label_col: str = "label",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 label_type: str = "auto", batch_size: int = 1024) -> None:
        self.model = model
        self.features_col, self.label_col = features_col, label_col
        self.label_type = label_type_of(label_type, loss_fn)
        self.loss_fn = loss_fn or (mse if self.label_type == "float" else F.cross_entropy)
        self.batch_size = positive_int("batch_size", batch_size)

    def evaluate(self, data: Any) -> Mapping[str, float | None]:
        spark = _session()
        df = as_feature_frame(_frame(spark, data), self.features_col, self.label_col,
                              self.label_type)
        outputs = _model_fn(self.model, self.batch_size)
        loss_fn, label_type = self.loss_fn, self.label_type

        def partial(batches: Iterator[Any]) -> Iterator[Any]:
            import pandas as pd

            for pdf in batches:
                if len(pdf) == 0:
                    continue
                out = outputs(_features(pdf["features"]))
                y = _labels(pdf["label"], label_type)
                loss = float(loss_fn(out, y)) * len(y)
                if label_type == "long":
                    correct, sse = int((out.argmax(dim=1) == y).sum()), 0.0
                else:
                    pred = out.squeeze(-1) if out.dim() == 2 and out.shape[1] == 1 else out
                    correct, sse = 0, float(((pred - y) ** 2).sum())
                yield pd.DataFrame({"n": [len(y)], "correct": [correct], "loss": [loss],
                                    "sse": [sse], "sy": [float(y.double().sum())],
                                    "syy": [float((y.double() ** 2).sum())]})

        row = (df.mapInPandas(partial, "n long, correct long, loss double, sse double, "
                                       "sy double, syy double")
               .groupBy().sum().collect()[0])
        n = row["sum(n)"] or 0
        if n == 0:
            raise ConfigError("cannot evaluate on an empty DataFrame")
        if label_type == "long":
            return {"accuracy": row["sum(correct)"] / n, "loss": row["sum(loss)"] / n,
                    "count": float(n)}
        var = row["sum(syy)"] / n - (row["sum(sy)"] / n) ** 2
        err = row["sum(sse)"] / n
        return {"accuracy": None, "loss": row["sum(loss)"] / n, "mse": err,
                "r2": 1.0 - err / var if var > 0 else None, "count": float(n)}


def accuracy(df: Any, prediction_col: str = "prediction", label_col: str = "label") -> float:
    """Fraction of rows whose prediction equals the label (one Spark aggregation)."""
    from pyspark.sql import functions as sf

    row = df.select(sf.avg((sf.col(prediction_col) == sf.col(label_col)).cast("double"))
                    .alias("acc")).collect()[0]
    if row["acc"] is None:
        raise ConfigError("cannot compute accuracy on an empty DataFrame")
    return float(row["acc"])


__all__ = ["SparkEvaluator", "SparkPredictor", "SparkTrainer", "accuracy"]
