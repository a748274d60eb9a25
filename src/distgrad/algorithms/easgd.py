"""Elastic averaging: EASGD, AEASGD, EAMSGD (Zhang, Choromanska, LeCun, NIPS 2015).

As in Hermans (2017) §2.2.2 and §2.3.3, with α = ηρ the elastic step
(dist-keras ``alpha = rho * learning_rate``; here ``rho`` × ``elastic_lr``).

**easgd** (synchronous, barrier every λ steps):
    worker: λ local steps;  E = α(θ^k − θ̃) with θ̃ the center of the previous sync;
            θ^k ← θ^k − E;  commit E;  barrier;  θ̃ ← Pull()   (θ^k is *not* replaced)
    server: θ̃ ← θ̃ + Σ_k E_k
    Option ``early_commit`` (the thesis' equilibrium rule, Eq. easgd_equilibrium_fix):
    leave the λ window early once ‖s‖ − ‖α(θ^k − θ̃)‖ < threshold, where s is the
    last inner-optimizer step (η∇L in the thesis) and the threshold defaults to the
    inner learning rate η. After an early commit the worker waits at the barrier.

**aeasgd** (asynchronous): every λ local steps an *elastic exchange*: the server
    computes E = α(θ^k − θ̃) against its current center, applies θ̃ ← θ̃ + E, and
    the worker applies θ^k ← θ^k − E. The thesis pulls fresh right before the
    elastic term; here pull, difference and commit form one atomic exchange, so
    the staleness of an elastic commit is 0 by construction. Workers never
    overwrite θ^k by θ̃.

**eamsgd**: aeasgd plus momentum δ on the local steps. Paper (Nesterov) form:
    v ← δv + s(θ^k + δv);  θ^k ← θ^k + v, where s(x) is one inner-optimizer step
    evaluated at x (−η∇L(x) for plain SGD). ``nesterov_sign="distkeras"`` gives
    dist-keras' version instead: the step is evaluated at θ^k − δv and
    v ← δv + elastic_lr · s (two learning rates multiply), spec §2.10.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    RoundSumServer,
    ServerRule,
    StepStats,
    WorkerRule,
)
from distgrad.errors import choose, float_in, positive_float


@dataclass(frozen=True, kw_only=True)
class ElasticConfig(AlgorithmConfig):
    """``rho`` ρ and ``elastic_lr`` η give the elastic step α = ρη, which must lie in (0, 1]."""

    window: int = 32
    rho: float = 5.0
    elastic_lr: float = 0.01

    @property
    def alpha(self) -> float:
        return self.rho * self.elastic_lr

    def validate(self) -> None:
        positive_float("rho", self.rho)
        positive_float("elastic_lr", self.elastic_lr)
        float_in("alpha = rho * elastic_lr", self.alpha, 0.0, 1.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class EASGDConfig(ElasticConfig):
    """Synchronous EASGD; ``early_commit`` enables the thesis' equilibrium rule."""

    window: int = 10
    early_commit: bool = False
    early_commit_threshold: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.early_commit_threshold is not None:
            positive_float("early_commit_threshold", self.early_commit_threshold)


@dataclass(frozen=True, kw_only=True)
class EAMSGDConfig(ElasticConfig):
    """``momentum`` δ in [0, 1); ``nesterov_sign`` 'paper' or 'distkeras'."""

    momentum: float = 0.9
    nesterov_sign: Literal["paper", "distkeras"] = "paper"

    def validate(self) -> None:
        super().validate()
        float_in("momentum", self.momentum, 0.0, 1.0, high_open=True)
        choose("nesterov_sign", self.nesterov_sign, ("paper", "distkeras"))


# --------------------------------------------------------------------------- synchronous EASGD


