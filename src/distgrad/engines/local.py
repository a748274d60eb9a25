"""The ``local`` engine: real worker processes on one machine, the center in shared memory.

Layout::

    parent process                                   worker process k (spawn, 1 torch thread)
    ───────────────────────────────────────────      ─────────────────────────────────────────
    ParameterServer (center in shared memory)        Replica: params, grad, inner optimizer
    ProtocolCore: one request at a time      <─pipe─> drive(WorkerDriver, PipeChannel)
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

Messages on the pipes are tiny fixed ``struct`` records of the protocol's requests
and replies (:mod:`distgrad.protocol`), never pickles.

Failures: a worker process that dies (SIGKILL, OOM) is seen at once through its
process sentinel, recorded as a ``fault`` event and removed from the server; with
``on_failure="reassign"`` the samples it had not committed go to the live workers so that
they finish together and no sample is lost: half at once, split in proportion to their
speed measured over their latest steps (:func:`split_by_speed`), the rest in pieces of
eight batches to whichever worker runs low first (speeds change once a worker is gone).
A Python exception inside a worker — including one raised while the worker rebuilds the
job — fails the whole run with that worker's traceback (every worker runs the same code;
reassigning would only repeat it).

The job reaches each worker pickled by reference, except classes and functions it could
not import (defined in a notebook, ``python -c``, stdin or inside a function), which go
by value (cloudpickle; :class:`JobShipper`). Per-worker streams are never pickled:
each worker reopens them from the data factory, and its order holds virtual indices of
stream samples (:func:`initial_order`, :class:`StreamOrder`), so reassignment,
checkpoints and resume work on them unchanged — a dead worker's rest goes to the heirs
as contiguous runs of its stream, all at once (no pool of small pieces: each piece would
reopen the stream). ``timing.fixed_order`` visits each shard in one order every pass.
Worker processes ignore SIGINT and SIGTERM (the parent orchestrates both), exit quietly
on any disconnect and die with the parent (``PR_SET_PDEATHSIG`` on Linux, a watchdog
thread elsewhere), so none lingers. SIGINT and SIGTERM stop every worker, write a final
checkpoint and the run directory, and leave no process behind; a second signal stops at
once. Every ``checkpoint_every`` seconds the parent writes a checkpoint (temp file +
rename) from which ``train(..., resume=DIR)`` continues exactly; one that cannot be
written (full disk, no permission) is a ``checkpoint_failed`` event and training goes on.

Checkpoints are whole and consistent: the parent raises a flag in shared memory; each
worker, at its next step boundary (right after reporting a local step, its generator
paused at a ``Step``), tells the parent and waits. A worker with a request still waiting
(a commit parked at the barrier, held by the stale-synchronous gate, or a replayed
request not yet due) is not at a step boundary and cannot get there before the others
move: when every live worker is paused or waiting so, the paused ones are let go (the
flag stays up) and pause again at their next step. Once every live worker is paused,
no request is in flight: the parent copies the server (center, clock, base versions,
rule state), the protocol core (positions, sequence numbers), the recorder's counters
and what is left of a replay schedule, then asks each worker for its
:meth:`Worker.state_dict` (replica, inner optimizer, rule, batch order and position) and
its driver's counters, and releases them. A resumed run starts each worker from its
state: no initial pull, no fresh optimizer, the same sequence numbers. SIGINT and SIGTERM
take such a checkpoint before stopping (waiting at most ``_FINAL_WAIT`` seconds for the
workers to pause), with or without ``checkpoint_every`` (the run lifecycle gives the
engine the run directory's checkpoint path); an interruption raised inside the serving
loop (e.g. by a progress callback) leaves the last periodic checkpoint standing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from collections import ChainMap, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from distgrad.algorithms.base import StepStats
from distgrad.data.streams import StreamSource, WorkerStreams
from distgrad.entry import interactive_main, ref_of
from distgrad.errors import ConfigError
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
from distgrad.rundir import save_snapshot, server_snapshot
from distgrad.worker import BatchSource, Worker

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

# worker -> parent: requests of the protocol (seq and counters as fixed struct records)
_PULL, _STEP, _COMMIT, _DONE, _FAIL, _READ, _APPLIED = 1, 2, 3, 4, 5, 6, 7
# worker -> parent: paused at a step boundary (a checkpoint is wanted); its snapshot
_PAUSED, _STATE = 8, 9
# parent -> worker
_REPLY, _EXTRA, _STOP = 1, 2, 3
# parent -> a paused worker: go on; send your snapshot, then go on
_GO, _SNAP = 4, 5
_FINAL_WAIT = 10.0  # seconds an interrupt waits for every worker to reach a step boundary
_START_WAIT = 60.0  # ... at most, while worker processes are still starting
_RATE_STEPS = 64  # a worker's speed is measured over its latest steps
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1
log = logging.getLogger("distgrad.local")
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

    ``wanted`` (a one-element shared tensor) is the parent's "checkpoint wanted" flag:
    when it is up at a step boundary the worker pauses (see :meth:`_pause`). ``driver``
    is the :class:`WorkerDriver` this channel carries, whose counters join the snapshot.
    """

    transport_errors = (_Stopped, EOFError, BrokenPipeError, ConnectionResetError)

    def __init__(self, conn: Connection, worker: Worker, base: torch.Tensor,
                 payload: torch.Tensor, center: torch.Tensor | None, apply_unlocked: Any,
                 slow: float, wanted: torch.Tensor | None = None,
                 driver: WorkerDriver | None = None) -> None:
        self.conn, self.worker = conn, worker
        self.base, self.payload, self.center = base, payload, center
        self.apply_unlocked = apply_unlocked
        self.slow = slow
        self.wanted = wanted.numpy() if wanted is not None else None
        self.driver = driver
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
            if self.wanted is not None and self.wanted[0]:
                self._pause()
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

    def _pause(self) -> None:
        """At a step boundary (the worker's generator is suspended at a ``Step``, no request
        in flight): tell the parent, wait until it lets this worker go, sending the
        worker's and the driver's snapshot first if it asks for them."""
        self.conn.send_bytes(bytes([_PAUSED]))
        while True:
            msg = self.conn.recv_bytes()
            kind = msg[0]
            if kind == _GO:
                return
            if kind == _SNAP:
                assert self.driver is not None
                buf = io.BytesIO()
                torch.save({"worker": self.worker.state_dict(),
                            "driver": self.driver.state_dict()}, buf)
                self.conn.send_bytes(bytes([_STATE]) + buf.getvalue())
                return
            self._other(kind, msg)

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
            self._other(kind, msg)

    def _other(self, kind: int, msg: bytes) -> None:
        """A parent message that is not the one awaited: extra work, or stop."""
        if kind == _EXTRA:
            self.worker.batches.extend(np.frombuffer(msg[1:], dtype=np.int64))
        elif kind == _STOP:
            raise _Stopped
        else:
            raise RuntimeError(f"unexpected message kind {kind} from the parent")


