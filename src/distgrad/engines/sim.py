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
are recorded as lost. ``Timing.cost_profile`` turns a measured cost profile into
``server_time``/``commit_time`` for the job's algorithm (:meth:`Timing.resolved`);
``Timing.fixed_order`` keeps each worker's shard in one order for every pass, as
dist-keras did, instead of reshuffling it each pass.

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

**Checkpoints and exact resume.** ``SimEngine(..., checkpoint_path=P, checkpoint_at=(v,
...))`` snapshots the whole simulation after the commit (or round) that brings the server
to version v, and ``checkpoint_every=S`` every S *virtual* seconds (``Job.checkpoint_every``
on ``sim``). A snapshot is only taken at a *quiescent* instant — every live, unfinished
worker suspended right after a local step (or not started yet): none queued behind the
server, waiting at a barrier or the stale-synchronous gate, waiting for a commit's reply or
sweeping a torn read — so it is taken at the first such instant at or after the requested
one, never refused. It holds the server, the protocol core, each live worker
(:meth:`Worker.state_dict <distgrad.worker.Worker.state_dict>` and its driver's counters),
the event heap, the virtual clock, the server queue, each worker clock's generator state,
the recorder's counters and the evaluation schedule; it is written with
:func:`distgrad.rundir.write_checkpoint` (``{version}`` in P is replaced by the server
version, for one file per checkpoint). ``SimEngine(..., resume=snapshot)`` (or
``train(resume=DIR)``) continues from it and ends with the same parameters and the same
events after the cut as the uninterrupted run. Taking snapshots does not change a run.
Limitation: a snapshot requested at an instant after which the run is never quiescent
again before it ends (e.g. many workers whose commit round trips or torn reads always
overlap) is not written; requests that fall before one quiescent instant share its
snapshot.
"""

from __future__ import annotations

import heapq
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from distgrad.rundir import write_checkpoint
from distgrad.server import ParameterServer
from distgrad.stats import StepStats
from distgrad.worker import BatchSource

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
    paused: bool = True  # not started yet, or suspended right after a StatsRequest


class _VirtualClock:
    """The simulator's current virtual time, readable by the protocol core."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimEngine:
    """Discrete-event simulation of asynchronous (or synchronous) workers.

    The simulator is a transport of :class:`~distgrad.protocol.core.ProtocolCore`: each
    worker is a :class:`~distgrad.protocol.driver.WorkerDriver` generator whose requests
    are handed to the core at their virtual time; the replies the core returns resume
    their workers after the commit time (and the torn-read time of a lock-free pull).
    """

    name = "sim"

    def __init__(self, timing: Timing, seed: int, threads: int | None = None, *,
                 checkpoint_path: str | Path | None = None,
                 checkpoint_at: Iterable[int] = (),
                 checkpoint_every: float | None = None,
                 resume: Mapping[str, Any] | None = None) -> None:
        """``checkpoint_path``: where snapshots are written (``{version}`` in it: one file
        per snapshot); ``checkpoint_at``: server versions after which to snapshot;
        ``checkpoint_every``: virtual seconds between snapshots; ``resume``: a snapshot
        this engine wrote (see the module docstring) to continue from."""
        self.timing = timing
        self.seed = seed
        self.threads = threads
        self._clock = _VirtualClock()
        self.checkpoint_path = checkpoint_path
        self.checkpoint_at = sorted({int(v) for v in checkpoint_at})
        if checkpoint_every is not None and not checkpoint_every > 0:
            raise ValueError(f"checkpoint_every must be > 0 virtual seconds, got "
                             f"{checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        if resume is not None and "sim" not in resume:
            raise ValueError("not a snapshot of the sim engine (no 'sim' state in it)")
        self.resume = resume
        self.checkpoints: list[Path] = []  # the files written, in order
        self.stop_requested = False  # an interrupt: checkpoint when quiescent, then stop

    @property
    def now(self) -> float:
        return self._clock.now

    @now.setter
    def now(self, t: float) -> None:
        self._clock.now = t

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        """Run every worker to the end of its data; return the final virtual time."""
        # unset here: the job's (build_parts gives small models one thread)
        threads = self.threads if self.threads is not None else parts.job.threads
        if threads is None:
            return self._run(parts, server, recorder, evals)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._run(parts, server, recorder, evals)
        finally:
            torch.set_num_threads(old)

    def _run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
             evals: EvalSchedule) -> float:
        workers = [parts.make_worker(k) for k in range(len(parts.shards))]
        if self.timing.fixed_order:  # dist-keras: every pass visits the shard in one order
            for k, w in enumerate(workers):
                b = w.batches
                w.batches = BatchSource(b.x, b.y, parts.shards[k], b.batch_size,
                                        parts.job.epochs, seed=0, shuffle=False,
                                        device=b.device)
        # a cost profile becomes server_time/commit_time for this algorithm and model size
        self.timing = self.timing.resolved(parts.job.algorithm, server.center.numel())
        self.workers = workers
        self.drivers = [WorkerDriver(w) for w in workers]
        snap = self.resume
        if snap is not None:  # the workers' own state first: it holds their data order
            self._load_workers(snap["sim"])
        server.stale_from_engine()  # a worker's base buffer is the center as it pulled it
        # the core reads the virtual time through a holder, not through the engine: no
        # reference cycle keeps a finished run's workers alive until the next full GC
        self.core = ProtocolCore(server, recorder, self._clock,
                                 totals=[w.batches.total for w in workers],
                                 on_update=evals.maybe, trusted=True)
        for k in range(len(workers)):
            self.core.admit(k, 0)
        self.clocks = self.timing.clocks(len(workers), self.seed)
        self.server, self.recorder, self.evals = server, recorder, evals
        self.states = [_State(gen=d.requests()) for d in self.drivers]
        self.heap: list[tuple[float, int, str, int]] = []
        self.seq = 0
        self.server_free = 0.0
        self.batch_size = max(w.batches.batch_size for w in workers)
        rule = server.rule
        self.read_time = (rule.read_fraction * self.timing.step_time
                          if rule.lock_free else 0.0)
        self.reads: dict[int, tuple[float, torch.Tensor]] = {}  # torn reads in progress
        self._next_checkpoint_t = self.checkpoint_every
        if snap is not None:
            self._load(snap)
        else:
            evals.maybe(0.0, server.version, 0)
            for k, clock in enumerate(self.clocks):
                self._push(clock.start_offset(), "run", k)
            for worker, when in self.timing.crashes:
                self._push(when, "crash", worker)
        while self.heap:
            if self.stop_requested and (self.checkpoint_path is None or self.quiescent()):
                if self.checkpoint_path is not None:
                    self._maybe_checkpoint()
                raise KeyboardInterrupt
            if self._checkpoint_due():
                self._maybe_checkpoint()
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
        st.paused = False
        while True:
            value, st.send = st.send, None
            req = st.gen.send(value)
            if isinstance(req, StatsRequest):
                st.paused = True
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

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_due(self) -> bool:
        if self.checkpoint_path is None:
            return False
        if self.checkpoint_at and self.server.version >= self.checkpoint_at[0]:
            return True
        return self._next_checkpoint_t is not None and self.now >= self._next_checkpoint_t

    def quiescent(self) -> bool:
        """Is every live, unfinished worker suspended right after a local step (or not
        started), with no request of any worker in flight? Only then is a snapshot exact."""
        if self.reads or self.server.held:
            return False
        for st, slot in zip(self.states, self.core.slots, strict=True):
            if slot.waiting is not None:  # at a barrier (a dead worker's too) or the gate
                return False
            if st.alive and not st.finished and not (
                    st.paused and st.send is None and st.pending is None):
                return False
        return True

    def _maybe_checkpoint(self) -> None:
        """Write the due snapshot if the simulation is quiescent now (else try again after
        the next event)."""
        if not self.quiescent():
            return
        version = self.server.version
        self.checkpoint_at = [v for v in self.checkpoint_at if v > version]
        if self._next_checkpoint_t is not None and self.checkpoint_every is not None:
            while self._next_checkpoint_t <= self.now:
                self._next_checkpoint_t += self.checkpoint_every
        snap = self.snapshot()
        self.recorder.note(self.now, "checkpoint", version=version)
        snap["events"] = len(self.recorder.events)  # a resume drops the events after this
        assert self.checkpoint_path is not None
        path = Path(str(self.checkpoint_path).replace("{version}", str(version)))
        write_checkpoint(path, snap)
        self.checkpoints.append(path)

    def snapshot(self) -> dict[str, Any]:
        """The whole simulation at a quiescent instant (tensors and plain data only): the
        keys every engine's checkpoint has (``t``, ``server``, recorder counters), and
        ``sim`` with the simulator's own state."""
        if not self.quiescent():
            raise RuntimeError("the simulation is not quiescent: a request is in flight")
        rec = self.recorder
        workers: list[dict[str, Any] | None] = []
        for w, d, st in zip(self.workers, self.drivers, self.states, strict=True):
            live = st.alive and not st.finished
            workers.append({"worker": w.state_dict(), "driver": d.state_dict()}
                           if live else None)
        sim = {
            "format": 1,
            "workers": workers,
            "states": [{"alive": st.alive, "finished": st.finished,
                        "read_credit": st.read_credit} for st in self.states],
            "core": self.core.state_dict(),
            "heap": [tuple(e) for e in self.heap],
            "seq": self.seq,
            "now": self.now,
            "server_free": self.server_free,
            "clocks": [c.rng.bit_generator.state for c in self.clocks],
            "bytes_committed": rec.bytes_committed,
            "last_batch": {k: {"loss": float(s.loss), "correct": int(s.correct),
                               "samples": int(s.samples)} for k, s in rec.last_batch.items()},
            "eval_next_at": self.evals.next_at,
            "checkpoint_every": self.checkpoint_every,
            "next_checkpoint_t": self._next_checkpoint_t,
        }
        return {
            "format": 1,
            "engine": "sim",
            "t": self.now,
            "server": self.server.state_dict(),
            "samples": rec.samples,
            "samples_committed": rec.samples_committed,
            "commits": rec.commits,
            "bytes_committed": rec.bytes_committed,
            "sim": sim,
        }

    def _load_workers(self, sim: Mapping[str, Any]) -> None:
        """Restore each live worker and its driver (after the driver was built: building
        it resets the worker's batch position)."""
        saved = sim["workers"]
        if len(saved) != len(self.workers):
            raise ValueError(f"snapshot of {len(saved)} workers, the run has "
                             f"{len(self.workers)}")
        for w, d, state in zip(self.workers, self.drivers, saved, strict=True):
            if state is not None:
                w.load_state_dict(state["worker"])
                d.load_state_dict(state["driver"])

    def _load(self, snap: Mapping[str, Any]) -> None:
        """Restore the server, the core, the heap, the clocks, the recorder's counters and
        the evaluation schedule of a snapshot (the workers are already restored)."""
        sim = snap["sim"]
        self.server.load_state_dict(snap["server"])
        self.server.stale_from_engine()
        self.core.load_state_dict(sim["core"])
        for st, saved in zip(self.states, sim["states"], strict=True):
            st.alive, st.finished = bool(saved["alive"]), bool(saved["finished"])
            st.read_credit = float(saved["read_credit"])
        for clock, state in zip(self.clocks, sim["clocks"], strict=True):
            clock.rng.bit_generator.state = state
        self.heap = [(float(t), int(q), str(kind), int(k)) for t, q, kind, k in sim["heap"]]
        heapq.heapify(self.heap)
        self.seq = int(sim["seq"])
        self.now = float(sim["now"])
        self.server_free = float(sim["server_free"])
        rec = self.recorder
        rec.samples = int(snap["samples"])
        rec.samples_committed = int(snap["samples_committed"])
        rec.commits = int(snap["commits"])
        rec.bytes_committed = int(sim["bytes_committed"])
        rec.last_batch = {int(k): StepStats(loss=float(v["loss"]), correct=int(v["correct"]),
                                            samples=int(v["samples"]))
                          for k, v in sim["last_batch"].items()}
        self.evals.next_at = int(sim["eval_next_at"])
        every = self.checkpoint_every
        if every is not None:
            if sim["checkpoint_every"] == every and sim["next_checkpoint_t"] is not None:
                self._next_checkpoint_t = float(sim["next_checkpoint_t"])
            else:
                self._next_checkpoint_t = every
                while self._next_checkpoint_t <= self.now:
                    self._next_checkpoint_t += every
        # versions already reached were checkpointed before (this resume is one of them)
        self.checkpoint_at = [v for v in self.checkpoint_at if v > self.server.version]

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
