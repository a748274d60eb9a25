"""Reproduce the thesis: its experiments as declarative configurations, its claims checked.

``distgrad reproduce --list`` names the experiments; ``distgrad reproduce NAME --scale
quick --out DIR`` runs one and writes ``DIR/report.md`` with the figures beside it;
``distgrad reproduce all ... --page docs/reproduction.md`` runs every experiment and
writes the results page. Runs are stored under ``DIR/runs`` (shared between experiments,
reused when the same job is asked for again).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgrad.errors import ConfigError, choose
from distgrad.reproduce.beale import BEALE
from distgrad.reproduce.experiments import E1, E2, E3, E4, E6, E7, STALENESS
from distgrad.reproduce.momentum import MOMENTUM
from distgrad.reproduce.provenance import machine
from distgrad.reproduce.report import write_report
from distgrad.reproduce.runner import _stderr, execute_runs, load_runs, train_command
from distgrad.reproduce.spec import SCALES, Claim, Experiment, Results, Verdict
from distgrad.reproduce.timing_exps import TIMING_ORDER, WALL_TIME

_ALL: tuple[Experiment, ...] = (E1, E2, E3, E4, E6, E7, STALENESS, BEALE, MOMENTUM,
                                TIMING_ORDER, WALL_TIME)
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in _ALL}


def names() -> list[str]:
    return [e.name for e in _ALL]


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; a ConfigError lists the known names otherwise."""
    return EXPERIMENTS[choose("experiment", name, EXPERIMENTS)]


@dataclass
class Outcome:
    """One experiment's results, verdicts, figures and report path."""

    experiment: Experiment
    results: Results
    verdicts: list[tuple[Claim, Verdict]]
    figures: list[tuple[str, str]]
    report: Path


def run_experiment(name: str, *, scale: str = "quick", out: str | Path, engine: str = "sim",
                   runs_dir: str | Path | None = None, command: str | None = None,
                   log: Callable[[str], None] | None = None,
                   reuse_stale: bool = False, archive: str | Path | None = None,
                   available_only: bool = False) -> Outcome:
    """Run (or reuse) an experiment's runs and write ``out/report.md`` and its figures.

    ``reuse_stale``: keep runs made by code with another fingerprint (marked stale).
    ``archive``: a directory of compact run copies (:mod:`distgrad.reproduce.archive`):
    runs missing from the runs directory are read from it, and runs finished here are
    copied into it. ``available_only``: train nothing; report on the finished runs (the
    claims that need an unfinished one are "not tested")."""
    exp = get_experiment(name)
    choose("scale", scale, SCALES)
    out = Path(out)
    runs = Path(runs_dir) if runs_dir is not None else out / "runs"
    logger = log or (lambda msg: (sys.stderr.write(msg + "\n"), sys.stderr.flush()))
    if exp.execute is not None:
        if engine != "sim":
            raise ConfigError(f"experiment {name!r} is a simulation of its own and runs on the "
                              f"sim engine only, got engine {engine!r}")
        logger(f"[{name}] simulating ...")
        results = exp.execute(exp, scale, out, exp.seed)
        commands = None
    else:
        arch = Path(archive) if archive is not None else None
        if not available_only:
            execute_runs(exp, scale, runs, engine=engine, log=logger, reuse_stale=reuse_stale,
                         archive=arch)
        results = load_runs(exp, scale, runs, allow_missing=available_only, archive=arch)
        setup = exp.setup(scale)
        commands = [(s.label, c) for s in exp.run_specs(scale)
                    if (c := train_command(s, setup, exp.seed, engine)) is not None]
    if command is None:
        command = shlex.join(["distgrad", "reproduce", name, "--scale", scale, "--engine",
                              engine, "--out", str(out)])
    report, verdicts, figures = write_report(results, out, command=command,
                                             machine_info=machine(), commands=commands)
    logger(f"[{name}] report: {report}")
    return Outcome(exp, results, verdicts, figures, report)


def _train_worker(k: int, plan: list[tuple[str, str]], runs_dir: str, engine: str,
                  threads: int, reuse_stale: bool, archive: str | None) -> None:
    """One process of :func:`train_parallel`: every run of ``plan`` that no other process
    holds, starting at experiment ``k`` (so that the processes spread)."""
    import torch

    torch.set_num_threads(threads)
    order = plan[k % len(plan):] + plan[:k % len(plan)]
    for name, scale in order:
        execute_runs(get_experiment(name), scale, Path(runs_dir), engine=engine,
                     log=lambda msg: _stderr(f"[job {k}] {msg}"), reuse_stale=reuse_stale,
                     archive=None if archive is None else Path(archive))


def train_parallel(plan: list[tuple[str, str]], jobs: int, runs_dir: str | Path, *,
                   engine: str = "sim", threads: int = 1, reuse_stale: bool = False,
                   archive: str | Path | None = None) -> None:
    """Train the runs of the experiments in ``plan`` ((name, scale) pairs) with ``jobs``
    processes at once, each with ``threads`` torch threads. They share ``runs_dir``: a run
    is trained by the one process that takes its lock (:func:`execute_runs`), so each run
    is trained once; the results are what one process would get (every run is seeded).
    Experiments that are simulations of their own (no runs) are left to the caller. A
    process that fails does not stop the others; the caller's own pass then retrains
    whatever is still missing."""
    import multiprocessing

    plan = [(n, s) for n, s in plan if get_experiment(n).execute is None]
    if not plan:
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_train_worker, name=f"reproduce-job-{k}",
                         args=(k, plan, str(runs_dir), engine, threads, reuse_stale,
                               None if archive is None else str(archive)))
             for k in range(jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)


def summary_counts(outcomes: list[Outcome]) -> dict[Any, int]:
    counts: dict[Any, int] = {True: 0, False: 0, None: 0}
    for o in outcomes:
        for _, v in o.verdicts:
            counts[v.holds] += 1
    return counts


__all__ = ["EXPERIMENTS", "Experiment", "Outcome", "get_experiment", "names",
           "run_experiment", "summary_counts", "train_parallel"]