def check_parts(*, model: Any, loss_fn: Any, streams: Any) -> None:
    """What the ``local`` engine refuses before training (a one-line ConfigError naming the
    object): a model or loss its worker processes can receive neither by reference (they
    cannot import it: defined in a notebook, ``python -c``, stdin or inside a function) nor
    by value (cloudpickle fails on it, e.g. it holds a lock or an open file). Per-worker
    ``streams`` are accepted: each worker process reopens them from the data factory."""
    for obj, what in ((model, "model"), (loss_fn, "loss_fn")):
        if obj is None:
            continue
        target = obj if callable(obj) and not isinstance(obj, nn.Module) else type(obj)
        if ref_of(target) is not None and (getattr(target, "__module__", None) != "__main__"
                                           or main_rerunnable()):
            continue  # imported by reference, as before
        import cloudpickle

        try:
            cloudpickle.dumps(obj)
        except Exception as exc:
            name = getattr(target, "__qualname__", type(obj).__name__)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ConfigError(
                f"{what} {name!r} cannot be sent to the local engine's worker processes: it "
                f"is defined where they cannot import it (notebook, python -c, stdin, or "
                f"inside a function) and cannot be pickled by value ({reason}); define it at "
                f"module level in a .py file on sys.path, or use engine='sim'") from None


def main_rerunnable() -> bool:
    """Whether a spawned worker re-runs ``__main__`` (behind its ``if __name__ ==
    "__main__":`` guard) and so can import what it defines: a script file or ``python -m``;
    not a notebook, ``python -c`` or stdin (which Python 3.11 names ``<stdin>``, a file that
    does not exist: :func:`distgrad.entry.interactive_main` misses that case)."""
    main = sys.modules.get("__main__")
    if main is None or interactive_main():
        return False
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    from multiprocessing import process

    return os.path.isfile(os.path.join(process.ORIGINAL_DIR or "", main.__file__))


