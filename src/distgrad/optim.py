"""Inner (worker-local) optimizers.

Local optimisation stays in ``torch.optim``: a worker runs one optimizer over its
parameters (views into its flat buffer) for the whole run, so its state (Adam
moments, momentum) survives every pull, as in dist-keras where a pull only
overwrote the weights. Adam and SGD are element-wise: per-layer views and one
flat tensor give the same arithmetic; the views are faster (cache locality).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from distgrad.errors import ConfigError, choose

INNER_OPTIMIZERS = ("sgd", "adam")


def make_inner_optimizer(
    name: str, params: torch.Tensor | Iterable[torch.Tensor], lr: float, **options: float
) -> torch.optim.Optimizer:
    """Build the named optimizer over ``params`` (a tensor or tensors whose ``.grad`` is set).

    ``adam`` uses Keras' defaults as the thesis scripts did (beta1=0.9,
    beta2=0.999); ``eps`` defaults to PyTorch's 1e-8 (Keras used 1e-7). It runs
    PyTorch's fused kernel (one pass per tensor; ~4x faster than the default on
    the thesis MLP on CPU). ``sgd`` accepts ``momentum`` and ``nesterov``.
    """
    choose("inner optimizer", name, INNER_OPTIMIZERS)
    tensors = [params] if isinstance(params, torch.Tensor) else list(params)
    if name == "sgd":
        unknown = set(options) - {"momentum", "nesterov", "weight_decay"}
        if unknown:
            raise ConfigError(f"unknown sgd option(s) {sorted(unknown)}; "
                              "valid: momentum, nesterov, weight_decay")
        return torch.optim.SGD(tensors, lr=lr, foreach=False, **options)
    unknown = set(options) - {"beta1", "beta2", "eps", "weight_decay"}
    if unknown:
        raise ConfigError(f"unknown adam option(s) {sorted(unknown)}; "
                          "valid: beta1, beta2, eps, weight_decay")
    betas = (options.pop("beta1", 0.9), options.pop("beta2", 0.999))
    return torch.optim.Adam(tensors, lr=lr, betas=betas, fused=True, **options)


def clone_state(value: Any, device: str | torch.device | None = None) -> Any:
    """A copy of a nested state (dicts, lists, tuples, tensors, plain values) sharing no tensor
    with ``value`` (snapshots must not change when training goes on); tensors are moved
    to ``device`` if given."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True) if device is not None else (
            value.detach().clone())
    if isinstance(value, Mapping):
        return {k: clone_state(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_state(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_state(v, device) for v in value)
    return value


def optimizer_state(optimizer: torch.optim.Optimizer,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """``optimizer.state_dict()`` as an independent copy (tensors cloned, onto ``device``).

    ``torch.optim`` returns its live state tensors, which the next step changes in place;
    a checkpoint needs a copy. Loading moves the tensors back to the parameters' device.
    """
    return clone_state(optimizer.state_dict(), device)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a state from :func:`optimizer_state` without aliasing it.

    ``Optimizer.load_state_dict`` keeps the given tensors when their dtype and device
    already match, so later steps would write into the snapshot (and a snapshot loaded
    twice would be shared by both optimizers); the state is cloned first.
    """
    optimizer.load_state_dict(clone_state(dict(state)))


def compensated_momentum(target: float, workers: int, minimum: float = 0.0) -> float:
    """Explicit momentum that keeps explicit + implicit momentum at ``target`` (EXPERIMENTAL).

    Mitliagkas et al. (2016, "Asynchrony begets momentum") show that n asynchronous
    workers behave in expectation like momentum SGD with an implicit momentum of
    1 − 1/n. To keep the total near ``target``, the explicit term becomes
    ``max(target − (1 − 1/n), minimum)``. The result is an expectation under a
    queueing model, not a guarantee; treat the setting as an experiment.
    """
    return max(target - (1.0 - 1.0 / workers), minimum)


def compensate_inner_options(name: str, options: dict[str, float], target: float,
                             workers: int) -> dict[str, float]:
    """Inner-optimizer options with their momentum term replaced by :func:`compensated_momentum`.

    ``sgd``: ``momentum``; ``adam``: ``beta1`` (Adam's first-moment decay plays the
    role of momentum). Other options are kept.
    """
    choose("inner optimizer", name, INNER_OPTIMIZERS)
    mu = compensated_momentum(target, workers)
    key = "momentum" if name == "sgd" else "beta1"
    return {**options, key: mu}
