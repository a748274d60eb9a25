"""Inner (worker-local) optimizers.

Local optimisation stays in ``torch.optim``: a worker runs one optimizer over its
single flat parameter vector for the whole run, so its state (Adam moments,
momentum) survives every pull, as in dist-keras where a pull only overwrote the
weights. Adam and SGD are element-wise, so one flat tensor gives exactly the
same arithmetic as one tensor per layer.
"""

from __future__ import annotations

import torch

from distgrad.errors import ConfigError, choose

INNER_OPTIMIZERS = ("sgd", "adam")


def make_inner_optimizer(
    name: str, params: torch.Tensor, lr: float, **options: float
) -> torch.optim.Optimizer:
    """Build the named optimizer over one flat parameter tensor (``params.grad`` must be set).

    ``adam`` uses Keras' defaults as the thesis scripts did (beta1=0.9,
    beta2=0.999); ``eps`` defaults to PyTorch's 1e-8 (Keras used 1e-7).
    ``sgd`` accepts ``momentum`` and ``nesterov``.
    """
    choose("inner optimizer", name, INNER_OPTIMIZERS)
    if name == "sgd":
        unknown = set(options) - {"momentum", "nesterov", "weight_decay"}
        if unknown:
            raise ConfigError(f"unknown sgd option(s) {sorted(unknown)}; "
                              "valid: momentum, nesterov, weight_decay")
        return torch.optim.SGD([params], lr=lr, foreach=False, **options)
    unknown = set(options) - {"beta1", "beta2", "eps", "weight_decay"}
    if unknown:
        raise ConfigError(f"unknown adam option(s) {sorted(unknown)}; "
                          "valid: beta1, beta2, eps, weight_decay")
    betas = (options.pop("beta1", 0.9), options.pop("beta2", 0.999))
    return torch.optim.Adam([params], lr=lr, betas=betas, foreach=False, **options)
