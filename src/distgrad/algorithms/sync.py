"""Synchronous data-parallel SGD (distributed mini-batch), Hermans (2017) §2.2 / Ch1.

Each of the n workers computes the gradient of its own mini-batch at the same
θ̃_t and sends it (times its batch size); the server waits for all of them
(barrier), forms the mean gradient over the global batch of n·m samples and takes
one step of the inner optimizer (``sgd``: θ̃ ← θ̃ − η·ḡ; ``adam``: Adam on ḡ),
then every worker pulls. This is what PyTorch DDP computes, and more workers
mean a bigger effective batch, not more steps.

``--batch-size`` is per worker, as in DDP. The window is fixed at 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    ServerRule,
    StepStats,
    WorkerRule,
)
from distgrad.errors import ConfigError
from distgrad.optim import load_optimizer_state, make_inner_optimizer, optimizer_state


@dataclass(frozen=True, kw_only=True)
class SyncConfig(AlgorithmConfig):
    """No hyperparameters of its own; the server uses the inner optimizer and learning rate."""

    window: int = 1

    def validate(self) -> None:
        if self.window != 1:
            raise ConfigError(f"sync commits after every step; window must be 1, got {self.window}")


class GradientWorker(WorkerRule):
    """Computes a gradient at the pulled center and sends batch_size × gradient."""

    def __init__(self, config, run) -> None:
        super().__init__(config, run)
        self._samples = 0

    def local_step(self, rep, x, y) -> StepStats:
        stats = rep.gradient(x, y)
        self._samples = stats.samples
        return stats

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return torch.mul(rep.grad, float(self._samples), out=rep.payload)

    def state_dict(self) -> dict:
        return {"samples": int(self._samples)}

    def load_state_dict(self, state) -> None:
        self._samples = int(state["samples"])


class ServerOptimizerRule(ServerRule):
    """Sums the weighted gradients of a round and steps a server-side optimizer on θ̃."""

    synchronous = True

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self._center = center
        center.grad = torch.zeros_like(center)
        self._samples = 0
        self.optimizer = make_inner_optimizer(
            self.run.inner_optimizer, center, self.run.lr, **dict(self.run.inner_options)
        )

    def accumulate(self, payload: torch.Tensor, ctx: CommitContext) -> None:
        self._center.grad.add_(payload)
        self._samples += ctx.samples

    def apply_round(self, center: torch.Tensor, participants: int) -> dict[str, float]:
        center.grad.div_(self._samples)
        self.optimizer.step()
        center.grad.zero_()
        self._samples = 0
        return {}

    def state_dict(self) -> dict:
        return {"optimizer": optimizer_state(self.optimizer)}

    def load_state_dict(self, state) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])


ALGORITHM = Algorithm(
    name="sync",
    summary="synchronous distributed mini-batch SGD: averaged gradients, one barrier per step",
    config=SyncConfig,
    worker_rule=GradientWorker,
    server_rule=ServerOptimizerRule,
    synchronous=True,
    reference="Hermans 2017 §2.2 (what PyTorch DDP computes)",
)
