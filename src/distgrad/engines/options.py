"""How and where a job runs: one frozen options dataclass per engine.

A :class:`~distgrad.parts.Job` says *what* is trained (algorithm, model, data,
optimizer, epochs, seed). Each engine's options say *how/where*: torch threads and
devices, what happens to a dead worker's samples, checkpoints, the Ray cluster, the
Spark master, the network server's address. The CLI generates its engine flags from
these fields (``metadata["help"]`` is the flag's help; ``metadata["flag"]`` overrides
the flag name), so a new option is one field here.

The ``local`` and ``sim`` options (``threads``, ``device``, ``on_failure``,
``checkpoint_every``, ``deferred_eval``) are still also fields of the Job, which the
engines read; :meth:`Job.engine_options` returns them as the engine's dataclass.

This module imports no engine (engines import it), so anything may depend on it.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from distgrad.errors import (
    ConfigError,
    choose,
    nonnegative_int,
    positive_float,
    positive_int,
)

ENGINES = ("local", "sim", "net", "ray", "spark")
"""Engine names (the first is the default of :class:`~distgrad.parts.Job` and the CLI)."""

DEFAULT_ENGINE = ENGINES[0]
DEVICES = ("cpu", "cuda")
ON_FAILURE = ("reassign", "drop")
INTEGRITY = ("full", "header")
#: the net engine's protection modes (as :data:`distgrad.transport.frames.PROTECTIONS`)
PROTECTIONS = ("encrypt", "integrity", "header")


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with its CLI help (and optional ``flag``/``metavar``) as metadata."""
    return field(default=default, metadata={"help": help, **cli})


def _threads(value: int | None) -> None:
    if value is not None:
        positive_int("threads", value)


def _threads_option() -> Any:
    return option(None, "torch threads: per worker process (local, default 1) or for the "
                        "whole simulator (sim, default: 1 for models of up to 1M parameters, "
                        "else torch's choice)", metavar="N")


def _max_restarts_option() -> Any:
    return option(3, "restarts of a failed worker (Ray actor; Spark task attempts - 1) before "
                     "the run fails", flag="--max-restarts", metavar="R")


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    """The deterministic simulator: every worker in this process on a virtual clock
    (its compute-time model is the job's ``timing``)."""

    threads: int | None = _threads_option()

    def __post_init__(self) -> None:
        _threads(self.threads)


@dataclass(frozen=True, kw_only=True)
class LocalOptions:
    """Worker processes on this machine around a shared-memory center."""

    threads: int | None = _threads_option()
    device: str = option(
        "cpu", "cpu|cuda: where workers train; cuda assigns GPUs round-robin, the center "
               "stays in host shared memory", metavar="DEV")
    on_failure: str = option(
        "reassign", "reassign|drop: what happens to the samples a dead worker had not "
                    "committed (reassign: a live worker takes them)", metavar="HOW")
    checkpoint_every: float | None = option(
        None, "snapshot the whole run (center, clock, rule state, every worker's optimizer "
              "and position) every SEC seconds (sim: virtual seconds) to DIR/checkpoint.pt; "
              "--resume DIR continues from it", metavar="SEC")
    deferred_eval: bool = option(
        False, "snapshot the center on the --eval-every schedule but evaluate the snapshots "
               "after training (no CPU taken from the workers)")

    def __post_init__(self) -> None:
        _threads(self.threads)
        choose("device", self.device, DEVICES)
        choose("on_failure", self.on_failure, ON_FAILURE)
        if self.checkpoint_every is not None:
            positive_float("checkpoint_every", self.checkpoint_every)


