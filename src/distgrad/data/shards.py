"""Split training indices over workers.

* ``contiguous``: consecutive blocks of the dataset as stored;
* ``shuffled``: a seeded random permutation cut into n near-equal blocks (IID;
  dist-keras' ``repartition(n)``);
* ``label_skewed``: indices sorted by label (random order within a label), then
  cut into n blocks, so each worker sees one or two classes (the classic non-IID
  split).

Shard sizes differ by at most one sample.
"""

from __future__ import annotations

import numpy as np

from distgrad.errors import ConfigError, choose

SHARDINGS = ("shuffled", "contiguous", "label_skewed")


def make_shards(labels: np.ndarray, workers: int, strategy: str, seed: int) -> list[np.ndarray]:
    """Return one int64 index array per worker."""
    choose("sharding", strategy, SHARDINGS)
    n = len(labels)
    if workers > n:
        raise ConfigError(f"more workers ({workers}) than training samples ({n})")
    rng = np.random.default_rng([seed, 0x5A4D])
    if strategy == "contiguous":
        order = np.arange(n, dtype=np.int64)
    elif strategy == "shuffled":
        order = rng.permutation(n).astype(np.int64)
    else:
        tie = rng.permutation(n)
        order = tie[np.argsort(np.asarray(labels)[tie], kind="stable")].astype(np.int64)
    return [s.copy() for s in np.array_split(order, workers)]
