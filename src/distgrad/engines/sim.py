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

**Stale-synchronous gate** (``ssp``): a commit the server reports as ``held``
parks the worker without its pull; after every commit and every departure the
engine asks the server which held workers are ``released()``, serves their pulls
and resumes them at that instant (the protocol in :mod:`distgrad.server`).

**Lock-free rules** (``hogwild``): the simulator has no real concurrency, so it
models what a missing lock does to reads. A pull is a read that sweeps the flat
vector from element 0 to element P−1 over R = ``read_fraction`` · ``step_time``
virtual seconds (the forward pass reading the layers one after another); element
j is read at ``start + (j+1)·R/P``. A commit landing at time t during the sweep
is therefore seen in the elements j ≥ ⌊(t − start)/R · P⌋ and not in the others:
the worker computes its gradient at a torn mixture of centers. The worker starts
computing when the sweep ends, and the sweep counts as part of its step (the
step's drawn duration is shortened by R, never below 0). Writes are applied as
atomic element-wise adds, the Hogwild paper's assumption; lost updates from
racing read-modify-writes are not modelled. With ``read_fraction = 0`` a
lock-free rule is simulated exactly like the same rule under a lock.
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
    gated: Commit | None = None  # held by the stale-synchronous gate
    read_credit: float = 0.0  # a torn read's duration, taken off the next step
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
        self.round_bytes = 0
        rule = server.rule
        self.read_time = (rule.read_fraction * self.timing.step_time
                          if rule.lock_free else 0.0)
        self.reads: dict[int, tuple[float, torch.Tensor]] = {}  # torn reads in progress
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
                delay = self._handle_commit(k, req, t)
                if delay is not None:
                    self._push(t + delay, "run", k)
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
        self.reads.pop(k, None)  # a torn read of k's has ended
        while True:
            value, st.send = st.send, None
            try:
                req = st.gen.send(value)
            except StopIteration:
                st.finished = True
                self.recorder.done(t, k)
                self._round_done(self.server.leave(k), t)
                self._release(t)
                return
            if isinstance(req, Step):
                self.recorder.batch(t, k, req.stats)
                frac = req.stats.samples / self.batch_size
                duration = self.clocks[k].step(frac)
                if st.read_credit:
                    duration, st.read_credit = max(duration - st.read_credit, 0.0), 0.0
                self._push(t + duration, "run", k)
                return
            if isinstance(req, Pull):
                st.send = self._pull(k, req.into, t, record=req.record)
                self.recorder.pull(t, k, st.send, read=not req.record)
                if self.read_time > 0:
                    self._push(t + self.read_time, "run", k)
                    return
                continue
            if isinstance(req, Commit):
                if self.timing.server_time > 0 and self.server_free > t:
                    st.pending = req  # queue behind the commit being applied
                    self._push(self.server_free, "run", k)
                    return
                delay = self._handle_commit(k, req, t)
                if delay is None:
                    return
                if delay > 0:
                    self._push(t + delay, "run", k)
                    return
                continue
            raise TypeError(f"unknown request {req!r}")

    def _pull(self, k: int, into: torch.Tensor, t: float, record: bool = True) -> int:
        """Serve a pull at time t; for a lock-free rule it opens a torn read of ``into``."""
        version = self.server.pull(k, into, record=record)
        if self.read_time > 0:
            self.reads[k] = (t, into)
            self.states[k].read_credit += self.read_time
        return version

    def _resume_after_commit(self, k: int, req: Commit, t: float) -> float:
        """Serve the pull a commit asks for; return the delay before k goes on."""
        st = self.states[k]
        if req.pull_into is not None:
            st.send = self._pull(k, req.pull_into, t)
            return self.timing.commit_time + self.read_time
        st.send = self.server.version
        return self.timing.commit_time

    def _handle_commit(self, k: int, req: Commit, t: float) -> float | None:
        """Apply a commit at time t. Returns the delay after which the worker goes on, or
        None if it must wait (barrier, stale-synchronous gate)."""
        server, st = self.server, self.states[k]
        if self.timing.server_time > 0:
            self.server_free = max(self.server_free, t) + self.timing.server_time
        if server.rule.synchronous:
            st.parked = req
            self.round_bytes += req.nbytes
            self._round_done(server.submit(k, req.payload, req.steps, req.samples), t)
            return None
        before = self._open_reads_snapshot(t)
        # the worker's pull buffer is the center as it pulled it: the stale center θ̃_{t−τ}
        stale = req.stale_center if req.stale_center is not None else self.workers[k].rep.base
        rec = server.commit(k, req.payload, req.steps, req.samples, stale)
        if before is not None:
            self._tear(t, before)
        self.recorder.commit(t, rec, nbytes=req.nbytes)
        self.evals.maybe(t, server.version, self.recorder.samples_committed)
        if rec.held:
            st.gated = req
            self._release(t)
            return None
        delay = self._resume_after_commit(k, req, t)
        self._release(t)
        return delay

    def _release(self, t: float) -> None:
        """Resume the workers the stale-synchronous gate lets go."""
        for p in self.server.released():
            st = self.states[p]
            req, st.gated = st.gated, None
            if not st.alive or req is None:
                continue
            self._push(t + self._resume_after_commit(p, req, t), "run", p)

    # ------------------------------------------------------------------ torn reads
    def _open_reads_snapshot(self, t: float) -> torch.Tensor | None:
        """The center before a commit at t, if some torn read is still sweeping."""
        if not self.reads:
            return None
        for k in [k for k, (start, _) in self.reads.items() if t >= start + self.read_time]:
            del self.reads[k]
        return self.server.center.clone() if self.reads else None

    def _tear(self, t: float, before: torch.Tensor) -> None:
        """A commit changed the center at t: the reads still sweeping see the change in
        the elements they have not read yet."""
        delta = self.server.center - before
        size = delta.numel()
        for start, buf in self.reads.values():
            j0 = min(size, int((t - start) / self.read_time * size))
            buf[j0:].add_(delta[j0:])

    def _round_done(self, rec: RoundRecord | None, t: float) -> None:
        if rec is None:
            return
        self.recorder.round(t, rec, nbytes=self.round_bytes)
        self.round_bytes = 0
        self.evals.maybe(t, self.server.version, self.recorder.samples_committed)
        for p in rec.participants:
            st = self.states[p]
            if not st.alive or st.parked is None:
                continue
            req, st.parked = st.parked, None
            self._push(t + self._resume_after_commit(p, req, t), "run", p)

    def _crash(self, k: int, t: float) -> None:
        st, w = self.states[k], self.workers[k]
        st.alive = False
        st.gen.close()
        self.reads.pop(k, None)
        lost = w.uncommitted_samples + len(w.batches.remaining())
        for req in (st.parked, st.gated):  # its commit already reached the server
            if req is not None:
                lost -= req.samples
        self.recorder.fault(t, k, "crash", samples_lost=lost)
        self._round_done(self.server.leave(k), t)
        self._release(t)
