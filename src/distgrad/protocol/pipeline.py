"""Pipelined commits (``Job.pipeline``, ``--pipeline``): a worker's commit travels while it
computes its next window.

Without pipelining a worker of the DOWNPOUR family sends a commit, waits for the center it
pulls with it, and only then starts its next window: the round trip is dead time. With
:func:`drive_pipelined` the commit (a copy of its payload) goes to a background thread that
carries it over the channel, and the worker goes on at once *from the center it already
holds*; the center pulled with commit k is taken in at commit k + 1. So commit k + 1 is
built on the center pulled with commit k − 1: one more window of staleness, sent honestly
as the commit's ``base_version`` (the first commit has no earlier reply: the worker keeps
its base, and its second commit is built on the initial pull).

The server must then accept a commit built on the worker's *previous* pull, compute its
staleness from that pull and, for rules that read θ̃_{t−τ} (ADAG, DC-ASGD, the distance
metric), use the center of that pull. :class:`PipelinedCore` does that over the frozen
:class:`~distgrad.protocol.core.ProtocolCore` (it keeps each worker's previous pull: its
version and, where the server keeps pulled centers, that center — one more model copy per
worker); engines build their core with :func:`make_core`.

Which algorithms can be pipelined is read from their :class:`Capabilities`
(:func:`check`): asynchronous rules that pull after each commit and neither exchange nor
read the reply, nor read the center before a commit, nor are gated or lock-free. The
``local`` engine refuses it: its worker's replica *is* the shared-memory buffers the
parent writes a pull into and reads a commit from, so a commit in flight would race the
next window (and shared memory has no transfer time to hide).
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from distgrad.errors import ConfigError
from distgrad.protocol.core import ProtocolCore
from distgrad.protocol.driver import Channel, WorkerDriver, log
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    Reply,
    StatsRequest,
)

if TYPE_CHECKING:
    from distgrad.algorithms.base import Capabilities

#: engines that carry pipelined commits
ENGINES = ("net", "ray", "spark")
#: requests queued for the background thread at most (step reports of one window and a
#: commit); the worker waits when the queue is full
QUEUE = 256


# --------------------------------------------------------------------------- refusals


def check(job: Any, caps: Capabilities | None = None) -> None:
    """Refuse (:class:`ConfigError`) to pipeline ``job`` when its engine or algorithm cannot;
    nothing to check when ``job.pipeline`` is off. ``caps``: the algorithm's capabilities
    (default: read from the job)."""
    if not getattr(job, "pipeline", False):
        return
    if job.engine not in ENGINES:
        why = ("its worker's replica is the shared-memory buffers the server side reads "
               "and writes in place, so a commit cannot travel while the worker computes"
               if job.engine == "local" else "it has no transfers to overlap")
        raise ConfigError(f"pipeline runs on the {', '.join(ENGINES)} engines, not "
                          f"{job.engine!r}: {why}")
    if caps is None:
        from distgrad.algorithms import get_algorithm

        caps = get_algorithm(job.algorithm).capabilities(job.algorithm_config(),
                                                         job.run_info())
    reasons = [why for bad, why in (
        (caps.synchronous, "it is synchronous (its workers wait at a barrier)"),
        (caps.exchange, "its commits exchange with the current center (elastic)"),
        (caps.uses_reply, "its worker reads the server's reply to each commit"),
        (caps.gated, f"its stale-synchronous gate (bound {caps.clock_bound}) holds commits"),
        (caps.lock_free, "it is lock-free (workers write the center themselves)"),
        (caps.reads, "its worker reads the center before each commit"),
        (not caps.pull_after_commit, "its worker does not pull after a commit"),
    ) if bad]
    if reasons:
        raise ConfigError(f"pipeline is for asynchronous algorithms that pull after each "
                          f"commit; {job.algorithm!r} cannot be pipelined: "
                          f"{'; '.join(reasons)}")


def make_core(job: Any, *args: Any, **kwargs: Any) -> ProtocolCore:
    """The protocol core an engine serves ``job`` with: a :class:`PipelinedCore` when the job
    pipelines (the :class:`~distgrad.job.Job` ran :func:`check` when it was made), else a
    plain :class:`ProtocolCore`; the arguments are :class:`ProtocolCore`'s."""
    if getattr(job, "pipeline", False):
        return PipelinedCore(*args, **kwargs)
    return ProtocolCore(*args, **kwargs)


