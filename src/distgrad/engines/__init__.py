"""Engines start workers and move messages; they never know which algorithm runs.

An engine has ``run(parts, server, recorder, evals) -> end_time``: it builds the
workers from ``parts`` (:class:`distgrad.parts.RunParts`), feeds their requests to
``server`` (:class:`distgrad.server.ParameterServer`), reports every event to
``recorder`` and lets ``evals`` evaluate the center as commits land. ``now`` is
the engine's clock when it stopped (virtual or wall seconds).

Each engine's settings (how/where) are a frozen dataclass in
:mod:`distgrad.engines.options`; :func:`make_engine` builds an engine from a job and
those options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from distgrad.engines.options import (
    ENGINES,
    LocalOptions,
    NetOptions,
    RayOptions,
    SimOptions,
    SparkOptions,
    check_options,
)
from distgrad.errors import ConfigError, choose

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import Job, RunParts
    from distgrad.server import ParameterServer

__all__ = ["ENGINES", "Engine", "LocalOptions", "NetOptions", "RayOptions", "SimOptions",
           "SparkOptions", "make_engine"]


class Engine(Protocol):
    name: str
    now: float

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float: ...


def make_engine(job: Job, options: Any = None, **modes: Any) -> Engine:
    """The engine the job names, configured from the job and ``options`` (that engine's
    options dataclass; default: its defaults).

    ``modes`` are run modes of the process engine: ``replay`` (a recorded
    schedule), ``resume`` (a checkpoint) and ``checkpoint_path``; ``sim`` takes
    ``resume`` and ``checkpoint_path`` too (its ``checkpoint_every`` counts virtual
    seconds). The ``local`` and
    ``sim`` options are still job fields (:meth:`Job.with_options`): options given here
    for them must equal the job's. Engines can also be built and passed to
    ``train(engine=...)``.
    """
    choose("engine", job.engine, ENGINES)
    if options is not None:
        check_options(job.engine, options)
        if job.engine in ("local", "sim") and options != job.engine_options():
            raise ConfigError(f"the {job.engine} engine reads its options from the job: "
                              "use job.with_options(options)")
    if job.engine == "local":
        from distgrad.engines.local import LocalEngine

        return LocalEngine(job, **modes)
    for key in ("replay", "resume"):
        if modes.get(key) is not None and not (key == "resume" and job.engine == "sim"):
            raise ConfigError(f"{key} needs the local engine")
    if job.engine == "net":
        raise ConfigError("engine 'net' needs a shared secret and waits for remote workers: "
                          "start it with `distgrad serve`, or pass "
                          "engine=NetEngine(secret, ...) to distgrad.train()")
    if job.engine == "ray":
        from distgrad.engines.ray import RayEngine

        return RayEngine(**(options or RayOptions()).engine_kwargs())
    if job.engine == "spark":
        from distgrad.engines.spark import SparkEngine

        return SparkEngine(**(options or SparkOptions()).engine_kwargs())
    from distgrad.engines.sim import SimEngine

    # sim: checkpoint_every is in virtual seconds; resume is a snapshot the sim wrote
    return SimEngine(job.timing, job.seed, threads=job.threads,
                     checkpoint_path=modes.get("checkpoint_path"),
                     checkpoint_every=job.checkpoint_every, resume=modes.get("resume"))
