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
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.multiprocessing as mp

from distgrad.algorithms.base import StepStats
from distgrad.worker import BatchSource, Commit, Pull, Step

if TYPE_CHECKING:
    from distgrad.engines.sim import EvalSchedule
    from distgrad.job import RunParts
    from distgrad.metrics.events import Recorder
    from distgrad.server import ParameterServer

# worker -> parent
_PULL, _STEP, _COMMIT, _DONE, _ERROR, _READ, _APPLIED = 1, 2, 3, 4, 5, 6, 7
# parent -> worker
_VERSION, _EXTRA, _STOP = 1, 2, 3
_STEP_FMT = struct.Struct("<Bdqq")  # kind, loss, correct, samples
_COMMIT_FMT = struct.Struct("<Bqqqq")  # kind, steps, samples, flags, bytes on the wire
_VERSION_FMT = struct.Struct("<Bq")
_F_PULL, _F_STALE = 1, 2


class WorkerFailed(RuntimeError):
    """A worker process raised; the message holds its traceback."""


# --------------------------------------------------------------------------- worker side


def _worker_main(k: int, parts: RunParts, base: torch.Tensor, payload: torch.Tensor,
                 conn: Connection, device: str, order: np.ndarray | None,
                 threads: int, center: torch.Tensor | None) -> None:
    """Entry point of worker process k: build the worker, serve its generator over the pipe.

    A straggler (``k < timing.stragglers``) sleeps ``(straggler_factor − 1)`` times
    each step's compute time after the step: a real slowdown of the same shape as
    the simulator's.

    ``center`` is given for lock-free rules (Hogwild): the worker then adds its
    commits into the shared center and copies it out itself, with no lock, and
    only tells the parent that it did (for the event log).
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
        on_host = rep.params.device.type == "cpu"
        if on_host:  # the replica reads and writes the shared buffers directly
            rep.base, rep.payload = base, payload
        gen = worker.run()
        value: Any = None
        resumed = time.perf_counter()
        while True:
            try:
                req = gen.send(value)
            except StopIteration:
                conn.send_bytes(bytes([_DONE]))
                return
            value = None
            if isinstance(req, Step):
                if slow:
                    time.sleep(slow * (time.perf_counter() - resumed))
                s = req.stats
                conn.send_bytes(_STEP_FMT.pack(_STEP, s.loss, s.correct, s.samples))
            elif isinstance(req, Pull):
                if req.record:  # the parent copies the center into base[k]
                    conn.send_bytes(bytes([_PULL]))
                    value = _await_version(conn, worker)
                    if req.into.data_ptr() != base.data_ptr():
                        req.into.copy_(base)
                else:  # a read: the parent copies the center into payload[k], free until
                    conn.send_bytes(bytes([_READ]))  # this worker's next commit
                    value = _await_version(conn, worker)
                    req.into.copy_(payload)
            elif isinstance(req, Commit) and center is not None:
                center.add_(req.payload.to(center.device))  # lock-free, as Hogwild does
                if req.pull_into is not None:
                    req.pull_into.copy_(center)
                conn.send_bytes(_COMMIT_FMT.pack(_APPLIED, req.steps, req.samples, 0,
                                                 req.nbytes))
            elif isinstance(req, Commit):
                if req.payload.data_ptr() != payload.data_ptr():
                    payload.copy_(req.payload)
                flags = (_F_PULL if req.pull_into is not None else 0) | (
                    _F_STALE if req.stale_center is not None else 0)
                conn.send_bytes(_COMMIT_FMT.pack(_COMMIT, req.steps, req.samples, flags,
                                                 req.nbytes))
                value = _await_version(conn, worker)
                if not on_host:
                    req.payload.copy_(payload)  # the server may have rewritten it
                    if req.pull_into is not None:
                        req.pull_into.copy_(base)
            else:
                raise TypeError(f"unknown request {req!r}")
            resumed = time.perf_counter()
    except _Stopped:
        return
    except (EOFError, BrokenPipeError):
        return  # the parent is gone: exit quietly instead of lingering as an orphan
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send_bytes(bytes([_ERROR]) + traceback.format_exc().encode())
        raise


class _Stopped(Exception):
    pass


def _await_version(conn: Connection, worker: Any) -> int:
    """Block until the parent's reply; take in extra work sent before it."""
    while True:
        msg = conn.recv_bytes()
        kind = msg[0]
        if kind == _VERSION:
            return _VERSION_FMT.unpack(msg)[1]
        if kind == _EXTRA:
            worker.batches.extend(np.frombuffer(msg[1:], dtype=np.int64))
        elif kind == _STOP:
            raise _Stopped
        else:
            raise RuntimeError(f"unexpected message kind {kind} from the parent")


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
    committed: int = 0  # samples of ``order`` whose effect reached the center
    alive: bool = True
    done: bool = False
    parked: tuple[int, int, int] | None = None  # (steps, samples, flags) at a barrier
    gated: int | None = None  # flags of a commit held by the stale-synchronous gate
    deferred: deque = field(default_factory=deque)  # replay: requests not yet due

    @property
    def remaining(self) -> np.ndarray:
        return self.order[self.committed:]


