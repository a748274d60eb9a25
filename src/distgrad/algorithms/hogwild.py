"""Hogwild! — lock-free parallel SGD (Niu, Recht, Ré, Wright, NIPS 2011, arXiv 1106.5730).

Workers share the parameter vector and update it without any lock: each reads
the center, computes one step s on one mini-batch and adds it, x ← x + s,
component-wise. In parameter-server terms it is DOWNPOUR with λ = 1 whose server
never serializes anything (elephas ``mode='hogwild'``; PyTorch's
``mnist_hogwild`` example with ``share_memory()``).

The rule declares ``lock_free``. What that means per engine (protocol in
:mod:`distgrad.server`):

* ``local``: workers add their steps into the shared-memory center with
  :meth:`LockFreeAddServer.apply_unlocked` and copy from it with no lock at all
  (real torn reads and racing adds); they tell the server afterwards, which only
  counts the commit (clock, τ) — see :mod:`distgrad.engines.local`;
* ``net``, ``ray``, ``spark``: there is no shared memory, so commits pass through
  the server one at a time (this is DOWNPOUR with λ = 1 there);
* the simulator models the torn reads instead: a pull sweeps the vector over
  ``read_fraction`` of a step, and commits landing during the sweep are seen only
  in the part not yet read (:mod:`distgrad.engines.sim`). With
  ``read_fraction = 0`` the simulation is exactly DOWNPOUR with λ = 1 (a test
  checks it bit for bit).

Differences from the paper: the paper samples single examples and touches only
their sparse coordinates; here a step is one mini-batch and dense (the setting
of the PyTorch example). Writes are atomic element-wise adds in the simulator;
lost updates from racing read-modify-writes are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.base import AddServer, Algorithm, AlgorithmConfig, WorkerRule
from distgrad.errors import ConfigError, float_in


@dataclass(frozen=True, kw_only=True)
class HogwildConfig(AlgorithmConfig):
    """``read_fraction`` in [0, 1): how long a read sweeps, as a fraction of a step (sim)."""

    window: int = 1
    read_fraction: float = 0.5

    def validate(self) -> None:
        if self.window != 1:
            raise ConfigError(f"hogwild adds every step; window must be 1, got {self.window}")
        float_in("read_fraction", self.read_fraction, 0.0, 1.0, high_open=True)


class LockFreeAddServer(AddServer):
    """θ̃ ← θ̃ + s, with no lock."""

    lock_free = True

    def __init__(self, config: HogwildConfig, run) -> None:
        super().__init__(config, run)
        self.read_fraction = config.read_fraction

    @staticmethod
    def apply_unlocked(center: torch.Tensor, payload: torch.Tensor) -> None:
        """x ← x + s straight into the shared center, by a worker, with no lock: the
        element-wise add of :meth:`apply` (same bits), without the distance."""
        center.add_(payload)


ALGORITHM = Algorithm(
    name="hogwild",
    summary="lock-free shared-memory SGD: every step added to the center without a lock "
            "(real on local; torn reads modelled on sim)",
    config=HogwildConfig,
    worker_rule=WorkerRule,
    server_rule=LockFreeAddServer,
    reference="Niu et al. 2011, arXiv 1106.5730",
)
