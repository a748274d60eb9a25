"""DynSGD (Jiang et al., SIGMOD 2017), as in Hermans (2017) §2.3.2.

Worker k:  θ^k ← Pull();  λ inner-optimizer steps;  commit a = θ^k − θ^k_pull (unnormalized)
Server:    τ = c̃ − (c̃ at k's last pull);   θ̃ ← θ̃ + a / (τ + 1);   c̃ ← c̃ + 1

τ is computed by the server, in the same critical section that applies the
commit (dist-keras read and incremented its counter outside the lock). The
equation in the thesis writes η/τ; the algorithm and the code use 1/(τ+1),
which is what this module does.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    ServerRule,
    WorkerRule,
)
from distgrad.fast import add_scaled


@dataclass(frozen=True, kw_only=True)
class DynSGDConfig(AlgorithmConfig):
    """``window`` λ: local steps per commit (dist-keras default 5)."""

    window: int = 5


class StalenessScaledServer(ServerRule):
    """θ̃ ← θ̃ + payload / (τ + 1)."""

    computes_distance = True

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        scale = 1.0 / (ctx.staleness + 1)
        distance = add_scaled(center, payload, scale, ctx.stale_center)
        metrics = {"scale": scale}
        if distance is not None:
            metrics["distance"] = distance
        return metrics


ALGORITHM = Algorithm(
    name="dynsgd",
    summary="asynchronous SGD; the server scales each commit by 1/(staleness+1)",
    config=DynSGDConfig,
    worker_rule=WorkerRule,
    server_rule=StalenessScaledServer,
    reference="Jiang et al. 2017; Hermans 2017 §2.3.2",
)
