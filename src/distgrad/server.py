"""The parameter server core: center, version clock, per-worker pull clocks, the rule.

This class is single-threaded arithmetic and bookkeeping; engines call it from
inside whatever critical section they use (none in the simulator, a lock in the
process engine). Staleness — both the update count τ and the thesis' distance
‖θ̃_t − θ̃_{t−τ}‖ — is computed here and only here, in the same call that applies
the commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from distgrad.algorithms.base import CommitContext, ServerRule
from distgrad.fast import distance as fast_distance


@dataclass(frozen=True)
class CommitRecord:
    """One applied asynchronous commit. ``version`` is the server clock after it."""

    worker: int
    version: int
    base_version: int
    staleness: int
    distance: float | None
    steps: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRecord:
    """One completed synchronous round. ``version`` is the server clock after it."""

    version: int
    participants: tuple[int, ...]
    steps: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ParameterServer:
    """Owns the flat float32 center, the clock and the rule state.

    ``track_distance`` keeps, per worker, the center it last pulled, so every
    asynchronous commit records ‖θ̃_t − θ̃_{t−τ}‖ (memory: one model per worker).
    Rules that need that stale center (ADAG) get it whatever the flag, kept here
    or sent by the worker. ``keep_stale=False`` is for engines whose workers'
    pull buffers the server can read (shared memory): they pass that buffer to
    :meth:`commit` as ``stale_center`` instead.
    """

    def __init__(
        self,
        center: torch.Tensor,
        rule: ServerRule,
        workers: int,
        track_distance: bool = True,
        keep_stale: bool | None = None,
    ) -> None:
        if center.dtype != torch.float32 or center.dim() != 1 or not center.is_contiguous():
            raise ValueError("the center must be a contiguous 1-D float32 tensor")
        self.center = center
        self.rule = rule
        self.workers = workers
        self.version = 0
        self.base_version = [0] * workers
        self.active: set[int] = set(range(workers))
        # An engine whose workers' pull buffers stay readable by the server (shared memory)
        # passes keep_stale=False and hands that buffer to commit() as stale_center.
        if keep_stale is None:
            keep_stale = (rule.needs_stale_center and not rule.stale_from_worker) or (
                track_distance and not rule.synchronous and not rule.exchange
            )
        self.keep_stale = keep_stale
        self.track_distance = track_distance
        self._stale: list[torch.Tensor | None] = [None] * workers
        self._round: list[CommitContext] = []
        rule.setup(center, workers)

    def stale_from_engine(self) -> None:
        """The engine will pass each commit the committing worker's pull buffer as
        ``stale_center`` (it can read it: same process or shared memory), so the server
        keeps no copies of its own."""
        self.keep_stale = False
        self._stale = [None] * self.workers

    # ------------------------------------------------------------------ pulls
    def pull(self, worker: int, into: torch.Tensor) -> int:
        """Copy what ``worker`` pulls into ``into``; return the version pulled."""
        src = self.rule.pull_source(worker, self.center)
        into.copy_(src)
        self.base_version[worker] = self.version
        if self.keep_stale:
            stale = self._stale[worker]
            if stale is None:
                stale = self._stale[worker] = torch.empty_like(self.center)
            stale.copy_(src)
        return self.version

    # ------------------------------------------------------------------ asynchronous
    def commit(
        self,
        worker: int,
        payload: torch.Tensor,
        steps: int,
        samples: int,
        stale_center: torch.Tensor | None = None,
    ) -> CommitRecord:
        """Apply one asynchronous commit; ``payload`` may be rewritten as the reply."""
        rule = self.rule
        if rule.synchronous:
            raise RuntimeError("commit() on a synchronous rule; use submit()")
        if rule.exchange:
            self.base_version[worker] = self.version
        base = self.base_version[worker]
        stale = stale_center if stale_center is not None else self._stale[worker]
        if not (self.track_distance or rule.needs_stale_center):
            stale = None
        ctx = CommitContext(
            worker=worker,
            version=self.version,
            base_version=base,
            staleness=self.version - base,
            samples=samples,
            steps=steps,
            stale_center=stale,
        )
        distance: float | None = None
        if rule.exchange:
            distance = 0.0
        elif stale is not None and self.track_distance and not rule.computes_distance:
            distance = fast_distance(self.center, stale)
        metrics = rule.apply(self.center, payload, ctx)
        if "distance" in metrics:
            distance = metrics.pop("distance")
        self.version += 1
        if rule.exchange:
            self.base_version[worker] = self.version
        return CommitRecord(
            worker=worker,
            version=self.version,
            base_version=base,
            staleness=ctx.staleness,
            distance=distance,
            steps=steps,
            samples=samples,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ synchronous
    def submit(
        self, worker: int, payload: torch.Tensor, steps: int, samples: int
    ) -> RoundRecord | None:
        """Add a commit to the current round; return the round once every live worker is in."""
        if not self.rule.synchronous:
            raise RuntimeError("submit() on an asynchronous rule; use commit()")
        if any(c.worker == worker for c in self._round):
            raise RuntimeError(f"worker {worker} committed twice in one round")
        ctx = CommitContext(worker=worker, version=self.version, base_version=self.version,
                            staleness=0, samples=samples, steps=steps)
        self.rule.accumulate(payload, ctx)
        self._round.append(ctx)
        return self._maybe_finish_round()

    def leave(self, worker: int) -> RoundRecord | None:
        """``worker`` is done or dead; a round waiting only for it completes now."""
        self.active.discard(worker)
        if self.rule.synchronous:
            return self._maybe_finish_round()
        return None

    def _maybe_finish_round(self) -> RoundRecord | None:
        if not self._round:
            return None
        submitted = {c.worker for c in self._round}
        if not self.active <= submitted:
            return None
        metrics = self.rule.apply_round(self.center, len(self._round))
        self.version += 1
        record = RoundRecord(
            version=self.version,
            participants=tuple(c.worker for c in self._round),
            steps=sum(c.steps for c in self._round),
            samples=sum(c.samples for c in self._round),
            metrics=metrics,
        )
        self._round = []
        return record

    # ------------------------------------------------------------------ results
    def models(self) -> list[torch.Tensor]:
        return self.rule.models(self.center)

    def params_sha256(self) -> str:
        """SHA-256 of the final parameter bytes (all members for an ensemble)."""
        h = hashlib.sha256()
        for m in self.models():
            h.update(m.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies); defined between synchronous rounds only."""
        if self._round:
            raise RuntimeError("cannot snapshot in the middle of a synchronous round")
        return {
            "center": self.center.clone(),
            "version": self.version,
            "base_version": list(self.base_version),
            "active": sorted(self.active),
            "stale": [None if s is None else s.clone() for s in self._stale],
            "rule": self.rule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.center.copy_(state["center"])
        self.version = int(state["version"])
        self.base_version = [int(v) for v in state["base_version"]]
        self.active = set(state["active"])
        self._stale = [None if s is None else s.clone() for s in state["stale"]]
        self.rule.load_state_dict(state["rule"])
