"""Evaluate parameter vectors on a full data set (the honest metric: the center, every sample)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from distgrad.replica import LossFn, flatten_parameters, is_classification


class Evaluator:
    """Runs a private copy of the model over a data set for any flat parameter vector.

    With several vectors (an ensemble) the prediction is the mean of their softmax
    outputs and the loss is the negative log of that mean probability.
    """

    def __init__(self, module: nn.Module, loss_fn: LossFn, batch_size: int = 2000) -> None:
        self.module = copy.deepcopy(module).cpu().eval()
        self.params = flatten_parameters(self.module)
        self.loss_fn = loss_fn
        self.batch_size = batch_size

    @torch.no_grad()
    def _outputs(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.params.copy_(vector)
        return torch.cat([self.module(x[i : i + self.batch_size])
                          for i in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def evaluate(self, vectors: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
                 ) -> dict[str, float | None]:
        """``{"loss", "acc"}``; ``acc`` is None for non-classification outputs."""
        if len(vectors) == 1:
            out = self._outputs(vectors[0], x)
            loss = float(self.loss_fn(out, y))
        else:
            probs = sum(F.softmax(self._outputs(v, x), dim=1) for v in vectors) / len(vectors)
            out = probs
            loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-30)), y))
        acc = None
        if is_classification(out, y):  # NaN outputs count as wrong, not as class 0
            acc = float((torch.nan_to_num(out, nan=-math.inf).argmax(dim=1) == y).float().mean())
        return {"loss": loss, "acc": acc}
