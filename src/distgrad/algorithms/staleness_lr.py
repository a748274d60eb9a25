"""Staleness-aware ASGD with n-softsync (Zhang, Gupta, Lian, Liu, IJCAI 2016, arXiv 1511.05950).

Each commit Δ_l carries its staleness τ_l, counted in *center updates* between the
worker's pull and the update that applies it, and gets the learning rate
α_l = α₀/τ_l (α₀ when τ_l = 0). With the **n-softsync** protocol the server
collects c = max(1, ⌊λ/n⌋) commits (λ = number of workers, n = ``softsync``) and
applies their staleness-scaled mean in one update:

    θ̃ ← θ̃ + (1/c) Σ_{l=1..c} Δ_l / max(τ_l, 1)

n = λ (the default, ``softsync=None``) gives c = 1: every commit applied on arrival
with its step divided by its staleness. n = 1 gives c = λ: one update per λ
commits, close to synchronous SGD. Here the worker's Δ is its inner-optimizer
step (λ_window steps accumulated), so α₀ is the inner learning rate; with
``--inner-optimizer sgd`` and window 1, Δ = −α₀·g as in the paper.

τ_l is counted in applied updates, not in commits: the event log's ``staleness``
counts commits (every commit advances the server clock), the rule converts it.
Commits held in the buffer when a worker leaves are applied at once (c then
shrinks to the number of live workers), so no work is lost at the end.

Differences from the paper: learners send accumulated inner-optimizer steps
rather than raw gradients applied by a server-side SGD; with window 1 and SGD
the two are the same. DynSGD is the same idea with 1/(τ + 1) and no soft-sync.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    ServerRule,
    WorkerRule,
)
from distgrad.errors import positive_int


@dataclass(frozen=True, kw_only=True)
class StalenessLRConfig(AlgorithmConfig):
    """``window`` λ steps per commit; ``softsync`` n (None: n = workers, i.e. c = 1)."""

    window: int = 1
    softsync: int | None = None

    def validate(self) -> None:
        if self.softsync is not None:
            positive_int("softsync", self.softsync)


class SoftSyncServer(ServerRule):
    """Buffers c commits, each divided by max(τ_update, 1); applies their mean."""

    def setup(self, center: torch.Tensor, workers: int) -> None:
        n = self.config.softsync or workers  # type: ignore[attr-defined]
        self.group = max(1, workers // n)
        self._buf = torch.zeros_like(center)
        self._count = 0
        self._last_version = 0
        #: server versions (commit counts) at which an update was applied, ascending
        self.update_versions: list[int] = []

    def _updates_since(self, version: int) -> int:
        """Center updates applied at commit versions >= ``version`` (i.e. after a pull at it)."""
        return len(self.update_versions) - bisect.bisect_left(self.update_versions, version)

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        self._last_version = ctx.version
        tau = self._updates_since(ctx.base_version)
        scale = 1.0 / max(tau, 1)
        self._buf.add_(payload, alpha=scale)
        self._count += 1
        if self._count >= self.group:
            self._flush(center, ctx.version)
        return {"scale": scale, "update_staleness": float(tau)}

    def _flush(self, center: torch.Tensor, version: int) -> None:
        center.add_(self._buf, alpha=1.0 / self._count)
        self._buf.zero_()
        self._count = 0
        self.update_versions.append(version)

    def on_leave(self, center: torch.Tensor, worker: int, remaining: int) -> dict[str, float]:
        self.group = max(1, min(self.group, remaining))
        if self._count:
            self._flush(center, self._last_version)
        return {}

    def state_dict(self) -> dict:
        return {"buf": self._buf.clone(), "count": self._count, "group": self.group,
                "last_version": self._last_version,
                "update_versions": list(self.update_versions)}

    def load_state_dict(self, state) -> None:
        self._buf.copy_(state["buf"])
        self._count = int(state["count"])
        self.group = int(state["group"])
        self._last_version = int(state["last_version"])
        self.update_versions = [int(v) for v in state["update_versions"]]


ALGORITHM = Algorithm(
    name="staleness-lr",
    summary="staleness-aware ASGD: each step divided by its staleness; n-softsync batches "
            "c = λ/n commits",
    config=StalenessLRConfig,
    worker_rule=WorkerRule,
    server_rule=SoftSyncServer,
    reference="Zhang et al. 2016, arXiv 1511.05950",
)
