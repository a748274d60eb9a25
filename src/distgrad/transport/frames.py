"""Wire format: a fixed typed header, a header tag, and a sealed body. No pickle, ever.

Messages travel over one TCP connection as a byte stream; each message is::

    header (HEADER.size bytes) | header tag (16 bytes) | body (body_size(length) bytes)

The header is a little-endian C struct (:data:`HEADER`) with the message kind,
flags, worker id, attempt, sequence number, the sender's message counter, version,
commit counters, payload dtype, shape and the payload's byte length. Because the
size of everything that follows is in the fixed-size header, a receiver knows a
message's size before it reads (and allocates) anything more, and refuses it
unread if it is over its limit for that peer (a few KiB before authentication).
The body is the payload plus, in the ``encrypt`` and ``integrity`` protection
modes, one 16-byte AEAD tag per :data:`CHUNK` bytes of payload (see
:mod:`distgrad.transport.seal`). Before authentication the header tag is zeros
and the body is the bare payload.

Payloads are raw float32/float64 arrays (row-major, the shape in the header), raw
bytes (a compressed commit), or UTF-8 JSON. :func:`decode_header` checks everything
a peer could get wrong — magic, protocol version, kind, dtype, rank, dims, that the
length matches the shape and is under the receiver's limit — and raises
:class:`FrameError` naming the problem. It never raises anything else on any input
(a property test feeds it arbitrary bytes); neither does :func:`as_json`.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"DGT2"
#: bytes of the header tag, and of each chunk tag (AES-GCM's tag size)
TAG = 16
MAX_DIMS = 4
#: payload bytes sealed under one chunk tag (chunks are sealed on a thread pool)
CHUNK = 1 << 20
#: JSON payloads (welcome with the job, errors) are small; anything bigger is refused
MAX_JSON = 1 << 20
#: the largest message a peer may send before it authenticated (HELLO, AUTH)
MAX_PREAUTH = 4096
#: the most a refusal reason or a logged peer string may hold (characters)
MAX_REASON = 200

#: magic, kind, flags, dtype, ndim, worker, attempt, seq, counter, version, steps, samples,
#: position, value, shape[4], length
HEADER = struct.Struct("<4sBBBBiqqQqqqqd4qQ")
PREAMBLE = HEADER.size + TAG


class Kind(enum.IntEnum):
    """Message kinds. c→s: requests from a worker; s→c: the server's replies."""

    HELLO = 1  # c→s  JSON {nonce, worker, attempt, total, protection, resume}; unsealed
    CHALLENGE = 2  # s→c  JSON {nonce}; unsealed
    AUTH = 3  # c→s  JSON {proof}; unsealed
    WELCOME = 4  # s→c  JSON {proof, worker, attempt, position, parameters, job, ...}; sealed
    REJECT = 5  # s→c  JSON {reason}; sealed after authentication
    PULL = 6  # c→s  no payload
    PULLED = 7  # s→c  float32 (1, n): the center; version = its version
    COMMIT = 8  # c→s  float32 (rows, n): payload [, stale center]; or BYTES (compressed)
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
    #: COMMIT: the stale center θ̃_{t−τ} the payload was built on follows the payload
    STALE = 4
    #: PULL: a read — the server does not move the worker's pull clock
    READ = 8
    #: any reply: the answer to a resent request, given again without a second effect
    AGAIN = 16


_FLAGS = int(Flag.REPLY | Flag.PULL | Flag.STALE | Flag.READ | Flag.AGAIN)


class DType(enum.IntEnum):
    NONE = 0
    F32 = 1
    F64 = 2
    JSON = 3
    #: raw bytes (a compressed commit in the job's codec, see :mod:`distgrad.compression`)
    BYTES = 4


