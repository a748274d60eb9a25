"""A job as JSON, and the parts a remote worker rebuilds from it (never pickle).

``distgrad serve`` sends :meth:`distgrad.job.Job.to_dict` to each worker after it
authenticated; :func:`job_from_dict` rebuilds and re-validates the frozen
:class:`~distgrad.job.Job`, and :func:`parts_from_job` makes the same data,
shards and model on the worker's host (same seed ⇒ same shards and batch order
as on the server and in ``sim``). Models, data and losses travel as names or import
paths with JSON arguments (``model="pkg.module:factory"``, ``model_args``, ...), which
every host imports itself; Python objects need an engine that ships them (Ray, Spark).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from distgrad.engines.timing import Timing
from distgrad.errors import ConfigError


def job_from_dict(d: Mapping[str, Any]) -> Any:
    """The :class:`Job` that ``Job.to_dict()`` described (validated again)."""
    from distgrad.parts import Job

    data = dict(d)
    timing = dict(data.pop("timing", {}) or {})
    timing["crashes"] = tuple(tuple(c) for c in timing.get("crashes", ()))
    params = dict(data.pop("params", {}) or {})
    window = params.pop("window", None)
    data.pop("window", None)
    known = {f.name for f in dataclasses.fields(Job)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"the server sent job fields this distgrad does not know: "
                          f"{', '.join(unknown)} (version mismatch?)")
    try:
        return Job(**data, params=params, window=window, timing=Timing(**timing))
    except TypeError as exc:
        raise ConfigError(f"malformed job description: {exc}") from None


def parts_from_job(job: Any) -> Any:
    """The :class:`RunParts` of a job with a named dataset and model (as ``train`` builds)."""
    from distgrad.parts import build_parts

    return build_parts(job)


def check_portable(parts: Any) -> None:
    """Raise unless remote workers can rebuild ``parts`` from the job alone (names or
    import paths of the model, data and loss; see :func:`distgrad.parts.build_parts`)."""
    if not parts.portable:
        raise ConfigError("a model, data or loss given as a Python object cannot be sent to "
                          "remote workers (nothing is pickled); name them by import path "
                          "(model='pkg.module:factory', dataset='pkg.module:factory', "
                          "loss='pkg.module:fn'), installed on every host, or use the "
                          "Ray/Spark engines")
