"""When the center is evaluated during a run: every N committed samples, and at the start.

Engines call :meth:`EvalSchedule.maybe` after each commit (or round) with the samples
committed so far; the run lifecycle (:mod:`distgrad.run`) owns the schedule and its
callback, which records an ``eval`` event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class EvalSchedule:
    """Evaluate the center every ``every_samples`` committed samples (and at the start)."""

    every_samples: int
    callback: Callable[..., Any]  # (t, version) -> records an eval event
    next_at: int = 0

    def maybe(self, t: float, version: int, committed: int) -> None:
        if committed >= self.next_at:
            self.callback(t, version)
            self.skip_to(committed)

    def skip_to(self, committed: int) -> None:
        """Move the next evaluation past ``committed`` samples (a resumed run).

        Constant time whatever the jump (a count comes from a peer; never loop on it).
        """
        if self.next_at <= committed:
            steps = (committed - self.next_at) // self.every_samples + 1
            self.next_at += steps * self.every_samples
