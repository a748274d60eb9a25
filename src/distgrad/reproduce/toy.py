"""Toy problems driven through the real simulator: the Beale function (E8) and a quadratic
(implicit momentum).

The "model" is a vector of parameters w whose forward pass returns w for every input
row; the "data" are rows of targets or noise, so the ordinary worker/server/engine code
trains it. :func:`simulate` runs a :class:`~distgrad.job.Job` on such a problem with the
``sim`` engine and hands back what the usual run summary does not hold: the center
after every commit (or round) and, through a probe wrapped around the worker rule, the
norms of every local step and of the elastic term.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distgrad.algorithms.base import StepStats, WorkerRule
from distgrad.data import Dataset, make_shards
from distgrad.engines.sim import SimEngine
from distgrad.errors import ConfigError
from distgrad.metrics.events import Recorder
from distgrad.metrics.schedule import EvalSchedule
from distgrad.parts import Job, RunParts
from distgrad.worker import Worker

BEALE_OPTIMUM = (3.0, 0.5)


class Vector(nn.Module):
    """A parameter vector w; ``forward(x)`` returns w once per row of x."""

    def __init__(self, init: tuple[float, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def beale(w: torch.Tensor) -> torch.Tensor:
    """Beale's function f(x, y) = (1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²
    over the last dimension; minimum 0 at (3, 0.5)."""
    x, y = w[..., 0], w[..., 1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def beale_loss(out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """f(w) + ⟨ξ, w⟩ averaged over the batch: the gradient is ∇f(w) + mean ξ, so rows of
    N(0, σ²) noise give the thesis' noisy gradients and rows of zeros give exact ones."""
    return (beale(out) + (out * noise).sum(dim=-1)).mean()


def quadratic_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5·‖w − y‖² averaged over the batch (Hessian = identity)."""
    return 0.5 * ((out - target) ** 2).sum(dim=-1).mean()


# --------------------------------------------------------------------------- the probe


@dataclass
class StepTrace:
    """Per local step of every worker: (worker, step index, ‖step‖, ‖α(θ^k − θ̃)‖).

    The elastic norm uses the center the worker last pulled (``rep.base``) and the
    algorithm's α = ρ·η when it has one (0 otherwise).
    """

    rows: list[tuple[int, int, float, float]] = field(default_factory=list)


class _ProbeRule(WorkerRule):
    """Wraps a worker rule; records the step and elastic norms around every local step."""

    def __init__(self, inner: WorkerRule, worker: int, trace: StepTrace) -> None:
        self.inner = inner
        self.config = inner.config
        self.run = inner.run
        self.worker = worker
        self.trace = trace
        self.steps = 0
        self.alpha = float(getattr(inner.config, "alpha", 0.0))
        self.pull_after_commit = inner.pull_after_commit  # type: ignore[misc]
        self.sends_stale_center = inner.sends_stale_center  # type: ignore[misc]
        self.uses_reply = inner.uses_reply  # type: ignore[misc]
        self.reads = inner.reads  # type: ignore[misc]

    def setup(self, rep: Any) -> None:
        self.inner.setup(rep)
        self._before = torch.empty_like(rep.params)

    def after_pull(self, rep: Any) -> None:
        self.inner.after_pull(rep)

    def local_step(self, rep: Any, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        self._before.copy_(rep.params)
        elastic = self.alpha * float(torch.dist(self._before, rep.base))
        stats = self.inner.local_step(rep, x, y)
        step = float(torch.dist(rep.params, self._before))
        self.trace.rows.append((self.worker, self.steps, step, elastic))
        self.steps += 1
        return stats

    def should_commit(self, rep: Any, steps: int, stats: StepStats) -> bool:
        return self.inner.should_commit(rep, steps, stats)

    def make_payload(self, rep: Any, steps: int) -> torch.Tensor:
        return self.inner.make_payload(rep, steps)

    def after_commit(self, rep: Any, reply: torch.Tensor) -> None:
        self.inner.after_commit(rep, reply)


@dataclass
class _ProbedParts(RunParts):
    trace: StepTrace | None = None

    def make_worker(self, k: int, device: str | torch.device = "cpu") -> Worker:
        worker = super().make_worker(k, device)
        if self.trace is not None:
            worker.rule = _ProbeRule(worker.rule, k, self.trace)
        return worker


@dataclass
class Simulation:
    """What :func:`simulate` returns."""

    events: list[dict[str, Any]]
    versions: list[int]
    times: list[float]
    centers: torch.Tensor  # (updates + 1, d): the center at t = 0 and after every update
    trace: StepTrace | None
    end_time: float


def simulate(job: Job, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor],
             torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor, *,
             probe: bool = False) -> Simulation:
    """Run ``job`` on the toy problem with the ``sim`` engine; record every center update.

    ``inputs``/``targets`` are the training rows (split over the workers as the job says).
    With ``probe`` every local step's norms are traced (see :class:`StepTrace`).
    """
    if job.engine != "sim":
        raise ConfigError(f"toy simulations run on the sim engine only, got engine {job.engine!r}")
    dataset = Dataset("toy", inputs, targets, inputs[:1], targets[:1])
    shards = make_shards(targets.new_zeros(len(targets)).numpy(), int(job.workers or 1),
                         job.sharding, job.seed)
    trace = StepTrace() if probe else None
    parts = _ProbedParts(job=job, dataset=dataset, shards=shards, template=copy.deepcopy(model),
                         loss_fn=loss_fn, trace=trace)
    server = parts.make_server()
    recorder = Recorder(None, record_batches=False)
    versions: list[int] = []
    times: list[float] = []
    snapshots: list[torch.Tensor] = []

    def snapshot(t: float, version: int) -> None:
        versions.append(version)
        times.append(t)
        snapshots.append(server.center.detach().clone())

    evals = EvalSchedule(1, snapshot)  # every commit or round
    engine = SimEngine(job.timing, job.seed)
    end = engine.run(parts, server, recorder, evals)
    if not versions or versions[-1] != server.version:
        snapshot(end, server.version)
    return Simulation(events=recorder.events, versions=versions, times=times,
                      centers=torch.stack(snapshots), trace=trace, end_time=end)
