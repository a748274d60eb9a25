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

from distgrad.errors import ConfigError
from distgrad.optim import (
    INNER_OPTIMIZERS,
    load_optimizer_state,
    make_inner_optimizer,
    optimizer_state,
)
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


def count_correct(out: torch.Tensor, y: torch.Tensor) -> int:
    """Correct predictions in a batch: per sample for a classifier, per token (averaged
    over the sequence, so the count stays per sample) for a language model; 0 otherwise."""
    if is_classification(out, y):
        return int((out.argmax(dim=1) == y).sum())
    if not y.is_floating_point() and y.dim() >= 2 and out.dim() == y.dim() + 1:
        per_token = (out.argmax(dim=-1) == y).float().mean()
        return round(float(per_token) * y.shape[0])
    return 0


StepFn = Callable[..., Any]
"""A custom step: ``step(model, x, y)`` returns the loss, or ``(loss, metrics)`` where
``metrics`` may hold ``"correct"`` (correct predictions in the batch)."""


def _custom_step(step_fn: StepFn, module: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, int]:
    result = step_fn(module, x, y)
    loss, metrics = (result if isinstance(result, tuple) else (result, {}))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the step function must return a scalar loss tensor (or (loss, "
                        f"metrics)), got {type(loss).__name__}")
    return loss, int(dict(metrics or {}).get("correct", 0))


def autocast_supported(device: torch.device) -> bool:
    """bf16 autocast works on the CPU and on CUDA devices that support bf16."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def build_optimizer(name: str, params: list[torch.Tensor], lr: float,
                    options: dict[str, Any]) -> torch.optim.Optimizer:
    """The inner optimizer: ``sgd``/``adam`` (the thesis' two, with their option names),
    any ``torch.optim`` class by name (``AdamW``, ``RMSprop``, ...; ``options`` are its
    keyword arguments) or a factory's import path, called as ``factory(params, lr=lr,
    **options)``."""
    from distgrad.entry import is_path, resolve

    if name in INNER_OPTIMIZERS:
        return make_inner_optimizer(name, params, lr, **options)
    if is_path(name):
        factory = resolve(name, "optimizer")
        return factory(params, lr=lr, **options)  # type: ignore[no-any-return]
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"unknown inner optimizer {name!r}; choose from: "
                          f"{', '.join(INNER_OPTIMIZERS)}, a torch.optim class (e.g. AdamW, "
                          f"RMSprop) or a factory's import path 'pkg.module:factory'")
    try:
        return cls(params, lr=lr, **options)
    except TypeError as exc:
        raise ConfigError(f"inner optimizer {name}: {exc}") from None


def check_optimizer(name: str) -> None:
    """Raise a ConfigError unless :func:`build_optimizer` knows ``name`` (no import)."""
    from distgrad.entry import is_path

    if name in INNER_OPTIMIZERS or is_path(name):
        return
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"unknown inner optimizer {name!r}; choose from: "
                          f"{', '.join(INNER_OPTIMIZERS)}, a torch.optim class (e.g. AdamW, "
                          f"RMSprop) or a factory's import path 'pkg.module:factory'")


def build_scheduler(path: str | None, optimizer: torch.optim.Optimizer) -> Any:
    """The LR scheduler ``factory(optimizer)`` at import path ``path`` (stepped after every
    local step), or None."""
    if path is None:
        return None
    from distgrad.entry import resolve

    return resolve(path, "lr scheduler")(optimizer)


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
        *,
        step_fn: StepFn | None = None,
        scheduler: str | None = None,
        autocast: bool = False,
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
        self.optimizer = build_optimizer(inner_optimizer, self._views, lr,
                                         dict(inner_options or {}))
        self.scheduler = build_scheduler(scheduler, self.optimizer)
        self.step_fn = step_fn
        self.autocast = autocast and autocast_supported(self.device)

    @classmethod
    def wrap(cls, worker: int, module: nn.Module, optimizer: torch.optim.Optimizer,
             seed: int = 0) -> Replica:
        """A replica over the user's own ``module`` and ``optimizer`` (no copy): the
        module's parameters become views of the flat buffer in place, so the optimizer,
        which holds the same ``Parameter`` objects, keeps working (:mod:`distgrad.loop`)."""
        rep = cls.__new__(cls)
        rep.worker, rep.seed = worker, seed
        rep.params = flatten_parameters(module)
        rep.device = rep.params.device
        rep.module = module
        rep.loss_fn = lambda out, y: torch.zeros(())  # the user's loop computes its loss
        rep._views = [p for p in module.parameters() if p.requires_grad]
        rep._grad = torch.zeros_like(rep.params)
        rep.base = torch.empty_like(rep.params)
        rep.payload = torch.empty_like(rep.params)
        rep.buffers = {}
        rep.lr = float(optimizer.param_groups[0]["lr"])
        rep.optimizer = optimizer
        rep.scheduler, rep.step_fn, rep.autocast = None, None, False
        return rep

    @property
    def sizes(self) -> list[int]:
        """Element counts of the trainable parameter tensors, in flat-buffer order."""
        return [p.numel() for p in self._views]

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Forward and backward on one batch; gradients land in the parameters' ``.grad``."""
        for p in self._views:
            p.grad = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.step_fn is not None:
                loss, correct = _custom_step(self.step_fn, self.module, x, y)
            else:
                out = self.module(x)
                loss = self.loss_fn(out, y)
                correct = None
        loss.backward()
        if correct is None:
            with torch.no_grad():
                correct = count_correct(out, y)
        return StepStats(loss=float(loss.detach()), correct=correct, samples=int(y.shape[0]))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One step of the inner optimizer (and of its LR scheduler, if any) on one batch."""
        stats = self.gradient(x, y)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
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
            **({} if self.scheduler is None else {"scheduler": self.scheduler.state_dict()}),
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
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
