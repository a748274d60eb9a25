"""Data that streams: per-worker iterables that each worker opens itself.

A data factory (``--data pkg.module:factory``) may return :class:`WorkerStreams`
instead of tensors: a function ``make(worker, workers, epoch, seed)`` giving worker
``worker``'s batches ``(x, y)`` for one epoch — typically a ``DataLoader`` over that
worker's files or its shard of a larger-than-memory data set — and how many samples
each worker has per epoch. Nothing is loaded up front: every worker (a ``sim``
worker, a ``distgrad work`` process on another host, a Ray actor) calls ``make`` itself.

The sample counts are declared because the server counts every sample once (exactly-
once commits, resume, progress, the evaluation schedule): a stream that yields more or
fewer samples than declared stops the worker with an error naming both numbers. The
stream must be deterministic for a seed (same batches on a rerun or a resume, which
skips the samples already committed), as the ``sim`` engine is.

Streams run on ``sim``, ``net`` and ``ray``; the ``local`` and ``spark`` engines hand
out sample indices of in-memory data and refuse them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distgrad.errors import ConfigError, positive_int

MakeStream = Callable[..., Iterable[tuple[Any, Any]]]


@dataclass(frozen=True)
class WorkerStreams:
    """Per-worker batch streams (see the module docstring).

    ``make(worker=k, workers=n, epoch=e, seed=s)`` returns worker k's ``(x, y)`` batches
    of epoch e; ``samples`` is each worker's samples per epoch (one int for all, or one
    per worker); ``test`` the ``(X, y)`` test data (optional)."""

    make: MakeStream
    samples: int | tuple[int, ...]
    test: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def per_worker(self, workers: int) -> list[int]:
        if isinstance(self.samples, int):
            return [positive_int("samples", self.samples)] * workers
        counts = [positive_int("samples", int(s)) for s in self.samples]
        if len(counts) != workers:
            raise ConfigError(f"the streams declare samples for {len(counts)} workers, the "
                              f"job has {workers}")
        return counts

    def first_batch(self, workers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker 0's first batch (the inputs are checked and the task read from it)."""
        for x, y in self.make(worker=0, workers=workers, epoch=0, seed=seed):
            return _tensor(x), _tensor(y)
        raise ConfigError("worker 0's stream is empty")


def _tensor(v: Any) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    return t.float() if t.dtype == torch.float64 else t


class StreamSource:
    """A worker's batches from its stream, with the interface the engines use of a
    :class:`~distgrad.worker.BatchSource` (``total``, ``position``, ``remaining``,
    snapshots). ``position`` samples are skipped when iteration starts (a resume)."""

    def __init__(self, streams: WorkerStreams, worker: int, workers: int, epochs: int,
                 seed: int, batch_size: int, device: str | torch.device = "cpu") -> None:
        self.streams, self.worker, self.workers = streams, worker, workers
        self.epochs, self.seed, self.batch_size = epochs, seed, batch_size
        self.per_epoch = streams.per_worker(workers)[worker]
        self.total = epochs * self.per_epoch
        self.position = 0
        self.device = torch.device(device)

    def remaining(self) -> np.ndarray:
        """Virtual indices of the samples not handed out yet (counted, not reassignable)."""
        return np.arange(self.position, self.total, dtype=np.int64)

    def extend(self, indices: np.ndarray) -> None:
        raise ConfigError("a stream cannot take over another worker's samples; run with "
                          "on_failure='drop'")

    def state_dict(self) -> dict[str, Any]:
        return {"stream": True, "position": int(self.position)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = self.position
        for epoch in range(self.epochs):
            seen = 0
            for x, y in self.streams.make(worker=self.worker, workers=self.workers,
                                          epoch=epoch, seed=self.seed):
                x, y = _tensor(x), _tensor(y)
                n = int(y.shape[0])
                seen += n
                if seen > self.per_epoch:
                    raise RuntimeError(f"worker {self.worker}'s stream yielded more than the "
                                       f"{self.per_epoch} samples declared for epoch {epoch}")
                if skip >= n:  # committed before a resume
                    skip -= n
                    continue
                if skip:
                    x, y, skip = x[skip:], y[skip:], 0
                self.position += int(y.shape[0])
                if self.device.type != "cpu":
                    x, y = x.to(self.device), y.to(self.device)
                yield x, y
            if seen != self.per_epoch:
                raise RuntimeError(f"worker {self.worker}'s stream yielded {seen} samples in "
                                   f"epoch {epoch}; {self.per_epoch} were declared")
