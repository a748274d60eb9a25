"""Fused commit arithmetic: a one-pass C fast path and the torch reference it is tested against.

A commit on the server reads the center, the payload and (for the distance
‖θ̃_t − θ̃_{t−τ}‖ and for ADAG) the stale center. With plain torch ops each step
is a separate pass over memory (ADAG needs nine); the C kernels in
``distgrad/_ext/kernels.c`` do it in one. They perform the same IEEE float
operations in the same order, so the center is bit-identical to the reference
path; only the reported distance and mean ADAG factor are summed differently
(agreeing to about 1e-5 relative). Without a compiled extension (no C compiler at install time) the
reference path runs, with the same results. ``benchmarks/server.py`` measures both.
"""

from __future__ import annotations

import math

import torch

try:
    from distgrad._ext import kernels as _kernels
except ImportError:  # built without a C compiler
    _kernels = None

#: set to False to force the torch reference path (tests, benchmarks)
USE_KERNELS = True


def kernels_available() -> bool:
    return _kernels is not None


def _fast(*tensors: torch.Tensor | None) -> bool:
    if _kernels is None or not USE_KERNELS:
        return False
    first = tensors[0]
    assert first is not None
    for t in tensors:
        if t is None:
            continue
        if (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                or t.numel() != first.numel()):
            return False
    return True


def add_scaled(center: torch.Tensor, payload: torch.Tensor, alpha: float = 1.0,
               stale: torch.Tensor | None = None) -> float | None:
    """``center += alpha * payload``; returns ‖center_before − stale‖ when ``stale`` is given."""
    if _fast(center, payload, stale):
        sq = _kernels.add_scaled(center.data_ptr(), payload.data_ptr(),
                                 0 if stale is None else stale.data_ptr(), center.numel(),
                                 alpha)
        return math.sqrt(sq) if stale is not None else None
    distance = None if stale is None else float(torch.linalg.vector_norm(center - stale))
    if alpha == 1.0:
        center.add_(payload)
    else:
        center.add_(payload * alpha)
    return distance


def adag_apply(center: torch.Tensor, payload: torch.Tensor, stale: torch.Tensor, gamma: float,
               rewrite2: bool = False, work: torch.Tensor | None = None) -> tuple[float, float]:
    """ADAG: f = 1/(γ⁻¹ d² + 1) (or 1/((d/γ)² + 1)), d = center − stale; payload ← f·payload;
    center += payload. Returns (‖d‖, mean f). ``work`` is scratch space for the reference path."""
    n = center.numel()
    if _fast(center, payload, stale):
        sq, fs = _kernels.adag(center.data_ptr(), payload.data_ptr(), stale.data_ptr(), n,
                               1.0 / gamma, 1 if rewrite2 else 0)
        return math.sqrt(sq), fs / n
    from distgrad.algorithms.transforms import adag_factor  # the reference path, written once

    d = work if work is not None else torch.empty_like(center)
    distance, scale = adag_factor(center, stale, gamma, out=d, rewrite2=rewrite2)
    payload.mul_(d)
    center.add_(payload)
    return distance, scale


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖."""
    if _fast(a, b):
        return math.sqrt(_kernels.sqdist(a.data_ptr(), b.data_ptr(), a.numel()))
    return float(torch.linalg.vector_norm(a - b))
