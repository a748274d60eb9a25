"""SSP — stale synchronous parallel (Ho et al., NIPS 2013).

Each worker's clock counts its commits (one clock tick = λ local steps and one
commit of the accumulated delta, DOWNPOUR's rule). A worker at clock c may start
its next tick only while c − min_q c_q ≤ s over the live workers; otherwise it
waits after its commit until the slowest worker catches up. Updates are
additive, θ̃ ← θ̃ + Δ, and a worker's pull then contains every update from every
worker up to clock c − s − 1, plus newer ones.

``bound`` = s: 0 is bulk-synchronous (every worker waits for all the others at
each tick), None is fully asynchronous (DOWNPOUR exactly), anything between keeps
most of the asynchronous throughput with bounded staleness: one dial from sync
to async. ``average=True`` divides each commit by n, so a full clock of n commits
moves the center by the *mean* delta; with s = 0 that is exactly synchronous model
averaging (a test checks ``ssp`` with bound 0 against ``averaging``).

The gate is the server's (``ParameterServer.clock_bound``, protocol in
:mod:`distgrad.server`); the simulator implements it, and any engine that
implements ``released()`` runs it.

Differences from the paper: no client-side cache (a worker always pulls the
freshest center after its commit, which the SSP model allows); a worker that
finishes or dies leaves the minimum, so it never blocks the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    ServerRule,
    WorkerRule,
)
from distgrad.errors import nonnegative_int


@dataclass(frozen=True, kw_only=True)
class SSPConfig(AlgorithmConfig):
    """``window`` λ steps per clock tick; ``bound`` s (None: no bound); ``average``."""

    window: int = 1
    bound: int | None = 3
    average: bool = False

    def validate(self) -> None:
        if self.bound is not None:
            nonnegative_int("bound", self.bound)


class SSPServer(ServerRule):
    """θ̃ ← θ̃ + Δ (or Δ/n), with the stale-synchronous gate at ``bound``."""

    def __init__(self, config: SSPConfig, run) -> None:
        super().__init__(config, run)
        self.clock_bound = config.bound

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self.workers = workers

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        if self.config.average:  # type: ignore[attr-defined]
            center.add_(payload, alpha=1.0 / self.workers)
        else:
            center.add_(payload)
        return {}


ALGORITHM = Algorithm(
    name="ssp",
    summary="stale synchronous parallel: a worker more than s commits ahead of the "
            "slowest waits",
    config=SSPConfig,
    worker_rule=WorkerRule,
    server_rule=SSPServer,
    reference="Ho et al., NIPS 2013",
)