@contextlib.contextmanager
def _spawnable_main() -> Iterator[None]:
    """While a worker process is spawned: hide a ``__main__.__file__`` that names no file
    (``<stdin>``), which ``multiprocessing`` would make the child re-run (it dies with
    FileNotFoundError before any of our code). What that ``__main__`` defines reaches the
    worker by value (:class:`JobShipper`)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or main_rerunnable():
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _dumps_by_value(obj: Any) -> bytes:
    """``obj`` pickled with cloudpickle (classes and functions a worker cannot import go
    by value) and torch's shared-memory reducers (shared tensors travel as handles)."""
    from multiprocessing.reduction import ForkingPickler

    import cloudpickle

    class _ByValue(cloudpickle.CloudPickler):
        dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
            ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
            cloudpickle.CloudPickler.dispatch_table)

    buf = io.BytesIO()
    _ByValue(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


class JobShipper:
    """The job's parts pickled for each spawned worker process (local IPC between this
    user's own processes, never network data): by reference with ``ForkingPickler`` where
    the worker can import every class and function they name; by value
    (:func:`_dumps_by_value`) where it cannot — everything of an interactive ``__main__``
    (notebook, ``python -c``, stdin: no file a worker could re-run), or, from a script, a
    class or function defined inside a function, or a lambda. Called once per worker (a
    shared tensor's handle is taken only once); once pickling by reference failed, the
    next workers' parts go by value at once (a failed attempt leaves handles no process
    takes). What cannot be pickled either way (a lock, an open file in a dataset object)
    is a one-line ConfigError."""

    def __init__(self, parts: RunParts) -> None:
        self.parts = parts
        self.by_value = not main_rerunnable()

    def __call__(self) -> bytes:
        from multiprocessing.reduction import ForkingPickler

        try:
            if not self.by_value:
                try:
                    return bytes(ForkingPickler.dumps(self.parts))
                except (pickle.PicklingError, AttributeError):  # a local class, a lambda
                    self.by_value = True
            return _dumps_by_value(self.parts)
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ConfigError(f"the local engine cannot send the job (model, data, loss) to "
                              f"its worker processes: {reason}; use objects defined at "
                              f"module level in a .py file, or engine='sim'") from None


# --------------------------------------------------------------------------- batch orders
#: a per-worker stream's sample s of worker j is the virtual index j * _STREAM_SPAN + s
_STREAM_SPAN = 1 << 40


def initial_order(parts: RunParts, k: int) -> np.ndarray:
    """Worker k's whole visiting order at the start of a run: indices of the in-memory
    training data, re-shuffled each pass from the worker's seed (as ``sim``), or the shard
    in the same order every pass with ``timing.fixed_order`` (dist-keras; as ``sim``); with
    per-worker streams, virtual indices ``k * _STREAM_SPAN + s`` of its stream's samples
    ``s`` (every epoch in turn; :class:`StreamOrder` reads them)."""
    job = parts.job
    if parts.streams is not None:
        return k * _STREAM_SPAN + np.arange(job.epochs * len(parts.shards[k]), dtype=np.int64)
    fixed = job.timing.fixed_order
    return BatchSource(parts.dataset.x_train, parts.dataset.y_train, parts.shards[k],
                       job.batch_size, job.epochs,
                       seed=0 if fixed else _worker_seed(job.seed, k),
                       shuffle=not fixed).order


class StreamOrder(BatchSource):
    """A ``local`` worker's batches from per-worker streams, over an order of virtual
    indices (:func:`initial_order`): its own stream, then any run of another worker's
    stream it took over from a dead worker (``extend``). Each run of consecutive indices
    of stream j is read by opening worker j's stream at that sample
    (:class:`~distgrad.data.streams.StreamSource`: it skips what comes before and checks
    the declared counts); batches are the stream's own, cut at the run's end. Order,
    position and snapshots are a :class:`BatchSource`'s, so the parent's bookkeeping
    (reassignment, checkpoints, resume) is the same as for in-memory data."""

    def __init__(self, streams: WorkerStreams, workers: int, epochs: int, seed: int,
                 order: np.ndarray, batch_size: int,
                 device: str | torch.device = "cpu") -> None:
        self.streams, self.workers, self.epochs, self.seed = streams, workers, epochs, seed
        self.x = self.y = None  # type: ignore[assignment]
        self.batch_size = batch_size
        self.order = np.asarray(order, dtype=np.int64)
        self.position = 0
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.position < len(self.order):
            rest = self.order[self.position:]
            breaks = np.flatnonzero(rest != rest[0] + np.arange(len(rest)))
            want = int(breaks[0]) if len(breaks) else len(rest)
            j, s = divmod(int(rest[0]), _STREAM_SPAN)
            src = self._open(j, s)
            for x, y in src:
                take = min(int(y.shape[0]), want)
                self.position += take
                want -= take
                yield x[:take], y[:take]
                if want == 0:
                    break
            if want:
                raise RuntimeError(f"worker {j}'s stream ended {want} samples before the "
                                   f"{src.total} declared")

    def _open(self, j: int, s: int) -> StreamSource:
        """Worker j's stream from its sample ``s`` (counted over every epoch): opened at
        the epoch holding it, so the epochs before it are not read again."""
        per = self.streams.per_worker(self.workers)[j]
        first = s // per
        make = self.streams.make

        def shifted(*, worker: int, workers: int, epoch: int, seed: int) -> Any:
            return make(worker=worker, workers=workers, epoch=epoch + first, seed=seed)

        src = StreamSource(replace(self.streams, make=shifted), j, self.workers,
                           self.epochs - first, self.seed, self.batch_size, device=self.device)
        src.position = s - first * per  # skipped within that epoch
        return src


def reopen_streams(parts: RunParts) -> RunParts:
    """``parts`` with per-worker streams rebuilt from the job's data factory (in a worker
    process: the streams are never pickled; the factory is called under the job's seed as
    in the parent, and must declare the same sample counts)."""
    from distgrad.parts import load_data

    job = parts.job
    streams = getattr(load_data(job), "streams", None)
    if streams is None:
        raise RuntimeError(f"the data factory {job.dataset!r} returned per-worker streams in "
                           "the parent process but not in this worker process")
    counts = streams.per_worker(len(parts.shards))
    if counts != [len(s) for s in parts.shards]:
        raise RuntimeError(f"the data factory {job.dataset!r} declared {counts} samples per "
                           f"worker here, {[len(s) for s in parts.shards]} in the parent")
    return replace(parts, streams=streams)


def _batches(parts: RunParts, order: np.ndarray, device: str) -> BatchSource:
    """The batch source of a worker visiting ``order`` (indices, or virtual stream indices)."""
    job = parts.job
    if parts.streams is not None:
        return StreamOrder(parts.streams, len(parts.shards), job.epochs, job.seed, order,
                           job.batch_size, device=device)
    return BatchSource.from_order(parts.dataset.x_train, parts.dataset.y_train, order,
                                  job.batch_size, device=device)


def build_worker(k: int, parts: RunParts, base: torch.Tensor, payload: torch.Tensor,
                 device: str = "cpu", order: np.ndarray | None = None,
                 state: bytes | None = None) -> tuple[Worker, WorkerDriver]:
    """Worker k and its driver as worker process k runs them: on the CPU the replica's
    pull and commit buffers are the shared ``base`` and ``payload``; its batches visit
    ``order`` (default :func:`initial_order`, as the parent computes it); ``order`` and
    ``state`` as in :func:`_worker_main`."""
    worker = parts.make_worker(k, device=device)
    worker.batches = _batches(parts, initial_order(parts, k) if order is None else order,
                              device)
    rep = worker.rep
    if rep.params.device.type == "cpu":  # the replica reads and writes the shared buffers
        rep.base, rep.payload = base, payload
    driver = WorkerDriver(worker)  # sets the batch position: load the state after it
    if state is not None:
        saved = torch.load(io.BytesIO(state), weights_only=True)
        worker.load_state_dict(saved["worker"])  # into the shared buffers, in place
        driver.load_state_dict(saved["driver"])
    return worker, driver


def _die_with_parent(parent: int | None) -> None:
    """Make this process exit as soon as the ``parent`` process dies: ``PR_SET_PDEATHSIG``
    (SIGKILL) on Linux, else a daemon thread that polls ``os.getppid()``."""
    if parent is None:
        return
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(0)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.2)
            os._exit(0)

        threading.Thread(target=watch, name="distgrad-parent-watch", daemon=True).start()


