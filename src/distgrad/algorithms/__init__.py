"""Algorithm registry. Filled by an explicit list; an unknown name lists the known ones."""

from __future__ import annotations

from distgrad.algorithms import (
    adag,
    agn,
    averaging,
    dcasgd,
    diloco,
    downpour,
    dynsgd,
    easgd,
    ensemble,
    gem,
    hogwild,
    localsgd,
    sequential,
    slowmo,
    ssp,
    staleness_lr,
    sync,
)
from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    RunInfo,
    ServerRule,
    StepStats,
    WorkerRule,
)
from distgrad.errors import choose

_ALL: tuple[Algorithm, ...] = (
    sequential.ALGORITHM,
    sync.ALGORITHM,
    averaging.ALGORITHM,
    ensemble.ALGORITHM,
    downpour.ALGORITHM,
    dynsgd.ALGORITHM,
    easgd.EASGD,
    easgd.AEASGD,
    easgd.EAMSGD,
    agn.ALGORITHM,
    adag.ALGORITHM,
    # beyond the thesis
    gem.ALGORITHM,
    dcasgd.ALGORITHM,
    staleness_lr.ALGORITHM,
    ssp.ALGORITHM,
    hogwild.ALGORITHM,
    diloco.ASYNC,
    localsgd.ALGORITHM,
    slowmo.ALGORITHM,
    diloco.ALGORITHM,
)

REGISTRY: dict[str, Algorithm] = {a.name: a for a in _ALL}


def get_algorithm(name: str) -> Algorithm:
    """The registry entry called ``name``; a ConfigError lists the known names otherwise."""
    return REGISTRY[choose("algorithm", name, REGISTRY)]


def names() -> list[str]:
    return [a.name for a in _ALL]


__all__ = [
    "REGISTRY",
    "Algorithm",
    "AlgorithmConfig",
    "CommitContext",
    "RunInfo",
    "ServerRule",
    "StepStats",
    "WorkerRule",
    "get_algorithm",
    "names",
]
