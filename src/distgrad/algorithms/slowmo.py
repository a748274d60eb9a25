"""SlowMo — slow momentum (Wang, Tantia, Ballas, Rabbat, ICLR 2020, arXiv 1910.00643).

Each outer iteration starts from the synchronised x_0; every worker takes τ steps
of its base optimizer (``window``; the job's inner optimizer, fast learning rate
γ = ``--lr``); the parameters are averaged exactly, then a slow-momentum step:

    x̄ = (1/n) Σ_k x_k
    u ← β·u + (x_0 − x̄) / γ
    x_0 ← x_0 − α·γ·u

β = ``slow_momentum``, α = ``slow_lr``. β = 0, α = 1 is local SGD (model averaging,
a test checks it); BMUF is a special case. Defaults as torchdistx' implementation:
τ = 48, β = 0.5, α = 1.0. DiLoCo is the same template with a Nesterov slow step.

Differences from the paper: the base optimizer's state stays with each worker (the
paper studies several base optimizers, some with averaged buffers); γ is the
job's constant learning rate (no schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgrad.algorithms.averaging import ParamsWorker
from distgrad.algorithms.base import Algorithm, AlgorithmConfig, RoundSumServer
from distgrad.algorithms.transforms import OuterSGD
from distgrad.errors import float_in, positive_float


@dataclass(frozen=True, kw_only=True)
class SlowMoConfig(AlgorithmConfig):
    """``window`` τ; ``slow_momentum`` β in [0, 1); ``slow_lr`` α > 0."""

    window: int = 48
    slow_momentum: float = 0.5
    slow_lr: float = 1.0

    def validate(self) -> None:
        float_in("slow_momentum", self.slow_momentum, 0.0, 1.0, high_open=True)
        positive_float("slow_lr", self.slow_lr)


class SlowMoServer(RoundSumServer):
    """Averages the round's parameters, then one slow-momentum step from x_0: heavy-ball
    :class:`~distgrad.algorithms.transforms.OuterSGD` on d = x_0 − x̄ with gradient scale
    1/γ and learning rate α·γ, whose momentum buffer is u."""

    def setup(self, center: torch.Tensor, workers: int) -> None:
        super().setup(center, workers)
        cfg: SlowMoConfig = self.config  # type: ignore[assignment]
        gamma = self.run.lr
        self.outer = OuterSGD(cfg.slow_lr * gamma, cfg.slow_momentum, nesterov=False,
                              grad_scale=1.0 / gamma, buffer=True)
        self.outer.init(center)

    @property
    def u(self) -> torch.Tensor:
        """The slow momentum buffer."""
        assert self.outer.buf is not None
        return self.outer.buf

    def apply_sum(self, center: torch.Tensor, total: torch.Tensor,
                  participants: int) -> dict[str, float]:
        d = total.div_(participants).neg_().add_(center)  # x_0 − x̄
        self.outer.step(center, d)
        return {}

    def state_dict(self) -> dict:
        return {"u": self.u.clone()}

    def load_state_dict(self, state) -> None:
        self.u.copy_(state["u"])


ALGORITHM = Algorithm(
    name="slowmo",
    summary="slow momentum: τ local steps, exact average, then a momentum step on the "
            "averaged displacement",
    config=SlowMoConfig,
    worker_rule=ParamsWorker,
    server_rule=SlowMoServer,
    synchronous=True,
    reference="Wang et al. 2020, arXiv 1910.00643",
)
