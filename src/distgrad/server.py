"""The parameter server core: center, version clock, per-worker pull clocks, the rule.

This class is single-threaded arithmetic and bookkeeping; engines call it from
inside whatever critical section they use (none in the simulator, a lock in the
process engine). Staleness — both the update count τ and the thesis' distance
‖θ̃_t − θ̃_{t−τ}‖ — is computed here and only here, in the same call that applies
the commit.

The engine-facing protocol
--------------------------

An engine serves each worker's requests (:mod:`distgrad.worker`) with these calls:

* ``Pull(into, record)``: ``pull(k, into, record=record)``. ``record=False`` is a
  *read*: it copies the center but leaves k's pull clock and stale copy alone.
* ``Commit`` of an asynchronous rule: ``rec = commit(k, payload, ...)``, then, unless
  ``rec.held``, the pull the request asks for (``pull_into``) and k goes on.
* ``Commit`` of a synchronous rule: ``submit(...)``; k waits until a returned
  :class:`RoundRecord` lists it in ``participants``, then pulls and goes on.
* A worker that finishes or dies: ``leave(k)`` (a pending round may complete).

**Stale-synchronous gate** (rules with ``clock_bound = s``, e.g. ``ssp``). Each
worker's clock counts its commits. When ``rec.held`` is true, worker k is more than
s commits ahead of the slowest live worker: the engine must *not* serve k's pull
nor resume it. After every ``commit()`` and every ``leave()`` the engine calls
``released()``, which returns the held workers that may go on now (the slowest
worker caught up, or left); for each, the engine serves its pending pull and
resumes it. The slowest live worker is never held, so the run cannot deadlock.
With s = 0 this is a barrier (BSP); with no bound, plain asynchrony.

**Lock-free rules** (``lock_free``, e.g. ``hogwild``). The rule's arithmetic is an
element-wise add that tolerates concurrent execution. An engine with real
parallelism may apply such commits and serve such pulls without the lock it uses
for other rules (workers writing straight into the shared center), accepting torn
reads and, rarely, lost updates; the version clock and τ are then approximate
unless the engine guards just the bookkeeping. The simulator, which has no real
concurrency, models the interleaving instead: a pull is a read that sweeps the
vector from the first element to the last over ``read_fraction`` of a step, and a
commit landing during that sweep is seen in the elements not yet read (see
:mod:`distgrad.engines.sim`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from distgrad.algorithms.base import CommitContext, ServerRule
from distgrad.fast import distance as fast_distance


class Refused(ValueError):
    """A commit the server cannot apply; raised before anything changed (or after all of
    it was put back). :class:`~distgrad.protocol.core.ProtocolCore` turns it into a
    rejection with this message as the reason."""


class NonFinite(Refused):
    """Applying a commit (or a synchronous round) would have made the center non-finite.

    Raised by :class:`ParameterServer` *after* it put everything back: the center, the
    rule's state and the clocks are bit-identical to before the call."""


def all_finite(t: torch.Tensor) -> bool:
    """True iff no element is NaN or ±Inf. A finite float32 sum proves it (NaN and Inf
    propagate through a sum) at the cost of one pass; only a non-finite sum, which may be
    an overflow of finite values, pays for the exact element-wise check."""
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class CommitRecord:
    """One applied asynchronous commit. ``version`` is the server clock after it.

    ``held``: the stale-synchronous gate holds the worker; it must wait for
    :meth:`ParameterServer.released` before its pull and its next step.
    """

    worker: int
    version: int
    base_version: int
    staleness: int
    distance: float | None
    steps: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    held: bool = False


@dataclass(frozen=True)
class RoundRecord:
    """One completed synchronous round. ``version`` is the server clock after it."""

    version: int
    participants: tuple[int, ...]
    steps: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: why the round was not applied (its result would have made the center non-finite);
    #: the center and the rule's state are as before the round, the clock moved on
    rejected: str = ""


