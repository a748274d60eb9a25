"""Ensemble training (dist-keras ``EnsembleTrainer``): independent members, averaged predictions.

Each worker trains its own model on its own shard and never reads anyone else's
parameters. Every λ steps it copies its parameters into its slot on the server so
that the ensemble can be evaluated during training. The trained model predicts
with the mean of the members' softmax outputs.

``same_init=False`` (default) re-initialises each member from its own seed, so
the members differ in data *and* initialisation; ``True`` starts them all from
the shared initial center.

Differences from dist-keras: there the trainer could not run (``num_epoch`` and
``num_workers`` were never set), stopped after one mini-batch, and returned raw
weight dicts with no way to combine them.
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
class EnsembleConfig(AlgorithmConfig):
    """``window``: steps between two copies of a member to the server; ``same_init``."""

    window: int = 50
    same_init: bool = False


class MemberWorker(WorkerRule):
    """Trains on its own; sends its parameters, never pulls after the first time."""

    pull_after_commit = False

    def setup(self, rep) -> None:
        if not self.config.same_init:  # type: ignore[attr-defined]
            rep.reinitialize(seed_offset=1 + rep.worker)

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        return rep.payload.copy_(rep.params)


class MembersServer(ServerRule):
    """Keeps one parameter vector per member; a commit replaces the committer's slot."""

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self.members = [center.clone() for _ in range(workers)]

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        self.members[ctx.worker].copy_(payload)
        if ctx.worker == 0:
            center.copy_(payload)
        return {}

    def models(self, center: torch.Tensor) -> list[torch.Tensor]:
        return self.members

    def state_dict(self) -> dict:
        return {"members": [m.clone() for m in self.members]}

    def load_state_dict(self, state) -> None:
        for slot, saved in zip(self.members, state["members"], strict=True):
            slot.copy_(saved)


ALGORITHM = Algorithm(
    name="ensemble",
    summary="independent members on their own shards; predictions average their outputs",
    config=EnsembleConfig,
    worker_rule=MemberWorker,
    server_rule=MembersServer,
    reference="dist-keras EnsembleTrainer",
)
