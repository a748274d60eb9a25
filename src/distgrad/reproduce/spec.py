"""The vocabulary of a reproduction: scales, runs, claims, figures and experiments.

An :class:`Experiment` is a declarative configuration: the runs it needs at each scale
(:class:`RunSpec`, sized by a :class:`Setup`), the thesis' claims it checks
(:class:`Claim`, each a small function from the results to a :class:`Verdict`), and
the figures and tables its report shows. Toy experiments (2-D simulations) replace the
MNIST runs by an ``execute`` function that writes its own data.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distgrad.engines.timing import Timing
from distgrad.errors import ConfigError, choose, positive_int
from distgrad.job import Job

SCALES = ("tiny", "quick", "full")
"""``full`` follows the thesis; ``quick`` fits in minutes on 2 cores; ``tiny`` is a smoke
test (tiny model, seconds; its numbers mean nothing)."""

REPRO_MODELS = {"mlp": None, "small": (64,), "tiny": (32,)}
"""Models by name: the thesis MLP (784-1000-2000-1000-10), and small one-hidden-layer MLPs
used where the model does not matter (staleness) or for smoke tests."""


@dataclass(frozen=True, kw_only=True)
class Setup:
    """How every run of an experiment is sized at one scale."""

    epochs: int
    train_samples: int | None = None
    model: str = "mlp"
    batch_size: int = 128
    eval_every: float = 0.25
    record_batches: bool = True
    track_distance: bool = False
    #: every run uses this setup's epochs and model, whatever the run says (smoke tests)
    uniform: bool = False

    def __post_init__(self) -> None:
        positive_int("epochs", self.epochs)
        choose("model", self.model, REPRO_MODELS)
        if self.train_samples is not None:
            positive_int("train_samples", self.train_samples)


TINY = Setup(epochs=1, train_samples=1024, model="tiny", batch_size=32, eval_every=0.5,
             uniform=True)
"""The smoke-test setup every MNIST experiment gets at scale ``tiny``."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run, in the thesis' terms. ``label`` names it inside its experiment."""

    label: str
    algorithm: str
    workers: int
    window: int
    params: tuple[tuple[str, Any], ...] = ()
    epochs: int | None = None  # overrides Setup.epochs (e.g. the thesis' 5-epoch DOWNPOUR)
    lr: float = 1e-3
    inner_optimizer: str = "adam"
    timing: Timing = field(default_factory=Timing)
    model: str | None = None  # overrides Setup.model

    def job(self, setup: Setup, *, seed: int, engine: str) -> Job:
        """The distgrad :class:`~distgrad.job.Job` of this run at ``setup``."""
        return Job(
            algorithm=self.algorithm, params=dict(self.params), engine=engine,
            workers=self.workers, window=self.window,
            epochs=self.epochs_at(setup),
            batch_size=setup.batch_size, lr=self.lr, inner_optimizer=self.inner_optimizer,
            train_samples=setup.train_samples, seed=seed, eval_every=setup.eval_every,
            timing=self.timing, track_distance=setup.track_distance,
            record_batches=setup.record_batches,
        )

    def epochs_at(self, setup: Setup) -> int:
        return setup.epochs if setup.uniform or self.epochs is None else self.epochs

    def model_name(self, setup: Setup) -> str:
        return setup.model if setup.uniform or self.model is None else self.model

    def dirname(self, setup: Setup, seed: int) -> str:
        """A directory name that differs whenever the job differs (runs are shared by name)."""
        parts = [self.algorithm, f"n{self.workers}", f"l{self.window}"]
        parts += [f"{k}{_short(v)}" for k, v in self.params]
        if self.lr != 1e-3 or self.inner_optimizer != "adam":
            parts.append(f"{self.inner_optimizer}{_short(self.lr)}")
        if self.timing != Timing():
            parts.append(f"t{self.timing.model[:3]}")
            if self.timing.server_time or self.timing.commit_time:
                parts.append(f"cost{self.timing.server_time:g}+{self.timing.commit_time:g}")
        parts += [f"e{self.epochs_at(setup)}", self.model_name(setup)]
        if setup.train_samples:
            parts.append(f"s{setup.train_samples}")
        # what else changes the run directory's contents (two experiments may share a job
        # apart from these, e.g. E1 and the staleness histograms)
        if not setup.record_batches:
            parts.append("nobatch")
        if setup.eval_every != 0.25:
            parts.append(f"ev{setup.eval_every:g}")
        if setup.track_distance:
            parts.append("dist")
        parts.append(f"seed{seed}")
        return "-".join(parts)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass(frozen=True)
