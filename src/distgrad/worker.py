"""The worker shell: data batches and the engine-agnostic worker loop.

The replica (the model over one flat buffer) is :class:`distgrad.replica.Replica`.
The worker loop (:meth:`Worker.run`) is a generator that yields what the algorithm
needs (:class:`Pull`, :class:`Step`, :class:`Commit`) and receives the replies;
:class:`distgrad.protocol.driver.WorkerDriver` turns that into protocol requests that
every engine carries the same way. The loop itself never knows which engine runs it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distgrad.algorithms.base import WorkerRule
from distgrad.compression import Compressor, Encoded
from distgrad.replica import Replica
from distgrad.stats import StepStats

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

    def state_dict(self) -> dict[str, Any]:
        """The visiting order (int64 tensor, every sample assigned so far, reassigned work
        included) and the position of the next batch in it."""
        return {"order": torch.from_numpy(self.order.astype(np.int64, copy=True)),
                "position": int(self.position)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        order = state["order"]
        order = order.numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
        self.order = order.astype(np.int64, copy=True)
        position = int(state["position"])
        if not 0 <= position <= len(self.order):
            raise ValueError(f"position {position} outside the order of {len(self.order)}")
        self.position = position

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

    Counters: ``version`` (the server version the worker holds), ``steps`` (local steps
    in all), ``window_steps`` (local steps since the last commit), ``uncommitted_samples``.

    **Snapshots.** Between two local steps — while the generator is suspended at a
    :class:`Step` request, before :meth:`run` was first called, or after it finished —
    :meth:`state_dict` captures everything the loop carries (replica, inner optimizer,
    rule, data position, compression residual, counters). A worker built the same way
    (e.g. ``RunParts.make_worker(k)``) that loads it and calls :meth:`run` again gets a
    generator that skips the initial pull and the rule's setup and yields exactly the
    requests the original generator would have yielded after that ``Step``. A snapshot
    in the middle of a pull or a commit is refused.
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
        self.window_steps = 0
        #: the initial pull was served and the rule set up
        self.started = False
        #: the stats of the last step when the commit decision after it is still to be taken
        #: (the generator is suspended at that step's ``Step`` request)
        self.pending_stats: StepStats | None = None
        self._in_request: str | None = None

    def run(self) -> Generator[Request, int | None, None]:
        """The worker loop; after :meth:`load_state_dict` it continues where the snapshot was."""
        rep, rule = self.rep, self.rule
        if not self.started:
            self._in_request = "the initial pull"
            self.version = yield Pull(rep.base)
            self._in_request = None
            rep.params.copy_(rep.base)
            rule.setup(rep)
            self.started = True
        if self.pending_stats is not None:  # resumed from a snapshot taken at a Step
            yield from self._after_step()
        for x, y in self.batches:
            stats = rule.local_step(rep, x, y)
            self.window_steps += 1
            self.steps += 1
            self.uncommitted_samples += stats.samples
            self.pending_stats = stats
            yield Step(stats)
            yield from self._after_step()
        if self.window_steps:
            yield from self._commit(self.window_steps)

    def _after_step(self) -> Generator[Request, int | None, None]:
        stats, self.pending_stats = self.pending_stats, None
        assert stats is not None
        if self.rule.should_commit(self.rep, self.window_steps, stats):
            yield from self._commit(self.window_steps)

    def _commit(self, steps: int) -> Generator[Request, int | None, None]:
        rep, rule = self.rep, self.rule
        self._in_request = "a commit"
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
        self.window_steps = 0
        rule.after_commit(rep, payload)
        if version is not None:
            self.version = version
        if rule.pull_after_commit:
            rule.after_pull(rep)
        self._in_request = None

    # ------------------------------------------------------------------ snapshots
    def state_dict(self) -> dict[str, Any]:
        """A snapshot between two local steps: tensors (on the CPU) and plain data only.

        Keys: ``format`` (1), ``worker`` (the id), ``started``, ``version``, ``steps``,
        ``window_steps``, ``uncommitted_samples``, ``pending_step`` (None, or the last
        step's ``{"loss", "correct", "samples"}`` when the commit decision after it is
        pending), ``replica`` (:meth:`Replica.state_dict`), ``rule``
        (:meth:`WorkerRule.state_dict`), ``batches`` (:meth:`BatchSource.state_dict`),
        ``compressor`` (:meth:`Compressor.state_dict`, or None without compression).
        """
        if self._in_request is not None:
            raise RuntimeError(f"worker {self.id} is in the middle of {self._in_request}; "
                               "snapshot it between two local steps")
        st = self.pending_stats
        return {
            "format": 1,
            "worker": self.id,
            "started": self.started,
            "version": int(self.version),
            "steps": int(self.steps),
            "window_steps": int(self.window_steps),
            "uncommitted_samples": int(self.uncommitted_samples),
            "pending_step": None if st is None else {
                "loss": float(st.loss), "correct": int(st.correct), "samples": int(st.samples)},
            "replica": self.rep.state_dict(),
            "rule": self.rule.state_dict(),
            "batches": self.batches.state_dict(),
            "compressor": None if self.compressor is None else self.compressor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot of worker ``state["worker"]``; then call :meth:`run` for a
        generator that continues from it (any earlier generator must be dropped)."""
        if int(state.get("format", 1)) != 1:
            raise ValueError(f"unknown worker snapshot format {state.get('format')!r}")
        if int(state["worker"]) != self.id:
            raise ValueError(f"snapshot of worker {state['worker']} loaded into worker {self.id}")
        if (state["compressor"] is None) != (self.compressor is None):
            raise ValueError("the snapshot and this worker disagree on compression")
        self.rep.load_state_dict(state["replica"])
        self.rule.load_state_dict(state["rule"])
        self.batches.load_state_dict(state["batches"])
        if self.compressor is not None:
            self.compressor.load_state_dict(state["compressor"])
        self.started = bool(state["started"])
        self.version = int(state["version"])
        self.steps = int(state["steps"])
        self.window_steps = int(state["window_steps"])
        self.uncommitted_samples = int(state["uncommitted_samples"])
        st = state["pending_step"]
        self.pending_stats = None if st is None else StepStats(
            loss=float(st["loss"]), correct=int(st["correct"]), samples=int(st["samples"]))
        self._in_request = None
