"""The server side of the protocol, with no I/O: requests in, replies and events out.

:class:`ProtocolCore` sits between a transport and
:class:`~distgrad.server.ParameterServer`. Every engine drives this one object: the
simulator from its event heap, ``local`` from its pipes, the network server from its
socket, the Ray server actors from their method calls (Spark's tasks talk to the
network server). A transport decodes a message into a request
(:mod:`distgrad.protocol.messages`), calls :meth:`ProtocolCore.handle`, and encodes the
replies it gets back — which may be addressed to *other* workers (a completed barrier
round, workers released by the stale-synchronous gate).

What the core owns:

* **attempts** — each worker slot has one live attempt. A new attempt (a Spark task
  retry, a restarted Ray actor, a ``distgrad work`` started again) fences the old one:
  anything still arriving from the old attempt is rejected.
* **positions and resume** — the core counts the samples each worker has committed
  (its *position* in its deterministic batch order). A new attempt resumes from there,
  so a retried task neither loses nor re-applies a window. A server restarted from a
  checkpoint fences every attempt that was live (:meth:`ProtocolCore.fence`): they
  rejoin as new attempts from their checkpointed positions.
* **liveness** — an attempt silent for the worker timeout is declared dead; a step
  report of zero samples is a heartbeat (a worker still building its model and shard).
* **exactly once, for every request kind** — a request carries (worker, attempt, seq).
  The reply to the last answered request is kept: the same request sent again (a lost
  reply) gets the same reply and has no second effect, whether it is a pull, a read, a
  commit, a done or a fail. A one-way step report sent twice is counted once. A commit
  whose window is already in the center (a new attempt resending it) is answered, not
  re-applied. A commit still waiting at a barrier or at the gate is simply still waiting.
* **the barrier, the stale-synchronous gate and reads** (the engine-facing protocol of
  :class:`~distgrad.server.ParameterServer`).
* **validation** — every count against its bounds (see :class:`ProtocolCore`), base
  version and position always; with ``trusted=False`` (any transport whose peers are
  other processes or hosts) also the payload's shape, dtype and finiteness. A request
  that does not fit the protocol's state (an ADAG commit before any pull, a second
  commit in one round, a pull while held by the gate) is rejected, never raised. A
  rejected request raises :class:`Rejected`, leaves the center exactly as it was, and
  its reason is what the transport logs and sends back.
* **the center guard** — a commit whose application would make the center non-finite
  is undone by :class:`~distgrad.server.ParameterServer` (bit-identical) and refused.

Not thread-safe: a transport calls it from one thread (or under one lock).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distgrad.algorithms.base import StepStats
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    Request,
    StatsRequest,
    reply_kind,
)
from distgrad.server import (
    CommitRecord,
    NonFinite,
    ParameterServer,
    Refused,
    RoundRecord,
    all_finite,
)

log = logging.getLogger("distgrad.protocol")

#: the largest count (samples, steps, positions, totals) any request may carry: 2⁴⁰
#: samples is far beyond any dataset, and keeps every sum of counts exact and cheap
MAX_COUNT = 1 << 40
#: how far a sequence number may jump ahead of the last one seen (lost one-way reports)
MAX_SEQ_GAP = 1 << 20
#: reasons quoted from a peer are cut to this many characters
MAX_REASON = 500


def _count(name: str, value: Any, low: int = 0, high: int = MAX_COUNT) -> int:
    """``value`` as a count in ``[low, high]``, or :class:`Rejected` naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise Rejected(f"{name} must be an integer in [{low}, {high}], got {shown}")
    return value


class Rejected(Exception):
    """A request the server refuses; the message is the reason (logged and sent back)."""


#: ends the refusal of an attempt whose slot is dead — declared dead while it was out of
#: reach, or fenced by a server resumed from a checkpoint: its worker may rejoin as a new
#: attempt (``distgrad work`` does so by itself). A superseded attempt is not told so.
REJOIN = "rejoin as a new attempt"


