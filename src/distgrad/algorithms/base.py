"""The algorithm contract: a frozen config, a ``WorkerRule`` and a ``ServerRule``.

A worker pulls the center, runs local steps with its inner ``torch.optim``
optimizer, and every so often commits a payload. The ``WorkerRule`` decides
when to commit, what the payload is and how the reply is taken in; the
``ServerRule`` decides how a payload changes the center. Rules work on flat
float32 tensors, write in place only into buffers handed to them, and know
nothing of clocks, processes or sockets: the engine moves the messages.

Two protocols exist:

* **asynchronous** (``ServerRule.synchronous = False``): each commit is applied
  on arrival by :meth:`ServerRule.apply`, under the server's lock, with the
  staleness of the commit already computed by the server;
* **synchronous**: a commit joins the current round (:meth:`ServerRule.accumulate`)
  and the worker waits at a barrier until every live worker has committed; then
  :meth:`ServerRule.apply_round` updates the center once.

Two engine-facing capabilities sit on top of the asynchronous protocol, both
declared by the server rule and documented in :mod:`distgrad.server`:

* ``clock_bound`` (stale-synchronous parallel): a worker more than s commits
  ahead of the slowest live worker waits after its commit until released;
* ``lock_free`` (Hogwild): commits and pulls need not be serialized; the
  simulator models the torn reads this causes over ``read_fraction`` of a step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

import torch

from distgrad.errors import ConfigError, choose, positive_int
from distgrad.fast import add_scaled

if TYPE_CHECKING:
    from distgrad.worker import Replica


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """Base of every algorithm config: frozen, keyword-only, validated on construction.

    ``window`` is λ, the number of local mini-batch steps between two commits
    (dist-keras' ``communication_window``).
    """

    window: int = 1

    def __post_init__(self) -> None:
        positive_int("window", self.window)
        self.validate()

    def validate(self) -> None:
        """Check the algorithm's own fields; raise :class:`ConfigError` naming the bad value."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AlgorithmConfig:
        """Build from keyword values; ``--set`` strings are coerced to the field types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown parameter {unknown[0]!r} for this algorithm; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(k, v, hints[k]) for k, v in params.items()}
        return cls(**values)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a ``--set`` string to the declared type; pass other values through unchanged."""
    if not isinstance(value, str):
        return value
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        return choose(name, value, [str(a) for a in args])
    if origin in (types.UnionType, typing.Union):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: cannot read {value!r} as {hint}")
    if hint is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class StepStats:
    """What one local mini-batch step reports: mean loss, number correct, batch size."""

    loss: float
    correct: int
    samples: int


@dataclass(frozen=True)
class CommitContext:
    """What the server knows about a commit when it applies it (under its lock).

    ``staleness`` τ = server clock now − server clock at the worker's last pull.
    ``stale_center`` is θ̃_{t−τ}, the center as the worker pulled it, when the
    server keeps it (or the worker sent it); ``None`` otherwise.
    """

    worker: int
    version: int
    base_version: int
    staleness: int
    samples: int
    steps: int
    stale_center: torch.Tensor | None = None


@dataclass(frozen=True)
class RunInfo:
    """Job-level facts a rule may need to build itself."""

    workers: int
    lr: float
    inner_optimizer: str
    inner_options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0


# --------------------------------------------------------------------------- rules


class WorkerRule:
    """Worker side of an algorithm. Subclasses override only what differs.

    The defaults describe the DOWNPOUR family: λ inner-optimizer steps, commit the
    accumulated delta ``params - base``, then replace the replica by the center.
    """

    #: after each commit the worker pulls the center into ``base`` and calls :meth:`after_pull`
    pull_after_commit: ClassVar[bool] = True
    #: the worker sends θ̃_{t−τ} (its ``base``) with each commit (ADAG placement 1)
    sends_stale_center: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig, run: RunInfo) -> None:
        self.config = config
        self.run = run

    def setup(self, rep: Replica) -> None:
        """Allocate per-worker buffers in ``rep.buffers``."""

    def after_pull(self, rep: Replica) -> None:
        """Take in a pull; the fresh center is in ``rep.base``."""
        rep.params.copy_(rep.base)

    def local_step(self, rep: Replica, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One local mini-batch step; default: one step of the inner optimizer."""
        return rep.train_step(x, y)

    def should_commit(self, rep: Replica, steps: int, stats: StepStats) -> bool:
        """``steps`` local steps were taken since the last commit; commit now?"""
        return steps >= self.config.window

    def make_payload(self, rep: Replica, steps: int) -> torch.Tensor:
        """Write what is sent into ``rep.payload`` and return it."""
        return torch.sub(rep.params, rep.base, out=rep.payload)

    def after_commit(self, rep: Replica, reply: torch.Tensor) -> None:
        """The commit was applied; ``reply`` is the payload buffer (the server may rewrite it)."""

    def read_buffer(self, rep: Replica) -> torch.Tensor | None:
        """A buffer to *read* the current center into right before each commit, or None.

        A read is a pull that does not move the worker's pull clock (staleness is
        still measured from the last real pull). GEM uses it to see how far the
        center moved since its previous commit.
        """
        return None


class ServerRule:
    """Server side of an algorithm: how commits change the center."""

    synchronous: ClassVar[bool] = False
    #: the rule's arithmetic uses θ̃_{t−τ}, the center as the committing worker pulled it
    needs_stale_center: ClassVar[bool] = False
    #: ...and the worker sends it with each commit (ADAG placement 1), so the server need
    #: not keep a copy per worker (placement 2)
    stale_from_worker: ClassVar[bool] = False
    #: :meth:`apply` returns the metric ``distance`` = ‖θ̃_t − θ̃_{t−τ}‖ itself
    computes_distance: ClassVar[bool] = False
    #: a commit reads the current center atomically (elastic exchange): τ = 0, counts as a pull
    exchange: ClassVar[bool] = False
    #: stale-synchronous gate: a worker whose commit count exceeds the slowest live worker's
    #: by more than this waits after its commit until released (None: no gate)
    clock_bound: int | None = None
    #: commits and pulls need no lock (Hogwild); see :mod:`distgrad.server`
    lock_free: ClassVar[bool] = False
    #: with ``lock_free``: a pull is a read sweeping the vector over this fraction of a
    #: step, and commits landing meanwhile show up in the part not yet read (simulator)
    read_fraction: float = 0.0

    def __init__(self, config: AlgorithmConfig, run: RunInfo) -> None:
        self.config = config
        self.run = run

    def setup(self, center: torch.Tensor, workers: int) -> None:
        """Allocate rule state (tensors only, so engines can place it in shared memory)."""

    def pull_source(self, worker: int, center: torch.Tensor) -> torch.Tensor:
        """What a pull by ``worker`` copies: the center, unless the rule keeps one per worker."""
        return center

    # asynchronous protocol
    def apply(
        self, center: torch.Tensor, payload: torch.Tensor, ctx: CommitContext
    ) -> dict[str, float]:
        """Apply one commit in place; may rewrite ``payload`` as the reply. Returns metrics."""
        raise NotImplementedError

    def on_leave(self, center: torch.Tensor, worker: int, remaining: int) -> dict[str, float]:
        """``worker`` finished or died; ``remaining`` workers are live. Asynchronous rules that
        hold back commits (n-softsync) apply what they hold here. Returns metrics."""
        return {}

    # synchronous protocol
    def accumulate(self, payload: torch.Tensor, ctx: CommitContext) -> None:
        raise NotImplementedError

    def apply_round(self, center: torch.Tensor, participants: int) -> dict[str, float]:
        raise NotImplementedError

    def models(self, center: torch.Tensor) -> list[torch.Tensor]:
        """Parameter vectors whose averaged predictions make the trained model."""
        return [center]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


class AddServer(ServerRule):
    """θ̃ ← θ̃ + payload (dist-keras' ``DeltaParameterServer``).

    The distance to the stale center is measured in the same pass as the add.
    """

    computes_distance = True

    def apply(
        self, center: torch.Tensor, payload: torch.Tensor, ctx: CommitContext
    ) -> dict[str, float]:
        distance = add_scaled(center, payload, 1.0, ctx.stale_center)
        return {} if distance is None else {"distance": distance}


# --------------------------------------------------------------------------- registry entry


@dataclass(frozen=True)
class Algorithm:
    """A registry entry: name, one-line summary, config class and rule builders."""

    name: str
    summary: str
    config: type[AlgorithmConfig]
    worker_rule: Callable[[AlgorithmConfig, RunInfo], WorkerRule]
    server_rule: Callable[[AlgorithmConfig, RunInfo], ServerRule]
    synchronous: bool = False
    #: the algorithm only makes sense with this many workers (sequential: 1)
    exact_workers: int | None = None
    reference: str = ""

    def make_config(self, params: Mapping[str, Any] | None = None) -> AlgorithmConfig:
        return self.config.from_params(dict(params or {}))

    def check(self, run: RunInfo) -> None:
        """Reject a worker count the algorithm cannot run with."""
        if self.exact_workers is not None and run.workers != self.exact_workers:
            raise ConfigError(
                f"algorithm {self.name!r} runs with exactly {self.exact_workers} worker(s), "
                f"got workers={run.workers}"
            )
