"""The remote parameter server's guard: who may talk, what is accepted, what happens once.

:class:`ServerCore` sits between a transport (the ZeroMQ server, the Ray shard
actors) and :class:`~distgrad.server.ParameterServer`. Every request is checked
before the center is touched, and commits are applied one at a time, through
``ParameterServer``, so remote engines give the same events and staleness as
``sim``:

* **attempts** — each worker slot has one live attempt. A new attempt (a Spark
  task retry, a restarted Ray actor, a ``distgrad work`` started again) fences
  the old one: anything still arriving from the old attempt is rejected.
* **resume** — the core counts the samples each worker has committed (its
  *position* in its deterministic batch order). A new attempt resumes from
  there, so a retried task neither loses nor re-applies a window.
* **exactly once** — a commit carries (worker, attempt, seq) and the position it
  ends at. A retried message with the same seq gets the cached answer; a commit
  whose window is already in the center is answered, not re-applied.
* **validation** — shape, dtype, finite values, base version (neither stale
  against this worker's last pull nor from the future) and position; a rejected
  commit leaves the center exactly as it was, is logged with its reason and
  answered with that reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distgrad.algorithms.base import StepStats
from distgrad.server import CommitRecord, ParameterServer, RoundRecord

log = logging.getLogger("distgrad.transport")


def all_finite(t: torch.Tensor) -> bool:
    """True iff no element is NaN or ±Inf. A finite float32 sum proves it (NaN and Inf
    propagate through a sum) at the cost of one pass; only a non-finite sum, which may be
    an overflow of finite values, pays for the exact element-wise check."""
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class Rejected(Exception):
    """A request the server refuses; the message is the reason (logged and sent back)."""


class EventSink(Protocol):
    samples_committed: int

    def batch(self, t: float, worker: int, stats: StepStats) -> None: ...
    def commit(self, t: float, rec: CommitRecord) -> None: ...
    def round(self, t: float, rec: RoundRecord) -> None: ...
    def fault(self, t: float, worker: int, kind: str, samples_lost: int, **extra: Any) -> None: ...
    def done(self, t: float, worker: int) -> None: ...


@dataclass
class CommitRequest:
    """A commit as the transport decoded it. ``payload``/``stale`` are owned by the core."""

    worker: int
    attempt: int
    seq: int
    base_version: int
    steps: int
    samples: int
    position: int
    payload: torch.Tensor
    stale: torch.Tensor | None = None
    want_reply: bool = False
    want_pull: bool = False


@dataclass
class CommitReply:
    """The answer to a commit: the server version the worker now holds, and tensors."""

    worker: int
    attempt: int
    seq: int
    version: int
    reply: torch.Tensor | None = None
    pulled: torch.Tensor | None = None
    duplicate: bool = False
    record: CommitRecord | None = None


@dataclass
class Slot:
    """The server's view of one worker id."""

    attempt: int = -1
    state: str = "free"  # free | live | done | dead
    seq: int = -1  # highest sequence number seen from the live attempt
    commit_seq: int = -1  # seq of the last commit answered (its reply is cached)
    cached: CommitReply | None = None
    parked: CommitRequest | None = None  # waiting at a synchronous barrier
    gated: CommitRequest | None = None  # held by the stale-synchronous gate (ssp)
    position: int = 0  # samples committed (applied or in the open round)
    uncommitted: int = 0  # samples stepped since the last commit
    total: int | None = None  # samples this worker has to process, when known
    last_seen: float = 0.0
    done_at: float | None = None
    dead_since: float | None = None


@dataclass
class Admission:
    worker: int
    attempt: int
    position: int
    releases: list[CommitReply] = field(default_factory=list)


