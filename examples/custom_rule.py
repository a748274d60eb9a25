"""A new algorithm defined outside distgrad: DOWNPOUR with norm clipping at the server.

Worker k:  θ^k ← Pull();  λ inner-optimizer steps;  commit Δ = (θ^k − θ^k_pull) / λ
Server:    c = min(1, max_norm / ‖Δ‖);   θ̃ ← θ̃ + c·Δ

A stale worker whose mean step is unusually long cannot throw the center far:
the commit keeps its direction but its length is capped at ``max_norm``. The
server counts the commits it clipped; that count is rule state, saved with a
checkpoint (``state_dict`` / ``load_state_dict``).

Everything distgrad needs is below: a frozen config, a ``WorkerRule``, a
``ServerRule`` and an ``Algorithm`` registered at import time. Use it by import
path, so that worker processes (and remote hosts) import this module too::

    python -m distgrad train --algorithm examples.custom_rule:ALGORITHM \\
        --engine local --workers 2 --set max_norm=0.5

    distgrad.train(algorithm="examples.custom_rule:ALGORITHM", engine="local")

See ``docs/extending.md`` for the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distgrad import Algorithm, register_algorithm
from distgrad.algorithms import AlgorithmConfig, CommitContext, ServerRule, WorkerRule
from distgrad.errors import positive_float


@dataclass(frozen=True, kw_only=True)
class ClippedConfig(AlgorithmConfig):
    """``window`` λ local steps per commit; ``max_norm`` the longest commit applied."""

    window: int = 4
    max_norm: float = 1.0

    def validate(self) -> None:
        positive_float("max_norm", self.max_norm)


class MeanStepWorker(WorkerRule):
    """Commits the mean local step of its window, then pulls (the default)."""

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        # write into the buffer the engine handed us, never a new tensor
        torch.sub(rep.params, rep.base, out=rep.payload)
        return rep.payload.div_(steps)


class ClipServer(ServerRule):
    """θ̃ ← θ̃ + min(1, max_norm/‖Δ‖)·Δ, applied on arrival under the server's lock."""

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self.clipped = 0

    def apply(self, center: torch.Tensor, payload: torch.Tensor,
              ctx: CommitContext) -> dict[str, float]:
        cfg: ClippedConfig = self.config  # type: ignore[assignment]
        norm = float(torch.linalg.vector_norm(payload))
        scale = 1.0 if norm <= cfg.max_norm else cfg.max_norm / norm
        if scale < 1.0:
            self.clipped += 1
        center.add_(payload, alpha=scale)
        return {"scale": scale}  # shows up in the commit events and summary.json

    def state_dict(self) -> dict[str, Any]:
        return {"clipped": self.clipped}

    def load_state_dict(self, state) -> None:
        self.clipped = int(state["clipped"])


ALGORITHM = register_algorithm(Algorithm(
    name="clipped-downpour",
    summary="DOWNPOUR whose server caps the norm of every commit at max_norm",
    config=ClippedConfig,
    worker_rule=MeanStepWorker,
    server_rule=ClipServer,
    reference="examples/custom_rule.py",
))
