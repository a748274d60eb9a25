"""Compute-time models for the simulator: how long each local step takes on each worker.

Times are virtual seconds. A full-batch step takes ``step_time`` on average
(a partial batch proportionally less). Models:

* ``constant`` — every step takes exactly ``step_time`` and every worker starts
  at t = 0. All workers then commit at the same instants and are served in a
  fixed round-robin order forever (lockstep: every commit exactly n−1 stale).
* ``lognormal`` (default) — each step takes ``step_time · exp(N(μ, σ²))`` with the
  mean kept at ``step_time``; each worker also starts at a random offset within
  one step. The jitter keeps workers from staying phase-locked, so the commit
  order is random, as on a real cluster.
* ``exponential`` — exponentially distributed step times (heavy jitter).

The timing model changes results, not just timings: in a probe of AGN at n=20,
λ=15, 40 epochs, lockstep round-robin service reached 93.6 % test accuracy where
a random order reached 98.45 %. Use ``constant`` only to study lockstep.

On top of any model: the first ``stragglers`` workers are slower by
``straggler_factor``; ``crashes`` lists (worker, time) pairs at which a worker
dies; ``commit_time`` is the network round trip of one commit (the worker
waits); ``server_time`` is the time the server needs to apply one commit
(commits queue behind each other, as on the thesis' one-lock server).
Every worker draws from its own seeded generator, so a worker's durations do
not depend on the order in which the simulator serves workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from distgrad.errors import (
    ConfigError,
    choose,
    nonnegative_float,
    nonnegative_int,
    positive_float,
)

TIMING_MODELS = ("lognormal", "constant", "exponential")


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Seeded compute-time model of the simulated workers (see module docstring)."""

    model: Literal["lognormal", "constant", "exponential"] = "lognormal"
    step_time: float = 0.05
    sigma: float = 0.25
    stragglers: int = 0
    straggler_factor: float = 2.0
    crashes: tuple[tuple[int, float], ...] = ()
    commit_time: float = 0.0
    server_time: float = 0.0

    def __post_init__(self) -> None:
        choose("timing model", self.model, TIMING_MODELS)
        positive_float("step_time", self.step_time)
        nonnegative_float("sigma", self.sigma)
        nonnegative_int("stragglers", self.stragglers)
        positive_float("straggler_factor", self.straggler_factor)
        nonnegative_float("commit_time", self.commit_time)
        nonnegative_float("server_time", self.server_time)
        for crash in self.crashes:
            if len(crash) != 2:
                raise ConfigError(f"a crash is (worker, time), got {crash!r}")
            nonnegative_int("crash worker", crash[0])
            nonnegative_float("crash time", crash[1])

    def check_workers(self, workers: int) -> None:
        if self.stragglers > workers:
            raise ConfigError(f"stragglers ({self.stragglers}) exceeds workers ({workers})")
        for w, _ in self.crashes:
            if w >= workers:
                raise ConfigError(f"crash of worker {w}, but workers are 0..{workers - 1}")

    def clocks(self, workers: int, seed: int) -> list[WorkerClock]:
        self.check_workers(workers)
        return [WorkerClock(self, k, seed) for k in range(workers)]


class WorkerClock:
    """Draws one worker's step durations from its own generator."""

    def __init__(self, timing: Timing, worker: int, seed: int) -> None:
        self.t = timing
        self.rng = np.random.default_rng([seed, worker, 0x7131])
        self.factor = timing.straggler_factor if worker < timing.stragglers else 1.0
        self.mu = math.log(timing.step_time) - timing.sigma**2 / 2

    def start_offset(self) -> float:
        if self.t.model == "constant":
            return 0.0
        return float(self.rng.uniform(0.0, self.t.step_time))

    def step(self, fraction: float = 1.0) -> float:
        """Duration of one step that processes ``fraction`` of a full batch."""
        if self.t.model == "constant":
            base = self.t.step_time
        elif self.t.model == "lognormal":
            base = float(self.rng.lognormal(self.mu, self.t.sigma))
        else:
            base = float(self.rng.exponential(self.t.step_time))
        return base * fraction * self.factor