def _worker_main(k: int, parts_blob: bytes, base: torch.Tensor, payload: torch.Tensor,
                 conn: Connection, device: str, order: np.ndarray | None,
                 threads: int, center: torch.Tensor | None, wanted: torch.Tensor | None = None,
                 state: bytes | None = None, parent: int | None = None,
                 streams: bool = False) -> None:
    """Entry point of worker process k: rebuild the job, build the worker, drive it over
    the pipe.

    ``parts_blob`` is the job's :class:`RunParts` pickled by the parent
    (:class:`JobShipper`: shared tensors travel as handles, what this process could
    not import by value); it is unpickled here, inside the error handling, so a model or
    dataset this process cannot rebuild fails the run with its traceback instead of
    killing the process before it can say why. ``streams``: the job's data factory
    returns per-worker streams, reopened here (:func:`reopen_streams`; the blob holds
    none). ``order`` replaces the worker's batch
    order (an older checkpoint's remaining samples); ``state`` (``torch.save`` bytes of
    ``{"worker", "driver"}``, from a checkpoint) restores the worker and its driver
    exactly where the snapshot was taken. ``parent`` is the parent's pid: this process
    dies with it.

    A straggler (``k < timing.stragglers``) sleeps ``(straggler_factor − 1)`` times
    each step's compute time after the step: a real slowdown of the same shape as
    the simulator's.
    """
    for sig in _STOP_SIGNALS:  # the parent orchestrates interrupts (it checkpoints first;
        signal.signal(sig, signal.SIG_IGN)  # ignored since exec, see LocalEngine.run)
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    try:
        try:
            from multiprocessing.reduction import ForkingPickler

            parts: RunParts = ForkingPickler.loads(parts_blob)
        except Exception:
            conn.send_bytes(bytes([_FAIL]) + (_UNPICKLABLE + traceback.format_exc()).encode(
                errors="replace"))
            raise SystemExit(1) from None
        try:
            timing = parts.job.timing
            slow = timing.straggler_factor - 1.0 if k < timing.stragglers else 0.0
            if streams:
                parts = reopen_streams(parts)
            worker, driver = build_worker(k, parts, base, payload, device, order, state)
        except Exception:
            conn.send_bytes(bytes([_FAIL]) + traceback.format_exc().encode(errors="replace"))
            raise SystemExit(1) from None
        channel = PipeChannel(conn, worker, base, payload, center,
                              parts.algorithm.apply_unlocked, slow, wanted, driver)
        try:
            drive(driver, channel)
        except PipeChannel.transport_errors:
            raise
        except Exception:  # drive reported the traceback to the parent, which fails the run
            raise SystemExit(1) from None
    except PipeChannel.transport_errors:
        return  # stopped, or the parent is gone: exit quietly instead of lingering


