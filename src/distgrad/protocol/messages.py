"""The protocol's messages: what a worker asks, what the server answers. No I/O here.

Every request carries ``(worker, attempt, seq)``: the worker slot, which attempt of it
(a restarted process, a retried Spark task or Ray actor is a new attempt), and a sequence
number that grows by one per request of that attempt. That triple is what makes retries
safe: the core answers a request it has already answered with the same reply and applies
it once (see :class:`~distgrad.protocol.core.ProtocolCore`).

Tensors in a request are owned by the caller until the core returns; ``into`` fields
name where the transport wants a pulled center written (a worker's own buffer in the
simulator, a shared-memory buffer on ``local``, ``None`` for the network: the core then
allocates one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distgrad.algorithms.base import StepStats


@dataclass
class Request:
    worker: int
    attempt: int
    seq: int


@dataclass
class PullRequest(Request):
    """Copy the center; ``record=False`` is a *read* (the worker's pull clock stays)."""

    record: bool = True
    into: torch.Tensor | None = None


@dataclass
class StatsRequest(Request):
    """One local step (one-way: no reply). ``t``: when it happened, default now."""

    stats: StepStats
    t: float | None = None


@dataclass
class CommitRequest(Request):
    """A commit of ``steps`` local steps over ``samples`` samples.

    ``base_version``: the version the payload was built on (the worker's last pull);
    ``position``: the samples this worker will have committed once it is applied.
    ``stale`` is θ̃_{t−τ} when the worker sends it (or an in-process transport lends the
    worker's pull buffer). ``want_reply``: send the (possibly rewritten) payload back;
    ``want_pull``: pull right after the commit, into ``pull_into`` when given.
    ``nbytes``: what the commit puts on the wire in its codec (for the event log).
    """

    base_version: int
    steps: int
    samples: int
    position: int
    payload: torch.Tensor
    stale: torch.Tensor | None = None
    want_reply: bool = False
    want_pull: bool = False
    pull_into: torch.Tensor | None = None
    nbytes: int = 0
    #: the compressed message of ``payload`` (a :class:`distgrad.compression.Encoded`)
    #: when the worker compresses: a network transport sends its bytes
    encoded: Any = None
    applied: bool = False  # lock-free: the worker already added it into the center


@dataclass
class DoneRequest(Request):
    """The worker has processed and committed all its samples."""


@dataclass
class FailRequest(Request):
    """The worker failed (it says so, or its transport saw it die: ``kind="crash"``)."""

    reason: str = ""
    kind: str = "error"


@dataclass
class Reply:
    """The answer to one request.

    ``version``: the server version the worker now holds (of what it pulled, or the
    clock after its commit); ``base_version``: the version its next commit is built on;
    ``reply``: the rewritten payload (``want_reply``); ``pulled``: the center (a pull,
    or a commit's ``want_pull``); ``duplicate``: a resend answered again, not re-applied.
    """

    worker: int
    attempt: int
    seq: int
    version: int
    base_version: int
    reply: torch.Tensor | None = None
    pulled: torch.Tensor | None = None
    duplicate: bool = False
    kind: str = "commit"


AnyRequest = PullRequest | StatsRequest | CommitRequest | DoneRequest | FailRequest


def reply_kind(req: Request) -> str:
    """The kind of reply a request gets: ``pull``, ``read``, ``commit``, ``done``, ``fail``
    (a resend must be of the same kind to be answered again)."""
    if isinstance(req, PullRequest):
        return "pull" if req.record else "read"
    return {CommitRequest: "commit", DoneRequest: "done", FailRequest: "fail"}.get(
        type(req), "?")
