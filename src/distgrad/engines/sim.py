"""The ``sim`` engine: n workers in one process on a virtual clock.

Workers are generators (:meth:`distgrad.worker.Worker.run`); an event heap keyed
by (virtual time, sequence number) decides which worker acts next. A worker's
local steps are computed for real (real gradients on real data), but their
*duration* comes from the seeded timing model, so the interleaving of commits —
and therefore staleness — is that of n workers running in parallel, whatever
the host. Same seed ⇒ bit-identical parameters and event log.

Commits and pulls happen at an instant of virtual time (plus ``commit_time`` for
the round trip, and queueing behind ``server_time`` if set). A synchronous rule
parks each committing worker until every live worker has committed (barrier).
A crash removes the worker at its time; its uncommitted and unprocessed samples
are recorded as lost.
"""

from __future__ import annotations

import heapq
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from distgrad.engines.timing import Timing
from distgrad.metrics.events import Recorder
from distgrad.server import ParameterServer, RoundRecord
from distgrad.worker import Commit, Pull, Step

if TYPE_CHECKING:
    from distgrad.job import RunParts


@dataclass
class EvalSchedule:
    """Evaluate the center every ``every_samples`` committed samples (and at the start)."""

    every_samples: int
    callback: Any  # Callable[[float, int], None]: (t, version) -> records an eval event
    next_at: int = 0

    def maybe(self, t: float, version: int, committed: int) -> None:
        if committed >= self.next_at:
            self.callback(t, version)
            while self.next_at <= committed:
                self.next_at += self.every_samples


@dataclass
class _State:
    gen: Generator
    send: Any = None
    alive: bool = True
    finished: bool = False
    parked: Commit | None = None  # waiting at a barrier
    pending: Commit | None = None  # waiting for the server queue
    extra: dict = field(default_factory=dict)


class SimEngine:
    """Discrete-event simulation of asynchronous (or synchronous) workers."""

    name = "sim"

    def __init__(self, timing: Timing, seed: int, threads: int | None = None) -> None:
        self.timing = timing
        self.seed = seed
        self.threads = threads
        self.now = 0.0

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        """Run every worker to the end of its data; return the final virtual time."""
        if self.threads is None:
            return self._run(parts, server, recorder, evals)
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._run(parts, server, recorder, evals)
        finally:
            torch.set_num_threads(old)

    def _run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
             evals: EvalSchedule) -> float:
        workers = [parts.make_worker(k) for k in range(len(parts.shards))]
        self.workers = workers
        server.stale_from_engine()  # a worker's base buffer is the center as it pulled it
        clocks = self.timing.clocks(len(workers), self.seed)
        self.server, self.workers, self.recorder, self.evals = server, workers, recorder, evals
        self.clocks = clocks
        self.states = [_State(gen=w.run()) for w in workers]
        self.heap: list[tuple[float, int, str, int]] = []
        self.seq = 0
        self.server_free = 0.0
        self.batch_size = max(w.batches.batch_size for w in workers)
        evals.maybe(0.0, server.version, 0)
        for k, clock in enumerate(clocks):
            self._push(clock.start_offset(), "run", k)
        for worker, when in self.timing.crashes:
            self._push(when, "crash", worker)
        while self.heap:
            t, _, kind, k = heapq.heappop(self.heap)
            self.now = t
            st = self.states[k]
            if not st.alive or st.finished:
                continue
            if kind == "crash":
                self._crash(k, t)
            elif st.pending is not None:
                req, st.pending = st.pending, None
                self._handle_commit(k, req, t)
            else:
                self._advance(k, t)
        return self.now

    # ------------------------------------------------------------------ internals
    def _push(self, t: float, kind: str, k: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, k))

    def _advance(self, k: int, t: float) -> None:
        """Resume worker k at time t and serve its requests until its clock must move."""
        st = self.states[k]
        while True:
            value, st.send = st.send, None
            try:
                req = st.gen.send(value)
            except StopIteration:
                st.finished = True
                self.recorder.done(t, k)
                self._round_done(self.server.leave(k), t)
                return
            if isinstance(req, Step):
                self.recorder.batch(t, k, req.stats)
                frac = req.stats.samples / self.batch_size
                self._push(t + self.clocks[k].step(frac), "run", k)
                return
            if isinstance(req, Pull):
                st.send = self.server.pull(k, req.into)
                self.recorder.pull(t, k, st.send)
                continue
            if isinstance(req, Commit):
                if self.timing.server_time > 0 and self.server_free > t:
                    st.pending = req  # queue behind the commit being applied
                    self._push(self.server_free, "run", k)
                    return
                if not self._handle_commit(k, req, t, resume=False):
                    return
                if self.timing.commit_time > 0:
                    self._push(t + self.timing.commit_time, "run", k)
                    return
                continue
            raise TypeError(f"unknown request {req!r}")

    def _handle_commit(self, k: int, req: Commit, t: float, resume: bool = True) -> bool:
        """Apply a commit at time t. Returns True if the worker may go on right away."""
        server, st = self.server, self.states[k]
        if self.timing.server_time > 0:
            self.server_free = max(self.server_free, t) + self.timing.server_time
        if server.rule.synchronous:
            st.parked = req
            self._round_done(server.submit(k, req.payload, req.steps, req.samples), t)
            return False
        # the worker's pull buffer is the center as it pulled it: the stale center θ̃_{t−τ}
        stale = req.stale_center if req.stale_center is not None else self.workers[k].rep.base
        rec = server.commit(k, req.payload, req.steps, req.samples, stale)
        self.recorder.commit(t, rec)
        self.evals.maybe(t, server.version, self.recorder.samples_committed)
        st.send = server.pull(k, req.pull_into) if req.pull_into is not None else rec.version
        if resume:
            self._push(t + self.timing.commit_time, "run", k)
        return True

    def _round_done(self, rec: RoundRecord | None, t: float) -> None:
        if rec is None:
            return
        self.recorder.round(t, rec)
        self.evals.maybe(t, self.server.version, self.recorder.samples_committed)
        for p in rec.participants:
            st = self.states[p]
            if not st.alive or st.parked is None:
                continue
            req, st.parked = st.parked, None
            st.send = (self.server.pull(p, req.pull_into) if req.pull_into is not None
                       else self.server.version)
            self._push(t + self.timing.commit_time, "run", p)

    def _crash(self, k: int, t: float) -> None:
        st, w = self.states[k], self.workers[k]
        st.alive = False
        st.gen.close()
        lost = w.uncommitted_samples + len(w.batches.remaining())
        if st.parked is not None:  # its commit already reached the server
            lost -= st.parked.samples
        self.recorder.fault(t, k, "crash", samples_lost=lost)
        self._round_done(self.server.leave(k), t)