_UNPICKLABLE = ("the worker process could not rebuild the job (a model, dataset or loss it "
                "can neither import nor rebuild by value); define it in an importable "
                "module\n")


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
    heard: bool = False  # it sent a message: its process started and rebuilt the job
    stepped: int = 0  # samples of its order it has reported steps for
    steps: deque[tuple[float, int]] = field(  # (time, samples) of its latest steps
        default_factory=lambda: deque(maxlen=_RATE_STEPS))

    def rate(self) -> float | None:
        """Samples per second over its latest steps (None before two): the speed it runs
        at now, on a host whose load changes."""
        if len(self.steps) < 2:
            return None
        span = self.steps[-1][0] - self.steps[0][0]
        return sum(n for _, n in list(self.steps)[1:]) / span if span > 0 else None


class _WallClock:
    """Seconds since the run started (continued across a resume), readable by the protocol
    core without a reference to the engine (no cycle keeps a finished run alive)."""

    __slots__ = ("now", "t0")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.now = 0.0

    def __call__(self) -> float:
        self.now = time.perf_counter() - self.t0
        return self.now


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
        self._clock = _WallClock()
        self.interrupted = False
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that asked to stop
        self.checkpoints_tried = 0  # checkpoint writes attempted by this run

    # ------------------------------------------------------------------ run
    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        job = self.job
        n = len(parts.shards)
        self.parts, self.server, self.recorder, self.evals = parts, server, recorder, evals
        server.stale_from_engine()  # base[k], in shared memory, is the center k pulled
        self._clock.t0 = time.perf_counter() - (self.resume["t"] if self.resume else 0.0)
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
        # a whole checkpoint (format 2) restores every worker exactly; an older one (format
        # 1) only the samples each worker had left, with fresh workers
        exact = self.resume is not None and "workers" in self.resume
        schedule = self.replay
        if exact and schedule is None and self.resume.get("schedule") is not None:
            schedule = [(str(op), int(w)) for op, w in self.resume["schedule"]]
        self.core = ProtocolCore(server, recorder, self._clock, totals=[len(o) for o in orders],
                                 on_update=self._on_update, trusted=True,
                                 schedule=schedule)
        if exact:
            self.core.load_state_dict(self.resume["core"])
        # the "checkpoint wanted" flag the workers read at each step boundary
        self.wanted = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self.snap_wanted = False
        self.paused: set[int] = set()
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            # SIGINT/SIGTERM only raise a flag, checked between requests, so a commit is never
            # left half-applied in the center or in a checkpoint. A signal this process
            # inherited as ignored (SIGINT of a background job `cmd &` in a script) stays so.
            old_handlers = {s: signal.signal(s, self._request_stop) for s in _STOP_SIGNALS
                            if signal.getsignal(s) is not signal.SIG_IGN}
        # per-worker streams are never pickled: each worker reopens them from the factory
        ship = JobShipper(parts if parts.streams is None else replace(
            parts, streams=None, dataset=replace(parts.dataset)))  # (drops dataset.streams)
        try:  # a failure while starting them (a full event log) stops those started
            for k in range(n):
                base = torch.zeros_like(server.center).share_memory_()
                payload = torch.zeros_like(server.center).share_memory_()
                parent_end, child_end = ctx.Pipe()
                blob = None
                if exact:  # the core already knows which workers are live (attempt 0)
                    done_already = self.core.slots[k].state != "live"
                    if not done_already:
                        blob = _worker_blob(self.resume["workers"], k)
                        # the parent reads base[k] as the stale center k holds
                        base.copy_(self.resume["workers"][k]["worker"]["replica"]["base"])
                else:
                    done_already = self.resume is not None and len(orders[k]) == 0
                proc = ctx.Process(
                    target=_worker_main, name=f"distgrad-worker-{k}", daemon=True,
                    # pickled once per worker: a shared tensor's handle is taken only once
                    args=(k, ship(), base, payload, child_end,
                          devices[k], orders[k] if self.resume and not exact else None,
                          threads, server.center if lock_free else None, self.wanted, blob,
                          os.getpid(), parts.streams is not None))
                slot = _Slot(k, proc, parent_end, base, payload, orders[k])
                self.slots.append(slot)
                core_slot = self.core.slots[k]
                slot.stepped = int(core_slot.position) + int(core_slot.uncommitted)
                if done_already:
                    slot.alive = False
                    slot.done = not exact or self.core.slots[k].state == "done"
                    if not exact:
                        self.core.retire(k)
                    continue
                if not exact:
                    self.core.admit(k, 0)
                # while it is forked and exec'd both are ignored, so the worker inherits them
                # ignored from its first instruction: a signal to the whole process group
                # (Ctrl-C, SLURM) in its seconds of start-up cannot kill it (the mask would
                # not do: the child's is reset). One in these milliseconds is lost.
                for sig in old_handlers if main_thread else ():
                    signal.signal(sig, signal.SIG_IGN)
                try:
                    with _spawnable_main():
                        proc.start()
                finally:
                    for sig in old_handlers if main_thread else ():
                        signal.signal(sig, self._request_stop)
                child_end.close()
                recorder.note(self._t(), "worker_start", worker=k, pid=proc.pid,
                              device=devices[k])
        except BaseException:
            self._shutdown()
            if main_thread:
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
            raise
        self.deferred: list[tuple[float, int, list[torch.Tensor], int]] = []
        # a dead worker's samples not yet handed out: given to whoever runs low first
        self.spare = (np.asarray(self.resume["pool"].numpy(), dtype=np.int64)
                     if self.resume is not None and "pool" in self.resume
                     else np.empty(0, dtype=np.int64))
        self.pool_owner = -1  # the worker whose samples the pool holds (for a loss)
        self.low_water = 8 * job.batch_size  # samples left to step when a top-up is sent
        try:
            self._maybe_eval()
            self._serve()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self._shutdown()
            self.pool.shutdown(wait=True)
            self.core.on_update = None  # no engine <-> core cycle outlives the run
            torch.set_num_threads(old_threads)
            if main_thread:
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
        for t, version, vectors, committed in self.deferred:
            evals.callback(t, version, vectors, committed)
        if self.interrupted:
            raise KeyboardInterrupt
        return self.now

    def _request_stop(self, signum: int, frame: Any) -> None:
        """SIGINT/SIGTERM: stop after a final checkpoint; a second signal stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.stop_signal = signum

    @property
    def now(self) -> float:
        return self._clock.now

    def _t(self) -> float:
        return self._clock()

    def _initial_orders(self, parts: RunParts) -> list[np.ndarray]:
        """Each worker's whole visiting order (for an older checkpoint: what it had left)."""
        if self.resume is not None and "workers" in self.resume:
            # the order a live worker saved, reassigned work included; the core's position
            # counts into it. A finished or dead worker keeps what it had left.
            return [np.asarray(w["worker"]["batches"]["order"].numpy(), dtype=np.int64)
                    if w is not None else np.asarray(o.numpy(), dtype=np.int64)
                    for w, o in zip(self.resume["workers"], self.resume["orders"],
                                    strict=True)]
        if self.resume is not None:
            return [np.asarray(o.numpy(), dtype=np.int64) for o in self.resume["orders"]]
        return [initial_order(parts, k) for k in range(len(parts.shards))]

    # ------------------------------------------------------------------ serving loop
    def _serve(self) -> None:
        crashes = sorted((t, w) for w, t in self.job.timing.crashes)  # injected SIGKILLs
        every = self.job.checkpoint_every if self.checkpoint_path is not None else None
        self.next_ckpt = self._t() + every if every else math.inf
        self.written = 0  # checkpoints written by this run
        stop_by: float | None = None
        tried_at_stop, give_up = 0, math.inf
        while any(s.alive and not s.done for s in self.slots):
            if self.stop_requested:  # SIGINT/SIGTERM: a last whole checkpoint, then stop
                if self.checkpoint_path is None or self.recorder.write_error is not None:
                    raise KeyboardInterrupt  # nowhere to write it, or the log is broken
                if stop_by is None:
                    stop_by, tried_at_stop = self._t() + _FINAL_WAIT, self.checkpoints_tried
                    give_up = self._t() + _START_WAIT
                    self._want_snapshot()
                elif any(not s.heard for s in self.slots if s.alive and not s.done):
                    # a worker process still starting (importing torch on a busy host)
                    stop_by = min(max(stop_by, self._t() + _FINAL_WAIT), give_up)
                if self.checkpoints_tried > tried_at_stop:
                    raise KeyboardInterrupt
                elif self._t() >= stop_by:
                    log.warning("no final checkpoint: the workers did not all reach a step "
                                "boundary within %.0f s; the last checkpoint stands",
                                _FINAL_WAIT)
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
            if self.snap_wanted:
                self._advance_snapshot()
            elif now >= self.next_ckpt:
                self._want_snapshot()
        if len(self.spare):  # every worker finished before it ran low (should not happen)
            self.recorder.fault(self._t(), self.pool_owner, "unassigned",
                                samples_lost=len(self.spare))
            self.spare = np.empty(0, dtype=np.int64)

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
        slot.heard = True
        if kind == _PAUSED:
            if self.snap_wanted:
                self.paused.add(k)
            else:  # the checkpoint it paused for is already taken
                self._send(slot, bytes([_GO]))
            return
        if kind == _STEP:
            _, seq, loss, correct, samples = _STEP_FMT.unpack(msg)
            slot.steps.append((self._clock.now, samples))
            slot.stepped += samples
            self.core.stats(StatsRequest(k, 0, seq, StepStats(loss, correct, samples)))
            if len(self.spare) and len(slot.order) - slot.stepped <= self.low_water:
                self._top_up(slot)
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
            if (kind == _COMMIT and len(self.spare)
                    and len(slot.order) - slot.stepped <= self.low_water):
                self._top_up(slot)  # before the reply: it takes the work in before done
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
        self.paused.discard(slot.k)
        slot.proc.join(timeout=1.0)
        code = slot.proc.exitcode
        lost = self._remaining(slot)
        # samples it computed but never committed: their work is done again (or lost)
        wasted = min(int(self.core.slots[slot.k].uncommitted), len(lost))
        kind = f"killed by signal {-code}" if code is not None and code < 0 else (
            f"exited with code {code}")
        if not slot.heard:  # e.g. Python could not start it (a script read from stdin)
            kind += " before it started"
            if code is not None and code > 0:
                kind += "; its own error, if any, is on stderr above"
        reassigned: list[list[int]] = []
        speeds: list[list[Any]] = []  # [worker, measured samples/s, samples it had left]
        # heirs: live workers with samples still to commit (one whose last commit was
        # answered may already have said it is done: extra work would come too late)
        heirs = [s for s in self.slots if s.alive and not s.done and len(self._remaining(s))]
        pooled = 0
        if self.job.on_failure == "reassign" and len(lost) and heirs:
            # half now, split by measured speed so that all would finish together; the rest
            # is handed out in small pieces to whichever worker runs low first (speeds
            # change once a worker is gone), so that they do finish together
            # (streams: all at once, one contiguous run per heir, each opened only once)
            pooled = len(lost) // 2 if len(heirs) > 1 and self.parts.streams is None else 0
            now_part, self.spare = lost[:len(lost) - pooled], np.concatenate(
                [self.spare, lost[len(lost) - pooled:]])
            self.pool_owner = slot.k
            speeds = [[s.k, s.rate(), len(self._remaining(s))] for s in heirs]
            shares = split_by_speed(len(now_part), [r for _, _, r in speeds],
                                    [v for _, v, _ in speeds])
            start = 0
            for heir, share in zip(heirs, shares, strict=True):
                if share:
                    reassigned.append([heir.k, share])
                    self._give(heir, now_part[start:start + share])
                    start += share
        lost_now = len(lost) if not (reassigned or pooled) else 0
        if not heirs and len(self.spare):  # nobody left to take the pool either
            lost_now, self.spare = lost_now + len(self.spare), np.empty(0, dtype=np.int64)
        self._send_replies(self.core.crash(
            slot.k, "died", samples_lost=lost_now, detail=kind, uncommitted=len(lost),
            wasted=wasted, reassigned=reassigned or None, pooled=pooled or None,
            reassigned_to=[w for w, _ in reassigned] or None, heirs=speeds or None))

    def _give(self, heir: _Slot, chunk: np.ndarray) -> None:
        """Append ``chunk`` to ``heir``'s work (its order, the core's total, its process)."""
        heir.order = np.concatenate([heir.order, chunk])
        self.core.add_work(heir.k, len(chunk))
        self._send_extra(heir, chunk)

    def _top_up(self, slot: _Slot) -> None:
        """``slot`` runs low while a dead worker's samples wait in the pool: give it a piece
        (it still has samples to commit, so it reads them before it can say done)."""
        if not slot.alive or slot.done or not len(self._remaining(slot)):
            return
        chunk, self.spare = self.spare[:self.low_water], self.spare[self.low_water:]
        self.recorder.note(self._t(), "extra_work", worker=slot.k, samples=len(chunk),
                           origin=self.pool_owner)
        self._give(slot, chunk)

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
    def _want_snapshot(self) -> None:
        """Ask every worker to pause at its next step boundary (see the module docstring)."""
        self.snap_wanted = True
        self.wanted[0] = 1

    def _blocked(self, k: int) -> bool:
        """Worker k has a request the core holds (barrier, gate, replay order): it gets to
        its next step boundary only when another worker moves."""
        return self.core.slots[k].waiting is not None or bool(self.core.deferred[k])

    def _advance_snapshot(self) -> None:
        """Every live worker paused: take the checkpoint. Every live worker paused or
        blocked (so waiting for a paused one): let the paused ones go; they pause again at
        their next step boundary."""
        live = [s for s in self.slots if s.alive and not s.done]
        if not live or not self.paused:
            return
        if all(s.k in self.paused for s in live):
            self._take_snapshot(live)
        elif all(s.k in self.paused or self._blocked(s.k) for s in live):
            self._release()

    def _release(self) -> None:
        paused, self.paused = sorted(self.paused), set()
        for k in paused:
            self._send(self.slots[k], bytes([_GO]))

    def _send(self, slot: _Slot, msg: bytes) -> None:
        try:
            slot.conn.send_bytes(msg)
        except (BrokenPipeError, OSError):
            self._died(slot)

    def snapshot(self) -> dict[str, Any]:
        """The parent's half of a checkpoint: server (center, clock, base versions, rule
        state), protocol core, what is left of a replay schedule, each worker's remaining
        samples and the recorder's counters. Consistent only while no request is in flight
        (every live worker paused at a step boundary)."""
        snap = server_snapshot(self.core, self.recorder, self._t(), 2)
        snap["orders"] = [torch.from_numpy(self._remaining(s).copy()) for s in self.slots]
        snap["pool"] = torch.from_numpy(self.spare.copy())
        return snap

    def _take_snapshot(self, live: list[_Slot]) -> None:
        """Every live worker is paused at a step boundary: snapshot the parent, collect each
        worker's state (it then goes on by itself) and write the checkpoint."""
        try:
            snap = self.snapshot()
        except RuntimeError:  # a request still waits (a dead worker's?): try again later
            self._release()
            return
        self.snap_wanted = False
        self.wanted[0] = 0
        workers: list[dict[str, Any] | None] = [None] * len(self.slots)
        lost: list[_Slot] = []
        for s in live:  # paused: the next message of each is its state
            try:
                s.conn.send_bytes(bytes([_SNAP]))
                msg = s.conn.recv_bytes()
            except (EOFError, OSError):
                lost.append(s)
                continue
            if msg[0] != _STATE:
                raise RuntimeError(f"worker {s.k} sent message kind {msg[0]} instead of its "
                                   "snapshot")
            workers[s.k] = torch.load(io.BytesIO(msg[1:]), weights_only=True)
        self.paused.clear()
        for s in lost:
            self._died(s)
        if lost:  # the snapshot misses a worker: the last checkpoint stands; retry soon
            self.next_ckpt = self._t()
            return
        snap["workers"] = workers
        assert self.checkpoint_path is not None
        self.checkpoints_tried += 1
        self.written += save_snapshot(self.checkpoint_path, snap, self.recorder, snap["t"])
        every = self.job.checkpoint_every  # counted from the end of this one: a slow write
        self.next_ckpt = self._t() + every if every else math.inf  # (big model) never loops

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        """Stop every worker and reap it: no process survives the run (the last whole
        checkpoint stands: an interrupted run takes none here)."""
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
            if s.proc.is_alive():  # (workers ignore SIGTERM: the parent orchestrates it)
                s.proc.kill()
                s.proc.join()
            s.conn.close()


