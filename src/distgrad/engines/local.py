"""The ``local`` engine: real worker processes on one machine, the center in shared memory.

Layout::

    parent process                                   worker process k (spawn, 1 torch thread)
    ───────────────────────────────────────────      ─────────────────────────────────────────
    ParameterServer (center in shared memory)        Replica: params, grad, inner optimizer
    serving loop: one request at a time      <─pipe─> Worker.run() generator
    base[k], payload[k]: shared-memory buffers <──── writes payload[k]; reads base[k]
    evaluator thread (snapshots of the center)

A worker writes its commit straight into its shared ``payload[k]`` and sends a
few bytes on its pipe; the parent applies the algorithm's server rule from that
buffer, in place on the center, then (for pull-after-commit rules) copies the
center into the worker's shared ``base[k]`` and replies with the version. The
serving loop handles one request at a time, so it is the server's lock: version
and staleness are computed in the same step that applies the commit, exactly as
in ``sim`` (same :class:`~distgrad.server.ParameterServer`, same events).
Synchronous rules park committing workers until the round completes (barrier).

Messages on the pipes are tiny fixed ``struct`` records, never pickles.

Failures: a worker process that dies (SIGKILL, OOM) is seen at once through its
process sentinel, recorded as a ``fault`` event and removed from the server; with
``on_failure="reassign"`` the samples it had not committed are appended to the
live worker with the least work left, so no sample is lost. A Python exception
inside a worker fails the whole run with that worker's traceback (every worker
runs the same code; reassigning would only repeat it). Ctrl-C stops every
worker, writes a final checkpoint and the run directory, and leaves no process
behind. Every ``checkpoint_every`` seconds the parent snapshots the server state
(center, rule state, clock) and each worker's uncommitted sample order
(temp file + rename), from which ``train(..., resume=DIR)`` continues.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.multiprocessing as mp

from distgrad.algorithms.base import StepStats
from distgrad.protocol.core import ProtocolCore
from distgrad.protocol.driver import WorkerDriver, drive
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    StatsRequest,
)
from distgrad.rundir import write_checkpoint
from distgrad.worker import BatchSource, Worker

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

# worker -> parent: requests of the protocol (seq and counters as fixed struct records)
_PULL, _STEP, _COMMIT, _DONE, _FAIL, _READ, _APPLIED = 1, 2, 3, 4, 5, 6, 7
# parent -> worker
_REPLY, _EXTRA, _STOP = 1, 2, 3
_STEP_FMT = struct.Struct("<Bqdqq")  # kind, seq, loss, correct, samples
_REQ_FMT = struct.Struct("<Bqqqqqqq")  # kind, seq, base version, steps, samples, position,
#                                        flags, bytes on the wire
_REPLY_FMT = struct.Struct("<Bqqq")  # kind, seq, version, base version
_F_PULL, _F_STALE = 1, 2


class WorkerFailed(RuntimeError):
    """A worker process raised; the message holds its traceback."""


# --------------------------------------------------------------------------- worker side


class _Stopped(Exception):
    pass


class PipeChannel:
    """The worker end of the protocol on ``local``: requests as struct records on a pipe,
    tensors through the shared-memory buffers ``base`` (pulls) and ``payload`` (commits,
    reads). On the host the replica's own buffers *are* the shared ones: nothing is copied.

    ``center`` is given for lock-free rules (Hogwild): the worker then adds its commits
    into the shared center itself (:meth:`Algorithm.apply_unlocked`) and copies it out,
    with no lock, and only tells the parent that it did (for the event log).
    """

    transport_errors = (_Stopped, EOFError, BrokenPipeError, ConnectionResetError)

    def __init__(self, conn: Connection, worker: Worker, base: torch.Tensor,
                 payload: torch.Tensor, center: torch.Tensor | None, apply_unlocked: Any,
                 slow: float) -> None:
        self.conn, self.worker = conn, worker
        self.base, self.payload, self.center = base, payload, center
        self.apply_unlocked = apply_unlocked
        self.slow = slow
        self.resumed = time.perf_counter()

    def call(self, req: AnyRequest) -> Reply | None:
        try:
            return self._call(req)
        finally:
            self.resumed = time.perf_counter()

    def _call(self, req: AnyRequest) -> Reply | None:
        conn = self.conn
        if isinstance(req, StatsRequest):
            if self.slow:  # a straggler: a real slowdown of the simulator's shape
                time.sleep(self.slow * (time.perf_counter() - self.resumed))
            s = req.stats
            conn.send_bytes(_STEP_FMT.pack(_STEP, req.seq, s.loss, s.correct, s.samples))
            return None
        if isinstance(req, PullRequest):
            conn.send_bytes(_REQ_FMT.pack(_PULL if req.record else _READ, req.seq,
                                          0, 0, 0, 0, 0, 0))
            reply = self._await(req.seq)
            src = self.base if req.record else self.payload  # a read lands in payload
            assert req.into is not None
            if req.into.data_ptr() != src.data_ptr():
                req.into.copy_(src)
            reply.pulled = req.into
            return reply
        if isinstance(req, CommitRequest):
            return self._commit(req)
        if isinstance(req, DoneRequest):
            conn.send_bytes(_REQ_FMT.pack(_DONE, req.seq, 0, 0, 0, 0, 0, 0))
            return self._await(req.seq)
        if isinstance(req, FailRequest):  # the parent fails the run with this traceback
            conn.send_bytes(bytes([_FAIL]) + req.reason.encode(errors="replace"))
            return Reply(req.worker, req.attempt, req.seq, 0, 0, kind="fail")
        raise TypeError(f"unknown request {req!r}")

    def _commit(self, req: CommitRequest) -> Reply:
        fields = (req.seq, req.base_version, req.steps, req.samples, req.position)
        if self.center is not None:  # lock-free: apply it here, tell the parent
            self.apply_unlocked(self.center, req.payload.to(self.center.device))
            if req.pull_into is not None:
                req.pull_into.copy_(self.center)
            self.conn.send_bytes(_REQ_FMT.pack(_APPLIED, *fields, 0, req.nbytes))
            return Reply(req.worker, req.attempt, req.seq, req.base_version + 1,
                         req.base_version + 1, reply=req.payload, pulled=req.pull_into)
        if req.payload.data_ptr() != self.payload.data_ptr():
            self.payload.copy_(req.payload)
        flags = (_F_PULL if req.want_pull else 0) | (_F_STALE if req.stale is not None else 0)
        self.conn.send_bytes(_REQ_FMT.pack(_COMMIT, *fields, flags, req.nbytes))
        reply = self._await(req.seq)
        if req.payload.data_ptr() != self.payload.data_ptr():
            req.payload.copy_(self.payload)  # the server may have rewritten it
        reply.reply = req.payload
        if req.pull_into is not None:
            if req.pull_into.data_ptr() != self.base.data_ptr():
                req.pull_into.copy_(self.base)
            reply.pulled = req.pull_into
        return reply

    def _await(self, seq: int) -> Reply:
        """Block until the parent's reply to ``seq``; take in extra work sent before it."""
        while True:
            msg = self.conn.recv_bytes()
            kind = msg[0]
            if kind == _REPLY:
                _, rseq, version, base = _REPLY_FMT.unpack(msg)
                if rseq != seq:
                    raise RuntimeError(f"reply to request {rseq}, expected {seq}")
                return Reply(self.worker.id, 0, seq, version, base)
            if kind == _EXTRA:
                self.worker.batches.extend(np.frombuffer(msg[1:], dtype=np.int64))
            elif kind == _STOP:
                raise _Stopped
            else:
                raise RuntimeError(f"unexpected message kind {kind} from the parent")


