"""Model averaging (Hermans 2017 §2.2.1, Alg. model_averaging_worker).

Worker k:  θ^k ← Pull();  λ inner-optimizer steps;  commit θ^k;  barrier;  θ^k ← Pull()
Server:    θ̃ ← (1/n) Σ_k θ^k          (n = workers alive in this round)

Every worker starts from the same center, so no warm-up is needed. The inner
optimizer's state stays with each worker across rounds.

Differences from dist-keras' ``AveragingTrainer``: there the accumulation buffer
was never re-zeroed, so from the second epoch on the "average" was
(previous average + Σ θ^k)/n, and λ was fixed at one epoch; here λ is a
parameter and the average is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    RoundSumServer,
    WorkerRule,
)


@dataclass(frozen=True, kw_only=True)
class AveragingConfig(AlgorithmConfig):
    """``window`` λ: local steps between two averagings."""

    window: int = 10


class ParamsWorker(WorkerRule):
    """Sends its full parameters."""

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return rep.payload.copy_(rep.params)


class MeanServer(RoundSumServer):
    """θ̃ ← mean of the round's payloads."""

    def apply_sum(self, center: torch.Tensor, total: torch.Tensor,
                  participants: int) -> dict[str, float]:
        torch.div(total, participants, out=center)
        return {}


ALGORITHM = Algorithm(
    name="averaging",
    summary="synchronous model averaging every λ local steps",
    config=AveragingConfig,
    worker_rule=ParamsWorker,
    server_rule=MeanServer,
    synchronous=True,
    reference="Hermans 2017 §2.2.1 (dist-keras AveragingTrainer)",
)
