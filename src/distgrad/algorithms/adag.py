"""ADAG — Asynchronous Distributed Adaptive Gradients (Hermans 2017, chapter 4).

Staleness redefined as a distance: a commit built on θ̃_{t−τ} is harmless when
θ̃_{t−τ} is close to the current center θ̃_t. ADAG-AGN, the recommended form:

Worker k:  AGN — commit Δ = (θ^k − θ^k_pull) / λ, then pull.
Server:    f = 1 / (γ⁻¹ (θ̃_t − θ̃_{t−τ})² + 1)      element-wise (one factor per scalar)
           θ̃ ← θ̃ + f ⊙ Δ

γ replaces η in the thesis' η⁻¹ (Eq. adag_rewrite); "usually" 1e-4, lower it if
the loss still diverges. With τ = 0 (the pulled center is the current one) the
factor is exactly 1 and ADAG is AGN.

Placements of θ̃_{t−τ} (spec §2.12): ``placement="server"`` keeps the center each
worker pulled on the server (Alg. adag_2, memory n·|θ|); ``placement="worker"``
has the worker send it with the commit (Alg. adag_1, dist-keras' Experimental
trainer, twice the traffic). Both give the same arithmetic.

Differences from the paper: the LaTeX writes ‖·‖², but the thesis calls the
factor per-weight and the code squares element-wise, so this is element-wise.
``form="rewrite2"`` gives the unvalidated alternative of Eq. adag_rewrite_2,
f = 1 / ((γ⁻¹ (θ̃_t − θ̃_{t−τ}))² + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distgrad.algorithms.agn import NormalizedDeltaWorker
from distgrad.algorithms.base import Algorithm, AlgorithmConfig, CommitContext, ServerRule
from distgrad.errors import choose, positive_float
from distgrad.fast import adag_apply


@dataclass(frozen=True, kw_only=True)
class ADAGConfig(AlgorithmConfig):
    """``gamma`` γ > 0 (default 1e-4); ``placement`` of the stale center; ``form`` of the factor."""

    window: int = 12
    gamma: float = 1e-4
    placement: Literal["server", "worker"] = "server"
    form: Literal["thesis", "rewrite2"] = "thesis"

    def validate(self) -> None:
        positive_float("gamma", self.gamma)
        choose("placement", self.placement, ("server", "worker"))
        choose("form", self.form, ("thesis", "rewrite2"))


class ADAGWorker(NormalizedDeltaWorker):
    """AGN worker; with placement='worker' it also sends the center it pulled."""

    def __init__(self, config: ADAGConfig, run) -> None:
        super().__init__(config, run)
        self.sends_stale_center = config.placement == "worker"  # type: ignore[misc]


class ADAGServer(ServerRule):
    """θ̃ ← θ̃ + Δ / (γ⁻¹ (θ̃ − θ̃_{t−τ})² + 1), element-wise.

    The factor is :func:`~distgrad.algorithms.transforms.adag_factor` (shared with
    ``diloco-async``); :func:`distgrad.fast.adag_apply` computes it, scales Δ and adds
    it in one pass, with the same bits (``tests/test_extending.py``).
    """

    computes_distance = True
    needs_stale_center = True

    def __init__(self, config: ADAGConfig, run) -> None:
        super().__init__(config, run)
        self.stale_from_worker = config.placement == "worker"  # type: ignore[misc]
        self._work: torch.Tensor | None = None

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self._work = torch.empty_like(center)

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        if ctx.stale_center is None:
            raise RuntimeError("ADAG needs the center the worker pulled; none was kept or sent")
        cfg: ADAGConfig = self.config  # type: ignore[assignment]
        distance, scale_mean = adag_apply(center, payload, ctx.stale_center, cfg.gamma,
                                          rewrite2=cfg.form == "rewrite2", work=self._work)
        return {"scale": scale_mean, "distance": distance}


ALGORITHM = Algorithm(
    name="adag",
    summary="AGN commits scaled element-wise by 1/(γ⁻¹(θ̃_t − θ̃_{t−τ})² + 1)",
    config=ADAGConfig,
    worker_rule=ADAGWorker,
    server_rule=ADAGServer,
    reference="Hermans 2017, chapter 4",
)
