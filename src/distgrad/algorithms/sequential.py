"""Sequential training: one worker, all the data, no parameter server arithmetic.

The worker runs its inner optimizer over the whole training set; every λ steps it
copies its parameters to the server (``θ̃ ← θ^1``) so that the center can be
evaluated. The result is exactly single-process training with ``torch.optim``
(bit for bit), which is the reference every asynchronous method is measured
against.

Differences from dist-keras' ``SingleTrainer``: that worker stopped after the
first mini-batch (an AttributeError swallowed inside ``SequentialWorker``); this
one trains every epoch and keeps the final partial batch of each pass.
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


@dataclass(frozen=True, kw_only=True)
class SequentialConfig(AlgorithmConfig):
    """``window``: steps between two copies to the server (does not change the result)."""

    window: int = 10


class CopyWorker(WorkerRule):
    """Sends its parameters and keeps training from them (no pull after commit)."""

    pull_after_commit = False

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return rep.payload.copy_(rep.params)


class ReplaceServer(ServerRule):
    """θ̃ ← payload."""

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        center.copy_(payload)
        return {}


ALGORITHM = Algorithm(
    name="sequential",
    summary="one worker trains on all the data; the non-distributed reference",
    config=SequentialConfig,
    worker_rule=CopyWorker,
    server_rule=ReplaceServer,
    exact_workers=1,
    reference="Hermans 2017, §2.1 (dist-keras SingleTrainer)",
)
