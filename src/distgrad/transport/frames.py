"""Wire format: a fixed typed header, a MAC, and raw payload bytes. No pickle, ever.

A message is exactly three ZeroMQ frames::

    [header (HEADER.size bytes), mac (32 bytes, empty before authentication), payload]

The header is a little-endian C struct (:data:`HEADER`) with the message kind,
flags, worker id, attempt, sequence number, session id, version, commit
counters, payload dtype, shape and byte length. The payload is the raw bytes of
a float32/float64 array (row-major, the shape in the header) or UTF-8 JSON.
:func:`decode` checks everything a peer could get wrong — magic, protocol
version, kind, dtype, rank, dims, that the length matches the shape, that it is
under the receiver's limit, and that the payload frame really holds that many
bytes — and raises :class:`FrameError` naming the problem. It never raises
anything else on any input (a property test feeds it arbitrary bytes).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"DGT1"
MAC_SIZE = 32
MAX_DIMS = 4
#: JSON payloads (hello, welcome with the job, errors) are small; anything bigger is refused
MAX_JSON = 1 << 20

#: magic, kind, flags, dtype, ndim, worker, attempt, seq, session, version, steps, samples,
#: position, value, shape[4], length
HEADER = struct.Struct("<4sBBBBiqqQqqqqd4qQ")


class Kind(enum.IntEnum):
    """Message kinds. c→s: requests from a worker; s→c: the server's replies."""

    HELLO = 1  # c→s  JSON {nonce, worker, attempt}; no MAC
    CHALLENGE = 2  # s→c  JSON {nonce}
    AUTH = 3  # c→s  mac = proof of the secret; no payload
    WELCOME = 4  # s→c  JSON {proof, session, worker, attempt, position, parameters, job, ...}
    REJECT = 5  # s→c  JSON {reason}
    PULL = 6  # c→s  no payload
    PULLED = 7  # s→c  float32 (1, n): the center; version = its version
    COMMIT = 8  # c→s  float32 (rows, n): payload [, stale center]
    COMMITTED = 9  # s→c  float32 (rows, n) or empty: [reply payload] [, pulled center]
    STATS = 10  # c→s  one local step: value = loss, steps = correct, samples; one-way
    DONE = 11  # c→s  the worker finished its data
    FAIL = 12  # c→s  JSON {reason}: the worker failed
    ACK = 13  # s→c
    WAIT = 14  # s→c  the commit waits at a synchronous barrier; keep waiting


class Flag(enum.IntFlag):
    NONE = 0
    #: COMMIT: the worker wants the (possibly rewritten) payload back; COMMITTED: it is row 0
    REPLY = 1
    #: COMMIT: pull right after the commit; COMMITTED: the pulled center is the last row
    PULL = 2
    #: COMMIT: row 1 is the stale center θ̃_{t−τ} the payload was built on
    STALE = 4
    #: PULL: a read — the server does not move the worker's pull clock
    READ = 8
    #: any reply: the answer to a resent request, given again without a second effect
    AGAIN = 16


class DType(enum.IntEnum):
    NONE = 0
    F32 = 1
    F64 = 2
    JSON = 3


_NUMPY = {DType.F32: np.dtype("<f4"), DType.F64: np.dtype("<f8")}
_ITEMSIZE = {DType.NONE: 0, DType.F32: 4, DType.F64: 8, DType.JSON: 1}


class FrameError(ValueError):
    """A message that does not follow the wire format; the text says what is wrong."""


@dataclass(frozen=True)
class Header:
    """The typed header of one message; unused fields are 0."""

    kind: Kind
    flags: Flag = Flag.NONE
    dtype: DType = DType.NONE
    shape: tuple[int, ...] = ()
    worker: int = -1
    attempt: int = 0
    seq: int = 0
    session: int = 0
    version: int = 0
    steps: int = 0
    samples: int = 0
    position: int = 0
    value: float = 0.0
    length: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.length < 0:
            object.__setattr__(self, "length", payload_length(self.dtype, self.shape))

    def pack(self) -> bytes:
        if len(self.shape) > MAX_DIMS:
            raise FrameError(f"at most {MAX_DIMS} dimensions, got shape {self.shape}")
        dims = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        try:
            return HEADER.pack(MAGIC, int(self.kind), int(self.flags), int(self.dtype),
                               len(self.shape), self.worker, self.attempt, self.seq,
                               self.session, self.version, self.steps, self.samples,
                               self.position, self.value, *dims, self.length)
        except struct.error as exc:
            raise FrameError(f"header field out of range: {exc}") from None


def payload_length(dtype: DType, shape: tuple[int, ...]) -> int:
    if dtype == DType.NONE:
        if any(shape):
            raise FrameError(f"dtype none with a non-empty shape {shape}")
        return 0
    return math.prod(shape) * _ITEMSIZE[dtype]