class ParameterServer:
    """Owns the flat float32 center, the clock and the rule state.

    ``track_distance`` keeps, per worker, the center it last pulled, so every
    asynchronous commit records ‖θ̃_t − θ̃_{t−τ}‖ (memory: one model per worker).
    Rules that need that stale center (ADAG) get it whatever the flag, kept here
    or sent by the worker. ``keep_stale=False`` is for engines whose workers'
    pull buffers the server can read (shared memory): they pass that buffer to
    :meth:`commit` as ``stale_center`` instead.

    ``guard`` (default on): a commit or round whose application would make the center
    (or any model of :meth:`models`) non-finite is undone — the center and the rule's
    state restored bit for bit — and refused with :class:`NonFinite`. It costs one copy of
    the center and one summing pass per commit (about 1.5 ms for the thesis MLP's 4.8 M
    parameters on one core), plus a :meth:`ServerRule.state_dict` snapshot for rules that
    keep state. Lock-free commits the workers apply themselves
    (:meth:`record_unlocked_commit`) are not guarded.
    """

    def __init__(
        self,
        center: torch.Tensor,
        rule: ServerRule,
        workers: int,
        track_distance: bool = True,
        keep_stale: bool | None = None,
        guard: bool = True,
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
        #: commits per worker (the stale-synchronous clocks)
        self.clock = [0] * workers
        self.clock_bound = rule.clock_bound
        self._held: set[int] = set()
        rule.setup(center, workers)
        self.guard = guard
        #: the center before the commit being applied (the guard's undo copy)
        self._backup = torch.empty_like(center) if guard else None
        #: the rule keeps state a refused commit must not change (read once, after setup)
        self._stateful = bool(rule.state_dict())

    # ------------------------------------------------------------------ the guard
    def _guarded(self, apply: Callable[[], dict[str, float]], what: str) -> dict[str, float]:
        """Run ``apply`` (which changes the center in place) as a transaction: if a model
        is non-finite afterwards, put the center and the rule's state back and raise
        :class:`NonFinite`. Without the guard, just ``apply()``."""
        if not self.guard or self._backup is None:
            return apply()
        self._backup.copy_(self.center)
        # a rule's state_dict is a snapshot (copies), as checkpoints need it to be
        state = self.rule.state_dict() if self._stateful else None
        try:
            metrics = apply()
            others = [m for m in self.rule.models(self.center) if m is not self.center]
            bad = 0 if all(all_finite(m) for m in (self.center, *others)) else sum(
                int((~torch.isfinite(m)).sum()) for m in (self.center, *others))
        except BaseException:
            self._restore(state)
            raise
        if bad:
            self._restore(state)
            raise NonFinite(f"{what} would make {bad} element(s) of the center non-finite "
                            "(NaN/Inf); not applied, the center is unchanged")
        return metrics

    def _restore(self, state: dict[str, Any] | None) -> None:
        assert self._backup is not None
        self.center.copy_(self._backup)
        if state is not None:
            self.rule.load_state_dict(state)

    def in_round(self, worker: int) -> bool:
        """Has ``worker`` already committed to the open synchronous round?"""
        return any(c.worker == worker for c in self._round)

    def has_stale(self, worker: int) -> bool:
        """Does the server keep a stale center θ̃_{t−τ} for ``worker`` (it has pulled)?"""
        return self._stale[worker] is not None

    def stale_from_engine(self) -> None:
        """The engine will pass each commit the committing worker's pull buffer as
        ``stale_center`` (it can read it: same process or shared memory), so the server
        keeps no copies of its own."""
        self.keep_stale = False
        self._stale = [None] * self.workers

    # ------------------------------------------------------------------ pulls
    def pull(self, worker: int, into: torch.Tensor, record: bool = True) -> int:
        """Copy what ``worker`` pulls into ``into``; return the version pulled.

        ``record=False`` makes it a read: the worker's pull clock (what staleness
        is measured from) and its stale copy stay as they were.
        """
        if worker in self._held:
            raise RuntimeError(f"worker {worker} is held by the stale-synchronous gate; "
                               "serve its pull once released() returns it")
        src = self.rule.pull_source(worker, self.center)
        into.copy_(src)
        if not record:
            return self.version
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
        base = self.version if rule.exchange else self.base_version[worker]
        stale = stale_center if stale_center is not None else self._stale[worker]
        if not (self.track_distance or rule.needs_stale_center):
            stale = None
        if stale is None and rule.needs_stale_center:
            raise Refused(f"{type(rule).__name__} needs the center worker {worker} pulled, "
                          "but it has not pulled and sent none (a commit before any pull)")
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
        metrics = self._guarded(lambda: rule.apply(self.center, payload, ctx),
                                f"the commit of worker {worker}")
        if "distance" in metrics:
            distance = metrics.pop("distance")
        self.version += 1
        if rule.exchange:
            self.base_version[worker] = self.version
        self.clock[worker] += 1
        held = self.clock_bound is not None and self._ahead(worker)
        if held:
            self._held.add(worker)
        return CommitRecord(
            worker=worker,
            version=self.version,
            base_version=base,
            staleness=ctx.staleness,
            distance=distance,
            steps=steps,
            samples=samples,
            metrics=metrics,
            held=held,
        )

    def record_unlocked_commit(self, worker: int, steps: int, samples: int) -> CommitRecord:
        """Account for a commit a lock-free worker applied to the shared center itself
        (Hogwild on the local engine), followed by its own pull.

        The clock advances and τ = clock − the clock when this worker last pulled, but
        both are approximate: other workers may be writing at the same moment, and
        the distance is not measured.
        """
        base = self.base_version[worker]
        staleness = self.version - base
        self.version += 1
        self.base_version[worker] = self.version
        self.clock[worker] += 1
        return CommitRecord(worker=worker, version=self.version, base_version=base,
                            staleness=staleness, distance=None, steps=steps, samples=samples)

    # ------------------------------------------------------------------ stale-synchronous gate
    def _ahead(self, worker: int) -> bool:
        """Is ``worker`` more than ``clock_bound`` commits ahead of the slowest live worker?"""
        live = [self.clock[k] for k in self.active]
        if not live or self.clock_bound is None:
            return False
        return self.clock[worker] - min(live) > self.clock_bound

    def released(self) -> list[int]:
        """Held workers that may go on now, in worker order; they are no longer held."""
        if not self._held:
            return []
        free = sorted(k for k in self._held if not self._ahead(k))
        self._held.difference_update(free)
        return free

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    # ------------------------------------------------------------------ synchronous
    def submit(
        self, worker: int, payload: torch.Tensor, steps: int, samples: int
    ) -> RoundRecord | None:
        """Add a commit to the current round; return the round once every live worker is in."""
        if not self.rule.synchronous:
            raise RuntimeError("submit() on an asynchronous rule; use commit()")
        if self.in_round(worker):
            raise RuntimeError(f"worker {worker} committed twice in one round")
        ctx = CommitContext(worker=worker, version=self.version, base_version=self.version,
                            staleness=0, samples=samples, steps=steps)
        self.rule.accumulate(payload, ctx)
        self._round.append(ctx)
        return self._maybe_finish_round()

    def leave(self, worker: int) -> RoundRecord | None:
        """``worker`` is done or dead; a round waiting only for it completes now.

        For asynchronous rules, held workers may be released (call :meth:`released`)
        and the rule may apply commits it held back (:meth:`ServerRule.on_leave`).
        """
        self.active.discard(worker)
        self._held.discard(worker)
        if self.rule.synchronous:
            return self._maybe_finish_round()
        self.rule.on_leave(self.center, worker, len(self.active))
        return None

    def _maybe_finish_round(self) -> RoundRecord | None:
        if not self._round:
            return None
        submitted = {c.worker for c in self._round}
        if not self.active <= submitted:
            return None
        participants = tuple(c.worker for c in self._round)
        rejected = ""
        try:
            metrics = self._guarded(
                lambda: self.rule.apply_round(self.center, len(self._round)),
                f"the round of workers {list(participants)}")
        except NonFinite as exc:  # dropped; its workers go on from the unchanged center
            metrics, rejected = {}, str(exc)
            self.rule.discard_round()
        self.version += 1
        record = RoundRecord(
            version=self.version,
            participants=participants,
            steps=sum(c.steps for c in self._round),
            samples=sum(c.samples for c in self._round),
            metrics=metrics,
            rejected=rejected,
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
            "clock": list(self.clock),
            "held": sorted(self._held),
            "rule": self.rule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.center.copy_(state["center"])
        self.version = int(state["version"])
        self.base_version = [int(v) for v in state["base_version"]]
        self.active = set(state["active"])
        self._stale = [None if s is None else s.clone() for s in state["stale"]]
        self.clock = [int(c) for c in state.get("clock", [0] * self.workers)]
        self._held = set(state.get("held", ()))
        self.rule.load_state_dict(state["rule"])