class EASGDWorker(WorkerRule):
    """Sync EASGD worker: elastic commit against the center of the previous sync."""

    def __init__(self, config: EASGDConfig, run) -> None:
        super().__init__(config, run)
        self.threshold = config.early_commit_threshold or run.lr
        self.equilibrium = False

    def setup(self, rep) -> None:
        if self.config.early_commit:  # type: ignore[attr-defined]
            rep.buffers["before"] = torch.empty_like(rep.params)

    def after_pull(self, rep) -> None:
        """The worker keeps its own parameters; the pulled center stays in ``rep.base``."""

    def local_step(self, rep, x, y) -> StepStats:
        cfg: EASGDConfig = self.config  # type: ignore[assignment]
        if not cfg.early_commit:
            return rep.train_step(x, y)
        before = rep.buffers["before"].copy_(rep.params)
        elastic = cfg.alpha * float(torch.dist(before, rep.base))
        stats = rep.train_step(x, y)
        step = float(torch.dist(rep.params, before))
        self.equilibrium = step - elastic < self.threshold
        return stats

    def should_commit(self, rep, steps: int, stats: StepStats) -> bool:
        return steps >= self.config.window or self.equilibrium

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        self.equilibrium = False
        e = torch.sub(rep.params, rep.base, out=rep.payload).mul_(self.config.alpha)  # type: ignore[attr-defined]
        rep.params.sub_(e)
        return e

    def state_dict(self) -> dict:
        return {"equilibrium": bool(self.equilibrium)}

    def load_state_dict(self, state) -> None:
        self.equilibrium = bool(state["equilibrium"])


class SumServer(RoundSumServer):
    """Synchronous: θ̃ ← θ̃ + Σ_k payload_k once every live worker has committed."""

    def apply_sum(self, center: torch.Tensor, total: torch.Tensor,
                  participants: int) -> dict[str, float]:
        center.add_(total)
        return {}


# --------------------------------------------------------------------------- asynchronous


class ElasticExchangeWorker(WorkerRule):
    """Sends θ^k; the reply is the elastic difference E, and θ^k ← θ^k − E."""

    pull_after_commit = False
    uses_reply = True

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return rep.payload.copy_(rep.params)

    def after_commit(self, rep, reply: torch.Tensor) -> None:
        rep.params.sub_(reply)


class ElasticExchangeServer(ServerRule):
    """E = α(θ^k − θ̃);  θ̃ ← θ̃ + E;  the payload buffer becomes E (the reply)."""

    exchange = True

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        payload.sub_(center).mul_(self.config.alpha)  # type: ignore[attr-defined]
        center.add_(payload)
        return {}


class EAMSGDWorker(ElasticExchangeWorker):
    """Elastic exchange plus momentum on the local steps (see module docstring)."""

    def setup(self, rep) -> None:
        rep.buffers["velocity"] = torch.zeros_like(rep.params)
        rep.buffers["theta"] = torch.empty_like(rep.params)
        rep.buffers["point"] = torch.empty_like(rep.params)

    def local_step(self, rep, x, y) -> StepStats:
        cfg: EAMSGDConfig = self.config  # type: ignore[assignment]
        v = rep.buffers["velocity"]
        theta = rep.buffers["theta"].copy_(rep.params)
        v.mul_(cfg.momentum)
        if cfg.nesterov_sign == "paper":
            rep.params.add_(v)  # look-ahead θ + δv
            stats = rep.train_step(x, y)  # params = θ + δv + s = new θ
            torch.sub(rep.params, theta, out=v)  # v = δv + s
            return stats
        rep.params.sub_(v)  # dist-keras: the step is evaluated at θ − δv
        point = rep.buffers["point"].copy_(rep.params)
        stats = rep.train_step(x, y)
        v.add_(rep.params.sub_(point), alpha=cfg.elastic_lr)  # v = δv + lr·s
        torch.add(theta, v, out=rep.params)
        return stats


EASGD = Algorithm(
    name="easgd",
    summary="synchronous elastic averaging every λ steps (optional equilibrium early commit)",
    config=EASGDConfig,
    worker_rule=EASGDWorker,
    server_rule=SumServer,
    synchronous=True,
    reference="Zhang et al. 2015; Hermans 2017 §2.2.2, §3.4",
)

AEASGD = Algorithm(
    name="aeasgd",
    summary="asynchronous elastic averaging: elastic exchange with the center every λ steps",
    config=ElasticConfig,
    worker_rule=ElasticExchangeWorker,
    server_rule=ElasticExchangeServer,
    reference="Zhang et al. 2015; Hermans 2017 §2.3.3",
)

EAMSGD = Algorithm(
    name="eamsgd",
    summary="aeasgd with Nesterov momentum on the local steps",
    config=EAMSGDConfig,
    worker_rule=EAMSGDWorker,
    server_rule=ElasticExchangeServer,
    reference="Zhang et al. 2015 (EAMSGD); dist-keras EAMSGD",
)
