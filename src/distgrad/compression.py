"""Compressed commits: fp16, bf16 and int8 (one scale per parameter tensor), with error feedback.

Compression sits in the worker shell, between the algorithm's payload and the
wire: :class:`Compressor` turns the float32 payload into an :class:`Encoded`
message (the bytes a network transport sends) and overwrites the payload with
exactly the values the server will decode from it (:func:`decode` of the message
gives the same values bit for bit). Every engine applies that decoded payload, so
the effect of a codec on training and its byte count (``Encoded.nbytes``, in the
events and ``summary.json``) are exact on all of them. The ``net`` engine puts the
encoded bytes themselves on the wire (:func:`to_bytes`; the server decodes them with
:func:`decode_bytes`) and records the message's size on the wire; the in-process
engines move the decoded float32 values. The algorithm and the server rule never know
a commit was compressed.

Codecs (``P`` = parameters, ``T`` = parameter tensors of the model):

=========  ==========================================================  ===============
codec      encoding                                                    bytes
=========  ==========================================================  ===============
``fp32``   the float32 values (lossless; for testing the path)         4·P
``fp16``   IEEE half, values clamped to ±65504 first                   2·P
``bf16``   bfloat16 (float32's exponent range, 8-bit mantissa)         2·P
``int8``   per tensor: s = max|x|/127, q = round(x/s) ∈ [−127, 127]    P + 4·T
=========  ==========================================================  ===============

**Error feedback** (Seide et al. 2014; Karimireddy et al. 2019): the worker keeps
the residual e of what compression lost and adds it to its next payload,
``send Q(x + e); e ← (x + e) − Q(x + e)``. For additive payloads (deltas,
gradients, pseudo-gradients) the sum of what the server applied then equals the
sum of the true payloads minus the last residual, so the error does not
accumulate. For payloads that are parameters (averaging, localsgd, slowmo,
sequential, ensemble, aeasgd/eamsgd) the residual is carried into the next
commit's parameters; prefer fp16/bf16 there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distgrad.errors import choose

CODECS = ("none", "fp32", "fp16", "bf16", "int8")

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class Encoded:
    """One compressed payload: what a transport puts on the wire.

    ``data`` holds the values in the codec's dtype (flat); ``scales`` one float32
    per parameter tensor for int8, else None; ``sizes`` the element counts of the
    parameter tensors (the segments the scales apply to).
    """

    codec: str
    data: torch.Tensor
    scales: torch.Tensor | None
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n


def payload_bytes(codec: str, numel: int, tensors: int) -> int:
    """Bytes a payload of ``numel`` float32 values in ``tensors`` tensors takes with ``codec``."""
    choose("compression", codec, CODECS)
    if codec in ("none", "fp32"):
        return 4 * numel
    if codec in ("fp16", "bf16"):
        return 2 * numel
    return numel + 4 * tensors


def encode(codec: str, x: torch.Tensor, sizes: Sequence[int]) -> Encoded:
    """Encode the flat float32 tensor ``x`` (split into tensors of ``sizes``)."""
    choose("compression", codec, CODECS[1:])
    sizes = tuple(int(s) for s in sizes)
    if sum(sizes) != x.numel():
        raise ValueError(f"segment sizes sum to {sum(sizes)}, payload has {x.numel()} elements")
    if codec == "fp32":
        return Encoded(codec, x.detach().clone(), None, sizes)
    if codec == "fp16":
        return Encoded(codec, x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16), None, sizes)
    if codec == "bf16":
        return Encoded(codec, x.to(torch.bfloat16), None, sizes)
    q = torch.empty(x.numel(), dtype=torch.int8, device=x.device)
    scales = torch.empty(len(sizes), dtype=torch.float32, device=x.device)
    offset = 0
    for i, n in enumerate(sizes):
        seg = x[offset:offset + n]
        amax = float(seg.abs().max()) if n else 0.0
        scale = amax / 127.0 if amax > 0 and amax == amax else 1.0
        scales[i] = scale
        q[offset:offset + n] = torch.round(seg / scale).clamp_(-127, 127).to(torch.int8)
        offset += n
    return Encoded(codec, q, scales, sizes)


def to_bytes(enc: Encoded) -> list[memoryview]:
    """The wire bytes of ``enc`` (no copy): its values, then for int8 its float32 scales —
    ``payload_bytes(codec, ...)`` bytes in all."""
    data = enc.data.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    views = [memoryview(data.numpy()).cast("B")]
    if enc.scales is not None:
        views.append(memoryview(enc.scales.detach().cpu().contiguous().numpy()).cast("B"))
    return views


def decode_bytes(codec: str, raw: Any, sizes: Sequence[int]) -> torch.Tensor:
    """A fresh float32 tensor of the values the wire bytes ``raw`` of ``codec`` stand for
    (the inverse of :func:`to_bytes`); ``sizes``: the parameter tensors' element counts."""
    choose("compression", codec, CODECS[1:])
    sizes = tuple(int(s) for s in sizes)
    n = sum(sizes)
    view = memoryview(raw).cast("B")
    if len(view) != payload_bytes(codec, n, len(sizes)):
        raise ValueError(f"{len(view)} bytes of {codec}, expected "
                         f"{payload_bytes(codec, n, len(sizes))}")
    out = torch.empty(n, dtype=torch.float32)
    if codec == "fp32":
        return out.copy_(torch.from_numpy(np.frombuffer(view, dtype="<f4")))
    if codec in ("fp16", "bf16"):
        half = torch.from_numpy(np.frombuffer(view, dtype="<i2").copy())
        return out.copy_(half.view(torch.float16 if codec == "fp16" else torch.bfloat16))
    q = torch.from_numpy(np.frombuffer(view[:n], dtype=np.int8).copy())
    scales = torch.from_numpy(np.frombuffer(view[n:], dtype="<f4").copy())
    return decode(Encoded(codec, q, scales, sizes), out)