class Verdict:
    """Our number(s) as text and whether the claim holds (None: not testable here)."""

    ours: str
    holds: bool | None
    note: str = ""

    @property
    def label(self) -> str:
        return {True: "holds", False: "does not hold", None: "not tested"}[self.holds]


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A falsifiable statement of the thesis, its number(s), and how we check it."""

    id: str
    text: str
    thesis: str
    check: Callable[[Results], Verdict]


@dataclass(frozen=True, kw_only=True)
class Figure:
    """A PNG the report shows: ``draw(results, path)`` writes it."""

    file: str
    caption: str
    draw: Callable[[Results, Path], None]


@dataclass(frozen=True, kw_only=True)
class Table:
    """A markdown table (or any markdown) computed from the results."""

    title: str
    render: Callable[[Results], str]


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One experiment of the thesis as a declarative configuration.

    MNIST experiments list their runs per scale (``tiny`` uses the ``quick`` runs, unless
    it has its own, with the :data:`TINY` setup); toy experiments give ``execute``
    instead, which computes and saves their data and returns it as :class:`Results`.
    ``knobs`` are per-scale values the claims read (thresholds, ...).
    """

    name: str
    shows: str
    thesis: str
    claims: tuple[Claim, ...]
    setups: Mapping[str, Setup] = field(default_factory=dict)
    runs: Mapping[str, tuple[RunSpec, ...]] = field(default_factory=dict)
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()
    knobs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    execute: Callable[[Experiment, str, Path, int], Results] | None = None
    #: toy experiments: one line on how a scale is sized (MNIST ones derive it from the setup)
    describe: Callable[[str], str] | None = None
    #: partial run sets: one phrase on what is finished (e.g. a grid's complete cells)
    progress: Callable[[Results], str] | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        if self.execute is None:
            for scale in ("quick", "full"):
                if scale not in self.setups or scale not in self.runs:
                    raise ConfigError(f"experiment {self.name!r} has no {scale!r} setup/runs")
            for scale, specs in self.runs.items():
                labels = [s.label for s in specs]
                if len(set(labels)) != len(labels):
                    raise ConfigError(f"experiment {self.name!r}: duplicate run labels at "
                                      f"scale {scale!r}")
        ids = [c.id for c in self.claims]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"experiment {self.name!r}: duplicate claim ids")

    def setup(self, scale: str) -> Setup:
        choose("scale", scale, SCALES)
        return TINY if scale == "tiny" else self.setups[scale]

    def run_specs(self, scale: str) -> tuple[RunSpec, ...]:
        choose("scale", scale, SCALES)
        if scale == "tiny":
            return self.runs.get("tiny", self.runs["quick"])
        return self.runs[scale]

    def knob(self, scale: str, key: str) -> Any:
        table = self.knobs.get(scale)
        if table is None and scale == "tiny":
            table = self.knobs.get("quick")
        if table is None or key not in table:
            raise KeyError(f"experiment {self.name!r} has no knob {key!r} at scale {scale!r}")
        return table[key]


# --------------------------------------------------------------------------- results


@dataclass
class RunData:
    """A finished run as read back from its directory."""

    label: str
    spec: RunSpec
    summary: dict[str, Any]
    events: list[dict[str, Any]]
    path: Path | None = None
    #: made by code whose result-affecting source differs from this code's
    stale: bool = False
    #: a stale run whose first epochs, replayed by this code, gave its events identically:
    #: how many epochs were replayed (:mod:`distgrad.reproduce.replay`); None otherwise
    replayed: int | None = None
    #: the machine it was made on (:func:`~distgrad.reproduce.provenance.machine`; None
    #: for runs from before machines were recorded)
    machine: dict[str, Any] | None = None

    @property
    def step_time(self) -> float:
        """Median interval between a worker's consecutive mini-batches (virtual s in sim)."""
        last: dict[int, float] = {}
        gaps: list[float] = []
        for e in self.events:
            if e["type"] == "batch":
                w = e["worker"]
                if w in last and e["t"] > last[w]:
                    gaps.append(e["t"] - last[w])
                last[w] = e["t"]
        if not gaps:
            return float("nan")
        gaps.sort()
        return gaps[len(gaps) // 2]

    def metric(self, key: str) -> float | None:
        v = self.summary.get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class Results:
    """Everything a report is made from: the runs (MNIST) or the data (toys) of one scale."""

    experiment: Experiment
    scale: str
    runs: dict[str, RunData] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def __getitem__(self, label: str) -> RunData:
        try:
            return self.runs[label]
        except KeyError:
            raise KeyError(f"experiment {self.experiment.name!r} has no run {label!r} at scale "
                           f"{self.scale!r}; runs: {', '.join(self.runs)}") from None

    def knob(self, key: str) -> Any:
        return self.experiment.knob(self.scale, key)

    def with_runs(self, **runs: RunData) -> Results:
        return replace(self, runs={**self.runs, **runs})


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def cached_results(exp: Experiment, scale: str, out: Path, knobs: Mapping[str, Any],
                   compute: Callable[[], dict[str, Any]], indent: int | None = None
                   ) -> Results:
    """Results of a computed (non-MNIST) experiment: ``out/data.json`` when it was made with
    the same ``knobs``, else ``compute()`` (its dict, plus the knobs and the wall time, is
    written there)."""
    key = json.loads(json.dumps(knobs))
    path = out / "data.json"
    if path.exists():
        saved = read_json(path)
        if saved.get("knobs") == key:
            return Results(experiment=exp, scale=scale, data=saved,
                           wall_seconds=saved["wall_seconds"])
    start = time.perf_counter()
    data = {"knobs": key, **compute()}
    data["wall_seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    return Results(experiment=exp, scale=scale, data=data, wall_seconds=data["wall_seconds"])
