"""Local SGD (Stich 2018, arXiv 1805.09767) and post-local SGD (Lin et al., ICLR 2020,
arXiv 1808.07217).

Local SGD: every worker takes H inner-optimizer steps (``window``) from the common
center, then all parameters are averaged (one barrier per H steps):

    x_k ← x_k + s_k  (H times);     x̄ = (1/n) Σ_k x_k;     every x_k ← x̄

**Post-local SGD** runs H = 1 — synchronous averaging after every step, which for
plain SGD is mini-batch SGD on the averaged gradient — for a warm-up of
``warmup_steps`` local steps per worker, and H = ``window`` afterwards. The paper
switches at the first learning-rate decay; here the switch is a step count.

Only parameters are averaged; each worker's inner-optimizer state (momentum,
Adam moments) stays local, as in PyTorch's ``PostLocalSGDOptimizer`` (which PyTorch
flags as an accuracy risk, pytorch/pytorch#59699).

Differences from the papers: the inner optimizer is the job's (SGD or Adam); the
warm-up is counted in local steps, not epochs or a learning-rate schedule. With
``warmup_steps = 0`` this is the ``averaging`` algorithm (same rules).
"""

from __future__ import annotations

from dataclasses import dataclass

from distgrad.algorithms.averaging import MeanServer, ParamsWorker
from distgrad.algorithms.base import Algorithm, AlgorithmConfig, StepStats
from distgrad.errors import nonnegative_int


@dataclass(frozen=True, kw_only=True)
class LocalSGDConfig(AlgorithmConfig):
    """``window`` H after the warm-up; ``warmup_steps`` of H = 1 first (0: plain local SGD)."""

    window: int = 8
    warmup_steps: int = 0

    def validate(self) -> None:
        nonnegative_int("warmup_steps", self.warmup_steps)


class LocalSGDWorker(ParamsWorker):
    """Commits its parameters every step during the warm-up, then every H steps."""

    def __init__(self, config: LocalSGDConfig, run) -> None:
        super().__init__(config, run)
        self.total_steps = 0

    def should_commit(self, rep, steps: int, stats: StepStats) -> bool:
        self.total_steps += 1
        if self.total_steps <= self.config.warmup_steps:  # type: ignore[attr-defined]
            return True
        return steps >= self.config.window

    def state_dict(self) -> dict:
        return {"total_steps": int(self.total_steps)}

    def load_state_dict(self, state) -> None:
        self.total_steps = int(state["total_steps"])


ALGORITHM = Algorithm(
    name="localsgd",
    summary="local SGD: average parameters every H steps; post-local SGD with a warm-up "
            "of H = 1",
    config=LocalSGDConfig,
    worker_rule=LocalSGDWorker,
    server_rule=MeanServer,
    synchronous=True,
    reference="Stich 2018, arXiv 1805.09767; Lin et al. 2020, arXiv 1808.07217",
)
