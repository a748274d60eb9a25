"""Evaluate parameter vectors on a full data set (the honest metric: the center, every sample).

The metrics follow the task (:func:`distgrad.data.tasks.task_of`): ``acc`` for
classification; ``acc`` (per token) and ``perplexity`` for a language model;
``mse`` and ``r2`` for regression. ``loss`` is always the loss function's.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from distgrad.data.tasks import LANGUAGE_MODEL, REGRESSION, task_of
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
        # a language model's outputs are (B, T, vocab): keep a batch's worth of logits
        rows = self.batch_size if x.dim() < 2 or x.is_floating_point() else max(
            1, self.batch_size // max(1, x.shape[1]) * 8)
        return torch.cat([self.module(x[i : i + rows]) for i in range(0, len(x), rows)])

    @torch.no_grad()
    def evaluate(self, vectors: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
                 ) -> dict[str, float | None]:
        """``{"loss", "acc"}`` and the task's other metrics (``perplexity``; ``mse``,
        ``r2``); ``acc`` is None where there are no classes."""
        if len(x) == 0:
            return {"loss": None, "acc": None}
        if len(vectors) == 1:
            out = self._outputs(vectors[0], x)
            loss = float(self.loss_fn(out, y))
        else:
            probs = sum(F.softmax(self._outputs(v, x), dim=-1) for v in vectors) / len(vectors)
            out = probs
            logp = torch.log(probs.clamp_min(1e-30))
            loss = float(F.nll_loss(logp.reshape(-1, logp.shape[-1]), y.reshape(-1)))
        metrics: dict[str, float | None] = {"loss": loss, "acc": None}
        task = task_of(y)
        if is_classification(out, y) or (
                task == LANGUAGE_MODEL and out.dim() == y.dim() + 1):
            # NaN outputs count as wrong, not as class 0
            pred = torch.nan_to_num(out, nan=-math.inf).argmax(dim=-1)
            metrics["acc"] = float((pred == y).float().mean())
        if task == LANGUAGE_MODEL:
            metrics["perplexity"] = math.exp(loss) if loss < 700 else math.inf
        elif task == REGRESSION:
            pred = out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out
            if pred.shape == y.shape:
                err = float(((pred - y) ** 2).mean())
                var = float(((y - y.mean()) ** 2).mean())
                metrics["mse"] = err
                metrics["r2"] = 1.0 - err / var if var > 0 else None
        return metrics