def not_live(worker: int, attempt: int, slot: Slot) -> str:
    """Why ``attempt`` of ``worker`` may not send requests (``slot``: its server state)."""
    live = slot.attempt if slot.state == "live" else None
    return (f"attempt {attempt} of worker {worker} is not live (state {slot.state}, live "
            f"attempt {live})" + (f"; {REJOIN}" if slot.state == "dead" else ""))


class EventSink(Protocol):
    samples_committed: int

    def batch(self, t: float, worker: int, stats: StepStats) -> None: ...
    def pull(self, t: float, worker: int, version: int, read: bool = False) -> None: ...
    def commit(self, t: float, rec: CommitRecord, nbytes: int | None = None) -> None: ...
    def round(self, t: float, rec: RoundRecord, nbytes: int | None = None) -> None: ...
    def fault(self, t: float, worker: int, kind: str, samples_lost: int, **extra: Any) -> None: ...
    def done(self, t: float, worker: int) -> None: ...


@dataclass
class Slot:
    """The server's view of one worker id."""

    attempt: int = -1
    state: str = "free"  # free | live | done | dead
    seq: int = -1  # highest sequence number seen from the live attempt
    answered: Reply | None = None  # the reply to the last answered request (resends)
    parked: CommitRequest | None = None  # waiting at a synchronous barrier
    gated: CommitRequest | None = None  # held by the stale-synchronous gate (ssp)
    position: int = 0  # samples committed (applied or in the open round)
    uncommitted: int = 0  # samples stepped since the last commit
    total: int | None = None  # samples this worker has to process, when known
    last_seen: float = 0.0
    done_at: float | None = None
    dead_since: float | None = None
    #: where this worker's pulls are copied when the transport gives no buffer (reused:
    #: a worker sends its next request only once it has read the previous reply)
    buffer: torch.Tensor | None = None

    @property
    def waiting(self) -> CommitRequest | None:
        return self.parked or self.gated


@dataclass
class Admission:
    worker: int
    attempt: int
    position: int
    releases: list[Reply] = field(default_factory=list)