class ServerCore:
    """Validation, fencing, exactly-once and resume around a :class:`ParameterServer`.

    ``sink`` receives the events (a :class:`~distgrad.metrics.events.Recorder`);
    ``on_update(t, version, samples_committed)`` is called after each applied
    commit or round (evaluation schedule). ``clock()`` gives the event time.
    Not thread-safe: the transport calls it from one thread.
    """

    def __init__(self, server: ParameterServer, sink: EventSink | None, clock: Callable[[], float],
                 totals: list[int] | None = None,
                 on_update: Callable[[float, int, int], None] | None = None) -> None:
        self.server = server
        self.sink = sink
        self.clock = clock
        self.on_update = on_update
        self.parameters = int(server.center.numel())
        self.slots = [Slot() for _ in range(server.workers)]
        if totals is not None:
            if len(totals) != server.workers:
                raise ValueError(f"{len(totals)} totals for {server.workers} workers")
            for slot, total in zip(self.slots, totals, strict=True):
                slot.total = int(total)
        self.synchronous = bool(server.rule.synchronous)
        start = clock()
        for slot in self.slots:
            slot.last_seen = start

    # ------------------------------------------------------------------ helpers
    def _slot(self, worker: int, attempt: int) -> Slot:
        if not 0 <= worker < len(self.slots):
            raise Rejected(f"worker id {worker} out of range 0..{len(self.slots) - 1}")
        slot = self.slots[worker]
        if slot.state != "live" or slot.attempt != attempt:
            live = slot.attempt if slot.state == "live" else None
            raise Rejected(f"attempt {attempt} of worker {worker} is not live "
                           f"(state {slot.state}, live attempt {live})")
        return slot

    def _seq(self, slot: Slot, seq: int) -> None:
        if seq <= slot.seq:
            raise Rejected(f"stale sequence number {seq} (already saw {slot.seq})")
        slot.seq = seq

    def _check_tensor(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != torch.float32 or t.shape != (self.parameters,):
            raise Rejected(f"{name} must be float32 of shape ({self.parameters},), got "
                           f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}")
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise Rejected(f"{name} holds {bad} non-finite value(s) (NaN/Inf); not applied")

    def _leave(self, worker: int, t: float) -> list[CommitReply]:
        self.slots[worker].gated = None
        return self._round_done(self.server.leave(worker), t) + self._released()

    def _pull(self, worker: int, record: bool = True) -> tuple[int, torch.Tensor]:
        into = torch.empty(self.parameters, dtype=torch.float32)
        return self.server.pull(worker, into, record=record), into

    def _released(self) -> list[CommitReply]:
        """Replies to the commits the stale-synchronous gate lets go now."""
        replies = []
        for k in self.server.released():
            slot = self.slots[k]
            req, slot.gated = slot.gated, None
            replies += self._answer_waiting(slot, req)
        return replies

    def _answer_waiting(self, slot: Slot, req: CommitRequest | None) -> list[CommitReply]:
        """The reply to a commit that waited (at a barrier or the stale-synchronous gate),
        if its attempt is still the live one; cached for resends."""
        if req is None or slot.state != "live" or req.attempt != slot.attempt:
            return []
        version, pulled = (self._pull(req.worker) if req.want_pull
                           else (self.server.version, None))
        reply = CommitReply(req.worker, req.attempt, req.seq, version,
                            req.payload if req.want_reply else None, pulled)
        slot.commit_seq, slot.cached = req.seq, reply
        return [reply]

    def _updated(self, t: float) -> None:
        if self.on_update is not None:
            committed = self.sink.samples_committed if self.sink is not None else 0
            self.on_update(t, self.server.version, committed)

    # ------------------------------------------------------------------ joining
    def admit(self, worker: int | None, attempt: int | None, total: int | None = None
              ) -> Admission:
        """Let an attempt of ``worker`` (None: any free or dead slot) join; fence older ones."""
        t = self.clock()
        if worker is None:
            free = [k for k, s in enumerate(self.slots) if s.state == "free"]
            dead = [k for k, s in enumerate(self.slots) if s.state == "dead"]
            if not free and not dead:
                raise Rejected(f"all {len(self.slots)} worker slots are taken")
            worker = (free or dead)[0]
        if not 0 <= worker < len(self.slots):
            raise Rejected(f"worker id {worker} out of range 0..{len(self.slots) - 1}")
        slot = self.slots[worker]
        if attempt is None:
            attempt = slot.attempt + 1
        if attempt <= slot.attempt:
            raise Rejected(f"attempt {attempt} of worker {worker} is stale: attempt "
                           f"{slot.attempt} already joined")
        # A finished worker may come back (a Spark stage re-run after another task
        # failed): it resumes at its end, has nothing left to train and says done again.
        if total is not None:
            if slot.total is not None and slot.total != total:
                raise Rejected(f"worker {worker} reports {total} samples to process, "
                               f"the server expects {slot.total}")
            slot.total = int(total)
        releases: list[CommitReply] = []
        if slot.state == "live":
            log.warning("worker %d: attempt %d supersedes attempt %d", worker, attempt,
                        slot.attempt)
            if self.sink is not None:
                self.sink.fault(t, worker, "superseded", samples_lost=0,
                                attempt=slot.attempt)
            releases = self._leave(worker, t)
        slot.attempt, slot.state, slot.seq, slot.commit_seq = attempt, "live", -1, -1
        slot.cached, slot.parked, slot.gated, slot.uncommitted = None, None, None, 0
        slot.last_seen, slot.dead_since = t, None
        self.server.active.add(worker)
        return Admission(worker=worker, attempt=attempt, position=slot.position,
                         releases=releases)

    # ------------------------------------------------------------------ requests
    def pull(self, worker: int, attempt: int, seq: int, record: bool = True
             ) -> tuple[int, torch.Tensor]:
        """Serve a pull; ``record=False`` is a read (the worker's pull clock stays)."""
        slot = self._slot(worker, attempt)
        self._seq(slot, seq)
        slot.last_seen = self.clock()
        return self._pull(worker, record)

    def stats(self, worker: int, attempt: int, seq: int, stats: StepStats,
              t: float | None = None) -> None:
        """One local step of the live attempt (``t``: when it happened, default now)."""
        slot = self._slot(worker, attempt)
        self._seq(slot, seq)
        if stats.samples < 1 or not 0 <= stats.correct <= stats.samples:
            raise Rejected(f"bad step stats {stats}")
        slot.last_seen = self.clock()
        slot.uncommitted += stats.samples
        if self.sink is not None:
            self.sink.batch(slot.last_seen if t is None else t, worker, stats)

    def commit(self, req: CommitRequest) -> list[CommitReply]:
        """Apply (or park, or re-answer) a commit. Returns the replies now due: the
        committer's, or — when it completes a synchronous round — every participant's."""
        slot = self._slot(req.worker, req.attempt)
        t = self.clock()
        slot.last_seen = t
        if req.seq == slot.commit_seq and slot.cached is not None:
            log.info("worker %d: commit seq %d received again; answered, not re-applied",
                     req.worker, req.seq)
            return [self._again(slot.cached)]
        if slot.parked is not None and req.seq == slot.parked.seq:
            return []  # still waiting at the barrier; the reply comes with the round
        if slot.gated is not None and req.seq == slot.gated.seq:
            return []  # still held by the stale-synchronous gate
        self._seq(slot, req.seq)
        if req.steps < 1 or req.samples < 0:
            raise Rejected(f"bad commit counters steps={req.steps} samples={req.samples}")
        self._check_tensor("commit payload", req.payload)
        if req.stale is not None:
            self._check_tensor("stale center", req.stale)
        server = self.server
        if req.base_version > server.version:
            raise Rejected(f"commit built on future version {req.base_version}; the server "
                           f"is at version {server.version}")
        expected = server.version if self.synchronous else server.base_version[req.worker]
        if req.base_version != expected:
            raise Rejected(f"commit built on version {req.base_version}, but worker "
                           f"{req.worker} last pulled version {expected} (stale or replayed)")
        end = slot.position + req.samples
        if req.position != end:
            if req.position <= slot.position:
                log.info("worker %d: window ending at sample %d is already applied; "
                         "answered, not re-applied", req.worker, req.position)
                version, pulled = self._pull(req.worker) if req.want_pull else (
                    server.version, None)
                reply = CommitReply(req.worker, req.attempt, req.seq, version, None, pulled,
                                    duplicate=True)
                slot.commit_seq, slot.cached = req.seq, reply
                return [reply]
            raise Rejected(f"commit ends at sample {req.position}, expected {end} "
                           f"({slot.position} committed + {req.samples})")
        slot.position = end
        slot.uncommitted = 0
        if self.synchronous:
            slot.parked = req
            return self._round_done(server.submit(req.worker, req.payload, req.steps,
                                                  req.samples), t)
        rec = server.commit(req.worker, req.payload, req.steps, req.samples, req.stale)
        if self.sink is not None:
            self.sink.commit(t, rec)
        self._updated(t)
        if rec.held:  # answered when the slowest worker catches up (see _released)
            slot.gated = req
            return self._released()
        version, pulled = self._pull(req.worker) if req.want_pull else (rec.version, None)
        reply = CommitReply(req.worker, req.attempt, req.seq, version,
                            req.payload if req.want_reply else None, pulled, record=rec)
        slot.commit_seq, slot.cached = req.seq, reply
        return [reply, *self._released()]

    def _again(self, cached: CommitReply) -> CommitReply:
        if cached.pulled is None:
            return cached
        version, pulled = self._pull(cached.worker)  # a fresh pull; base version moves too
        return CommitReply(cached.worker, cached.attempt, cached.seq, version, cached.reply,
                           pulled, duplicate=True)

    def _round_done(self, rec: RoundRecord | None, t: float) -> list[CommitReply]:
        if rec is None:
            return []
        if self.sink is not None:
            self.sink.round(t, rec)
        self._updated(t)
        replies = []
        for p in rec.participants:
            slot = self.slots[p]
            req, slot.parked = slot.parked, None
            replies += self._answer_waiting(slot, req)
        return replies

    def done(self, worker: int, attempt: int, seq: int) -> list[CommitReply]:
        slot = self._slot(worker, attempt)
        self._seq(slot, seq)
        t = self.clock()
        if slot.total is not None and slot.position != slot.total:
            raise Rejected(f"worker {worker} says it is done at sample {slot.position}, "
                           f"but has {slot.total} to process")
        again = slot.done_at is not None
        slot.state, slot.done_at = "done", t
        if self.sink is not None and not again:
            self.sink.done(t, worker)
        return self._leave(worker, t)

    def fail(self, worker: int, attempt: int, reason: str, kind: str = "error"
             ) -> list[CommitReply]:
        """The live attempt failed (it says so, or its engine saw it die: ``kind="crash"``);
        the slot may be taken over by a new attempt."""
        self._slot(worker, attempt)
        log.warning("worker %d attempt %d failed: %s", worker, attempt, reason)
        return self._die(worker, kind, reason=reason[:500])

    def _die(self, worker: int, kind: str, **extra: Any) -> list[CommitReply]:
        t = self.clock()
        slot = self.slots[worker]
        slot.state, slot.dead_since = "dead", t
        if self.sink is not None:
            self.sink.fault(t, worker, kind, samples_lost=slot.uncommitted,
                            attempt=slot.attempt, **extra)
        slot.uncommitted = 0
        return self._leave(worker, t)

    def expire(self, timeout: float) -> list[CommitReply]:
        """Declare dead every live worker silent for more than ``timeout`` seconds."""
        now = self.clock()
        releases: list[CommitReply] = []
        for k, slot in enumerate(self.slots):
            if slot.state in ("live", "free") and now - slot.last_seen > timeout:
                what = "silent" if slot.state == "live" else "not joined"
                log.warning("worker %d (attempt %d) %s for %.1f s: declared dead", k,
                            slot.attempt, what, now - slot.last_seen)
                kind = "timeout" if slot.state == "live" else "never_joined"
                releases += self._die(k, kind, silent_seconds=round(now - slot.last_seen, 3))
        return releases

    def abandon(self, worker: int) -> None:
        """Give up on a dead or never-started worker: its unprocessed samples are lost."""
        slot = self.slots[worker]
        if slot.state in ("done", "live"):
            raise ValueError(f"worker {worker} is {slot.state}, it cannot be abandoned")
        lost = (slot.total - slot.position) if slot.total is not None else 0
        if self.sink is not None:
            self.sink.fault(self.clock(), worker, "abandoned", samples_lost=lost)
        slot.state, slot.dead_since = "done", None
        slot.done_at = self.clock()

    # ------------------------------------------------------------------ views
    def finished(self) -> bool:
        return all(s.state == "done" for s in self.slots)

    def live(self) -> list[int]:
        return [k for k, s in enumerate(self.slots) if s.state == "live"]

    def positions(self) -> list[int]:
        return [s.position for s in self.slots]