def decode_header(raw: bytes | memoryview, max_length: int) -> Header:
    """Parse and validate a header; ``max_length`` bounds the payload it may announce."""
    if len(raw) != HEADER.size:
        raise FrameError(f"truncated header: {len(raw)} bytes, expected {HEADER.size}")
    (magic, kind, flags, dtype, ndim, worker, attempt, seq, session, version, steps, samples,
     position, value, d0, d1, d2, d3, length) = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (not a distgrad frame, or another "
                         f"protocol version; expected {MAGIC!r})")
    try:
        kind_ = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown message kind {kind}") from None
    try:
        dtype_ = DType(dtype)
    except ValueError:
        raise FrameError(f"unknown dtype code {dtype}") from None
    if flags & ~int(Flag.REPLY | Flag.PULL | Flag.STALE | Flag.READ | Flag.AGAIN):
        raise FrameError(f"unknown flag bits {flags:#x}")
    if ndim > MAX_DIMS:
        raise FrameError(f"rank {ndim} exceeds {MAX_DIMS}")
    dims = (d0, d1, d2, d3)
    if any(d < 0 for d in dims) or any(dims[ndim:]):
        raise FrameError(f"bad shape fields {dims} for rank {ndim}")
    shape = dims[:ndim]
    if dtype_ == DType.NONE and ndim:
        raise FrameError("dtype none with a shape")
    if not math.isfinite(value):
        raise FrameError("non-finite value field")
    if length > max_length:
        raise FrameError(f"payload of {length} bytes exceeds the limit of {max_length} bytes")
    expected = payload_length(dtype_, shape)
    if length != expected:
        raise FrameError(f"length field {length} does not match dtype {dtype_.name} and "
                         f"shape {shape} ({expected} bytes)")
    return Header(kind=kind_, flags=Flag(flags), dtype=dtype_, shape=shape, worker=worker,
                  attempt=attempt, seq=seq, session=session, version=version, steps=steps,
                  samples=samples, position=position, value=value, length=length)


def decode(parts: list[Any], max_length: int) -> tuple[Header, memoryview, bytes]:
    """Split a three-frame message into (header, payload view, mac); check their sizes.

    ``parts`` are bytes-like objects (or ZeroMQ frames with a ``buffer``).
    """
    if len(parts) != 3:
        raise FrameError(f"a message has 3 frames (header, mac, payload), got {len(parts)}")
    raw_header, raw_mac, raw_payload = (_view(p) for p in parts)
    header = decode_header(raw_header, max_length)
    if len(raw_mac) not in (0, MAC_SIZE):
        raise FrameError(f"mac of {len(raw_mac)} bytes, expected {MAC_SIZE} or none")
    if len(raw_payload) != header.length:
        what = "truncated" if len(raw_payload) < header.length else "oversized"
        raise FrameError(f"{what} payload: header announces {header.length} bytes, "
                         f"frame holds {len(raw_payload)}")
    return header, raw_payload, bytes(raw_mac)


def _view(part: Any) -> memoryview:
    buf = getattr(part, "buffer", part)
    view = memoryview(buf)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# --------------------------------------------------------------------------- payloads


def array_payload(array: np.ndarray) -> tuple[DType, tuple[int, ...], memoryview]:
    """(dtype code, shape, bytes view) of a C-contiguous float32/float64 array."""
    if array.dtype == np.float32:
        code = DType.F32
    elif array.dtype == np.float64:
        code = DType.F64
    else:
        raise FrameError(f"only float32/float64 tensors travel, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise FrameError("tensor payloads must be C-contiguous")
    return code, tuple(array.shape), memoryview(array).cast("B")


def as_array(header: Header, payload: memoryview) -> np.ndarray:
    """A read-only numpy view of a tensor payload (no copy)."""
    if header.dtype not in _NUMPY:
        raise FrameError(f"expected a tensor payload, got dtype {header.dtype.name}")
    return np.frombuffer(payload, dtype=_NUMPY[header.dtype]).reshape(header.shape)


def json_payload(obj: Any) -> bytes:
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise FrameError(f"JSON payload of {len(data)} bytes exceeds {MAX_JSON}")
    return data


def as_json(header: Header, payload: memoryview) -> dict[str, Any]:
    if header.dtype != DType.JSON:
        raise FrameError(f"expected a JSON payload, got dtype {header.dtype.name}")
    if header.length > MAX_JSON:
        raise FrameError(f"JSON payload of {header.length} bytes exceeds {MAX_JSON}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"malformed JSON payload: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"JSON payload must be an object, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- MACs


def mac(key: bytes, header: bytes, payload: memoryview | bytes, full: bool) -> bytes:
    """HMAC-SHA256 over the header (which holds the payload length), and the payload if
    ``full``."""
    h = hmac.new(key, header, hashlib.sha256)
    if full and len(payload):
        h.update(payload)
    return h.digest()


def check_mac(key: bytes, header: bytes | memoryview, payload: memoryview, tag: bytes,
              full: bool) -> None:
    if len(tag) != MAC_SIZE:
        raise FrameError("missing message authentication code")
    if not hmac.compare_digest(mac(key, bytes(header), payload, full), tag):
        raise FrameError("message authentication failed (wrong session key or altered bytes)")
