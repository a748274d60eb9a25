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

Whether the order changes results is measured by ``distgrad reproduce timing-order``
(AGN, n=20, λ=15: lockstep round-robin against the random order); an early probe
that saw a gap at 40 epochs is not reproduced there. Use ``constant`` only to study
lockstep.

``cost_profile`` fills ``server_time``/``commit_time`` from costs measured on a real
engine (``distgrad reproduce --measure-costs FILE``; :meth:`Timing.resolved`), and
``fixed_order`` keeps each worker's shard in one order for every pass (dist-keras'
order) instead of reshuffling it each pass.

On top of any model: the first ``stragglers`` workers are slower by
``straggler_factor``; ``crashes`` lists (worker, time) pairs at which a worker
dies; ``commit_time`` is the network round trip of one commit (the worker
waits); ``server_time`` is the time the server needs to apply one commit
(commits queue behind each other, as on the thesis' one-lock server).
Every worker draws from its own seeded generator, so a worker's durations do
not depend on the order in which the simulator serves workers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

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
    cost_profile: str | None = None
    fixed_order: bool = False

    def __post_init__(self) -> None:
        choose("timing model", self.model, TIMING_MODELS)
        positive_float("step_time", self.step_time)
        nonnegative_float("sigma", self.sigma)
        nonnegative_int("stragglers", self.stragglers)
        positive_float("straggler_factor", self.straggler_factor)
        nonnegative_float("commit_time", self.commit_time)
        nonnegative_float("server_time", self.server_time)
        if self.cost_profile is not None:
            read_cost_profile(self.cost_profile)  # fails now, naming the file, not mid-run
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

    def resolved(self, algorithm: str, parameters: int) -> Timing:
        """This timing with ``server_time``/``commit_time`` filled from ``cost_profile``
        (for ``algorithm`` and a model of ``parameters``); unchanged without a profile."""
        if self.cost_profile is None:
            return self
        server, commit = profile_costs(read_cost_profile(self.cost_profile), algorithm,
                                       parameters, self.step_time)
        return replace(self, cost_profile=None,
                       server_time=self.server_time or server,
                       commit_time=self.commit_time or commit)


COST_PROFILE_KIND = "distgrad-cost-profile"


def read_cost_profile(path: str | Path) -> dict[str, Any]:
    """A cost profile (JSON written by ``distgrad reproduce costs``), checked."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read cost profile {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != COST_PROFILE_KIND:
        raise ConfigError(f"{str(path)!r} is not a cost profile (no kind={COST_PROFILE_KIND!r})")
    for key in ("parameters", "step_seconds", "commit_seconds", "server_seconds"):
        if key not in data:
            raise ConfigError(f"cost profile {str(path)!r} has no {key!r}")
    return data


def profile_costs(profile: dict[str, Any], algorithm: str, parameters: int,
                  step_time: float) -> tuple[float, float]:
    """(server_time, commit_time) in virtual seconds: the measured seconds in units of the
    measured step (one worker step of the profiled model), times ``step_time``, scaled
    linearly by ``parameters`` / the profiled model's parameters (both costs are memory
    passes over the parameter vector)."""
    per_alg = profile["server_seconds"]
    if algorithm not in per_alg:
        raise ConfigError(f"cost profile has no server cost for algorithm {algorithm!r}; "
                          f"it has: {', '.join(sorted(per_alg))}")
    unit = step_time / float(profile["step_seconds"]) * parameters / float(profile["parameters"])
    return float(per_alg[algorithm]) * unit, float(profile["commit_seconds"]) * unit


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
