"""DOWNPOUR (Dean et al., NIPS 2012), as used by Hermans (2017) §1.3/§2.3.1.

Worker k:  θ^k ← Pull();  repeat λ times { θ^k ← θ^k + s_i }  (s_i = one inner-optimizer step)
           commit  Δ = Σ_i s_i = θ^k − θ^k_pull   (unnormalized);  θ^k ← Pull()
Server:    θ̃ ← θ̃ + Δ

With λ = 1 this is plain asynchronous SGD, ``θ̃_{t+1} = θ̃_t − η∇L(θ̃_{t−τ})``.
With λ > 1 the unnormalized accumulated delta is the thesis' divergence
experiment (E2): commits grow with λ and so does the implicit momentum.

Differences from dist-keras' ``DOWNPOURWorker``: there the first window had λ−1
steps (the commit test ran before the step with iteration starting at 1) and the
last partial window was never committed; here every window has λ steps and the
final partial window is committed.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgrad.algorithms.base import AddServer, Algorithm, AlgorithmConfig, WorkerRule


@dataclass(frozen=True, kw_only=True)
class DownpourConfig(AlgorithmConfig):
    """``window`` λ: local steps per commit (dist-keras trainer default 5)."""

    window: int = 5


ALGORITHM = Algorithm(
    name="downpour",
    summary="asynchronous SGD; commits the unnormalized sum of λ local steps",
    config=DownpourConfig,
    worker_rule=WorkerRule,
    server_rule=AddServer,
    reference="Dean et al. 2012; Hermans 2017 §2.3.1",
)
