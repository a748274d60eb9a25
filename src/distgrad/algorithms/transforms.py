"""Server-side transforms shared by several rules, written once.

In the spirit of optax, a transform is a small function, or an object with named
state (``state_dict`` / ``load_state_dict``), that rewrites a flat update or
applies it to the center; a rule composes them. Each one performs exactly the
float operations, in the order, that the rules using it were tested with
(``tests/test_rules.py``), so sharing it changed no result.

* :func:`adag_factor` — ADAG's element-wise factor f = 1/(γ⁻¹(θ̃_t − θ̃_{t−τ})² + 1)
  (``adag``, and ``diloco-async`` with ``adag_gamma``). ``adag`` itself applies it
  through the fused kernel :func:`distgrad.fast.adag_apply`, whose reference path
  is this function followed by ``payload ← f ⊙ payload; center ← center + payload``
  (``tests/test_extending.py`` checks the two agree bit for bit).
* :class:`OuterSGD` — the outer optimizer of DiLoCo (Nesterov momentum) and SlowMo
  (heavy-ball momentum on the displacement divided by the inner learning rate):
  ``torch.optim.SGD``'s update, dampening 0, on a flat buffer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def adag_factor(center: torch.Tensor, stale: torch.Tensor, gamma: float, *,
                out: torch.Tensor, rewrite2: bool = False) -> tuple[float, float]:
    """Write ADAG's factor into ``out`` and return (‖θ̃_t − θ̃_{t−τ}‖, mean factor).

    ``f = 1 / (γ⁻¹ d² + 1)`` element-wise, with d = ``center`` − ``stale`` (the thesis'
    form), or ``f = 1 / ((d / γ)² + 1)`` with ``rewrite2`` (Eq. adag_rewrite_2). A
    fresh center (d = 0) gives exactly 1. ``out`` may not alias the inputs.
    """
    d = torch.sub(center, stale, out=out)
    if rewrite2:
        distance = float(torch.linalg.vector_norm(d))
        d.mul_(1.0 / gamma)
        d.mul_(d)
    else:
        d.mul_(d)
        distance = math.sqrt(float(d.sum()))
        d.mul_(1.0 / gamma)
    d.add_(1.0)
    d.reciprocal_()
    return distance, float(d.sum()) / d.numel()


class OuterSGD:
    """``torch.optim.SGD``'s step (dampening 0) on a flat center, for an outer optimizer.

    With gradient ``g`` scaled by ``grad_scale`` = s and momentum buffer b::

        b ← μ·b + s·g
        θ ← θ − η·(s·g + μ·b)        (nesterov)
        θ ← θ − η·b                  (heavy ball)

    and with μ = 0, s = 1 simply θ ← θ − η·g: no buffer is kept unless ``buffer=True``
    (then b = g and θ ← θ − η·b, the same values). DiLoCo uses
    Nesterov with s = 1; SlowMo uses heavy ball with s = 1/γ and η = α·γ (γ the
    inner learning rate), so that its ``u`` is exactly b. ``g`` is scratch: the step
    may overwrite it. A test checks the Nesterov form against ``torch.optim.SGD``.
    """

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 grad_scale: float = 1.0, buffer: bool = False) -> None:
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.grad_scale = grad_scale
        self.keeps_buffer = buffer or momentum != 0.0 or grad_scale != 1.0
        self.buf: torch.Tensor | None = None

    def init(self, center: torch.Tensor) -> None:
        """Allocate the momentum buffer (zeros) now rather than at the first step."""
        if self.keeps_buffer and self.buf is None:
            self.buf = torch.zeros_like(center)

    def step(self, center: torch.Tensor, g: torch.Tensor) -> None:
        """One outer step of ``center`` on ``g`` (which may be overwritten)."""
        if not self.keeps_buffer:
            center.sub_(g, alpha=self.lr)
            return
        if self.buf is None:
            self.buf = torch.zeros_like(center)
        if self.grad_scale == 1.0:
            self.buf.mul_(self.momentum).add_(g)
        else:
            self.buf.mul_(self.momentum).add_(g, alpha=self.grad_scale)
        if self.nesterov:
            if self.grad_scale != 1.0:
                g.mul_(self.grad_scale)
            g.add_(self.buf, alpha=self.momentum)
            center.sub_(g, alpha=self.lr)
        else:
            center.sub_(self.buf, alpha=self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"buf": None if self.buf is None else self.buf.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        buf = state["buf"]
        self.buf = None if buf is None else buf.clone()
