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

Every capability an engine acts on is *declared* on a rule (class attribute, or an
instance attribute set in ``__init__`` when it depends on the config) and collected
once per run into :class:`Capabilities` by :meth:`Algorithm.capabilities`; engines
never infer one from which methods a rule overrides. ``docs/extending.md`` shows how
to write and register a rule outside the package.
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
from distgrad.stats import StepStats

if TYPE_CHECKING:
    from distgrad.replica import Replica


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
    #: :meth:`after_commit` reads the reply, i.e. the payload as the server rewrote it
    #: (elastic exchange), so an engine must copy the reply back into the payload buffer.
    #: The only source engines read: a rule that overrides :meth:`after_commit` must
    #: declare it, True or False (checked by :func:`audit_rules` and on registration).
    uses_reply: ClassVar[bool] = False
    #: :meth:`read_buffer` returns a buffer: the worker reads the center before each
    #: commit (GEM). Declared, like ``uses_reply``, by every rule overriding it.
    reads: ClassVar[bool] = False

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

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state between two local steps: plain Python values and tensors
        (counters, flags, generator states as tensors). Tensors kept in ``rep.buffers``
        belong to the replica and are saved with it (:meth:`Replica.state_dict`), so a rule
        whose state lives only there returns ``{}`` (the default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the rule's :meth:`setup` is not called again."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


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

    @staticmethod
    def apply_unlocked(center: torch.Tensor, payload: torch.Tensor) -> None:
        """``lock_free`` rules only: apply one commit with no lock and no rule state.

        An engine whose workers share the center's memory (``local``) calls this in the
        worker process, concurrently with other workers' calls and pulls (torn reads,
        racing element-wise adds: Hogwild), then tells the server, which only counts the
        commit (:meth:`distgrad.server.ParameterServer.record_unlocked_commit`). It must
        be a static method so that the worker can call it without building the rule:
        ``algorithm.server_rule.apply_unlocked`` (see :meth:`Algorithm.apply_unlocked`).
        ``payload`` is on the center's device.
        """
        raise NotImplementedError("only lock_free rules apply commits without the server")

    # synchronous protocol
    def accumulate(self, payload: torch.Tensor, ctx: CommitContext) -> None:
        raise NotImplementedError

    def apply_round(self, center: torch.Tensor, participants: int) -> dict[str, float]:
        raise NotImplementedError

    def discard_round(self) -> None:
        """Forget what the current round accumulated: the server refused the round (its
        result was not finite) and put the center and :meth:`state_dict` back. Rules that
        accumulate outside ``state_dict`` clear it here (:class:`RoundSumServer` does)."""

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


class RoundSumServer(ServerRule):
    """Synchronous rules over the *sum* of a round's payloads (averaging, DiLoCo, SlowMo...).

    :meth:`accumulate` adds each payload into one buffer; once the round is complete
    :meth:`apply_round` hands the sum to :meth:`apply_sum`, which may use it as scratch
    space, and zeroes it for the next round. Subclasses write only :meth:`apply_sum`
    (and call ``super().setup`` if they override :meth:`setup`).
    """

    synchronous = True

    def setup(self, center: torch.Tensor, workers: int) -> None:
        self._sum = torch.zeros_like(center)

    def accumulate(self, payload: torch.Tensor, ctx: CommitContext) -> None:
        self._sum.add_(payload)

    def apply_round(self, center: torch.Tensor, participants: int) -> dict[str, float]:
        metrics = self.apply_sum(center, self._sum, participants)
        self._sum.zero_()
        return metrics

    def discard_round(self) -> None:
        self._sum.zero_()

    def apply_sum(self, center: torch.Tensor, total: torch.Tensor,
                  participants: int) -> dict[str, float]:
        """Update ``center`` from ``total`` = Σ payloads of the round's ``participants``."""
        raise NotImplementedError


# --------------------------------------------------------------------------- capabilities


@dataclass(frozen=True)
class Capabilities:
    """What an engine must provide to run an algorithm, read once from its rules.

    Engines ask :meth:`Algorithm.capabilities` (once per run) instead of building
    rules or inspecting their methods. Plain data: ``asdict`` gives JSON for a wire
    handshake.
    """

    #: barrier rounds (``accumulate`` / ``apply_round``) instead of ``apply`` on arrival
    synchronous: bool = False
    #: a commit reads the current center atomically (elastic exchange): τ = 0, and it
    #: counts as a pull
    exchange: bool = False
    #: the worker reads the reply (the payload as the server rewrote it) in
    #: ``after_commit``: the engine must send it back
    uses_reply: bool = False
    #: after a commit the worker pulls the center (into ``base``)
    pull_after_commit: bool = True
    #: stale-synchronous gate: a worker more than this many commits ahead of the
    #: slowest live one waits after its commit (None: no gate)
    clock_bound: int | None = None
    #: commits and pulls need no lock; workers sharing the center's memory apply their
    #: commits with :meth:`Algorithm.apply_unlocked`
    lock_free: bool = False
    #: with ``lock_free``: the simulator's torn-read sweep, as a fraction of a step
    read_fraction: float = 0.0
    #: the worker reads the center (a pull that does not reset its staleness) right
    #: before each commit
    reads: bool = False
    #: the worker sends θ̃_{t−τ} (the center it pulled) with each commit
    sends_stale_center: bool = False
    #: the server rule's arithmetic uses θ̃_{t−τ}
    needs_stale_center: bool = False
    #: ...which comes from the worker (``sends_stale_center``), not from a server copy
    stale_from_worker: bool = False
    #: the server rule reports the ``distance`` metric itself
    computes_distance: bool = False

    @property
    def gated(self) -> bool:
        """Is there a stale-synchronous gate (``clock_bound`` set)?"""
        return self.clock_bound is not None

    @classmethod
    def of(cls, worker: WorkerRule, server: ServerRule) -> Capabilities:
        """Read the declarations of two built rules (instance values override class ones,
        as rules whose capabilities depend on their config set them in ``__init__``)."""
        caps = cls(
            synchronous=bool(server.synchronous),
            exchange=bool(server.exchange),
            uses_reply=bool(worker.uses_reply),
            pull_after_commit=bool(worker.pull_after_commit),
            clock_bound=server.clock_bound,
            lock_free=bool(server.lock_free),
            read_fraction=float(server.read_fraction),
            reads=bool(worker.reads),
            sends_stale_center=bool(worker.sends_stale_center),
            needs_stale_center=bool(server.needs_stale_center),
            stale_from_worker=bool(server.stale_from_worker),
            computes_distance=bool(server.computes_distance),
        )
        problems = []
        if caps.synchronous and (caps.exchange or caps.lock_free or caps.gated):
            problems.append("a synchronous server rule cannot also declare exchange, "
                            "lock_free or clock_bound")
        if caps.stale_from_worker and not caps.sends_stale_center:
            problems.append("the server rule takes the stale center from the worker "
                            "(stale_from_worker) but the worker rule does not send it "
                            "(sends_stale_center)")
        if caps.lock_free and type(server).apply_unlocked is ServerRule.apply_unlocked:
            problems.append("a lock_free server rule must define the static method "
                            "apply_unlocked(center, payload)")
        if problems:
            raise TypeError(f"{type(worker).__name__} / {type(server).__name__}: "
                            + "; ".join(problems))
        return caps


def _undeclared(cls: type, method: str, flag: str, base: type) -> bool:
    """Does ``cls`` override ``base.method`` without declaring ``flag`` at or below the
    class that overrides it?"""
    mro = cls.__mro__
    where = next(i for i, c in enumerate(mro) if method in vars(c))
    if mro[where] is base:
        return False
    return not any(flag in vars(c) for c in mro[: where + 1])


def audit_rules(algorithm: Algorithm) -> list[str]:
    """Declarations an algorithm's rule *classes* are missing (empty: none).

    Engines read capabilities only from declarations, never from which methods a rule
    overrides; this check makes sure the two agree: a worker rule overriding
    ``after_commit`` declares ``uses_reply``, one overriding ``read_buffer`` declares
    ``reads``, and ``Algorithm.synchronous`` matches the server rule. Rule builders that
    are plain functions rather than classes are checked when built
    (:meth:`Algorithm.capabilities`).
    """
    problems: list[str] = []
    w, s = algorithm.worker_rule, algorithm.server_rule
    if not (isinstance(algorithm.config, type) and issubclass(algorithm.config, AlgorithmConfig)):
        problems.append(f"config must be an AlgorithmConfig subclass, got {algorithm.config!r}")
    if isinstance(w, type):
        if not issubclass(w, WorkerRule):
            problems.append(f"worker_rule {w.__name__} is not a WorkerRule")
        else:
            if _undeclared(w, "after_commit", "uses_reply", WorkerRule):
                problems.append(f"{w.__name__} overrides after_commit: declare uses_reply = "
                                "True if it reads the reply (the payload as the server "
                                "rewrote it), else False")
            if _undeclared(w, "read_buffer", "reads", WorkerRule):
                problems.append(f"{w.__name__} overrides read_buffer: declare reads = True "
                                "(or set it per instance in __init__)")
    if isinstance(s, type):
        if not issubclass(s, ServerRule):
            problems.append(f"server_rule {s.__name__} is not a ServerRule")
        elif bool(s.synchronous) != bool(algorithm.synchronous):
            problems.append(f"Algorithm(synchronous={algorithm.synchronous}) disagrees with "
                            f"{s.__name__}.synchronous = {s.synchronous}")
    return problems


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

    def capabilities(self, config: AlgorithmConfig | None = None,
                     run: RunInfo | None = None) -> Capabilities:
        """What an engine must provide for this algorithm with ``config`` (default: the
        config's defaults). Builds both rules once (no ``setup``: nothing is allocated)
        and reads their declarations; call it once per run, not per message."""
        config = self.make_config() if config is None else config
        if run is None:
            run = RunInfo(workers=self.exact_workers or 2, lr=1e-3, inner_optimizer="sgd")
        problems = audit_rules(self)
        if problems:
            raise TypeError(f"algorithm {self.name!r}: " + "; ".join(problems))
        caps = Capabilities.of(self.worker_rule(config, run), self.server_rule(config, run))
        if caps.synchronous != bool(self.synchronous):
            raise TypeError(f"algorithm {self.name!r}: Algorithm(synchronous="
                            f"{self.synchronous}) disagrees with its server rule")
        return caps

    def apply_unlocked(self, center: torch.Tensor, payload: torch.Tensor) -> None:
        """Apply a commit of this ``lock_free`` algorithm straight into the shared center,
        without the server or its lock (the server rule's static ``apply_unlocked``)."""
        fn = getattr(self.server_rule, "apply_unlocked", None)
        if fn is None or fn is ServerRule.apply_unlocked:
            raise TypeError(f"algorithm {self.name!r} is not lock-free: its server rule "
                            "defines no static apply_unlocked")
        fn(center, payload)

    def check(self, run: RunInfo) -> None:
        """Reject a worker count the algorithm cannot run with."""
        if self.exact_workers is not None and run.workers != self.exact_workers:
            raise ConfigError(
                f"algorithm {self.name!r} runs with exactly {self.exact_workers} worker(s), "
                f"got workers={run.workers}"
            )