class ProtocolCore:
    """Attempts, positions, exactly-once, barrier, gate and validation around a
    :class:`ParameterServer` (see the module docstring).

    ``sink`` receives the events (a :class:`~distgrad.metrics.events.Recorder`);
    ``on_update(t, version, samples_committed)`` is called after each applied commit or
    round (the evaluation schedule). ``clock()`` gives the event time (wall or virtual).
    ``totals``: the samples each worker has to process, when the server knows them.
    ``trusted``: the payloads come from this library's own worker code in the same
    process or machine (sim, local), so their shape and finiteness are not re-checked.

    The center guard (:class:`~distgrad.server.ParameterServer`, ``guard``) holds for
    trusted transports too: a commit that would make the center non-finite is refused
    and the center left bit-identical. An untrusted peer gets the refusal; a trusted
    worker (a diverging run) is answered as if its window had been applied, with nothing
    applied (a zero reply for rules that use one), and a ``rejected`` fault event records
    the samples lost — so the run goes on from the last finite center.

    **Bounds.** Every count a request carries is checked against the job before anything
    changes: sequence numbers grow by at most :data:`MAX_SEQ_GAP`; ``1 <= steps <=
    samples``; a commit's ``samples`` at most ``max_commit`` (when given) and what is
    left of the worker's ``total`` (when known); positions only grow and stay within the
    total; a total a worker reports (Spark) is at most ``max_total``; nothing exceeds
    :data:`MAX_COUNT`.
    """

    def __init__(self, server: ParameterServer, sink: EventSink | None,
                 clock: Callable[[], float], totals: list[int] | None = None,
                 on_update: Callable[[float, int, int], None] | None = None,
                 trusted: bool = False,
                 schedule: list[tuple[str, int]] | None = None,
                 max_total: int | None = None, max_commit: int | None = None) -> None:
        self.server = server
        self.sink = sink
        self.clock = clock
        self.on_update = on_update
        self.trusted = trusted
        self.parameters = int(server.center.numel())
        self.slots = [Slot() for _ in range(server.workers)]
        self.max_total = MAX_COUNT if max_total is None else min(int(max_total), MAX_COUNT)
        self.max_commit = MAX_COUNT if max_commit is None else min(int(max_commit), MAX_COUNT)
        if totals is not None:
            if len(totals) != server.workers:
                raise ValueError(f"{len(totals)} totals for {server.workers} workers")
            for slot, total in zip(self.slots, totals, strict=True):
                slot.total = int(total)
        self.synchronous = bool(server.rule.synchronous)
        self.round_bytes = 0
        #: a recorded order of server operations to replay (see :meth:`handle`)
        self.schedule = deque(schedule) if schedule is not None else None
        self.deferred: list[deque[AnyRequest]] = [deque() for _ in self.slots]
        start = clock()
        for slot in self.slots:
            slot.last_seen = start

    # ------------------------------------------------------------------ dispatch
    def handle(self, req: AnyRequest) -> list[Reply]:
        """Serve one request; return the replies now due (to it and to other workers).

        With a ``schedule`` (a recorded run's order of pulls, reads, commits and dones,
        :func:`replay_schedule`), those requests are held until they are next in the
        schedule, so any transport replays that run's interleaving exactly; once the
        schedule is used up, requests are served as they come.
        """
        if self.schedule is not None and _op(req) is not None:
            return self._sequence(req)
        return self._serve(req)

    def _sequence(self, req: AnyRequest) -> list[Reply]:
        slot = self._check_worker(req.worker)
        if slot.attempt == req.attempt and req.seq <= slot.seq:
            return self._serve(req)  # a resend of a request already served (or stale)
        queue = self.deferred[req.worker]
        if any(q.seq == req.seq and q.attempt == req.attempt for q in queue):
            return []  # a resend of a request still waiting for its turn
        queue.append(req)
        replies: list[Reply] = []
        assert self.schedule is not None
        while self.schedule:
            op, k = self.schedule[0]
            queue = self.deferred[k]
            if not queue:
                break
            if _op(queue[0]) != op:
                raise Rejected(f"replay diverged: worker {k} sent a {_op(queue[0])} where "
                               f"the recorded run has a {op}")
            self.schedule.popleft()
            replies += self._serve(queue.popleft())
        if not self.schedule:  # the recording is used up: serve what is left directly
            self.schedule = None
            for queue in self.deferred:
                while queue:
                    replies += self._serve(queue.popleft())
        return replies

    def _serve(self, req: AnyRequest) -> list[Reply]:
        if isinstance(req, StatsRequest):
            self.stats(req)
            return []
        if isinstance(req, PullRequest):
            return self.pull(req)
        if isinstance(req, CommitRequest):
            return self.commit(req)
        if isinstance(req, DoneRequest):
            return self.done(req)
        if isinstance(req, FailRequest):
            return self.fail(req)
        raise Rejected(f"unknown request {type(req).__name__}")

    # ------------------------------------------------------------------ helpers
    def _check_worker(self, worker: int) -> Slot:
        if not isinstance(worker, int) or not 0 <= worker < len(self.slots):
            raise Rejected(f"worker id {worker} out of range 0..{len(self.slots) - 1}")
        return self.slots[worker]

    def _live(self, worker: int, attempt: int) -> Slot:
        slot = self._check_worker(worker)
        if slot.state != "live" or slot.attempt != attempt:
            raise Rejected(not_live(worker, attempt, slot))
        return slot

    def _begin(self, req: Request) -> tuple[Slot | None, list[Reply]]:
        """Fence and sequence a request. Returns (slot, []) for a new request, or
        (None, replies) for a resend: its cached reply, or nothing while it waits."""
        slot = self._check_worker(req.worker)
        if slot.attempt == req.attempt:
            cached = slot.answered
            if cached is not None and cached.seq == req.seq and cached.kind == reply_kind(req):
                slot.last_seen = self.clock()
                log.info("worker %d: request %d received again; answered again, not "
                         "re-applied", req.worker, req.seq)
                return None, [_again(cached)]
            waiting = slot.waiting
            if waiting is not None and waiting.seq == req.seq:
                return None, []  # still at the barrier or the gate; answered when released
        slot = self._live(req.worker, req.attempt)
        self._check_seq(slot, req.seq)
        slot.seq = req.seq
        slot.last_seen = self.clock()
        return slot, []

    @staticmethod
    def _check_seq(slot: Slot, seq: int) -> None:
        """A new request's sequence number: above the last one seen, by a bounded gap (an
        attempt's first request may start anywhere: a resumed driver keeps counting)."""
        _count("sequence number", seq, 0, 1 << 62)
        if seq <= slot.seq:
            raise Rejected(f"stale sequence number {seq} (already saw {slot.seq})")
        if slot.seq >= 0 and seq > slot.seq + MAX_SEQ_GAP:
            raise Rejected(f"sequence number {seq} jumps more than {MAX_SEQ_GAP} past the "
                           f"last one seen ({slot.seq})")

    def _answer(self, slot: Slot, reply: Reply) -> Reply:
        slot.answered = reply
        return reply

    def _check_tensor(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != torch.float32 or t.shape != (self.parameters,):
            raise Rejected(f"{name} must be float32 of shape ({self.parameters},), got "
                           f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}")
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise Rejected(f"{name} holds {bad} non-finite value(s) (NaN/Inf); not applied")

    def _pull_into(self, worker: int, into: torch.Tensor | None, record: bool = True
                   ) -> tuple[int, torch.Tensor]:
        if into is None:
            slot = self.slots[worker]
            if slot.buffer is None:  # a fresh 4n bytes per pull costs page faults
                slot.buffer = torch.empty(self.parameters, dtype=torch.float32)
            into = slot.buffer
        return self.server.pull(worker, into, record=record), into

    def _base(self, worker: int) -> int:
        return self.server.version if self.synchronous else self.server.base_version[worker]

    def _leave(self, worker: int, t: float) -> list[Reply]:
        self.slots[worker].gated = None
        return self._round_done(self.server.leave(worker), t) + self._released()

    def _released(self) -> list[Reply]:
        """Replies to the commits the stale-synchronous gate lets go now."""
        replies = []
        for k in self.server.released():
            slot = self.slots[k]
            req, slot.gated = slot.gated, None
            replies += self._answer_waiting(slot, req)
        return replies

    def _commit_reply(self, req: CommitRequest, version: int, duplicate: bool = False
                      ) -> Reply:
        """The reply to a commit that was applied (or waited, or was already applied)."""
        pulled = None
        if req.want_pull:
            version, pulled = self._pull_into(req.worker, req.pull_into)
        return Reply(req.worker, req.attempt, req.seq, version, self._base(req.worker),
                     reply=req.payload if req.want_reply else None, pulled=pulled,
                     duplicate=duplicate)

    def _answer_waiting(self, slot: Slot, req: CommitRequest | None) -> list[Reply]:
        """The reply to a commit that waited (at a barrier or the stale-synchronous gate),
        if its attempt is still the live one; kept for resends."""
        if req is None or slot.state != "live" or req.attempt != slot.attempt:
            return []
        return [self._answer(slot, self._commit_reply(req, self.server.version))]

    def _updated(self, t: float) -> None:
        if self.on_update is not None:
            committed = self.sink.samples_committed if self.sink is not None else 0
            self.on_update(t, self.server.version, committed)

    # ------------------------------------------------------------------ joining
    def admit(self, worker: int | None, attempt: int | None, total: int | None = None
              ) -> Admission:
        """Let an attempt of ``worker`` (None: any free or dead slot) join; fence older ones.
        Admitting the live attempt again before it sent anything (a handshake retried) is
        answered as the first time."""
        t = self.clock()
        if worker is None:
            free = [k for k, s in enumerate(self.slots) if s.state == "free"]
            dead = [k for k, s in enumerate(self.slots) if s.state == "dead"]
            if not free and not dead:
                raise Rejected(f"all {len(self.slots)} worker slots are taken")
            worker = (free or dead)[0]
        slot = self._check_worker(worker)
        if attempt is None:
            attempt = slot.attempt + 1
        if attempt == slot.attempt and slot.state == "live" and slot.seq == -1:
            return Admission(worker=worker, attempt=attempt, position=slot.position)
        if attempt <= slot.attempt:
            raise Rejected(f"attempt {attempt} of worker {worker} is stale: attempt "
                           f"{slot.attempt} already joined")
        # A finished worker may come back (a Spark stage re-run after another task
        # failed): it resumes at its end, has nothing left to train and says done again.
        _count("attempt", attempt, 0, 1 << 62)
        if total is not None:
            _count(f"the samples worker {worker} reports to process", total,
                   0, self.max_total)
            if slot.total is not None and slot.total != total:
                raise Rejected(f"worker {worker} reports {total} samples to process, "
                               f"the server expects {slot.total}")
            slot.total = int(total)
        releases: list[Reply] = []
        if slot.state == "live":
            log.warning("worker %d: attempt %d supersedes attempt %d", worker, attempt,
                        slot.attempt)
            if self.sink is not None:
                self.sink.fault(t, worker, "superseded", samples_lost=0,
                                attempt=slot.attempt)
            releases = self._leave(worker, t)
        slot.attempt, slot.state, slot.seq, slot.answered = attempt, "live", -1, None
        slot.parked, slot.gated, slot.uncommitted = None, None, 0
        slot.last_seen, slot.dead_since = t, None
        self.server.active.add(worker)
        return Admission(worker=worker, attempt=attempt, position=slot.position,
                         releases=releases)

    def add_work(self, worker: int, samples: int) -> None:
        """``worker`` was given ``samples`` more to process (reassigned from a dead one)."""
        slot = self.slots[worker]
        if slot.total is not None:
            slot.total += int(samples)

    # ------------------------------------------------------------------ requests
    def pull(self, req: PullRequest) -> list[Reply]:
        """A pull, or with ``record=False`` a read (the worker's pull clock stays)."""
        slot, again = self._begin(req)
        if slot is None:
            return again
        if req.worker in self.server.held:
            raise Rejected(f"worker {req.worker} is held by the stale-synchronous gate; it "
                           "may not pull until released")
        version, pulled = self._pull_into(req.worker, req.into, req.record)
        if self.sink is not None:
            self.sink.pull(slot.last_seen, req.worker, version, read=not req.record)
        return [self._answer(slot, Reply(req.worker, req.attempt, req.seq, version,
                                         self._base(req.worker), pulled=pulled,
                                         kind="read" if not req.record else "pull"))]

    def stats(self, req: StatsRequest) -> None:
        """One local step of the live attempt; a repeated report is counted once.

        A report of zero samples is a *heartbeat*: the attempt is alive but has no step to
        report (a worker building its model and data shard before its first request, which
        may take longer than the worker timeout on a loaded host). It only renews the
        attempt's liveness; its sequence number is not checked or kept."""
        slot = self._live(req.worker, req.attempt)
        samples = getattr(req.stats, "samples", None)
        if type(samples) is int and samples == 0:
            slot.last_seen = self.clock()
            return
        if isinstance(req.seq, int) and req.seq <= slot.seq:
            return  # a duplicate of a one-way report
        self._check_seq(slot, req.seq)
        s = req.stats
        if not (isinstance(s.samples, int) and isinstance(s.correct, int)
                and isinstance(s.loss, float | int) and 1 <= s.samples <= 1 << 31
                and 0 <= s.correct <= s.samples):
            raise Rejected(f"bad step stats {str(s)[:200]}")
        slot.seq = req.seq
        slot.last_seen = self.clock()
        slot.uncommitted += s.samples
        if self.sink is not None:
            self.sink.batch(slot.last_seen if req.t is None else req.t, req.worker, s)

    def commit(self, req: CommitRequest) -> list[Reply]:
        """Apply (or park, or re-answer) a commit. Returns the replies now due: the
        committer's, or — when it completes a synchronous round — every participant's,
        and those of workers the stale-synchronous gate releases."""
        slot, again = self._begin(req)
        if slot is None:
            return again
        t = slot.last_seen
        samples = _count("commit samples", req.samples, 0, self.max_commit)
        _count("commit steps", req.steps, 1, max(samples, 1))
        _count("commit position", req.position)
        _count("commit base version", req.base_version)
        _count("commit byte count", req.nbytes)
        if not self.trusted:
            self._check_tensor("commit payload", req.payload)
            if req.stale is not None:
                self._check_tensor("stale center", req.stale)
        server = self.server
        if slot.waiting is not None:
            raise Rejected(f"worker {req.worker} sent commit {req.seq} while its commit "
                           f"{slot.waiting.seq} is still waiting")
        if req.applied:
            return self._applied(slot, req, t)
        if req.base_version > server.version:
            raise Rejected(f"commit built on future version {req.base_version}; the server "
                           f"is at version {server.version}")
        if req.base_version != self._base(req.worker):
            raise Rejected(f"commit built on version {req.base_version}, but worker "
                           f"{req.worker} last pulled version {self._base(req.worker)} "
                           "(stale or replayed)")
        end = slot.position + samples
        if req.position != end:
            if req.position <= slot.position:
                log.info("worker %d: window ending at sample %d is already applied; "
                         "answered, not re-applied", req.worker, req.position)
                return [self._answer(slot, self._commit_reply(req, server.version,
                                                              duplicate=True))]
            raise Rejected(f"commit ends at sample {req.position}, expected {end} "
                           f"({slot.position} committed + {samples})")
        if end > (self.max_total if slot.total is None else slot.total):
            raise Rejected(f"commit ends at sample {end}, past the "
                           f"{self.max_total if slot.total is None else slot.total} samples "
                           f"worker {req.worker} has to process")
        rule = server.rule
        if (rule.needs_stale_center and req.stale is None and not rule.exchange
                and not server.has_stale(req.worker)):
            raise Rejected(f"{type(rule).__name__} needs the center worker {req.worker} "
                           "pulled, but it has not pulled and sent none (commit before "
                           "any pull)")
        if self.synchronous:
            if server.in_round(req.worker):  # an earlier attempt's commit is in the round
                raise Rejected(f"worker {req.worker} already has a commit in the open round "
                               f"(from an earlier attempt); commit again once round "
                               f"{server.version + 1} is complete")
            slot.position, slot.uncommitted = end, 0
            slot.parked = req
            self.round_bytes += req.nbytes
            return self._round_done(server.submit(req.worker, req.payload, req.steps,
                                                  samples), t)
        try:
            rec = server.commit(req.worker, req.payload, req.steps, samples, req.stale)
        except Refused as exc:
            if not (self.trusted and isinstance(exc, NonFinite)):
                raise Rejected(str(exc)) from None
            return self._dropped(slot, req, end, str(exc), t)
        slot.position, slot.uncommitted = end, 0
        if self.sink is not None:
            self.sink.commit(t, rec, nbytes=req.nbytes)
        self._updated(t)
        if rec.held:  # answered when the slowest worker catches up (see _released)
            slot.gated = req
            return self._released()
        reply = self._answer(slot, self._commit_reply(req, rec.version))
        return [reply, *self._released()]

    def _dropped(self, slot: Slot, req: CommitRequest, end: int, reason: str, t: float
                 ) -> list[Reply]:
        """A trusted worker's commit the center guard refused (its training diverged): the
        window is dropped — its samples lost, nothing applied — and the worker is answered
        so it goes on from the center; a rule that uses the reply gets a zero update."""
        log.warning("worker %d: commit %d dropped: %s", req.worker, req.seq, reason)
        slot.position, slot.uncommitted = end, 0
        if self.sink is not None:
            self.sink.fault(t, req.worker, "rejected", samples_lost=req.samples,
                            reason=reason)
        if req.want_reply:
            req.payload.zero_()
        reply = self._answer(slot, self._commit_reply(req, self.server.version))
        return [reply, *self._released()]

    def _applied(self, slot: Slot, req: CommitRequest, t: float) -> list[Reply]:
        """A lock-free commit the worker added into the shared center itself."""
        if not self.server.rule.lock_free:
            raise Rejected(f"worker {req.worker} applied a commit itself, but "
                           f"{type(self.server.rule).__name__} is not lock-free")
        total = self.max_total if slot.total is None else slot.total
        if slot.position + req.samples > total:
            raise Rejected(f"commit ends at sample {slot.position + req.samples}, past the "
                           f"{total} samples worker {req.worker} has to process")
        slot.position += req.samples
        slot.uncommitted = 0
        rec = self.server.record_unlocked_commit(req.worker, req.steps, req.samples)
        if self.sink is not None:
            self.sink.commit(t, rec, nbytes=req.nbytes)
        self._updated(t)
        return [self._answer(slot, Reply(req.worker, req.attempt, req.seq, rec.version,
                                         rec.version))]

    def _round_done(self, rec: RoundRecord | None, t: float) -> list[Reply]:
        if rec is None:
            return []
        if rec.rejected:  # the center guard refused the round: nothing applied
            log.warning("round of workers %s dropped: %s", list(rec.participants),
                        rec.rejected)
            if self.sink is not None:
                for p in rec.participants:
                    parked = self.slots[p].parked
                    self.sink.fault(t, p, "rejected", reason=rec.rejected,
                                    samples_lost=parked.samples if parked else 0)
        if self.sink is not None:
            self.sink.round(t, rec, nbytes=self.round_bytes)
        self.round_bytes = 0
        self._updated(t)
        replies = []
        for p in rec.participants:
            slot = self.slots[p]
            req, slot.parked = slot.parked, None
            replies += self._answer_waiting(slot, req)
        return replies

    def done(self, req: DoneRequest) -> list[Reply]:
        slot, again = self._begin(req)
        if slot is None:
            return again
        t = slot.last_seen
        if slot.total is not None and slot.position != slot.total:
            raise Rejected(f"worker {req.worker} says it is done at sample {slot.position}, "
                           f"but has {slot.total} to process")
        first = slot.done_at is None
        slot.state, slot.done_at = "done", t
        if self.sink is not None and first:
            self.sink.done(t, req.worker)
        ack = self._answer(slot, Reply(req.worker, req.attempt, req.seq, self.server.version,
                                       self._base(req.worker), kind="done"))
        return [ack, *self._leave(req.worker, t)]

    def fail(self, req: FailRequest, samples_lost: int | None = None, **extra: Any
             ) -> list[Reply]:
        """The live attempt failed (it says so, or its engine saw it die); the slot may be
        taken over by a new attempt. ``samples_lost`` (default: its uncommitted samples)
        and ``extra`` go into the fault event."""
        slot, again = self._begin(req)
        if slot is None:
            return again
        reason = str(req.reason)[:MAX_REASON]
        log.warning("worker %d attempt %d failed: %r", req.worker, req.attempt, reason)
        ack = self._answer(slot, Reply(req.worker, req.attempt, req.seq, self.server.version,
                                       self._base(req.worker), kind="fail"))
        if reason:
            extra.setdefault("reason", reason)
        return [ack, *self._die(req.worker, req.kind, samples_lost, **extra)]

    def crash(self, worker: int, kind: str = "crash", samples_lost: int | None = None,
              **extra: Any) -> list[Reply]:
        """The transport saw worker's live attempt die (no request of its own)."""
        slot = self.slots[worker]
        if slot.state != "live":
            return []
        return self._die(worker, kind, samples_lost, **extra)

    def _die(self, worker: int, kind: str, samples_lost: int | None = None, **extra: Any
             ) -> list[Reply]:
        t = self.clock()
        slot = self.slots[worker]
        slot.state, slot.dead_since = "dead", t
        if self.sink is not None:
            lost = slot.uncommitted if samples_lost is None else samples_lost
            self.sink.fault(t, worker, kind, samples_lost=lost, attempt=slot.attempt, **extra)
        slot.uncommitted = 0
        return self._leave(worker, t)

    def expire(self, timeout: float) -> list[Reply]:
        """Declare dead every live worker silent for more than ``timeout`` seconds."""
        now = self.clock()
        releases: list[Reply] = []
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

    def retire(self, worker: int) -> list[Reply]:
        """``worker`` has nothing to do (a resumed run where its shard is finished)."""
        slot = self.slots[worker]
        slot.state, slot.done_at = "done", self.clock()
        return self._leave(worker, slot.done_at)

    # ------------------------------------------------------------------ snapshots
    def state_dict(self) -> dict[str, Any]:
        """The core's bookkeeping (plain data), for a checkpoint taken while no request is
        in flight: no commit waiting at a barrier or the gate, no replay pending. Replies
        kept for resends are not saved (a resumed worker is a new attempt or has none)."""
        if any(s.waiting is not None for s in self.slots) or any(self.deferred):
            raise RuntimeError("cannot snapshot the protocol while a request is waiting")
        keys = ("attempt", "state", "seq", "position", "uncommitted", "total", "done_at",
                "dead_since")
        return {"slots": [{k: getattr(s, k) for k in keys} for s in self.slots],
                "round_bytes": self.round_bytes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["slots"]) != len(self.slots):
            raise ValueError(f"snapshot of {len(state['slots'])} workers, the core has "
                             f"{len(self.slots)}")
        for slot, saved in zip(self.slots, state["slots"], strict=True):
            for k, v in saved.items():
                setattr(slot, k, v)
            slot.answered, slot.parked, slot.gated = None, None, None
        self.round_bytes = int(state["round_bytes"])

    def fence(self) -> list[int]:
        """After a restart from a checkpoint whose workers kept running elsewhere (a
        network server that died and was resumed): fence every attempt that was live.

        What such an attempt did after the checkpoint — commits applied to the lost
        center, pulls, its replica, its rule and optimizer state — is unknown here, so
        none of it may be taken back: its reconnection (or a resend of its in-flight
        commit) is refused as "not live", and the worker rejoins as a new attempt that
        starts from its checkpointed position (its samples after that position are
        trained again, and each is committed once, into the restored center). The
        fenced slots are ``dead`` from now (not a fault: no sample is lost), so they wait
        for their workers like any dead slot (a barrier does not wait for them). Returns
        the fenced worker ids. (Nothing waits at a barrier or the gate in a checkpoint
        and nobody is connected yet, so no reply is due.)"""
        now = self.clock()
        fenced = []
        for k, slot in enumerate(self.slots):
            if slot.state == "live":
                slot.state, slot.dead_since, slot.last_seen = "dead", now, now
                slot.uncommitted, slot.answered = 0, None
                self._leave(k, now)
                fenced.append(k)
        return fenced

    # ------------------------------------------------------------------ views
    def finished(self) -> bool:
        return all(s.state == "done" for s in self.slots)

    def live(self) -> list[int]:
        return [k for k, s in enumerate(self.slots) if s.state == "live"]

    def positions(self) -> list[int]:
        return [s.position for s in self.slots]


def _op(req: AnyRequest) -> str | None:
    """The server operation a request is in a replay schedule (None: not scheduled)."""
    if isinstance(req, PullRequest):
        return "pull" if req.record else "read"
    if isinstance(req, CommitRequest):
        return "commit"
    if isinstance(req, DoneRequest):
        return "done"
    return None


def replay_schedule(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The order of server operations in a recorded run (its event log): explicit pulls,
    reads, commits (a synchronous round lists its participants in arrival order) and
    dones. :class:`ProtocolCore` replays it on any engine (``schedule=``)."""
    ops: list[tuple[str, int]] = []
    for e in events:
        if e["type"] == "pull":
            ops.append(("read" if e.get("read") else "pull", e["worker"]))
        elif e["type"] == "commit":
            ops.append(("commit", e["worker"]))
        elif e["type"] == "round":
            ops.extend(("commit", w) for w in e["workers"])
        elif e["type"] == "done":
            ops.append(("done", e["worker"]))
    return ops


def _again(cached: Reply) -> Reply:
    """A cached reply sent again: the same answer, marked as a duplicate."""
    return Reply(cached.worker, cached.attempt, cached.seq, cached.version,
                 cached.base_version, cached.reply, cached.pulled, duplicate=True,
                 kind=cached.kind)
