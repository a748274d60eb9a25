"""The worker shell: a model replica over one flat buffer, and the engine-agnostic worker loop.

The replica's parameters are *views* into one private flat float32 buffer
(``Replica.params``), so a pull is one ``copy_`` and a commit is one buffer. The
replica never aliases the center or another replica: ``params`` is allocated
here and only ever written by copies (the thesis' own simulator shared one array
between the server and every worker by accident, see spec/thesis.md §6).

The worker loop (:meth:`Worker.run`) is a generator that yields requests
(:class:`Pull`, :class:`Step`, :class:`Commit`) and receives the engine's replies.
The simulator drives it on a virtual clock; the process engine drives it with
shared memory. The loop itself never knows which.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distgrad.algorithms.base import StepStats, WorkerRule
from distgrad.compression import Compressor, Encoded
from distgrad.optim import make_inner_optimizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Move ``module``'s trainable parameters into one flat buffer and return it.

    After the call every trainable parameter ``p`` has ``p.data`` a view of the
    returned buffer, so writing the buffer (a pull) writes the model, and the
    buffer is what a commit sends. Gradients stay ordinary per-parameter tensors
    (autograd allocates them; accumulating into views of a flat buffer instead
    costs two extra passes over memory per step).
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for p in trainable}
    if dtypes != {torch.float32}:
        raise ValueError(f"distgrad trains float32 parameters only, got {sorted(map(str, dtypes))}")
    total = sum(p.numel() for p in trainable)
    params = torch.empty(total, dtype=torch.float32, device=trainable[0].device)
    offset = 0
    for p in trainable:
        n = p.numel()
        params[offset : offset + n].copy_(p.data.reshape(-1))
        p.data = params[offset : offset + n].view_as(p)
        offset += n
    return params


def is_classification(out: torch.Tensor, y: torch.Tensor) -> bool:
    """Logits (N, C) against integer class labels (N,): accuracy is defined."""
    return out.dim() == 2 and y.dim() == 1 and not y.is_floating_point()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Replica:
    """One worker's model copy, flat buffers and inner optimizer.

    Buffers: ``params`` (θ^k; the module's parameters are views of it), ``grad``
    (the last gradient, flat, assembled on access), ``base`` (the center as of the
    last pull), ``payload`` (what is sent), and ``buffers`` for whatever the worker
    rule keeps (velocity, ...).
    """

    def __init__(
        self,
        worker: int,
        module: nn.Module,
        loss_fn: LossFn,
        inner_optimizer: str,
        lr: float,
        inner_options: dict[str, float] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.worker = worker
        self.seed = seed
        self.device = torch.device(device)
        self.module = copy.deepcopy(module).to(self.device)
        self.module.train()
        self.loss_fn = loss_fn
        self.params = flatten_parameters(self.module)
        self._views = [p for p in self.module.parameters() if p.requires_grad]
        self._grad = torch.zeros_like(self.params)
        self.base = torch.empty_like(self.params)
        self.payload = torch.empty_like(self.params)
        self.buffers: dict[str, torch.Tensor] = {}
        self.lr = lr
        self.optimizer = make_inner_optimizer(
            inner_optimizer, self._views, lr, **dict(inner_options or {})
        )

    @property
    def sizes(self) -> list[int]:
        """Element counts of the trainable parameter tensors, in flat-buffer order."""
        return [p.numel() for p in self._views]

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Forward and backward on one batch; gradients land in the parameters' ``.grad``."""
        for p in self._views:
            p.grad = None
        out = self.module(x)
        loss = self.loss_fn(out, y)
        loss.backward()
        with torch.no_grad():
            correct = int((out.argmax(dim=1) == y).sum()) if is_classification(out, y) else 0
        return StepStats(loss=float(loss.detach()), correct=correct, samples=int(y.shape[0]))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One step of the inner optimizer on one batch."""
        stats = self.gradient(x, y)
        self.optimizer.step()
        return stats

    @property
    def grad(self) -> torch.Tensor:
        """The last backward's gradient as one flat vector (assembled on access; zeros for
        parameters that got none). Writing into it does not change the parameters' grads."""
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(),
                                                                           device=p.device)
                 for p in self._views]
        return torch.cat(grads, out=self._grad)

    def reinitialize(self, seed_offset: int) -> None:
        """Re-draw the parameters from a seed of their own (ensemble members)."""
        from distgrad.models import initialize

        initialize(self.module, self.seed * 1_000_003 + seed_offset)


# --------------------------------------------------------------------------- data


