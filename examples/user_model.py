"""Your own model and data, named by import path on every engine.

``make_model`` and ``make_data`` are *factories*: distgrad imports this module and calls
them in every process that needs them (the server, ``local`` worker processes, ``distgrad
work`` on another host, Ray actors, Spark tasks), so nothing is pickled::

    python -m distgrad train --model examples.user_model:make_model --model-arg hidden=64 \\
        --data examples.user_model:make_data --data-arg n=2000 --engine local --workers 2

    distgrad.train(model="examples.user_model:make_model", model_args={"hidden": 64},
                   dataset="examples.user_model:make_data", engine="sim")

The contract: the model factory takes no required arguments and returns an
``nn.Module``; the data factory returns ``((X, y), (X_test, y_test))`` (tensors or numpy
arrays; the test pair may be None), or ``(train, test)`` torch ``Dataset``s or
``DataLoader``s. Keyword arguments come from ``--model-arg``/``--data-arg`` (JSON values)
or ``model_args``/``data_args``. Both are called with the job's seed set in torch's
global generator, so every process builds the same thing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def make_model(features: int = 8, classes: int = 3, hidden: int = 32) -> nn.Module:
    """A small classifier: features -> hidden -> classes logits."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def make_data(n: int = 1200, features: int = 8, classes: int = 3, seed: int = 7
              ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Gaussian blobs, one per class, seeded: 5/6 for training, 1/6 for testing."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = (centers[y] + rng.normal(0.0, 1.0, size=(n, features))).astype(np.float32)
    cut = n * 5 // 6
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss by import path (``--loss examples.user_model:loss``): label-smoothed CE."""
    return nn.functional.cross_entropy(out, y, label_smoothing=0.05)


def make_streams(samples: int = 250, batch: int = 25, features: int = 8, classes: int = 3):
    """Per-worker streams (:mod:`distgrad.data.streams`): each worker generates its own
    batches of the same blobs as :func:`make_data` — as it would read its own files —
    seeded by (seed, worker, epoch), so a rerun sees the same stream."""
    from distgrad.data.streams import WorkerStreams

    (_, _), test = make_data(n=600, features=features, classes=classes)
    rng = np.random.default_rng(7)  # the class centers of make_data
    centers = rng.normal(0.0, 2.0, size=(classes, features))

    def make(worker: int, workers: int, epoch: int, seed: int):
        g = np.random.default_rng([seed, worker, epoch])
        for start in range(0, samples, batch):
            n = min(batch, samples - start)
            y = g.integers(0, classes, size=n)
            x = (centers[y] + g.normal(0.0, 1.0, size=(n, features))).astype(np.float32)
            yield torch.from_numpy(x), torch.from_numpy(y)

    return WorkerStreams(make=make, samples=samples, test=test)