def replay_schedule(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The order of server operations in a recorded run: initial pulls and commits."""
    ops: list[tuple[str, int]] = []
    for e in events:
        if e["type"] == "pull":
            ops.append(("read" if e.get("read") else "pull", e["worker"]))
        elif e["type"] == "commit":
            ops.append(("commit", e["worker"]))
        elif e["type"] == "round":
            ops.extend(("commit", w) for w in e["workers"])
    return ops


class LocalEngine:
    """Worker processes with the server in the parent (see module docstring)."""

    name = "local"

    def __init__(self, job: Any, replay: list[tuple[str, int]] | None = None,
                 resume: dict[str, Any] | None = None,
                 checkpoint_path: Path | None = None) -> None:
        self.job = job
        self.replay = deque(replay) if replay is not None else None
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
                    server.leave(k)
                    continue
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
        self.round_bytes = 0
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

    def _handle(self, slot: _Slot, msg: bytes) -> None:
        kind = msg[0]
        if kind == _STEP:
            _, loss, correct, samples = _STEP_FMT.unpack(msg)
            self.recorder.batch(self._t(), slot.k, StepStats(loss, correct, samples))
        elif kind == _APPLIED:
            _, steps, samples, _, nbytes = _COMMIT_FMT.unpack(msg)
            slot.committed += samples
            self.recorder.commit(self._t(), self.server.record_unlocked_commit(
                slot.k, steps, samples), nbytes=nbytes)
            self._maybe_eval()
        elif kind in (_PULL, _COMMIT, _READ):
            op = ({_PULL: "pull", _READ: "read"}.get(kind, "commit"), msg)
            if self.replay is not None:
                slot.deferred.append(op)
                self._run_replay()
            else:
                self._apply(slot, *op)
        elif kind == _DONE:
            slot.done = True
            self.recorder.done(self._t(), slot.k)
            self._release(self.server.leave(slot.k))
        elif kind == _ERROR:
            text = msg[1:].decode(errors="replace")
            raise WorkerFailed(f"worker {slot.k} raised:\n{text}")
        else:
            raise RuntimeError(f"unknown message kind {kind} from worker {slot.k}")

    def _run_replay(self) -> None:
        """Apply deferred requests in the recorded order, as far as they have arrived."""
        assert self.replay is not None
        progressed = True
        while progressed and self.replay:
            progressed = False
            kind, w = self.replay[0]
            slot = self.slots[w]
            if slot.deferred and slot.deferred[0][0] == kind:
                self.replay.popleft()
                self._apply(slot, *slot.deferred.popleft())
                progressed = True
            elif slot.deferred:
                raise RuntimeError(
                    f"replay diverged: worker {w} sent a {slot.deferred[0][0]} where the "
                    f"recorded run has a {kind}")
        if not self.replay:  # the recording is exhausted: serve what is left directly
            for s in self.slots:
                while s.deferred:
                    self._apply(s, *s.deferred.popleft())
            self.replay = None

    def _apply(self, slot: _Slot, kind: str, msg: bytes) -> None:
        server, rec = self.server, self.recorder
        if kind in ("pull", "read"):
            read = kind == "read"
            version = server.pull(slot.k, slot.payload if read else slot.base, record=not read)
            rec.pull(self._t(), slot.k, version, read=read)
            self._reply(slot, version)
            return
        _, steps, samples, flags, nbytes = _COMMIT_FMT.unpack(msg)
        if server.rule.synchronous:
            slot.parked = (steps, samples, flags)
            self.round_bytes += nbytes
            self._release(server.submit(slot.k, slot.payload, steps, samples))
            return
        r = server.commit(slot.k, slot.payload, steps, samples, stale_center=slot.base)
        slot.committed += samples
        rec.commit(self._t(), r, nbytes=nbytes)
        self._maybe_eval()
        if r.held:  # stale-synchronous gate: no reply until the slowest worker catches up
            slot.gated = flags
        else:
            self._reply(slot, server.pull(slot.k, slot.base) if flags & _F_PULL else r.version)
        self._release_gated()

    def _release_gated(self) -> None:
        """Reply to the workers the stale-synchronous gate lets go."""
        for p in self.server.released():
            slot = self.slots[p]
            flags, slot.gated = slot.gated, None
            if slot.alive and flags is not None:
                self._reply(slot, self.server.pull(p, slot.base) if flags & _F_PULL
                            else self.server.version)

    def _release(self, record: Any) -> None:
        """After a leave or a completed synchronous round: reply to every worker that may go
        on (round participants, workers the stale-synchronous gate releases)."""
        self._release_gated()
        if record is None:
            return
        self.recorder.round(self._t(), record, nbytes=self.round_bytes)
        self.round_bytes = 0
        for p in record.participants:
            slot = self.slots[p]
            if slot.parked is None:
                continue
            _, samples, flags = slot.parked
            slot.parked = None
            slot.committed += samples
            if not slot.alive:
                continue
            version = (self.server.pull(p, slot.base) if flags & _F_PULL
                       else self.server.version)
            self._reply(slot, version)
        self._maybe_eval()

    def _reply(self, slot: _Slot, version: int) -> None:
        try:
            slot.conn.send_bytes(_VERSION_FMT.pack(_VERSION, version))
        except (BrokenPipeError, OSError):
            self._died(slot)

    # ------------------------------------------------------------------ failures
    def _died(self, slot: _Slot) -> None:
        if not slot.alive:
            return
        slot.alive = False
        slot.proc.join(timeout=1.0)
        code = slot.proc.exitcode
        lost = slot.remaining
        if slot.parked is not None:  # its commit already reached the server
            lost = lost[slot.parked[1]:]
        kind = f"killed by signal {-code}" if code is not None and code < 0 else (
            f"exited with code {code}")
        reassigned_to = None
        if self.job.on_failure == "reassign" and len(lost):
            heirs = [s for s in self.slots if s.alive and not s.done]
            if heirs:
                heir = min(heirs, key=lambda s: len(s.remaining))
                heir.order = np.concatenate([heir.order, lost])
                self._send_extra(heir, lost)
                reassigned_to = heir.k
        samples_lost = 0 if reassigned_to is not None else len(lost)
        self.recorder.fault(self._t(), slot.k, "died", samples_lost=samples_lost,
                            detail=kind, uncommitted=len(lost),
                            reassigned_to=reassigned_to)
        self._release(self.server.leave(slot.k))

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
        if self.server._round:
            return None
        return {
            "format": 1,
            "t": self._t(),
            "server": self.server.state_dict(),
            "orders": [torch.from_numpy(s.remaining.copy()) for s in self.slots],
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
    from distgrad.job import worker_seed

    return worker_seed(seed, k)


def _devices(device: str, n: int) -> list[str]:
    if device == "cpu":
        return ["cpu"] * n
    count = torch.cuda.device_count()
    if count == 0:
        from distgrad.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device is visible")
    return [f"cuda:{k % count}" for k in range(n)]


def write_checkpoint(path: Path, snapshot: dict[str, Any]) -> None:
    """Atomically write a snapshot: a temporary file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(snapshot, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a snapshot written by :func:`write_checkpoint` (tensors and plain data only)."""
    return torch.load(path, weights_only=True)
