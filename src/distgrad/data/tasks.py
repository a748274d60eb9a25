"""What kind of task a data set is, its loss, and the checks made before training.

The task follows from the targets, once, here:

* ``classification`` — integer labels ``(N,)``: cross-entropy; metric accuracy;
* ``language_model`` — integer targets ``(N, T)`` (next tokens): cross-entropy per
  token; metrics perplexity ``exp(loss)`` and token accuracy;
* ``regression`` — floating-point targets: mean squared error; metrics MSE and R².

:func:`check_inputs` runs before any worker starts and raises a one-line
:class:`~distgrad.errors.ConfigError` naming the problem (float labels for a
classifier, 2-D labels, a model whose output width does not cover the classes,
non-finite features or targets), instead of a torch traceback in every worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from distgrad.errors import ConfigError

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"
REGRESSION = "regression"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LAZY_CHECKED = 512
"""Samples of a data set read lazily whose features are checked for finiteness."""


def task_of(y: torch.Tensor) -> str:
    """The task of targets ``y`` (see the module docstring)."""
    if y.is_floating_point():
        return REGRESSION
    return CLASSIFICATION if y.dim() == 1 else LANGUAGE_MODEL


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``(..., C)`` against integer targets ``(...)`` (per
    sample for classification, per token for a language model)."""
    if out.dim() == 2 and y.dim() == 1:
        return F.cross_entropy(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error; an output ``(N, 1)`` against targets ``(N,)`` is squeezed."""
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
        out = out.squeeze(-1)
    return F.mse_loss(out, y.to(out.dtype))


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}
"""Losses by name (``--loss``); ``auto`` picks by task, an import path names any other."""


def loss_for(name: str, y: torch.Tensor) -> LossFn:
    """The loss called ``name`` (``auto``: by the task of ``y``) or at import path ``name``."""
    from distgrad.entry import is_path, resolve

    if name == "auto":
        return mse if task_of(y) == REGRESSION else cross_entropy
    if is_path(name):
        fn = resolve(name, "loss")
        if not callable(fn):
            raise ConfigError(f"loss {name!r} is a {type(fn).__name__}, not a function")
        return fn  # type: ignore[no-any-return]
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose from: auto, "
                          f"{', '.join(sorted(LOSSES))}, or an import path 'pkg.module:fn'")
    return LOSSES[name]


def is_classifier_loss(loss_fn: Any) -> bool:
    return loss_fn is cross_entropy or loss_fn is F.cross_entropy


def check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any, *,
                 name: str = "data", classes: int | None = None) -> None:
    """Check a few samples against the model and the loss before training (one-line
    ConfigError naming the problem); also every feature (of a data set read lazily: the
    first ``LAZY_CHECKED`` samples) and every target for finiteness."""
    xs = x if isinstance(x, torch.Tensor) else x[:LAZY_CHECKED]  # read lazily: a prefix
    if xs.is_floating_point() and not bool(torch.isfinite(xs).all()):
        bad = int((~torch.isfinite(xs)).reshape(len(xs), -1).any(1).sum())
        raise ConfigError(f"{name}: {bad} sample(s) have non-finite features (NaN or inf); "
                          f"clean or impute them before training")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ConfigError(f"{name}: the targets hold NaN or inf")
    classifier = is_classifier_loss(loss_fn)
    if classifier and y.is_floating_point():
        raise ConfigError(f"{name}: cross-entropy needs integer class labels, got {y.dtype} "
                          f"targets (convert them with y.long(), or use loss='mse' for "
                          f"regression)")
    if classifier and y.dtype == torch.bool:
        raise ConfigError(f"{name}: boolean labels; convert them with y.long()")
    if classifier and int(y.min()) < 0:
        raise ConfigError(f"{name}: class labels must be >= 0, got {int(y.min())}")
    sample_x, sample_y = x[:2], y[:2]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(sample_x)
    except Exception as exc:  # the model and the features do not fit: say so in one line
        raise ConfigError(f"the model cannot take {name} features of shape "
                          f"{tuple(x.shape[1:])} and dtype {x.dtype}: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model returns a {type(out).__name__}, not a tensor; "
                          f"use a custom step function (step=...) for other outputs")
    if classifier:
        if sample_y.dim() == 1 and out.dim() != 2:
            raise ConfigError(f"{name}: class labels of shape {tuple(y.shape)} need model "
                              f"outputs (N, classes), got {tuple(out.shape)}")
        if sample_y.dim() > 1 and out.dim() != sample_y.dim() + 1:
            raise ConfigError(f"{name}: labels of shape {tuple(y.shape)} (one per row? pass "
                              f"them as (N,), e.g. y.squeeze(1) or y.argmax(1)) do not match "
                              f"model outputs of shape {tuple(out.shape)}")
        width = int(out.shape[-1])
        top = int(y.max()) + 1 if classes is None else classes
        if width < top:
            raise ConfigError(f"{name}: the labels go up to {top - 1} ({top} classes) but "
                              f"the model outputs only {width} values per sample")
    if loss_fn is mse:
        pred = out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out
        if pred.shape != sample_y.shape:
            hint = (" (integer class labels stored as floats? convert them with y.long() for "
                    "cross-entropy)" if y.dim() == 1 and out.dim() == 2 else "")
            raise ConfigError(f"{name}: float targets of shape {tuple(y.shape)} are regressed "
                              f"with MSE, but the model outputs shape {tuple(out.shape)}"
                              f"{hint}")
    try:
        loss = loss_fn(out, sample_y)
    except Exception as exc:
        raise ConfigError(f"{name}: the loss cannot compare model outputs of shape "
                          f"{tuple(out.shape)} with targets of shape {tuple(y.shape)} "
                          f"({y.dtype}): {type(exc).__name__}: {exc}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"the loss must return a scalar tensor, got "
                          f"{getattr(loss, 'shape', type(loss).__name__)}")


def chance_accuracy(y: torch.Tensor, classes: int) -> float | None:
    """The accuracy of guessing uniformly among the classes, or None without classes."""
    if task_of(y) == REGRESSION or classes < 1:
        return None
    return 1.0 / classes


def task_summary(y: torch.Tensor, final_test: dict[str, Any], train_m: dict[str, Any],
                 has_test: bool) -> dict[str, Any]:
    """The summary fields that depend on the task (joined after the generic ones, so they
    override ``last_batch_train_accuracy`` where a batch has no accuracy)."""
    task = task_of(y)
    out: dict[str, Any] = {"task": task}
    if not has_test:
        out["test_note"] = ("no test data was given: test metrics are absent; train_* "
                            "evaluate the final center on the training data")
    if task == LANGUAGE_MODEL:
        out["test_perplexity"] = final_test.get("test_perplexity")
        out["train_perplexity"] = train_m.get("perplexity")
    elif task == REGRESSION:
        out["test_mse"] = final_test.get("test_mse")
        out["test_r2"] = final_test.get("test_r2")
        out["train_mse"] = train_m.get("mse")
        out["train_r2"] = train_m.get("r2")
        out["last_batch_train_accuracy"] = None
    return out