_NUMPY = {DType.F32: np.dtype("<f4"), DType.F64: np.dtype("<f8")}
_ITEMSIZE = {DType.NONE: 0, DType.F32: 4, DType.F64: 8, DType.JSON: 1, DType.BYTES: 1}
#: protection modes: encrypt (AES-256-GCM over every byte), integrity (GMAC over every byte,
#: payload in clear), header (GMAC over the header only)
PROTECTIONS = ("encrypt", "integrity", "header")


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
    counter: int = 0
    version: int = 0
    steps: int = 0
    samples: int = 0
    position: int = 0
    value: float = 0.0
    length: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.length < 0:
            object.__setattr__(self, "length", payload_length(self.dtype, self.shape))

    def replace(self, **changes: Any) -> Header:
        """A copy with ``changes`` (the length is recomputed when dtype or shape change)."""
        fields = {**self.__dict__, **changes}
        if ("dtype" in changes or "shape" in changes) and "length" not in changes:
            fields["length"] = -1
        return Header(**fields)

    def pack(self) -> bytes:
        if len(self.shape) > MAX_DIMS:
            raise FrameError(f"at most {MAX_DIMS} dimensions, got shape {self.shape}")
        dims = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        try:
            return HEADER.pack(MAGIC, int(self.kind), int(self.flags), int(self.dtype),
                               len(self.shape), self.worker, self.attempt, self.seq,
                               self.counter, self.version, self.steps, self.samples,
                               self.position, self.value, *dims, self.length)
        except struct.error as exc:
            raise FrameError(f"header field out of range: {exc}") from None


def payload_length(dtype: DType, shape: tuple[int, ...]) -> int:
    if dtype == DType.NONE:
        if any(shape):
            raise FrameError(f"dtype none with a non-empty shape {shape}")
        return 0
    return math.prod(shape) * _ITEMSIZE[dtype]


def chunks(length: int) -> int:
    """How many chunk tags seal a payload of ``length`` bytes."""
    return -(-length // CHUNK)


def body_size(length: int, protection: str | None) -> int:
    """Bytes that follow the preamble for a payload of ``length`` bytes (``None``: an
    unsealed message of the handshake)."""
    if protection in ("encrypt", "integrity"):
        return length + TAG * chunks(length)
    return length


def frame_size(length: int, protection: str | None) -> int:
    """All bytes one message with a payload of ``length`` bytes puts on the wire."""
    return PREAMBLE + body_size(length, protection)


def decode_header(raw: bytes | memoryview, max_length: int) -> Header:
    """Parse and validate a header; ``max_length`` bounds the payload it may announce."""
    if len(raw) != HEADER.size:
        raise FrameError(f"truncated header: {len(raw)} bytes, expected {HEADER.size}")
    (magic, kind, flags, dtype, ndim, worker, attempt, seq, counter, version, steps, samples,
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
    if flags & ~_FLAGS:
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
                  attempt=attempt, seq=seq, counter=counter, version=version, steps=steps,
                  samples=samples, position=position, value=value, length=length)


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


def as_array(header: Header, payload: Any) -> np.ndarray:
    """A numpy view of a tensor payload (no copy)."""
    if header.dtype not in _NUMPY:
        raise FrameError(f"expected a tensor payload, got dtype {header.dtype.name}")
    return np.frombuffer(payload, dtype=_NUMPY[header.dtype]).reshape(header.shape)


def json_payload(obj: Any) -> bytes:
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise FrameError(f"JSON payload of {len(data)} bytes exceeds {MAX_JSON}")
    return data


def as_json(header: Header, payload: Any) -> dict[str, Any]:
    """The JSON object of a payload; anything malformed — bad UTF-8, bad JSON, nesting
    deep enough to exhaust the parser's recursion, integers too long to convert — raises
    :class:`FrameError`."""
    if header.dtype != DType.JSON:
        raise FrameError(f"expected a JSON payload, got dtype {header.dtype.name}")
    if header.length > MAX_JSON:
        raise FrameError(f"JSON payload of {header.length} bytes exceeds {MAX_JSON}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"malformed JSON payload: {clip(exc)}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"JSON payload must be an object, got {type(obj).__name__}")
    return obj


def clip(text: object, limit: int = MAX_REASON) -> str:
    """``text`` as printable ASCII of at most ``limit`` characters (for logs and refusals:
    a peer's bytes never make a log line long or unencodable)."""
    s = ascii(str(text))[1:-1]
    return s if len(s) <= limit else s[: limit - 3] + "..."
