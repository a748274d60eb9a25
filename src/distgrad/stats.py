"""What one local step reports (shared by the rules, the replica and the protocol)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    """What one local mini-batch step reports: mean loss, number correct, batch size."""

    loss: float
    correct: int
    samples: int
