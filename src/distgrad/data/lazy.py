"""A map-style torch ``Dataset`` read batch by batch instead of loaded whole.

:class:`LazyRows` stands where the engines expect the training features ``x_train``
(a tensor): ``rows[idx]`` with an index tensor or array reads exactly those samples
(``dataset[i][0]``, stacked) when a worker assembles its batch, and a slice reads that
range (the evaluation). Only the targets are held in memory (read once at the start,
from ``dataset.targets`` when the data set has them, else sample by sample). A worker
process or Ray actor receives the data set object itself (pickled, e.g. a list of file
names), not its samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distgrad.errors import ConfigError


def _as_tensor(v: Any) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
    return t.float() if t.dtype == torch.float64 else t


class LazyRows:
    """The features of a map-style data set, read on demand (see the module docstring)."""

    def __init__(self, dataset: Any, index: np.ndarray | None = None) -> None:
        self.dataset = dataset
        self.index = np.arange(len(dataset), dtype=np.int64) if index is None else index
        first = _as_tensor(dataset[int(self.index[0])][0]) if len(self.index) else None
        if first is None:
            raise ConfigError("data is empty")
        self.sample_shape = tuple(first.shape)
        self.dtype = first.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.sample_shape)

    def __len__(self) -> int:
        return len(self.index)

    def dim(self) -> int:
        return 1 + len(self.sample_shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def head(self, n: int) -> LazyRows:
        """The first ``n`` samples, still lazy."""
        return LazyRows(self.dataset, self.index[:n])

    def share_memory_(self) -> LazyRows:
        return self  # nothing to share: each process reads the data set itself

    def numpy(self) -> np.ndarray:
        return self[slice(None)].numpy()

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            rows = self.index[key]
        else:
            k = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
            rows = self.index[k]
        if len(rows) == 0:
            return torch.empty((0, *self.sample_shape), dtype=self.dtype)
        return torch.stack([_as_tensor(self.dataset[int(i)][0]) for i in rows])


def targets_of(dataset: Any) -> torch.Tensor:
    """All targets of a map-style data set (``dataset.targets`` if it has them)."""
    held = getattr(dataset, "targets", None)
    if held is not None and len(held) == len(dataset):
        return _as_tensor(held)
    return torch.stack([_as_tensor(dataset[i][1]) for i in range(len(dataset))])
