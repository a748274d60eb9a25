"""A job as JSON, and the parts a remote worker rebuilds from it (never pickle).

``distgrad serve`` sends :meth:`distgrad.job.Job.to_dict` to each worker after it
authenticated; :func:`job_from_dict` rebuilds and re-validates the frozen
:class:`~distgrad.job.Job`, and :func:`parts_from_job` makes the same data,
shards and model on the worker's host (same seed ⇒ same shards and batch order
as on the server and in ``sim``). Only named datasets and models can travel this
way; a custom ``nn.Module`` or custom tensors need an engine that ships Python
objects itself (Ray, Spark).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch.nn import functional as F

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
    """Raise unless remote workers can rebuild ``parts`` from the job alone."""
    from distgrad.models import MODELS

    job = parts.job
    if parts.dataset.name != job.dataset:
        raise ConfigError("custom data cannot be sent to remote workers; use a named "
                          "dataset (--dataset) or the Ray/Spark engines")
    if type(parts.template) is not MODELS[job.model] or parts.loss_fn is not F.cross_entropy:
        raise ConfigError("a custom model or loss cannot be sent to remote workers; use a "
                          "named model (--model) or the Ray/Spark engines")
