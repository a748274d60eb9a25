"""Inputs are checked before training: one-line ConfigErrors, and metrics chosen by task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import distgrad
from distgrad.errors import ConfigError
from distgrad.parts import Job, build_parts

X = torch.randn(120, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()  # 3 classes


def parts(model: nn.Module | None = None, x=X, y=Y, **kw):
    return build_parts(Job(engine="sim", workers=2, **kw), model=model or nn.Linear(6, 3),
                       data=(x, y))


@pytest.mark.parametrize(("model", "x", "y", "match"), [
    (nn.Linear(6, 2), X, Y, "labels go up to 2 \\(3 classes\\) but the model outputs only 2"),
    (None, X, Y.float(), "float targets of shape \\(120,\\) are regressed .* y.long\\(\\)"),
    (None, X, Y[:, None], "labels of shape \\(120, 1\\)"),
    (None, torch.where(torch.arange(120)[:, None] == 7, math.nan, X), Y,
     "1 sample\\(s\\) have non-finite features"),
    (nn.Linear(5, 3), X, Y, "the model cannot take data features of shape \\(6,\\)"),
    (None, X, Y - 1, "class labels must be >= 0, got -1"),
])
def test_bad_inputs_fail_before_training(model, x, y, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parts(model, x, y)
    assert "\n" not in str(info.value)


def test_regression_with_negative_targets_and_no_test_data() -> None:
    """Targets in (-2, -1] once crashed the summary (chance = 1/classes)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 4, generator=g)
    y = -1.5 + 0.1 * torch.tanh(x @ torch.tensor([1.0, -1.0, 0.5, 0.0]))
    with torch.random.fork_rng():  # the same initial model whatever ran before
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
    with torch.no_grad():
        start_mse = float(((model(x).squeeze(1) - y) ** 2).mean())
    res = distgrad.train(engine="sim", workers=2, epochs=5, lr=0.1, algorithm="downpour",
                         model=model, data=(x, y), batch_size=20)
    s = res.summary
    assert s["task"] == "regression" and s["test_accuracy"] is None
    assert s["last_batch_train_accuracy"] is None and s["not_learned"] is False
    assert "no test data" in s["test_note"] and s["test_loss"] is None
    assert s["train_mse"] is not None and s["train_mse"] < start_mse / 2, (start_mse, s)
    assert not s["diverged"]


def test_numpy_float64_data_and_a_dataloader_are_accepted() -> None:
    ds = torch.utils.data.TensorDataset(X, Y)
    loader = torch.utils.data.DataLoader(ds, batch_size=32)
    p = build_parts(Job(engine="sim", workers=2), model=nn.Linear(6, 3),
                    data=(X.double().numpy(), Y.numpy()), test_data=loader)
    assert p.dataset.x_train.dtype == torch.float32 and len(p.dataset.y_test) == 120
    assert p.identity["task"] == "classification" and p.identity["parameters"] == 21


def test_progress_true_shows_a_bar(capsys) -> None:
    distgrad.train(engine="sim", workers=2, model=nn.Linear(6, 3), data=(X, Y),
                   progress=True, batch_size=30)
    assert "sample" in capsys.readouterr().err


def test_optimizers_schedulers_and_custom_steps_by_name_and_path(tmp_path) -> None:
    res = distgrad.train(engine="sim", workers=2, model=nn.Linear(6, 3), data=(X, Y),
                         inner_optimizer="AdamW", inner_options={"weight_decay": 0.01},
                         lr_scheduler="tests.test_inputs:halving", step="tests.test_inputs:step",
                         autocast=True, batch_size=30, epochs=2, lr=0.05)
    assert res.summary["status"] == "completed" and np.isfinite(res.summary["train_loss"])
    assert res.summary["last_batch_train_accuracy"] > 0  # the step reported its "correct"
    with pytest.raises(ConfigError, match="unknown inner optimizer 'Adamm'"):
        Job(inner_optimizer="Adamm")


def halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    out = model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    return loss, {"correct": int((out.argmax(1) == y).sum())}


class Blobs(torch.utils.data.Dataset):
    """A map-style data set that makes every sample on demand (as one reading files)."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        y = (i + self.offset) % 3
        g = torch.Generator().manual_seed(i + self.offset)
        x = torch.randn(6, generator=g, dtype=torch.float64)
        x[y] += 4.0  # class y: feature y is high
        return x, y


def test_a_map_style_dataset_is_read_batch_by_batch_on_local_workers() -> None:
    from distgrad.data.lazy import LazyRows

    p = build_parts(Job(engine="local", workers=2, train_samples=200), model=nn.Linear(6, 3),
                    data=Blobs(300), test_data=torch.utils.data.DataLoader(Blobs(60, 1000)))
    assert isinstance(p.dataset.x_train, LazyRows) and len(p.dataset.x_train) == 200
    assert p.dataset.x_train[torch.tensor([4, 1])].dtype == torch.float32
    res = distgrad.train(engine="local", workers=2, model=nn.Linear(6, 3), data=Blobs(300),
                         test_data=Blobs(60, 1000), epochs=3, batch_size=30, lr=0.05,
                         algorithm="downpour")
    assert res.summary["status"] == "completed" and res.samples == 900
    assert res.test_accuracy > 0.8  # chance: 1/3


def test_float_labels_with_an_explicit_cross_entropy() -> None:
    with pytest.raises(ConfigError, match=r"cross-entropy needs integer class labels, got "
                                          r"torch\.float32 targets"):
        parts(x=X, y=Y.float(), loss="cross_entropy")