# --------------------------------------------------------------------------- server side


@dataclass
class _Commit:
    """The commit being served: the worker's pull before it (``version``, and the buffer
    holding that center where the server keeps one), and whether it is built on the pull
    before that (``lagged``)."""

    worker: int
    version: int
    stale: torch.Tensor | None
    lagged: bool
    pulled: bool = False


class PipelinedCore(ProtocolCore):
    """A :class:`ProtocolCore` that also accepts a commit built on the worker's *previous*
    pull (a pipelined worker's: see the module docstring), with its staleness, its base
    version and its θ̃_{t−τ} taken from that pull.

    Per worker it keeps that previous pull: its version and — where the server keeps the
    center each worker pulled — that center, in a second buffer swapped with the server's
    (no copy in the steady state). A plain pull (the first one of an attempt) clears it, so
    a commit can only name a pull of the same attempt; anything else is refused as before.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n = len(self.slots)
        self._lag: list[int | None] = [None] * n  # version of the previous pull
        self._lag_stale: list[torch.Tensor | None] = [None] * n  # its center
        self._serving: _Commit | None = None

    def commit(self, req: CommitRequest) -> list[Reply]:
        w = req.worker
        server = self.server
        if not isinstance(w, int) or not 0 <= w < len(self.slots) or req.applied:
            return super().commit(req)
        keep = server.keep_stale
        stale = server._stale[w] if keep else None
        lag = self._lag[w]
        ctx = _Commit(w, server.base_version[w], stale,
                      lagged=lag is not None and req.base_version == lag
                      and lag != server.base_version[w])
        if ctx.lagged:  # served as if the previous pull were the last one
            assert lag is not None
            server.base_version[w] = lag
            if keep:
                server._stale[w] = self._lag_stale[w]
        self._serving = ctx
        try:
            return super().commit(req)
        finally:
            self._serving = None
            if ctx.lagged and not ctx.pulled:  # refused or answered again: as it was
                server.base_version[w] = ctx.version
                if keep:
                    server._stale[w] = ctx.stale

    def _pull_into(self, worker: int, into: torch.Tensor | None, record: bool = True
                   ) -> tuple[int, torch.Tensor]:
        ctx = self._serving
        if record:
            if ctx is not None and ctx.worker == worker:  # the pull after a commit
                ctx.pulled = True
                self._lag[worker] = ctx.version
                if self.server.keep_stale:
                    if ctx.lagged:  # the server's buffer now is the old lag one
                        self._lag_stale[worker] = ctx.stale
                    elif ctx.stale is not None:  # overwritten next: keep a copy
                        spare = self._lag_stale[worker]
                        if spare is None or spare is ctx.stale:
                            spare = torch.empty_like(ctx.stale)
                        self._lag_stale[worker] = spare.copy_(ctx.stale)
            else:  # a plain pull starts afresh
                self._lag[worker] = None
        return super()._pull_into(worker, into, record)


# --------------------------------------------------------------------------- worker side


class _Pending:
    """The answer to one request carried by the background thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    def set(self, reply: Reply | None = None, error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error
        self._done.set()

    def wait(self) -> Reply | None:
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.reply


class _Carrier:
    """One thread that calls ``channel.call`` for queued requests, in order (a channel is
    used by one thread at a time). After an error it answers every later request with
    that error, which the worker meets at its next wait or submission."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[AnyRequest, _Pending] | None] = queue.Queue(QUEUE)
        self._thread = threading.Thread(target=self._run, name="distgrad-pipeline",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            req, pending = item
            if self.error is not None:
                pending.set(error=self.error)
                continue
            try:
                pending.set(self.channel.call(req))
            except BaseException as exc:  # surfaced in the worker's thread
                self.error = exc
                pending.set(error=exc)

    def submit(self, req: AnyRequest) -> _Pending:
        if self.error is not None:
            raise self.error
        pending = _Pending()
        self._queue.put((req, pending))
        return pending

    def close(self) -> None:
        """Let the queued requests go (answered with the error after one), then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


@dataclass
class _InFlight:
    """A commit on its way: its answer, where the worker wanted the center, and the
    staging buffer the center arrives in."""

    pending: _Pending
    want: torch.Tensor
    staging: torch.Tensor


class _Buffers:
    """The copies a commit in flight owns (the worker reuses its own buffers): its payload,
    its stale center, and two staging buffers for pulled centers (one being received, one
    holding the center the worker takes in)."""

    def __init__(self) -> None:
        self.payload: torch.Tensor | None = None
        self.stale: torch.Tensor | None = None
        self.staging: list[torch.Tensor] = []
        self.turn = 0

    @staticmethod
    def _copy(src: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype \
                or buf.device != src.device:
            buf = torch.empty_like(src, memory_format=torch.contiguous_format)
        return buf.copy_(src)

    def outgoing(self, req: CommitRequest) -> CommitRequest:
        """``req`` with its own copies of the tensors it sends and a staging buffer to pull
        into."""
        assert req.pull_into is not None
        self.payload = self._copy(req.payload, self.payload)
        if req.stale is not None:
            self.stale = self._copy(req.stale, self.stale)
        if not self.staging:
            self.staging = [torch.empty_like(req.pull_into) for _ in range(2)]
        staging = self.staging[self.turn]
        self.turn ^= 1
        return replace(req, payload=self.payload,
                       stale=None if req.stale is None else self.stale, pull_into=staging)


def _take(r: Reply | None, into: torch.Tensor) -> Reply:
    if r is None or r.pulled is None:
        raise RuntimeError("the server's reply to a pipelined commit holds no pulled center")
    if r.pulled.data_ptr() != into.data_ptr():
        into.copy_(r.pulled.to(into.device) if r.pulled.device != into.device else r.pulled)
    return r


def drive_pipelined(driver: WorkerDriver, channel: Channel) -> None:
    """:func:`~distgrad.protocol.driver.drive` with pipelined commits (see the module
    docstring): a commit that pulls is handed to a background thread and answered at once
    with the center of the previous commit (the first: the worker's own base, version and
    base version); its own answer is taken at the next commit, or before any other request
    but a step report. Step reports go through the same thread, in order. A failure that is
    not the channel's own is reported to the server, then re-raised; an error of the
    background call is raised in the worker at its next wait, with its type."""
    carrier = _Carrier(channel)
    try:
        _serve(driver, carrier)
    except channel.transport_errors:
        carrier.close()
        raise
    except BaseException:
        reason = traceback.format_exc()
        carrier.close()
        if not isinstance(carrier.error, channel.transport_errors):
            try:
                channel.call(driver.fail_request(reason))
            except Exception as report_exc:  # the original error matters more
                log.error("could not report the failure to the server: %s", report_exc)
        raise
    carrier.close()


def _serve(driver: WorkerDriver, carrier: _Carrier) -> None:
    gen = driver.requests()
    buffers = _Buffers()
    flight: _InFlight | None = None
    reply: Reply | None = None
    while True:
        try:
            req = gen.send(reply)
        except StopIteration:
            break
        if isinstance(req, StatsRequest):
            carrier.submit(req)
            reply = None
            continue
        if isinstance(req, CommitRequest) and req.want_pull and req.pull_into is not None:
            if flight is None:  # nothing pulled yet: the worker goes on from its own base
                reply = Reply(req.worker, req.attempt, req.seq, driver.worker.version,
                              driver.base_version, pulled=req.pull_into)
            else:
                prev = flight.pending.wait()
                reply = _take(prev, flight.staging)
                reply = replace(reply, seq=req.seq, pulled=flight.staging)
            out = buffers.outgoing(req)
            flight = _InFlight(carrier.submit(out), req.pull_into, out.pull_into)
            continue
        if flight is not None:  # settle the commit in flight first
            r = _take(flight.pending.wait(), flight.want)
            driver.base_version = r.base_version
            flight = None
        r = carrier.submit(req).wait()
        if r is None:
            raise RuntimeError(f"no reply to {type(req).__name__}")
        if isinstance(req, DoneRequest):
            return
        reply = r
    if flight is not None:  # (the driver always ends with a done)
        flight.pending.wait()


__all__ = ["ENGINES", "PipelinedCore", "check", "drive_pipelined", "make_core"]
