"""DiLoCo — distributed low-communication training (Douillard et al. 2023, arXiv 2311.08105).

Every outer round each worker starts from the center θ, takes H inner-optimizer
steps (``window``; AdamW in the paper, the job's ``--inner-optimizer`` here) and
sends its **pseudo-gradient** Δ_k = θ − θ_k. The server treats the average as a
gradient for an outer Nesterov SGD step (PyTorch's ``SGD(nesterov=True)``):

    Δ  = (1/n) Σ_k Δ_k
    b  ← μ·b + Δ
    θ  ← θ − η_out·(Δ + μ·b)            (``nesterov=False``: θ ← θ − η_out·b)

Published defaults: H = 500, η_out = 0.7, μ = 0.9 (OpenDiLoCo, torchft). The
default H here is 50, sized for MNIST, where an epoch is a few hundred steps.
With η_out = 1 and μ = 0 the round is exactly model averaging (a test checks it).
Inner optimizer state stays on each worker across rounds, as in the paper.

**diloco-async** (the Async Local-SGD setting, arXiv 2401.09135): the server
applies each pseudo-gradient as it arrives, with weight 1/n so that n arrivals
move the center about as far as one synchronous round:

    f  = 1 / (γ⁻¹(θ − θ_{t−τ})² + 1)   element-wise if ``adag_gamma`` = γ is set (ADAG), else 1
    g  = f ⊙ Δ_k / n                    (``average=False``: f ⊙ Δ_k)
    b  ← μ·b + g;   θ ← θ − η_out·(g + μ·b)

then the worker pulls the center and starts its next H steps. The default outer
momentum is 0.5 here, not 0.9: each stale pseudo-gradient lands on a center the
momentum buffer has already pushed further, and in our MNIST runs μ = 0.9 lost
most of the accuracy that μ = 0.5 or plain averaging (μ = 0, η_out = 1) kept — the
problem the Async Local-SGD paper's Delayed Nesterov addresses.

Differences from the papers: the inner optimizer is the job's (Adam or SGD, not
AdamW); asynchronous arrivals are weighted 1/n by default (a choice of ours, the
Async Local-SGD paper studies several); the ADAG factor is our combination
(spec beyond-thesis §1, "PS mapping"). Delayed Nesterov and dynamic local
updates from arXiv 2401.09135 are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    RoundSumServer,
    ServerRule,
    WorkerRule,
)
from distgrad.algorithms.transforms import OuterSGD, adag_factor
from distgrad.errors import float_in, positive_float


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig(AlgorithmConfig):
    """``window`` H inner steps; ``outer_lr`` η_out; ``outer_momentum`` μ; ``nesterov``."""

    window: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True

    def validate(self) -> None:
        positive_float("outer_lr", self.outer_lr)
        float_in("outer_momentum", self.outer_momentum, 0.0, 1.0, high_open=True)


@dataclass(frozen=True, kw_only=True)
class AsyncDiLoCoConfig(DiLoCoConfig):
    """Adds ``average`` (weight each arrival 1/n) and ``adag_gamma`` (None: no ADAG factor);
    the outer momentum defaults to 0.5 (see the module docstring)."""

    outer_momentum: float = 0.5
    average: bool = True
    adag_gamma: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.adag_gamma is not None:
            positive_float("adag_gamma", self.adag_gamma)


class PseudoGradientWorker(WorkerRule):
    """Sends Δ_k = θ (as pulled) − θ_k after H inner steps, then pulls."""

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return torch.sub(rep.base, rep.params, out=rep.payload)


#: the outer optimizer (b ← μb + g; θ ← θ − η(g + μb), or θ − ηb without Nesterov);
#: the name this module used before the transform was shared with SlowMo
OuterNesterov = OuterSGD


def _outer(config: DiLoCoConfig) -> OuterSGD:
    return OuterSGD(config.outer_lr, config.outer_momentum, config.nesterov)


class _OuterState:
    """The server's state is its outer optimizer's: ``{"buf": b or None}``."""

    outer: OuterSGD

    def state_dict(self) -> dict:
        return self.outer.state_dict()

    def load_state_dict(self, state) -> None:
        self.outer.load_state_dict(state)


class DiLoCoServer(_OuterState, RoundSumServer):
    """Synchronous: average the round's pseudo-gradients, one outer Nesterov step."""

    def setup(self, center: torch.Tensor, workers: int) -> None:
        super().setup(center, workers)
        self.outer = _outer(self.config)  # type: ignore[arg-type]

    def apply_sum(self, center: torch.Tensor, total: torch.Tensor,
                  participants: int) -> dict[str, float]:
        self.outer.step(center, total.div_(participants))
        return {}


class AsyncDiLoCoServer(_OuterState, ServerRule):
    """Asynchronous: one outer step per arriving pseudo-gradient, optionally ADAG-scaled."""

    def __init__(self, config: AsyncDiLoCoConfig, run) -> None:
        super().__init__(config, run)
        self.gamma = config.adag_gamma
        self.needs_stale_center = self.gamma is not None  # type: ignore[misc]
        self.computes_distance = self.gamma is not None  # type: ignore[misc]

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self.workers = workers
        self.outer = _outer(self.config)  # type: ignore[arg-type]
        self._work = torch.empty_like(center) if self.gamma is not None else None

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        cfg: AsyncDiLoCoConfig = self.config  # type: ignore[assignment]
        metrics: dict[str, float] = {}
        if self.gamma is not None:
            if ctx.stale_center is None:
                raise RuntimeError("diloco-async with adag_gamma needs the pulled center")
            assert self._work is not None
            distance, scale = adag_factor(center, ctx.stale_center, self.gamma, out=self._work)
            metrics = {"distance": distance, "scale": scale}
            payload.mul_(self._work)
        if cfg.average:
            payload.div_(self.workers)
        self.outer.step(center, payload)
        return metrics


ALGORITHM = Algorithm(
    name="diloco",
    summary="H local steps, then one outer Nesterov step on the averaged pseudo-gradient "
            "(synchronous)",
    config=DiLoCoConfig,
    worker_rule=PseudoGradientWorker,
    server_rule=DiLoCoServer,
    synchronous=True,
    reference="Douillard et al. 2023, arXiv 2311.08105",
)

ASYNC = Algorithm(
    name="diloco-async",
    summary="DiLoCo with each pseudo-gradient applied on arrival (weight 1/n), optional "
            "ADAG scaling",
    config=AsyncDiLoCoConfig,
    worker_rule=PseudoGradientWorker,
    server_rule=AsyncDiLoCoServer,
    reference="Douillard et al. 2023; Liu et al. 2024, arXiv 2401.09135",
)
