"""Shared fixtures: tiny models and data sets so that whole runs take a second or less."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from torch import nn

from distgrad.data import load_mnist
from distgrad.models import initialize


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Spark needs a Java runtime: without one, the ``spark`` tests are skipped, not failed."""
    if shutil.which("java") or os.environ.get("JAVA_HOME"):
        return
    skip = pytest.mark.skip(reason="Spark needs Java 17+: no `java` on PATH and no JAVA_HOME")
    for item in items:
        if "spark" in item.keywords:
            item.add_marker(skip)


class Point(nn.Module):
    """A model that is just a 2-vector w; paired with :func:`half_sq` it is the quadratic
    0.5·‖w − y‖², whose SGD step is w ← w − η(w − y): easy to follow by hand."""

    def __init__(self, init: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


@pytest.fixture(autouse=True)
def _default_signal_handlers():
    """Each test starts with Python's own SIGINT/SIGTERM handlers: ``ray.init`` in this
    process installs a SIGTERM handler of its own (``sys.exit``) that outlives
    ``ray.shutdown``, and would otherwise decide how a later test's interrupt ends."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def half_sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


def point_data(targets: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor(targets, dtype=torch.float32)
    return torch.zeros(len(y), 1), y


class TinyMLP(nn.Sequential):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@pytest.fixture(scope="session")
def mnist_small() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """3,000 training and 1,000 test images of the real MNIST."""
    d = load_mnist()
    return {"data": (d.x_train[:3000], d.y_train[:3000]),
            "test_data": (d.x_test[:1000], d.y_test[:1000])}


@pytest.fixture()
def tiny_mlp() -> nn.Module:
    return initialize(TinyMLP(), seed=0)
