"""Keep your training loop: one call per step makes it a distgrad worker.

In the spirit of torchft's ``LocalSGD``/``DiLoCo`` and Horovod's
``DistributedOptimizer``: the user's loop computes the loss, calls ``backward`` and
steps its own ``torch.optim`` optimizer; :class:`DistributedLoop` does the rest —
the first pull, the commits every λ steps with the algorithm's worker rule (DOWNPOUR,
AGN, ADAG, DiLoCo, ...), the pulls and the final commit — against a ``distgrad serve``
server, from a worker started by any launcher (SLURM, torchrun, Kubernetes, a shell)::

    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with DistributedLoop(model, opt, "tcp://10.0.0.1:5555", secret) as dl:
        for x, y in dl.batches():          # or your own loader over dl.shard
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            dl.step(len(x), loss=loss.item())

The server's job (``distgrad serve --model pkg.mod:factory --data pkg.mod:factory ...``)
defines the model layout, the algorithm and how many samples each worker trains:
``dl.samples_total`` (its epochs over its shard, ``dl.shard``, indices into the job's
training data ``dl.data``). The loop must report exactly that many samples through
:meth:`DistributedLoop.step` — the server counts every sample once, and resumes a
restarted worker where its commits ended. :meth:`DistributedLoop.batches` yields them
in the job's deterministic order (the same batches ``distgrad work`` would train on).

How it works: the worker machinery every engine runs (:class:`~distgrad.worker.Worker`
driven by :func:`~distgrad.protocol.driver.drive` over a
:class:`~distgrad.transport.client.NetClient`) runs in a helper thread that only ever
runs while :meth:`step` waits for it, so it never touches the model while your code
does. The model's parameters become views of one flat buffer (the optimizer keeps
the same ``Parameter`` objects); a pull writes the center into them in place.

Algorithms whose worker rule replaces the local step itself (the EASGD momentum
variants, the synchronous gradient rules) need ``distgrad work``; they are refused.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from distgrad.algorithms.base import WorkerRule
from distgrad.errors import ConfigError
from distgrad.replica import Replica
from distgrad.stats import StepStats
from distgrad.worker import BatchSource, Worker

__all__ = ["DistributedLoop"]

_STOP = object()


class _Handoff:
    """The helper thread's batch source: each "batch" is the stats of one step the user
    took; iteration blocks until the next :meth:`DistributedLoop.step` (or the end)."""

    def __init__(self, total: int, batch_size: int) -> None:
        self.total = total
        self.batch_size = batch_size
        self.position = 0
        self.inbox: list[Any] = []
        self.turn = threading.Condition()
        self.waiting = False  # the helper waits for the user's next step

    def remaining(self) -> np.ndarray:
        return np.empty(0, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[Any, None]]:
        while True:
            with self.turn:
                self.waiting = True
                self.turn.notify_all()
                self.turn.wait_for(lambda: bool(self.inbox))
                item = self.inbox.pop(0)
                self.waiting = False
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, None


class DistributedLoop:
    """Make the user's loop a worker of a ``distgrad serve`` run (see the module docstring).

    ``model`` and ``optimizer`` are the user's (trained in place); ``address`` and
    ``secret`` the server's (``tcp://HOST:PORT``, the shared secret's bytes); ``worker``
    None lets the server pick a free slot. Use it as a context manager (or call
    :meth:`close`); leaving the block with an exception reports the failure to the
    server, which reassigns or drops the worker's samples per its ``--on-failure``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, address: str,
                 secret: bytes, *, worker: int | None = None, timeout: float = 60.0) -> None:
        from distgrad.transport.client import NetClient
        from distgrad.transport.jobspec import job_from_dict, parts_from_job

        self.client = NetClient(address, secret, worker=worker, timeout=timeout)
        try:
            if "job" not in self.client.info:
                raise ConfigError("the server sent no job description (is it a "
                                  "`distgrad serve` server?)")
            self.job = job_from_dict(self.client.info["job"])
            self.parts = parts_from_job(self.job)
            self._setup(model, optimizer)
        except BaseException:
            self.client.close()
            raise
        self.samples = self.client.position  # committed before (a restarted worker)
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._serve, name="distgrad-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self._wait()  # the initial pull is in the model
        except BaseException:
            self._thread.join(timeout=60)
            self.client.close()
            raise

    def _setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        k, job, parts = self.client.worker, self.job, self.parts
        rule = parts.algorithm.worker_rule(parts.config, parts.info)
        if type(rule).local_step is not WorkerRule.local_step:
            raise ConfigError(f"algorithm {job.algorithm!r} replaces the local step itself; "
                              f"run its workers with `distgrad work` instead of a custom loop")
        rep = Replica.wrap(k, model, optimizer, seed=job.seed)
        expected = len(parts.initial_center())
        if len(rep.params) != expected:
            raise ConfigError(f"the model has {len(rep.params)} trainable parameters, the "
                              f"server's job ({job.model}) {expected}: train the same model")
        self.worker = k
        self.shard: np.ndarray = parts.shards[k]
        self.data = parts.dataset
        self.samples_total = job.epochs * len(self.shard)
        self.epochs, self.batch_size = job.epochs, job.batch_size
        self._batches = _Handoff(self.samples_total, job.batch_size)
        rule.local_step = lambda rep, stats, _y: stats  # type: ignore[method-assign]
        self._worker = Worker(k, rep, rule, self._batches)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ helper thread
    def _serve(self) -> None:
        from distgrad.transport.client import run_worker

        try:
            run_worker(self.client, self._worker)
        except BaseException as exc:
            self._error = exc
        finally:
            with self._batches.turn:
                self._done = True
                self._batches.turn.notify_all()

    def _wait(self) -> None:
        """Until the helper waits for the next step (or ended); raise its error."""
        b = self._batches
        with b.turn:
            b.turn.wait_for(lambda: (b.waiting and not b.inbox) or self._done)
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the distgrad worker failed: {err}") from err

    def _hand(self, item: Any) -> None:
        if self._done:
            raise RuntimeError("this DistributedLoop is closed")
        with self._batches.turn:
            self._batches.inbox.append(item)
            self._batches.turn.notify_all()
        self._wait()

    # ------------------------------------------------------------------ the user's side
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This worker's batches of the job's data, in the job's deterministic order (what
        ``distgrad work`` trains on), from where its committed samples end."""
        from distgrad.parts import worker_seed

        job = self.job
        src = BatchSource(self.data.x_train, self.data.y_train, self.shard, job.batch_size,
                          job.epochs, seed=worker_seed(job.seed, self.worker))
        src.position = self.samples
        return iter(src)

    def step(self, samples: int, loss: float = float("nan"), correct: int = 0) -> None:
        """Report one local step over ``samples`` samples (after ``optimizer.step()``);
        commits, pulls and the algorithm's worker rule run here when it is time."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples must be an integer >= 1, got {samples!r}")
        if self.samples + samples > self.samples_total:
            raise ConfigError(f"this step would bring worker {self.worker} to "
                              f"{self.samples + samples} samples; the job gives it "
                              f"{self.samples_total} ({self.epochs} epoch(s) of its shard)")
        self.samples += samples
        self._hand(StepStats(loss=float(loss), correct=int(correct), samples=samples))

    def close(self) -> None:
        """Commit what is left and tell the server this worker is done."""
        if self._done:
            return
        if self.samples != self.samples_total:
            self._abort(f"the loop ended after {self.samples} of the "
                        f"{self.samples_total} samples the job gives worker {self.worker}")
            raise ConfigError(f"the loop reported {self.samples} samples; the job gives worker "
                              f"{self.worker} {self.samples_total} ({self.epochs} epoch(s) "
                              f"of {len(self.shard)}): report exactly those")
        try:
            self._hand(_STOP)
        finally:
            self._thread.join(timeout=60)
            self.client.close()

    def _abort(self, reason: str) -> None:
        """Report a failure to the server (the helper raises it inside the driver)."""
        if not self._done:
            # the failure we cause here is reported to the server by the driver
            with contextlib.suppress(RuntimeError):
                self._hand(RuntimeError(reason))
        self._thread.join(timeout=60)
        self.client.close()

    def __enter__(self) -> DistributedLoop:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self._abort("the training loop raised: " + "".join(
                traceback.format_exception_only(exc_type, exc)).strip())
            return
        self.close()
