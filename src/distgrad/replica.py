"""One worker's model replica: the module's parameters as views of one flat buffer.

The replica's parameters are *views* into one private flat float32 buffer
(``Replica.params``), so a pull is one ``copy_`` and a commit is one buffer. The
replica never aliases the center or another replica: ``params`` is allocated
here and only ever written by copies (the thesis' own simulator shared one array
between the server and every worker by accident, see spec/thesis.md §6).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from distgrad.optim import load_optimizer_state, make_inner_optimizer, optimizer_state
from distgrad.stats import StepStats

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Move ``module``'s trainable parameters into one flat buffer and return it.

    After the call every trainable parameter ``p`` has ``p.data`` a view of the
    returned buffer, so writing the buffer (a pull) writes the model, and the
    buffer is what a commit sends. Gradients stay ordinary per-parameter tensors
    (autograd allocates them; accumulating into views of a flat buffer instead
    costs two extra passes over memory per step).
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for p in trainable}
    if dtypes != {torch.float32}:
        raise ValueError(f"distgrad trains float32 parameters only, got {sorted(map(str, dtypes))}")
    total = sum(p.numel() for p in trainable)
    params = torch.empty(total, dtype=torch.float32, device=trainable[0].device)
    offset = 0
    for p in trainable:
        n = p.numel()
        params[offset : offset + n].copy_(p.data.reshape(-1))
        p.data = params[offset : offset + n].view_as(p)
        offset += n
    return params


def is_classification(out: torch.Tensor, y: torch.Tensor) -> bool:
    """Logits (N, C) against integer class labels (N,): accuracy is defined."""
    return out.dim() == 2 and y.dim() == 1 and not y.is_floating_point()


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Replica:
    """One worker's model copy, flat buffers and inner optimizer.

    Buffers: ``params`` (θ^k; the module's parameters are views of it), ``grad``
    (the last gradient, flat, assembled on access), ``base`` (the center as of the
    last pull), ``payload`` (what is sent), and ``buffers`` for whatever the worker
    rule keeps (velocity, ...).
    """

    def __init__(
        self,
        worker: int,
        module: nn.Module,
        loss_fn: LossFn,
        inner_optimizer: str,
        lr: float,
        inner_options: dict[str, float] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.worker = worker
        self.seed = seed
        self.device = torch.device(device)
        self.module = copy.deepcopy(module).to(self.device)
        self.module.train()
        self.loss_fn = loss_fn
        self.params = flatten_parameters(self.module)
        self._views = [p for p in self.module.parameters() if p.requires_grad]
        self._grad = torch.zeros_like(self.params)
        self.base = torch.empty_like(self.params)
        self.payload = torch.empty_like(self.params)
        self.buffers: dict[str, torch.Tensor] = {}
        self.lr = lr
        self.optimizer = make_inner_optimizer(
            inner_optimizer, self._views, lr, **dict(inner_options or {})
        )

    @property
    def sizes(self) -> list[int]:
        """Element counts of the trainable parameter tensors, in flat-buffer order."""
        return [p.numel() for p in self._views]

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Forward and backward on one batch; gradients land in the parameters' ``.grad``."""
        for p in self._views:
            p.grad = None
        out = self.module(x)
        loss = self.loss_fn(out, y)
        loss.backward()
        with torch.no_grad():
            correct = int((out.argmax(dim=1) == y).sum()) if is_classification(out, y) else 0
        return StepStats(loss=float(loss.detach()), correct=correct, samples=int(y.shape[0]))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One step of the inner optimizer on one batch."""
        stats = self.gradient(x, y)
        self.optimizer.step()
        return stats

    @property
    def grad(self) -> torch.Tensor:
        """The last backward's gradient as one flat vector (assembled on access; zeros for
        parameters that got none). Writing into it does not change the parameters' grads."""
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(),
                                                                           device=p.device)
                 for p in self._views]
        return torch.cat(grads, out=self._grad)

    def reinitialize(self, seed_offset: int) -> None:
        """Re-draw the parameters from a seed of their own (ensemble members)."""
        from distgrad.models import initialize

        initialize(self.module, self.seed * 1_000_003 + seed_offset)

    def state_dict(self) -> dict[str, Any]:
        """Everything the replica carries from one step to the next, as CPU copies.

        ``params``, ``base``, ``payload`` (flat float32); ``grads`` (the last backward's
        gradient per trainable tensor, or None: a gradient-sending rule commits it after
        the step); ``buffers`` (the worker rule's, ``rep.buffers``); ``module_buffers``
        (the module's own, e.g. batch-norm statistics); ``optimizer`` (the inner
        ``torch.optim`` state dict: Adam moments and step counts, SGD momentum).
        """
        cpu = torch.device("cpu")
        return {
            "params": _cpu_copy(self.params),
            "base": _cpu_copy(self.base),
            "payload": _cpu_copy(self.payload),
            "grads": [None if p.grad is None else _cpu_copy(p.grad) for p in self._views],
            "buffers": {k: _cpu_copy(v) for k, v in self.buffers.items()},
            "module_buffers": {k: _cpu_copy(v) for k, v in self.module.named_buffers()},
            "optimizer": optimizer_state(self.optimizer, cpu),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` by copying into this replica's own buffers (which an
        engine may have placed in shared memory); rule buffers it lacks are created."""
        if state["params"].shape != self.params.shape:
            raise ValueError(f"the snapshot has {state['params'].numel()} parameters, "
                             f"this replica {self.params.numel()}")
        with torch.no_grad():
            self.params.copy_(state["params"])
            self.base.copy_(state["base"])
            self.payload.copy_(state["payload"])
        grads = state["grads"]
        if len(grads) != len(self._views):
            raise ValueError(f"the snapshot has gradients for {len(grads)} tensors, "
                             f"the model has {len(self._views)}")
        for p, g in zip(self._views, grads, strict=True):
            p.grad = None if g is None else g.to(p.device, copy=True).view_as(p)
        saved = state["buffers"]
        for name in [n for n in self.buffers if n not in saved]:
            del self.buffers[name]
        for name, value in saved.items():
            buf = self.buffers.get(name)
            if buf is not None and buf.shape == value.shape and buf.dtype == value.dtype:
                buf.copy_(value)
            else:
                self.buffers[name] = value.to(self.device, copy=True)
        own = dict(self.module.named_buffers())
        for name, value in state["module_buffers"].items():
            own[name].copy_(value)
        load_optimizer_state(self.optimizer, state["optimizer"])
