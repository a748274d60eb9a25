"""AGN — Accumulated Gradient Normalization (Hermans 2017, chapter 3).

Worker k:  θ^k ← Pull();  a ← 0
           repeat λ times { s ← inner-optimizer step at θ^k;  a ← a + s;  θ^k ← θ^k + s }
           commit  a / λ;   θ^k ← Pull()
Server:    θ̃ ← θ̃ + a/λ          (DOWNPOUR's add, no staleness handling)

λ = 1 is exactly DOWNPOUR. The commit is the *mean* local step, so the center
moves by about one step per commit whatever λ is; the thesis' heuristic for λ is
(n + number of layers)/2.

Differences from the paper: the last window of a worker may have fewer than λ
steps (its data ran out); it is committed and divided by its actual number of
steps, so no work is lost (dist-keras dropped it). In dist-keras this method is
the class called ``ADAG``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.base import AddServer, Algorithm, AlgorithmConfig, WorkerRule


@dataclass(frozen=True, kw_only=True)
class AGNConfig(AlgorithmConfig):
    """``window`` λ: local steps per commit (dist-keras default 12)."""

    window: int = 12


class NormalizedDeltaWorker(WorkerRule):
    """Commits (θ^k − θ^k_pull) / (number of local steps in the window)."""

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        torch.sub(rep.params, rep.base, out=rep.payload)
        return rep.payload.div_(steps)


ALGORITHM = Algorithm(
    name="agn",
    summary="accumulated gradient normalization: commits the mean of λ local steps",
    config=AGNConfig,
    worker_rule=NormalizedDeltaWorker,
    server_rule=AddServer,
    reference="Hermans 2017, chapter 3",
)