def _worker_main(k: int, parts: RunParts, base: torch.Tensor, payload: torch.Tensor,
                 conn: Connection, device: str, order: np.ndarray | None,
                 threads: int, center: torch.Tensor | None) -> None:
    """Entry point of worker process k: build the worker, drive it over the pipe.

    A straggler (``k < timing.stragglers``) sleeps ``(straggler_factor − 1)`` times
    each step's compute time after the step: a real slowdown of the same shape as
    the simulator's.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent orchestrates Ctrl-C
    torch.set_num_threads(threads)
    timing = parts.job.timing
    slow = timing.straggler_factor - 1.0 if k < timing.stragglers else 0.0
    try:
        worker = parts.make_worker(k, device=device)
        if order is not None:
            worker.batches = BatchSource.from_order(
                parts.dataset.x_train, parts.dataset.y_train, order, parts.job.batch_size,
                device=device)
        rep = worker.rep
        if rep.params.device.type == "cpu":  # the replica reads and writes the shared buffers
            rep.base, rep.payload = base, payload
        channel = PipeChannel(conn, worker, base, payload, center,
                              parts.algorithm.apply_unlocked, slow)
        drive(WorkerDriver(worker), channel)
    except PipeChannel.transport_errors:
        return  # stopped, or the parent is gone: exit quietly instead of lingering


# --------------------------------------------------------------------------- parent side


@dataclass
class _Slot:
    """The parent's view of one worker process."""

    k: int
    proc: Any
    conn: Connection
    base: torch.Tensor
    payload: torch.Tensor
    order: np.ndarray  # every sample assigned to this worker, in visiting order
    alive: bool = True
    done: bool = False