class BatchSource:
    """Mini-batches of one worker's shard for a number of epochs, deterministic for a seed.

    Every pass visits the whole shard, including a final partial batch (dist-keras
    dropped it). With ``shuffle`` the order is re-drawn each pass from the worker's
    own generator. ``remaining()`` gives the indices not yet handed out, so an
    engine can reassign the unfinished part of a shard.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: np.ndarray,
        batch_size: int,
        epochs: int,
        seed: int | list[int],
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(indices) == 0:
            raise ValueError("empty shard: every worker needs at least one sample")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        rng = np.random.default_rng(seed)
        order = [rng.permutation(indices) if shuffle else np.asarray(indices)
                 for _ in range(epochs)]
        self.order = np.concatenate(order) if order else np.empty(0, dtype=np.int64)
        self.position = 0
        self.device = torch.device(device)

    @classmethod
    def from_order(cls, x: torch.Tensor, y: torch.Tensor, order: np.ndarray, batch_size: int,
                   device: str | torch.device = "cpu") -> BatchSource:
        """Batches over an explicit sequence of indices (a resumed or reassigned shard)."""
        src = cls.__new__(cls)
        src.x, src.y, src.batch_size = x, y, batch_size
        src.order = np.asarray(order, dtype=np.int64)
        src.position = 0
        src.device = torch.device(device)
        return src

    def extend(self, indices: np.ndarray) -> None:
        """Append more samples to visit (work reassigned from a dead worker)."""
        self.order = np.concatenate([self.order, np.asarray(indices, dtype=np.int64)])

    @property
    def total(self) -> int:
        return len(self.order)

    def remaining(self) -> np.ndarray:
        return self.order[self.position :]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.position < len(self.order):
            idx = torch.from_numpy(self.order[self.position : self.position + self.batch_size])
            self.position += len(idx)
            xb, yb = self.x[idx], self.y[idx]
            if self.device.type != "cpu":
                xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device)
            yield xb, yb


# --------------------------------------------------------------------------- requests


@dataclass
class Pull:
    """Copy what the server hands this worker (normally the center) into ``into``.

    ``record=False`` makes it a *read*: the server does not move the worker's pull
    clock, so staleness is still measured from the last real pull. The engine
    replies with the server version of what was pulled.
    """

    into: torch.Tensor
    record: bool = True


@dataclass
class Step:
    """One local step was taken; the engine advances the worker's clock. Reply: None."""

    stats: StepStats


@dataclass
class Commit:
    """Send ``payload`` (``steps`` local steps over ``samples`` samples).

    ``stale_center`` is sent along when the rule asks for it (ADAG placement 1).
    ``pull_into``: pull right after the commit is applied (after the barrier for
    synchronous rules) into this buffer. The engine replies with the server
    version the worker now holds.

    ``nbytes`` is what the commit would put on the wire in its codec (payload plus
    the stale center if sent). With compression, ``encoded`` is the compressed
    message and ``payload`` already holds exactly the values decoding it gives
    (:func:`distgrad.compression.decode`); every engine applies ``payload``.
    """

    payload: torch.Tensor
    steps: int
    samples: int
    stale_center: torch.Tensor | None = None
    pull_into: torch.Tensor | None = None
    nbytes: int = 0
    encoded: Encoded | None = None


Request = Pull | Step | Commit


class Worker:
    """Runs one worker's algorithm loop as a generator of requests.

    ``compressor`` (optional) compresses every commit's payload
    (:mod:`distgrad.compression`); without it the payload travels as float32.
    """

    def __init__(self, worker: int, replica: Replica, rule: WorkerRule, batches: BatchSource,
                 compressor: Compressor | None = None):
        self.id = worker
        self.rep = replica
        self.rule = rule
        self.batches = batches
        self.compressor = compressor
        self.version = 0
        self.uncommitted_samples = 0
        self.steps = 0

    def run(self) -> Generator[Request, int | None, None]:
        rep, rule = self.rep, self.rule
        self.version = yield Pull(rep.base)
        rep.params.copy_(rep.base)
        rule.setup(rep)
        steps = 0
        for x, y in self.batches:
            stats = rule.local_step(rep, x, y)
            steps += 1
            self.steps += 1
            self.uncommitted_samples += stats.samples
            yield Step(stats)
            if rule.should_commit(rep, steps, stats):
                yield from self._commit(steps)
                steps = 0
        if steps:
            yield from self._commit(steps)

    def _commit(self, steps: int) -> Generator[Request, int | None, None]:
        rep, rule = self.rep, self.rule
        read_into = rule.read_buffer(rep)
        if read_into is not None:
            yield Pull(read_into, record=False)
        payload = rule.make_payload(rep, steps)
        encoded = None
        if self.compressor is not None:
            encoded = self.compressor.compress(payload)
            nbytes = encoded.nbytes
        else:
            nbytes = payload.numel() * payload.element_size()
        stale = rep.base if rule.sends_stale_center else None
        if stale is not None:
            nbytes += stale.numel() * stale.element_size()
        version = yield Commit(
            payload=payload,
            steps=steps,
            samples=self.uncommitted_samples,
            stale_center=stale,
            pull_into=rep.base if rule.pull_after_commit else None,
            nbytes=nbytes,
            encoded=encoded,
        )
        self.uncommitted_samples = 0
        rule.after_commit(rep, payload)
        if version is not None:
            self.version = version
        if rule.pull_after_commit:
            rule.after_pull(rep)