@dataclass(frozen=True, kw_only=True)
class NetOptions:
    """``distgrad serve``: a TCP parameter server that ``distgrad work`` processes join.
    (The shared secret is not an option: it is read from a file or the environment.)"""

    bind: str = option("127.0.0.1", "interface to listen on (0.0.0.0 for other hosts)",
                       metavar="ADDR")
    port: int = option(0, "TCP port (0: the OS chooses a free one)", metavar="P")
    advertise: str | None = option(
        None, "host name printed for the workers (default: the bind address, or this host's "
              "name with --bind 0.0.0.0)", metavar="HOST")
    protection: str = option(
        "encrypt", "encrypt|integrity|header: AES-256-GCM on every byte (encrypt), every "
                   "byte authenticated but payloads in clear (integrity), or only headers "
                   "authenticated (header; trusted networks only); workers must use the same",
        metavar="HOW")
    integrity: str | None = option(
        None, "deprecated spelling of --protection: full = integrity, header = header",
        metavar="HOW")
    worker_timeout: float = option(120.0, "a worker silent this long is declared dead",
                                   metavar="SEC")
    rejoin_timeout: float | None = option(
        None, "with no worker running, a dead worker not replaced within this time is "
              "abandoned and its samples reported lost (default: --worker-timeout)",
        metavar="SEC")
    shards: int = option(
        1, "cut the center into S contiguous slices, each served by its own parameter "
           "server on its own port (--port P: ports P..P+S-1) and thread; workers connect "
           "to the first and talk to all in parallel (DistBelief)", metavar="S")

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or \
                not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or \
                not 1 <= self.shards <= 64:
            raise ConfigError(f"shards must be an integer in [1, 64], got {self.shards!r}")
        choose("protection", self.protection, PROTECTIONS)
        if self.integrity is not None:
            choose("integrity", self.integrity, INTEGRITY)
            object.__setattr__(self, "protection",
                               "integrity" if self.integrity == "full" else "header")
        positive_float("worker_timeout", self.worker_timeout)
        if self.rejoin_timeout is not None:
            positive_float("rejoin_timeout", self.rejoin_timeout)


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Ray actors: one per worker, the server in one actor (or sharded over several)."""

    address: str | None = option(
        None, "join an existing Ray cluster ('auto': the one `ray start` made on this host); "
              "default: start a local Ray instance", flag="--ray-address",
        metavar="auto|HOST:PORT")
    shard_threshold: int = option(
        50_000_000, "shard the server over several actors when the model has more than N "
                    "parameters", flag="--ray-shard-threshold", metavar="N")
    shards: int | None = option(
        None, "number of server shards when sharding (default: one per 25M parameters)",
        flag="--ray-shards", metavar="S")
    max_restarts: int = _max_restarts_option()

    def __post_init__(self) -> None:
        positive_int("shard_threshold", self.shard_threshold)
        if self.shards is not None:
            positive_int("shards", self.shards)
        nonnegative_int("max_restarts", self.max_restarts)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~distgrad.engines.ray.RayEngine`."""
        return {"address": self.address, "shard_threshold": self.shard_threshold,
                "shards": self.shards, "max_restarts": self.max_restarts}


@dataclass(frozen=True, kw_only=True)
class SparkOptions:
    """A Spark barrier stage; the server runs in the driver."""

    master: str | None = option(
        None, "Spark master (default: the session spark-submit made, else local[WORKERS])",
        flag="--spark-master", metavar="URL")
    max_restarts: int = _max_restarts_option()

    def __post_init__(self) -> None:
        nonnegative_int("max_restarts", self.max_restarts)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~distgrad.engines.spark.SparkEngine`."""
        return {"master": self.master, "max_failures": self.max_restarts + 1}


EngineOptions = SimOptions | LocalOptions | NetOptions | RayOptions | SparkOptions

ENGINE_OPTIONS: dict[str, type] = {"local": LocalOptions, "sim": SimOptions, "net": NetOptions,
                                   "ray": RayOptions, "spark": SparkOptions}
"""Each engine's options class, in the order of :data:`ENGINES`."""


def options_for(engine: str, /, **values: Any) -> Any:
    """The options of ``engine`` from ``values``, ignoring keys that engine has no field for
    (so one set of CLI values serves every engine)."""
    cls = ENGINE_OPTIONS[choose("engine", engine, ENGINES)]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def check_options(engine: str, options: Any) -> None:
    """Raise unless ``options`` is the options class of ``engine``."""
    cls = ENGINE_OPTIONS[choose("engine", engine, ENGINES)]
    if not isinstance(options, cls):
        raise ConfigError(f"engine {engine!r} takes {cls.__name__}, got "
                          f"{type(options).__name__}")


def field_default(f: Field) -> Any:
    """A dataclass field's default value (calling its factory)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ConfigError(f"field {f.name!r} has no default")
