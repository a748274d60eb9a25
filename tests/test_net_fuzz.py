"""Fuzzing a live ``NetServer`` (hypothesis): arbitrary bytes before authentication and
arbitrary header fields and payloads inside an authenticated session. The server stays
up and answers an honest worker; the center is bit-identical unless a valid commit was
applied. The default profile is short; ``-m fuzz`` runs a longer one."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distgrad.transport.client import RemoteError
from distgrad.transport.frames import DType, Flag, Header, Kind
from test_net_security import rss_bytes
from test_transport import N, Served, assert_still_serving, client

LONG = os.environ.get("DISTGRAD_FUZZ") == "1"
EXAMPLES = 400 if LONG else 25
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.close()


def _send_raw(s: Served, data: bytes) -> None:
    host, port = s.net.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        try:
            sock.sendall(data)
            sock.settimeout(0.2)
            sock.recv(65536)
        except OSError:
            pass


@SETTINGS
@given(st.one_of(
    st.binary(max_size=600),
    st.builds(lambda h, rest: h + rest,
              st.builds(lambda k, d, n: Header(kind=k, dtype=d, shape=(n,) if d else ()).pack(),
                        st.sampled_from(list(Kind)), st.sampled_from(list(DType)),
                        st.integers(0, 5000)),
              st.binary(max_size=300))))
def test_bytes_before_authentication(served, data: bytes) -> None:
    before = served.snapshot()
    start = rss_bytes()
    _send_raw(served, data)
    assert served.net.error is None and served.thread.is_alive()
    assert torch.equal(served.center, before)
    assert rss_bytes() - start < 64 << 20


@pytest.mark.fuzz
def test_long_profile_is_enabled_by_the_environment() -> None:
    """``DISTGRAD_FUZZ=1 pytest -m fuzz tests/test_net_fuzz.py`` runs 400 examples each."""
    if not LONG:
        pytest.skip("set DISTGRAD_FUZZ=1 for the long profile")


i64 = st.integers(-(2**63), 2**63 - 1)


@SETTINGS
@given(kind=st.sampled_from(list(Kind)), flags=st.integers(0, 31),
       dtype=st.sampled_from([DType.NONE, DType.F32, DType.F64, DType.JSON, DType.BYTES]),
       rows=st.integers(0, 3), cols=st.sampled_from([0, 1, N - 1, N, N + 1]),
       version=i64, steps=i64, samples=i64, position=i64,
       value=st.floats(allow_nan=False, allow_infinity=False),
       fill=st.floats(width=32))
def test_fields_inside_an_authenticated_session(served, kind, flags, dtype, rows, cols,
                                                 version, steps, samples, position, value,
                                                 fill) -> None:
    before = served.snapshot()
    commits = len(served.recorder.of_type("commit"))
    with client(served, worker=0, attempt=None) as c:
        shape: tuple[int, ...] = ()
        payload = b""
        if dtype in (DType.F32, DType.F64):
            shape = (rows, cols)
            arr = np.full(shape, fill, dtype=np.float32 if dtype == DType.F32 else np.float64)
            payload = arr.tobytes()
        elif dtype != DType.NONE:
            payload = (b'{"reason":"x"}' if dtype == DType.JSON else bytes(rows * cols))
            shape = (len(payload),)
        h = Header(kind=kind, flags=Flag(flags), dtype=dtype, shape=shape, worker=c.worker,
                   attempt=c.attempt, seq=c.seq + 1, version=version, steps=steps,
                   samples=samples, position=position, value=value)
        try:
            c._send_frame(h, memoryview(payload))
            if kind != Kind.STATS:
                c._recv(2)
        except (OSError, RemoteError, TimeoutError, Exception):
            pass  # refused or dropped: both fine; what matters is below
    assert served.net.error is None and served.thread.is_alive()
    if len(served.recorder.of_type("commit")) == commits:
        assert torch.equal(served.center, before)
    else:  # a valid commit was applied: it was finite and counted once
        assert bool(torch.isfinite(served.center).all())
    assert_still_serving(served)