def decode(enc: Encoded, out: torch.Tensor) -> torch.Tensor:
    """Write the float32 values ``enc`` stands for into ``out`` (flat) and return it."""
    if enc.codec in ("fp32", "fp16", "bf16"):
        return out.copy_(enc.data)
    if enc.codec != "int8" or enc.scales is None:
        raise ValueError(f"cannot decode codec {enc.codec!r}")
    out.copy_(enc.data)
    offset = 0
    for i, n in enumerate(enc.sizes):
        out[offset:offset + n].mul_(enc.scales[i])
        offset += n
    return out


class Compressor:
    """Worker-side compression of commits, with optional error feedback (module docstring).

    ``compress(payload)`` rewrites ``payload`` in place with the decoded values the
    server will apply, and returns the :class:`Encoded` message.
    """

    def __init__(self, codec: str, sizes: Sequence[int], error_feedback: bool = True) -> None:
        choose("compression", codec, CODECS[1:])
        self.codec = codec
        self.sizes = tuple(int(s) for s in sizes)
        numel = sum(self.sizes)
        lossless = codec == "fp32"
        self.numel = numel
        self.error_feedback = error_feedback and not lossless
        self.residual: torch.Tensor | None = None

    def compress(self, payload: torch.Tensor) -> Encoded:
        if payload.numel() != self.numel:
            raise ValueError(f"payload has {payload.numel()} elements, expected {self.numel}")
        if self.error_feedback:
            if self.residual is None:
                self.residual = torch.zeros_like(payload)
            elif self.residual.device != payload.device:  # loaded from a CPU snapshot
                self.residual = self.residual.to(payload.device)
            payload.add_(self.residual)
        enc = encode(self.codec, payload, self.sizes)
        if self.residual is not None:
            self.residual.copy_(payload)
            decode(enc, payload)
            self.residual.sub_(payload)
        else:
            decode(enc, payload)
        return enc

    def state_dict(self) -> dict[str, Any]:
        """The error-feedback residual (None before the first commit or without feedback),
        and the codec it belongs to."""
        return {"codec": self.codec,
                "residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["codec"] != self.codec:
            raise ValueError(f"the snapshot's residual is for codec {state['codec']!r}, "
                             f"this compressor uses {self.codec!r}")
        residual = state["residual"]
        if residual is None:
            self.residual = None
        elif residual.numel() != self.numel:
            raise ValueError(f"the snapshot's residual has {residual.numel()} elements, "
                             f"expected {self.numel}")
        elif self.residual is not None and self.residual.shape == residual.shape:
            self.residual.copy_(residual)
        else:
            self.residual = residual.detach().clone()
