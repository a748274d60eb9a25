"""GEM — Gradient Energy Matching (Hermans & Louppe 2018, arXiv 1805.08469).

The target ("proxy") dynamics is sequential momentum SGD. Each worker keeps a
proxy momentum of its own updates and scales every update element-wise so that
the movement of the center — the collective "energy" of all workers — does not
exceed the proxy's:

    Δ   = the worker's update (λ inner-optimizer steps; −η∇L for plain SGD, λ = 1)
    m   ← μ·m + Δ                                        (proxy momentum)
    θ   = the center right now;  θ_prev = the center at this worker's previous commit
    π   = (κ·|m| − |θ − θ_prev|) / (|Δ| + ε)              element-wise
    π   ← clamp(π, 0, clamp)                              (the reference code's clamp)
    commit π ⊙ Δ;   server: θ̃ ← θ̃ + π ⊙ Δ

κ amplifies the proxy (reference ``train.sh``: "2 is a good value"; default 1
there). Paper setting: plain SGD, η = 0.05, μ = 0.9, batch 64, λ = 1 — use
``--inner-optimizer sgd --lr 0.05 --batch-size 64`` to match it; with Adam the
update Δ is an Adam step and m its running sum (not in the paper).

Placements (the same arithmetic; ``test_gem_placements_agree`` checks it bit for bit):

* ``placement="worker"`` (the paper's Algorithm 1): the worker keeps m and θ_prev,
  *reads* the current center right before committing (a read does not reset its
  staleness), computes π and sends π ⊙ Δ; the server only adds. Memory per worker:
  two extra models.
* ``placement="server"``: the worker sends Δ; the server keeps m and θ_prev per
  worker and computes π under its lock, so θ is exactly the center the commit
  lands on (no read, no race). Server memory: 3·n models. Records the mean π as
  ``scale``.

Differences from the paper and the reference code: the paper writes π without κ
and without a clamp; ``clamp=None`` drops the clamp (π may then be negative or
large), ``kappa=1`` removes the amplification. The reference adds ε inside the
absolute value, |Δ + ε|; here it is |Δ| + ε (ε = 1e-12), which differs only where
Δ ≈ −ε. In the reference the worker pulls the center before committing and
continues from θ + π⊙Δ without another pull; here the worker pulls after its
commit (in the simulator the two are identical, as nothing happens in between).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distgrad.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    CommitContext,
    ServerRule,
    WorkerRule,
)
from distgrad.errors import choose, float_in, positive_float

EPSILON = 1e-12


@dataclass(frozen=True, kw_only=True)
class GEMConfig(AlgorithmConfig):
    """``momentum`` μ of the proxy, ``kappa`` κ, ``clamp`` (None: no clamp), ``placement``."""

    window: int = 1
    momentum: float = 0.9
    kappa: float = 2.0
    clamp: float | None = 5.0
    placement: Literal["worker", "server"] = "worker"

    def validate(self) -> None:
        float_in("momentum", self.momentum, 0.0, 1.0, high_open=True)
        positive_float("kappa", self.kappa)
        if self.clamp is not None:
            positive_float("clamp", self.clamp)
        choose("placement", self.placement, ("worker", "server"))


def energy_factor(m: torch.Tensor, moved: torch.Tensor, delta: torch.Tensor, kappa: float,
                  clamp: float | None, out: torch.Tensor) -> torch.Tensor:
    """π = (κ|m| − |moved|) / (|Δ| + ε), clamped to [0, clamp]; written into ``out``."""
    torch.abs(delta, out=out).add_(EPSILON)
    num = torch.abs(m).mul_(kappa).sub_(moved.abs())
    torch.div(num, out, out=out)
    if clamp is not None:
        out.clamp_(0.0, clamp)
    return out


class GEMWorker(WorkerRule):
    """Placement 'worker': proxy momentum and π on the worker; sends π ⊙ Δ."""

    reads = True  # placement 'worker' only; __init__ sets it per config

    def __init__(self, config: GEMConfig, run) -> None:
        super().__init__(config, run)
        self.reads = config.placement == "worker"  # type: ignore[misc]

    def setup(self, rep) -> None:
        cfg: GEMConfig = self.config  # type: ignore[assignment]
        if cfg.placement == "server":
            return
        rep.buffers["momentum"] = torch.zeros_like(rep.params)
        rep.buffers["center_prev"] = rep.base.clone()  # the center at the first pull
        rep.buffers["center_now"] = torch.empty_like(rep.params)
        rep.buffers["pi"] = torch.empty_like(rep.params)

    def read_buffer(self, rep) -> torch.Tensor | None:
        if self.config.placement == "server":  # type: ignore[attr-defined]
            return None
        return rep.buffers["center_now"]

    def make_payload(self, rep, steps: int) -> torch.Tensor:
        delta = torch.sub(rep.params, rep.base, out=rep.payload)
        cfg: GEMConfig = self.config  # type: ignore[assignment]
        if cfg.placement == "server":
            return delta
        m, now = rep.buffers["momentum"], rep.buffers["center_now"]
        prev = rep.buffers["center_prev"]
        m.mul_(cfg.momentum).add_(delta)
        moved = prev.sub_(now).neg_()  # θ − θ_prev, in the θ_prev buffer
        pi = energy_factor(m, moved, delta, cfg.kappa, cfg.clamp, out=rep.buffers["pi"])
        prev.copy_(now)
        return delta.mul_(pi)


class GEMServer(ServerRule):
    """Placement 'worker': θ̃ ← θ̃ + payload. Placement 'server': π computed here."""

    def __init__(self, config: GEMConfig, run) -> None:
        super().__init__(config, run)
        self.on_server = config.placement == "server"
        # the first θ_prev of a worker is the center it first pulled
        self.needs_stale_center = self.on_server  # type: ignore[misc]
        self.momentum: list[torch.Tensor | None] = []
        self.prev: list[torch.Tensor | None] = []

    def setup(self, center: torch.Tensor, workers: int) -> None:
        if self.on_server:
            self.momentum = [None] * workers
            self.prev = [None] * workers
            self._pi = torch.empty_like(center)

    def apply(self, center, payload, ctx: CommitContext) -> dict[str, float]:
        if not self.on_server:
            center.add_(payload)
            return {}
        cfg: GEMConfig = self.config  # type: ignore[assignment]
        k = ctx.worker
        if self.momentum[k] is None:
            if ctx.stale_center is None:
                raise RuntimeError("GEM (placement=server) needs the center worker pulled")
            self.momentum[k] = torch.zeros_like(center)
            self.prev[k] = ctx.stale_center.clone()
        m, prev = self.momentum[k], self.prev[k]
        assert m is not None and prev is not None
        m.mul_(cfg.momentum).add_(payload)
        moved = prev.sub_(center).neg_()
        pi = energy_factor(m, moved, payload, cfg.kappa, cfg.clamp, out=self._pi)
        prev.copy_(center)
        payload.mul_(pi)
        center.add_(payload)
        return {"scale": float(pi.mean())}

    def state_dict(self) -> dict:
        if not self.on_server:
            return {}
        return {"momentum": [None if m is None else m.clone() for m in self.momentum],
                "prev": [None if p is None else p.clone() for p in self.prev]}

    def load_state_dict(self, state) -> None:
        if not self.on_server:
            super().load_state_dict(state)
            return
        self.momentum = [None if m is None else m.clone() for m in state["momentum"]]
        self.prev = [None if p is None else p.clone() for p in state["prev"]]


ALGORITHM = Algorithm(
    name="gem",
    summary="gradient energy matching: updates scaled so the center moves no faster than "
            "a momentum-SGD proxy",
    config=GEMConfig,
    worker_rule=GEMWorker,
    server_rule=GEMServer,
    reference="Hermans & Louppe 2018, arXiv 1805.08469",
)
