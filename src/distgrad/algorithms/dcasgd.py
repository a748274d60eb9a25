"""DC-ASGD — asynchronous SGD with delay compensation (Zheng et al., ICML 2017, arXiv 1609.08326).

A gradient g = ∇L(w_bak) computed on the copy w_bak that worker k pulled arrives
when the center is already w_t. The server corrects it with a first-order Taylor
term whose Hessian is approximated by λ·g⊙g, keeping a backup of what each worker
pulled:

    g̃ = g + λ · g ⊙ g ⊙ (w_t − w_bak(k))
    w_{t+1} = w_t − η · g̃                       (the server's optimizer step on g̃)

``mode="constant"``: λ fixed (DC-ASGD-c). ``mode="adaptive"`` (DC-ASGD-a): per element
λ_t = λ₀ / √(MS_t + ε), with MS_t = m·MS_{t−1} + (1 − m)·g² a moving average of the
squared gradients (m = ``ms_decay``). Default λ: 0.04 for constant (MXNet's
``DCASGD`` default), 2.0 for adaptive (the paper's ImageNet/CIFAR setting for λ₀).

Workers only compute gradients (window 1): the inner optimizer runs on the
server, on the compensated gradient, with the job's learning rate; with
``--inner-optimizer sgd`` (optionally ``momentum``) this is the paper's update, with
``adam`` the server's Adam consumes g̃ (not in the paper). The backups are the
stale centers the server keeps per worker (memory: n models).

Differences from the paper: none in the update; the adaptive λ uses ε = 1e-7
inside the root. MXNet's ``DCASGD`` optimizer keeps one "previous weight" per
server-side parameter instead of one backup per worker; this module keeps the
per-worker backups of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    ServerRule,
)
from distgrad.algorithms.sync import GradientWorker
from distgrad.errors import ConfigError, choose, float_in, positive_float
from distgrad.optim import load_optimizer_state, make_inner_optimizer, optimizer_state

MS_EPSILON = 1e-7


@dataclass(frozen=True, kw_only=True)
class DCASGDConfig(AlgorithmConfig):
    """``mode`` constant|adaptive; ``lam`` λ (None: 0.04 constant, 2.0 adaptive); ``ms_decay``."""

    window: int = 1
    mode: Literal["constant", "adaptive"] = "constant"
    lam: float | None = None
    ms_decay: float = 0.95

    def validate(self) -> None:
        if self.window != 1:
            raise ConfigError(f"dcasgd commits every gradient; window must be 1, "
                              f"got {self.window}")
        choose("mode", self.mode, ("constant", "adaptive"))
        if self.lam is not None:
            positive_float("lam", self.lam)
        float_in("ms_decay", self.ms_decay, 0.0, 1.0, high_open=True)

    @property
    def variance_lambda(self) -> float:
        if self.lam is not None:
            return self.lam
        return 0.04 if self.mode == "constant" else 2.0


class MeanGradientWorker(GradientWorker):
    """Sends the mean gradient of its mini-batch at the pulled center."""

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return rep.payload.copy_(rep.grad)


class DCASGDServer(ServerRule):
    """g̃ = g + λ g⊙g⊙(w − w_bak); the server's optimizer steps on g̃."""

    needs_stale_center = True

    def setup(self, center: torch.Tensor, workers: int) -> None:
        center.grad = torch.zeros_like(center)
        self._center = center
        self.optimizer = make_inner_optimizer(
            self.run.inner_optimizer, center, self.run.lr, **dict(self.run.inner_options))
        self._work = torch.empty_like(center)
        cfg: DCASGDConfig = self.config  # type: ignore[assignment]
        self.mean_square = torch.zeros_like(center) if cfg.mode == "adaptive" else None

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        if ctx.stale_center is None:
            raise RuntimeError("DC-ASGD needs the backup of the center the worker pulled")
        cfg: DCASGDConfig = self.config  # type: ignore[assignment]
        g = payload
        comp = torch.sub(center, ctx.stale_center, out=self._work)  # w_t − w_bak
        comp.mul_(g).mul_(g)
        if self.mean_square is not None:
            self.mean_square.mul_(cfg.ms_decay).addcmul_(g, g, value=1.0 - cfg.ms_decay)
            comp.div_(self.mean_square.add(MS_EPSILON).sqrt_())
        center.grad.copy_(g).add_(comp, alpha=cfg.variance_lambda)
        self.optimizer.step()
        return {}

    def state_dict(self) -> dict:
        return {"optimizer": optimizer_state(self.optimizer),
                "mean_square": None if self.mean_square is None else self.mean_square.clone()}

    def load_state_dict(self, state) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state["mean_square"] is not None:
            assert self.mean_square is not None
            self.mean_square.copy_(state["mean_square"])


ALGORITHM = Algorithm(
    name="dcasgd",
    summary="delay-compensated ASGD: the server corrects each stale gradient with "
            "λ·g⊙g⊙(w_t − w_backup)",
    config=DCASGDConfig,
    worker_rule=MeanGradientWorker,
    server_rule=DCASGDServer,
    reference="Zheng et al. 2017, arXiv 1609.08326",
)
