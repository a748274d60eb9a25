"""The wire format: round trips, and a decoder that refuses garbage with FrameError only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distgrad.transport.frames import (
    HEADER,
    MAGIC,
    MAX_PREAUTH,
    DType,
    Flag,
    FrameError,
    Header,
    Kind,
    array_payload,
    as_array,
    as_json,
    body_size,
    clip,
    decode_header,
    frame_size,
    json_payload,
)

LIMIT = 1 << 16

i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    dtype = draw(st.sampled_from(list(DType)))
    if dtype == DType.NONE:
        shape: tuple[int, ...] = ()
    else:
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    return Header(kind=draw(st.sampled_from(list(Kind))),
                  flags=Flag(draw(st.integers(0, 7))), dtype=dtype, shape=shape,
                  worker=draw(i32), attempt=draw(i64), seq=draw(i64), counter=draw(u64),
                  version=draw(i64), steps=draw(i64), samples=draw(i64), position=draw(i64),
                  value=draw(st.floats(allow_nan=False, allow_infinity=False)))


@given(headers())
def test_header_round_trip(h: Header) -> None:
    assert decode_header(h.pack(), max_length=10**9) == h


@given(headers(), st.data())
def test_every_truncation_of_a_header_is_refused(h: Header, data: st.DataObject) -> None:
    raw = h.pack()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(FrameError, match="truncated header"):
        decode_header(raw[:cut], max_length=10**9)


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=HEADER.size + 8))
def test_arbitrary_bytes_raise_frame_error_or_decode(raw: bytes) -> None:
    try:
        h = decode_header(raw, max_length=LIMIT)
    except FrameError:
        return
    assert h.length <= LIMIT
    assert decode_header(h.pack(), max_length=LIMIT) == h


@settings(max_examples=300)
@given(st.binary(min_size=HEADER.size - 4, max_size=HEADER.size - 4))
def test_arbitrary_headers_after_the_magic_never_crash(body: bytes) -> None:
    """A header with the right magic and random fields: decoded consistently or refused."""
    try:
        h = decode_header(MAGIC + body, max_length=LIMIT)
    except FrameError:
        return
    assert h.length <= LIMIT and body_size(h.length, "encrypt") >= h.length


def test_frame_sizes_are_the_payload_plus_a_fixed_preamble_and_chunk_tags() -> None:
    from distgrad.transport.frames import CHUNK, PREAMBLE, TAG

    assert frame_size(0, "encrypt") == PREAMBLE
    assert frame_size(10, None) == frame_size(10, "header") == PREAMBLE + 10
    assert frame_size(CHUNK, "integrity") == PREAMBLE + CHUNK + TAG
    assert frame_size(CHUNK + 1, "encrypt") == PREAMBLE + CHUNK + 1 + 2 * TAG
    assert MAX_PREAUTH < LIMIT


def test_clip_makes_any_text_short_printable_ascii() -> None:
    s = clip("\u00e9\u4e2d\x00" * 500)
    assert len(s) <= 200 and s.isascii() and s.isprintable()


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_tensor_payload_round_trip(values: list[float]) -> None:
    arr = np.asarray(values, dtype=np.float32).reshape(1, -1)
    dtype, shape, view = array_payload(arr)
    h = decode_header(Header(kind=Kind.COMMIT, dtype=dtype, shape=shape).pack(), LIMIT)
    np.testing.assert_array_equal(as_array(h, bytes(view)), arr)


def test_specific_refusals_name_the_problem() -> None:
    good = Header(kind=Kind.COMMIT, dtype=DType.F32, shape=(1, 4)).pack()
    with pytest.raises(FrameError, match="bad magic"):
        decode_header(b"XXXX" + good[4:], LIMIT)
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_header(Header(kind=Kind.COMMIT, dtype=DType.F32, shape=(1, LIMIT)).pack(), LIMIT)
    forged = bytearray(good)
    forged[-8:] = (17).to_bytes(8, "little")  # length no longer matches the shape
    with pytest.raises(FrameError, match="does not match"):
        decode_header(bytes(forged), LIMIT)
    with pytest.raises(FrameError, match="only float32/float64"):
        array_payload(np.zeros(3, dtype=np.int64))


def test_json_payloads_are_objects_of_bounded_size() -> None:
    data = json_payload({"a": 1})
    h = Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(len(data),))
    assert as_json(h, memoryview(data)) == {"a": 1}
    bad = b"[1, 2]"
    with pytest.raises(FrameError, match="must be an object"):
        as_json(Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(len(bad),)), memoryview(bad))
    for bad in (b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'{"a":' + b"9" * 5000 + b"}"):
        with pytest.raises(FrameError, match="malformed JSON"):
            as_json(Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(len(bad),)),
                    memoryview(bad))


@given(st.lists(st.floats(width=32), min_size=1, max_size=40))
def test_all_finite_agrees_with_the_elementwise_check(values: list[float]) -> None:
    import torch

    from distgrad.protocol.core import all_finite

    t = torch.tensor(values, dtype=torch.float32)
    assert all_finite(t) == bool(torch.isfinite(t).all())


def test_all_finite_is_not_fooled_by_an_overflowing_sum() -> None:
    import torch

    from distgrad.protocol.core import all_finite

    assert all_finite(torch.full((10,), 3.4e38))
    assert not all_finite(torch.tensor([1.0, float("inf"), float("-inf")]))