class LocalEngine:
    """Worker processes with the server in the parent (see module docstring)."""

    name = "local"

    def __init__(self, job: Any, replay: list[tuple[str, int]] | None = None,
                 resume: dict[str, Any] | None = None,
                 checkpoint_path: Path | None = None) -> None:
        self.job = job
        self.replay = replay
        self.resume = resume
        self.checkpoint_path = checkpoint_path
        self.now = 0.0
        self.interrupted = False
        self.stop_requested = False

    # ------------------------------------------------------------------ run
    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        job = self.job
        n = len(parts.shards)
        self.parts, self.server, self.recorder, self.evals = parts, server, recorder, evals
        server.stale_from_engine()  # base[k], in shared memory, is the center k pulled
        self.t0 = time.perf_counter() - (self.resume["t"] if self.resume else 0.0)
        orders = self._initial_orders(parts)
        lock_free = server.rule.lock_free
        if lock_free:  # Hogwild: workers write the center themselves
            server.center.share_memory_()
        ctx = mp.get_context("spawn")
        parts.dataset.x_train.share_memory_()
        parts.dataset.y_train.share_memory_()
        threads = job.threads or 1
        devices = _devices(job.device, n)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the parent only copies buffers and evaluates
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distgrad-eval")
        self.slots: list[_Slot] = []
        self.core = ProtocolCore(server, recorder, self._t, totals=[len(o) for o in orders],
                                 on_update=self._on_update, trusted=True,
                                 schedule=self.replay)
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:  # children inherit SIG_IGN: Ctrl-C reaches only the parent's handler
            old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for k in range(n):
                base = torch.zeros_like(server.center).share_memory_()
                payload = torch.zeros_like(server.center).share_memory_()
                parent_end, child_end = ctx.Pipe()
                done_already = self.resume is not None and len(orders[k]) == 0
                proc = ctx.Process(
                    target=_worker_main, name=f"distgrad-worker-{k}", daemon=True,
                    args=(k, parts, base, payload, child_end, devices[k],
                          orders[k] if self.resume else None, threads,
                          server.center if lock_free else None))
                slot = _Slot(k, proc, parent_end, base, payload, orders[k])
                self.slots.append(slot)
                if done_already:
                    slot.done, slot.alive = True, False
                    self.core.retire(k)
                    continue
                self.core.admit(k, 0)
                proc.start()
                child_end.close()
                recorder.note(self._t(), "worker_start", worker=k, pid=proc.pid,
                              device=devices[k])
        finally:
            if main_thread:
                # Ctrl-C only raises a flag, checked between requests, so a commit is never
                # left half-applied in the center or in a checkpoint
                signal.signal(signal.SIGINT, self._request_stop)
        self.deferred: list[tuple[float, int, list[torch.Tensor], int]] = []
        try:
            self._maybe_eval()
            self._serve()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self._shutdown()
            self.pool.shutdown(wait=True)
            torch.set_num_threads(old_threads)
            if main_thread:
                signal.signal(signal.SIGINT, old_sigint)
        for t, version, vectors, committed in self.deferred:
            evals.callback(t, version, vectors, committed)
        if self.interrupted:
            raise KeyboardInterrupt
        return self.now

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _t(self) -> float:
        self.now = time.perf_counter() - self.t0
        return self.now

    def _initial_orders(self, parts: RunParts) -> list[np.ndarray]:
        if self.resume is not None:
            return [np.asarray(o.numpy(), dtype=np.int64) for o in self.resume["orders"]]
        orders = []
        for k in range(len(parts.shards)):
            src = BatchSource(parts.dataset.x_train, parts.dataset.y_train, parts.shards[k],
                              parts.job.batch_size, parts.job.epochs,
                              seed=_worker_seed(parts.job.seed, k))
            orders.append(src.order)
        return orders

    # ------------------------------------------------------------------ serving loop
    def _serve(self) -> None:
        crashes = sorted((t, w) for w, t in self.job.timing.crashes)  # injected SIGKILLs
        every = self.job.checkpoint_every
        next_ckpt = self._t() + every if every else math.inf
        while any(s.alive and not s.done for s in self.slots):
            if self.stop_requested:
                raise KeyboardInterrupt
            live = [s for s in self.slots if s.alive and not s.done]
            waitables: list[Any] = [s.conn for s in live] + [s.proc.sentinel for s in live]
            timeout = 0.5
            if crashes:
                timeout = max(0.0, min(timeout, crashes[0][0] - self._t()))
            ready = wait(waitables, timeout=timeout)
            now = self._t()
            while crashes and crashes[0][0] <= now:
                _, w = crashes.pop(0)
                slot = self.slots[w]
                if slot.alive and not slot.done:
                    os.kill(slot.proc.pid, signal.SIGKILL)  # a real kill, detected below
            for obj in ready:
                slot = next((s for s in live if obj is s.conn or obj == s.proc.sentinel), None)
                if slot is None or not slot.alive or slot.done:
                    continue
                if obj is slot.conn:
                    try:
                        msg = slot.conn.recv_bytes()
                    except (EOFError, OSError):
                        self._died(slot)
                        continue
                    self._handle(slot, msg)
                else:
                    self._drain(slot)
                    if slot.alive and not slot.done:
                        self._died(slot)
            if now >= next_ckpt and self._checkpoint():
                next_ckpt = now + every

    def _drain(self, slot: _Slot) -> None:
        """Read what a finished process left in its pipe (its DONE may race its exit)."""
        while slot.alive and not slot.done and slot.conn.poll():
            try:
                msg = slot.conn.recv_bytes()
            except (EOFError, OSError):
                return
            self._handle(slot, msg)

    def _remaining(self, slot: _Slot) -> np.ndarray:
        """The samples of ``slot``'s order whose effect has not reached the center (a commit
        waiting at a barrier or the gate has reached it)."""
        return slot.order[self.core.slots[slot.k].position:]

    def _handle(self, slot: _Slot, msg: bytes) -> None:
        """Decode one message of worker ``slot.k`` into a protocol request and serve it."""
        kind, k = msg[0], slot.k
        if kind == _STEP:
            _, seq, loss, correct, samples = _STEP_FMT.unpack(msg)
            self.core.stats(StatsRequest(k, 0, seq, StepStats(loss, correct, samples)))
            return
        if kind == _FAIL:
            text = msg[1:].decode(errors="replace")
            raise WorkerFailed(f"worker {k} raised:\n{text}")
        try:
            _, seq, base, steps, samples, position, flags, nbytes = _REQ_FMT.unpack(msg)
        except struct.error:
            raise RuntimeError(f"unreadable message of kind {kind} from worker {k}") from None
        req: AnyRequest
        if kind in (_PULL, _READ):
            read = kind == _READ
            req = PullRequest(k, 0, seq, record=not read, into=slot.payload if read else slot.base)
        elif kind in (_COMMIT, _APPLIED):
            req = CommitRequest(k, 0, seq, base_version=base, steps=steps, samples=samples,
                                position=position, payload=slot.payload, stale=slot.base,
                                want_pull=bool(flags & _F_PULL), pull_into=slot.base,
                                nbytes=nbytes, applied=kind == _APPLIED)
        elif kind == _DONE:
            req = DoneRequest(k, 0, seq)
        else:
            raise RuntimeError(f"unknown message kind {kind} from worker {k}")
        self._serve_request(slot, req)

    def _serve_request(self, slot: _Slot, req: AnyRequest) -> None:
        if isinstance(req, CommitRequest) and req.applied:
            self.core.commit(req)
            return  # the lock-free worker does not wait for an answer
        self._send_replies(self.core.handle(req))

    def _send_replies(self, replies: list[Reply]) -> None:
        for r in replies:
            slot = self.slots[r.worker]
            if r.kind == "done":
                slot.done = True
            if not slot.alive:
                continue
            try:
                slot.conn.send_bytes(_REPLY_FMT.pack(_REPLY, r.seq, r.version, r.base_version))
            except (BrokenPipeError, OSError):
                self._died(slot)

    def _on_update(self, t: float, version: int, committed: int) -> None:
        self._maybe_eval()

    # ------------------------------------------------------------------ failures
    def _died(self, slot: _Slot) -> None:
        if not slot.alive:
            return
        slot.alive = False
        slot.proc.join(timeout=1.0)
        code = slot.proc.exitcode
        lost = self._remaining(slot)
        kind = f"killed by signal {-code}" if code is not None and code < 0 else (
            f"exited with code {code}")
        reassigned_to = None
        if self.job.on_failure == "reassign" and len(lost):
            heirs = [s for s in self.slots if s.alive and not s.done]
            if heirs:
                heir = min(heirs, key=lambda s: len(self._remaining(s)))
                heir.order = np.concatenate([heir.order, lost])
                self.core.add_work(heir.k, len(lost))
                self._send_extra(heir, lost)
                reassigned_to = heir.k
        samples_lost = 0 if reassigned_to is not None else len(lost)
        self._send_replies(self.core.crash(slot.k, "died", samples_lost=samples_lost,
                                           detail=kind, uncommitted=len(lost),
                                           reassigned_to=reassigned_to))

    def _send_extra(self, slot: _Slot, indices: np.ndarray) -> None:
        try:
            slot.conn.send_bytes(bytes([_EXTRA]) + np.ascontiguousarray(
                indices, dtype=np.int64).tobytes())
        except (BrokenPipeError, OSError):
            self._died(slot)

    # ------------------------------------------------------------------ evaluation
    def _maybe_eval(self) -> None:
        """Evaluate a snapshot of the center: in a parent thread while training goes on, or
        (``deferred_eval``) after the workers are done, so it takes no CPU from them."""
        evals = self.evals
        committed = self.recorder.samples_committed
        if committed < evals.next_at:
            return
        vectors = [m.clone() for m in self.server.models()]
        # the snapshot's own sample count: the event is written later (thread, or deferred)
        snap = (self._t(), self.server.version, vectors, committed)
        if self.job.deferred_eval:
            self.deferred.append(snap)
        else:
            self.pool.submit(evals.callback, *snap)
        while evals.next_at <= committed:
            evals.next_at += evals.every_samples

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict[str, Any] | None:
        """Server state, clock and each worker's uncommitted samples; None mid-round."""
        if self.server._round:  # mid-round (synchronous): the last snapshot stands
            return None
        return {
            "format": 1,
            "t": self._t(),
            "server": self.server.state_dict(),
            "orders": [torch.from_numpy(self._remaining(s).copy()) for s in self.slots],
            "samples": self.recorder.samples,
            "samples_committed": self.recorder.samples_committed,
            "commits": self.recorder.commits,
        }

    def _checkpoint(self) -> bool:
        if self.checkpoint_path is None:
            return True
        snap = self.snapshot()
        if snap is None:
            return False
        self.recorder.note(snap["t"], "checkpoint", version=snap["server"]["version"])
        snap["events"] = len(self.recorder.events)  # a resume drops the events after this
        write_checkpoint(self.checkpoint_path, snap)
        return True

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        """Stop every worker and reap it: no process survives the run."""
        if self.interrupted and self.checkpoint_path is not None:
            self._checkpoint()  # mid-round (synchronous) the last periodic snapshot stands
        for s in self.slots:
            if s.proc.pid is None:
                continue
            if s.proc.is_alive():
                with contextlib.suppress(OSError):
                    s.conn.send_bytes(bytes([_STOP]))
        deadline = time.monotonic() + 5.0
        for s in self.slots:
            if s.proc.pid is None:
                continue
            s.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if s.proc.is_alive():
                s.proc.terminate()
                s.proc.join(timeout=2.0)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()
            s.conn.close()


def _worker_seed(seed: int, k: int) -> list[int]:
    from distgrad.parts import worker_seed

    return worker_seed(seed, k)


def _devices(device: str, n: int) -> list[str]:
    if device == "cpu":
        return ["cpu"] * n
    count = torch.cuda.device_count()
    if count == 0:
        from distgrad.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device is visible")
    return [f"cuda:{k % count}" for k in range(n)]
