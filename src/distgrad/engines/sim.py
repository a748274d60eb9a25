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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distgrad.engines.timing import Timing
from distgrad.metrics.events import Recorder
from distgrad.metrics.schedule import EvalSchedule
from distgrad.protocol.core import ProtocolCore
from distgrad.protocol.driver import WorkerDriver
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    PullRequest,
    Reply,
    StatsRequest,
)
from distgrad.server import ParameterServer

if TYPE_CHECKING:
    from distgrad.parts import RunParts


@dataclass
class _State:
    gen: Generator[AnyRequest, Reply | None, None]
    send: Reply | None = None
    alive: bool = True
    finished: bool = False
    pending: CommitRequest | None = None  # waiting for the server queue
    read_credit: float = 0.0  # a torn read's duration, taken off the next step


class SimEngine:
    """Discrete-event simulation of asynchronous (or synchronous) workers.

    The simulator is a transport of :class:`~distgrad.protocol.core.ProtocolCore`: each
    worker is a :class:`~distgrad.protocol.driver.WorkerDriver` generator whose requests
    are handed to the core at their virtual time; the replies the core returns resume
    their workers after the commit time (and the torn-read time of a lock-free pull).
    """

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
        self.core = ProtocolCore(server, recorder, lambda: self.now,
                                 totals=[w.batches.total for w in workers],
                                 on_update=evals.maybe, trusted=True)
        for k in range(len(workers)):
            self.core.admit(k, 0)
        self.clocks = self.timing.clocks(len(workers), self.seed)
        self.server, self.recorder = server, recorder
        self.states = [_State(gen=WorkerDriver(w).requests()) for w in workers]
        self.heap: list[tuple[float, int, str, int]] = []
        self.seq = 0
        self.server_free = 0.0
        self.batch_size = max(w.batches.batch_size for w in workers)
        rule = server.rule
        self.read_time = (rule.read_fraction * self.timing.step_time
                          if rule.lock_free else 0.0)
        self.reads: dict[int, tuple[float, torch.Tensor]] = {}  # torn reads in progress
        evals.maybe(0.0, server.version, 0)
        for k, clock in enumerate(self.clocks):
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
                if self.server_free > t:  # the server is still applying an earlier commit
                    self._push(self.server_free, "run", k)
                    continue
                req, st.pending = st.pending, None
                delay = self._commit(k, req, t)
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
            req = st.gen.send(value)
            if isinstance(req, StatsRequest):
                self.core.stats(req)
                frac = req.stats.samples / self.batch_size
                duration = self.clocks[k].step(frac)
                if st.read_credit:
                    duration, st.read_credit = max(duration - st.read_credit, 0.0), 0.0
                self._push(t + duration, "run", k)
                return
            if isinstance(req, PullRequest):
                (st.send,) = self.core.pull(req)
                self._opened_read(k, req.into, t)
                if self.read_time > 0:
                    self._push(t + self.read_time, "run", k)
                    return
                continue
            if isinstance(req, CommitRequest):
                if req.stale is None:  # k's pull buffer is the center as it pulled it
                    req.stale = self.workers[k].rep.base
                if self.timing.server_time > 0 and self.server_free > t:
                    st.pending = req  # queue behind the commit being applied
                    self._push(self.server_free, "run", k)
                    return
                delay = self._commit(k, req, t)
                if delay is None:
                    return
                if delay > 0:
                    self._push(t + delay, "run", k)
                    return
                continue
            if isinstance(req, DoneRequest):
                st.finished = True
                self._resume(self.core.done(req), t, k)
                return
            raise TypeError(f"unknown request {req!r}")

    def _commit(self, k: int, req: CommitRequest, t: float) -> float | None:
        """Apply a commit at time t. Returns the delay after which worker k goes on, or
        None if it must wait (barrier, stale-synchronous gate)."""
        if self.timing.server_time > 0:
            self.server_free = max(self.server_free, t) + self.timing.server_time
        before = self._open_reads_snapshot(t)
        replies = self.core.commit(req)
        if before is not None:
            self._tear(t, before)
        return self._resume(replies, t, k, req.seq)

    def _resume(self, replies: list[Reply], t: float, k: int, seq: int | None = None
                ) -> float | None:
        """Schedule the workers the replies resume. Returns the delay of worker k's own
        asynchronous commit (``seq``) when it was answered; None when k waits."""
        mine = None
        for r in replies:
            if r.worker == k and r.seq == seq and not self.core.synchronous:
                mine = r
                continue
            if r.kind == "done" or not self.states[r.worker].alive:
                continue
            self.states[r.worker].send = r
            self._push(t + self._delay(r, t), "run", r.worker)
        if mine is None:
            return None
        self.states[k].send = mine
        return self._delay(mine, t)

    def _delay(self, r: Reply, t: float) -> float:
        """The round trip of a commit reply, and the torn read of its pull if any."""
        if r.pulled is None:
            return self.timing.commit_time
        self._opened_read(r.worker, r.pulled, t)
        return self.timing.commit_time + self.read_time

    # ------------------------------------------------------------------ torn reads
    def _opened_read(self, k: int, into: torch.Tensor | None, t: float) -> None:
        """A pull at time t; for a lock-free rule it opens a torn read of ``into``."""
        if self.read_time > 0 and into is not None:
            self.reads[k] = (t, into)
            self.states[k].read_credit += self.read_time

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

    def _crash(self, k: int, t: float) -> None:
        st = self.states[k]
        st.alive = False
        st.gen.close()
        self.reads.pop(k, None)
        slot = self.core.slots[k]
        lost = (slot.total or 0) - slot.position  # uncommitted and unprocessed samples
        self._resume(self.core.crash(k, "crash", samples_lost=lost), t, k)
