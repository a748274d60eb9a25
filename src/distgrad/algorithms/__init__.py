"""Algorithm registry. Filled by an explicit list; an unknown name lists the known ones.

Algorithms defined outside the package join it with :func:`register_algorithm`, and
can be named by import path, ``"package.module:ATTR"``: :func:`get_algorithm` imports
the module (which registers the algorithm, or simply defines it) and returns the
attribute. A job records such an algorithm by its import path (:func:`algorithm_ref`),
so that worker processes and remote hosts find it by importing the same module
(see ``docs/extending.md``).
"""

from __future__ import annotations

import sys

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
    Capabilities,
    CommitContext,
    RoundSumServer,
    RunInfo,
    ServerRule,
    StepStats,
    WorkerRule,
    audit_rules,
)
from distgrad.errors import ConfigError, choose

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
_BUILTIN = frozenset(REGISTRY)
#: algorithms loaded by import path, by that path
_BY_PATH: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Add ``algorithm`` to the registry under ``algorithm.name`` and return it.

    Call it at import time of the module that defines the algorithm
    (``ALGORITHM = register_algorithm(Algorithm(...))``); to run on worker processes
    or remote hosts, name the algorithm by that module's import path,
    ``"package.module:ALGORITHM"`` (:func:`get_algorithm`). The rule classes are
    audited first (:func:`~distgrad.algorithms.base.audit_rules`): a worker rule that
    overrides ``after_commit`` must declare ``uses_reply``, and so on. Registering the
    same object again is a no-op; another algorithm under a taken name is an error
    unless ``replace=True``. The built-in algorithms cannot be replaced.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register_algorithm takes an Algorithm, got {type(algorithm).__name__}")
    name = algorithm.name
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ConfigError(f"an algorithm name must be a non-empty string without ':' or "
                          f"surrounding spaces, got {name!r}")
    problems = audit_rules(algorithm)
    if problems:
        raise TypeError(f"algorithm {name!r}: " + "; ".join(problems))
    existing = REGISTRY.get(name)
    if existing is not None and existing is not algorithm:
        if name in _BUILTIN:
            raise ConfigError(f"{name!r} is a built-in algorithm; register yours under "
                              f"another name")
        if not replace:
            raise ConfigError(f"an algorithm called {name!r} is already registered "
                              f"(from {_module_of(existing)}); pass replace=True to replace it")
    REGISTRY[name] = algorithm
    return algorithm


def get_algorithm(name: str | Algorithm) -> Algorithm:
    """The algorithm called ``name``: a registered name, or an import path
    ``"package.module:ATTR"`` whose module is imported (and whose algorithm is registered
    if the module did not do it). An ``Algorithm`` is returned as it is. A ConfigError
    lists the known names otherwise."""
    if isinstance(name, Algorithm):
        return name
    found = REGISTRY.get(name)
    if found is not None:
        return found
    if isinstance(name, str) and ":" in name:
        return _load(name)
    try:
        return REGISTRY[choose("algorithm", name, REGISTRY)]
    except ConfigError as exc:
        raise ConfigError(f"{exc}; or the import path of an algorithm defined outside "
                          f"distgrad, 'package.module:ATTR'") from None


def algorithm_ref(algorithm: str | Algorithm) -> str:
    """What a job records for ``algorithm``: a string that :func:`get_algorithm` resolves
    in *any* process that can import the user's module.

    A built-in name stays as it is. An algorithm registered from outside the package
    (given by name or as the object) becomes ``"package.module:ATTR"``, the module
    attribute that holds it, so that a spawned worker process (pickle) or a remote host
    (JSON) imports its module. An algorithm held by no module attribute (built inside
    a function) is registered and recorded by name: it then runs only where that name
    is registered, e.g. on the ``sim`` engine.
    """
    algo = get_algorithm(algorithm)
    if algo.name in _BUILTIN and REGISTRY[algo.name] is algo:
        return algo.name
    if isinstance(algorithm, str) and ":" in algorithm:
        return algorithm
    for path, loaded in _BY_PATH.items():
        if loaded is algo:
            return path
    path = _find_path(algo)
    if path is not None:
        _BY_PATH.setdefault(path, algo)
        return path
    register_algorithm(algo)
    return algo.name


def names() -> list[str]:
    """The built-in algorithms, in the registry's order (registered ones: ``REGISTRY``)."""
    return [a.name for a in _ALL]


def _module_of(algorithm: Algorithm) -> str:
    return getattr(algorithm.worker_rule, "__module__", None) or "?"


def _find_path(algo: Algorithm) -> str | None:
    """``"module:ATTR"`` of a module attribute that is ``algo``, searching the modules
    that define its config and rules."""
    modules = []
    for obj in (algo.config, algo.worker_rule, algo.server_rule):
        mod = getattr(obj, "__module__", None)
        if mod and mod not in modules:
            modules.append(mod)
    for mod in modules:
        module = sys.modules.get(mod)
        if module is None:
            continue
        for attr, value in vars(module).items():
            if value is algo and not attr.startswith("_"):
                return f"{mod}:{attr}"
    return None


def _load(path: str) -> Algorithm:
    """Import ``"package.module:ATTR"`` and return (and register) the algorithm it names."""
    if path in _BY_PATH:
        return _BY_PATH[path]
    from distgrad.entry import resolve  # the one import-path resolver (models, data too)

    try:
        obj = resolve(path, "algorithm")
    except ConfigError as exc:
        module = sys.modules.get(path.partition(":")[0])  # imported, attribute missing
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Algorithm)) \
            if module is not None else []
        mine = f"; the module's algorithms: {', '.join(found)}" if found else ""
        raise ConfigError(f"{exc}{mine}. Known algorithms: "
                          f"{', '.join(sorted(REGISTRY))}") from None
    if not isinstance(obj, Algorithm) and callable(obj):
        obj = obj()  # a factory
    if not isinstance(obj, Algorithm):
        raise ConfigError(f"{path!r} is a {type(obj).__name__}, not an Algorithm")
    existing = REGISTRY.get(obj.name)
    if existing is None:
        register_algorithm(obj)
    elif existing is not obj:
        raise ConfigError(f"{path!r} is an algorithm called {obj.name!r}, but another "
                          f"algorithm is registered under that name (from "
                          f"{_module_of(existing)})")
    _BY_PATH[path] = obj
    return obj


__all__ = [
    "REGISTRY",
    "Algorithm",
    "AlgorithmConfig",
    "Capabilities",
    "CommitContext",
    "RoundSumServer",
    "RunInfo",
    "ServerRule",
    "StepStats",
    "WorkerRule",
    "algorithm_ref",
    "audit_rules",
    "get_algorithm",
    "names",
    "register_algorithm",
]