def split_by_speed(samples: int, remaining: list[int], rates: list[float | None]
                   ) -> list[int]:
    """Shares of ``samples`` reassigned samples for workers that have ``remaining`` samples
    left and run at ``rates`` samples per second (None: not measured yet, taken as the
    mean of the measured ones), such that every worker that gets some finishes at the same
    time T — water filling: a worker whose own work already outlasts T gets none. The
    shares are whole samples and add up to ``samples``."""
    if not remaining:
        return []
    known = [r for r in rates if r is not None and r > 0]
    fill = sum(known) / len(known) if known else 1.0
    speed = [r if r is not None and r > 0 else fill for r in rates]
    by_finish = sorted(range(len(speed)), key=lambda i: remaining[i] / speed[i])
    taking: list[int] = []
    finish = 0.0
    for pos, i in enumerate(by_finish):
        taking.append(i)
        finish = (samples + sum(remaining[j] for j in taking)) / sum(speed[j] for j in taking)
        nxt = by_finish[pos + 1] if pos + 1 < len(by_finish) else None
        if nxt is None or remaining[nxt] / speed[nxt] >= finish:
            break
    exact = [max(0.0, finish * speed[i] - remaining[i]) if i in taking else 0.0
             for i in range(len(speed))]
    shares = [math.floor(x) for x in exact]
    # the samples left by rounding down go to the largest fractional parts
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - shares[i],
                    reverse=True)[:samples - sum(shares)]:
        shares[i] += 1
    return shares


def _worker_blob(workers: list[dict[str, Any] | None], k: int) -> bytes:
    """Worker k's saved state, serialized for its process."""
    state = workers[k]
    if state is None:
        raise RuntimeError(f"the checkpoint holds no state for live worker {k}")
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


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
