"""Engines start workers and move messages; they never know which algorithm runs.

An engine has ``run(parts, server, recorder, evals) -> end_time``: it builds the
workers from ``parts`` (:class:`distgrad.job.RunParts`), feeds their requests to
``server`` (:class:`distgrad.server.ParameterServer`), reports every event to
``recorder`` and lets ``evals`` evaluate the center as commits land. ``now`` is
the engine's clock when it stopped (virtual or wall seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from distgrad.errors import ConfigError, choose

if TYPE_CHECKING:
    from distgrad.engines.sim import EvalSchedule
    from distgrad.job import Job, RunParts
    from distgrad.metrics.events import Recorder
    from distgrad.server import ParameterServer

ENGINES = ("local", "sim", "net", "ray", "spark")


class Engine(Protocol):
    name: str
    now: float

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float: ...


def make_engine(job: Job, **options: Any) -> Engine:
    """The engine the job names, configured from the job.

    ``options`` are run modes of the process engine: ``replay`` (a recorded
    schedule), ``resume`` (a checkpoint) and ``checkpoint_path``. Engines with
    options of their own — ``net``, ``ray``, ``spark`` — can also be built and
    passed to ``train(engine=...)``.
    """
    choose("engine", job.engine, ENGINES)
    if job.engine == "local":
        from distgrad.engines.local import LocalEngine

        return LocalEngine(job, **options)
    for key in ("replay", "resume"):
        if options.get(key) is not None:
            raise ConfigError(f"{key} needs the local engine")
    if job.engine == "net":
        raise ConfigError("engine 'net' needs a shared secret and waits for remote workers: "
                          "start it with `distgrad serve`, or pass "
                          "engine=NetEngine(secret, ...) to distgrad.train()")
    if job.engine == "ray":
        from distgrad.engines.ray import RayEngine

        return RayEngine()
    if job.engine == "spark":
        from distgrad.engines.spark import SparkEngine

        return SparkEngine()
    from distgrad.engines.sim import SimEngine

    return SimEngine(job.timing, job.seed, threads=job.threads)
