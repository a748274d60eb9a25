"""The worker side of the protocol, with no I/O: :class:`WorkerDriver` and :func:`drive`.

A :class:`~distgrad.worker.Worker` yields what its algorithm needs (pull, step, commit);
the driver turns that into protocol requests — sequence numbers, the attempt, the base
version a commit is built on, the position it ends at, a final ``done`` — and takes the
replies back into the worker's buffers. Every engine's worker side is this driver plus a
:class:`Channel` that carries one request to the server and brings its reply back:

* ``sim`` steps :meth:`WorkerDriver.requests` from its event heap (no channel: it hands
  the requests to the core in the same process);
* ``local`` over a pipe and shared-memory buffers, ``net`` and ``spark`` over TCP,
  ``ray`` over actor calls: :func:`drive` with their channel.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Generator
from typing import Protocol

import torch

from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    StatsRequest,
)
from distgrad.worker import Commit, Pull, Step, Worker

log = logging.getLogger("distgrad.protocol")


class Channel(Protocol):
    """Carries one request to the server and returns its reply (None for a step report,
    which is one-way). Raising one of ``transport_errors`` means the server is out of
    reach: the driver does not try to report the failure over the same channel."""

    transport_errors: tuple[type[BaseException], ...]

    def call(self, req: AnyRequest) -> Reply | None: ...


def _take(src: torch.Tensor | None, dst: torch.Tensor, what: str) -> None:
    if src is None:
        raise RuntimeError(f"the server's reply holds no {what}")
    if src.data_ptr() != dst.data_ptr():
        dst.copy_(src.to(dst.device) if src.device != dst.device else src)


class WorkerDriver:
    """Runs one attempt of one worker as a generator of protocol requests.

    ``position`` is where the server says this attempt resumes (samples of its batch
    order already committed); ``base_version`` the version of what it holds.
    """

    def __init__(self, worker: Worker, attempt: int = 0, position: int = 0,
                 base_version: int = 0) -> None:
        self.worker = worker
        self.attempt = attempt
        self.seq = 0
        self.position = position
        self.base_version = base_version
        self.uses_reply = bool(worker.rule.uses_reply)
        worker.batches.position = position

    def state_dict(self) -> dict[str, int]:
        """The driver's counters (with :meth:`Worker.state_dict`, a worker between steps)."""
        return {"attempt": self.attempt, "seq": self.seq, "position": self.position,
                "base_version": self.base_version}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters; the worker's batch position is the worker's own state."""
        self.attempt, self.seq = int(state["attempt"]), int(state["seq"])
        self.position, self.base_version = int(state["position"]), int(state["base_version"])

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def requests(self) -> Generator[AnyRequest, Reply | None, None]:
        """Yield the requests of the worker's loop and a final ``done``; send each reply in."""
        k, a = self.worker.id, self.attempt
        gen = self.worker.run()
        value: int | None = None
        while True:
            try:
                req = gen.send(value)
            except StopIteration:
                break
            if isinstance(req, Step):
                yield StatsRequest(k, a, self._next(), req.stats)
                value = None
            elif isinstance(req, Pull):
                r = yield PullRequest(k, a, self._next(), record=req.record, into=req.into)
                assert r is not None
                _take(r.pulled, req.into, "center")
                if req.record:
                    self.base_version = r.base_version
                value = r.version
            elif isinstance(req, Commit):
                position = self.position + req.samples
                r = yield CommitRequest(
                    k, a, self._next(), base_version=self.base_version, steps=req.steps,
                    samples=req.samples, position=position, payload=req.payload,
                    stale=req.stale_center, want_reply=self.uses_reply,
                    want_pull=req.pull_into is not None, pull_into=req.pull_into,
                    nbytes=req.nbytes, encoded=req.encoded)
                assert r is not None
                if self.uses_reply:
                    _take(r.reply, req.payload, "reply payload")
                if req.pull_into is not None:
                    _take(r.pulled, req.pull_into, "pulled center")
                self.position = position
                self.base_version = r.base_version
                value = r.version
            else:
                raise TypeError(f"unknown request {req!r}")
        yield DoneRequest(k, a, self._next())

    def fail_request(self, reason: str, kind: str = "error") -> FailRequest:
        return FailRequest(self.worker.id, self.attempt, self._next(), reason=reason, kind=kind)


def drive(driver: WorkerDriver, channel: Channel) -> None:
    """Serve ``driver``'s requests over ``channel`` until the worker is done. A failure
    that is not the channel's own is reported to the server, then re-raised."""
    gen = driver.requests()
    reply: Reply | None = None
    try:
        while True:
            try:
                req = gen.send(reply)
            except StopIteration:
                return
            reply = channel.call(req)
            if reply is None and not isinstance(req, StatsRequest):
                raise RuntimeError(f"no reply to {type(req).__name__}")
            if isinstance(req, DoneRequest):
                return
    except channel.transport_errors:
        raise
    except BaseException:
        reason = traceback.format_exc()
        try:
            channel.call(driver.fail_request(reason))
        except Exception as report_exc:  # the original error matters more
            log.error("could not report the failure to the server: %s", report_exc)
        raise
