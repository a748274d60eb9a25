"""The network parameter server against real sockets: every refusal is logged, the server
keeps serving, and the center is untouched; retries and task retries apply a window once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import zmq

from distgrad.algorithms import RunInfo, get_algorithm
from distgrad.metrics.events import Recorder
from distgrad.protocol.core import ProtocolCore
from distgrad.server import ParameterServer
from distgrad.transport.client import NetClient, RemoteError, TransportError
from distgrad.transport.frames import DType, Flag, Header, Kind, array_payload, mac
from distgrad.transport.server import NetServer

SECRET = b"correct horse battery staple 123"
N = 6


class Served:
    """A NetServer over a 6-parameter center, serving in a thread."""

    def __init__(self, algorithm: str = "agn", workers: int = 2, window: int = 1,
                 totals: list[int] | None = None) -> None:
        algo = get_algorithm(algorithm)
        cfg = algo.make_config({"window": window})
        info = RunInfo(workers=workers, lr=0.1, inner_optimizer="sgd")
        self.center = torch.arange(N, dtype=torch.float32)
        self.server = ParameterServer(self.center, algo.server_rule(cfg, info), workers)
        self.recorder = Recorder()
        start = time.perf_counter()
        self.core = ProtocolCore(self.server, self.recorder, lambda: time.perf_counter() - start,
                               totals=totals)
        self.net = NetServer(self.core, SECRET, worker_timeout=3600)
        self.thread = self.net.serve_in_thread()

    def snapshot(self) -> torch.Tensor:
        return self.center.clone()

    def close(self) -> None:
        self.net.stop()
        self.thread.join(5)
        assert self.net.error is None
        self.net.close()


@pytest.fixture()
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


def client(s: Served, **kw: int) -> NetClient:
    return NetClient(s.net.address, SECRET, timeout=5, retries=1, **kw)


def raw_socket(s: Served) -> zmq.Socket:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{s.net.address}")
    return sock


def reply_of(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(5000), "the server did not answer"
    return sock.recv_multipart()


def signed(c: NetClient, header: Header, payload: bytes | memoryview = b"") -> list:
    raw = header.pack()
    return [raw, mac(c.key, raw, memoryview(payload), True), payload]


def commit_frames(c: NetClient, payload: np.ndarray, seq: int, version: int = 0,
                  position: int | None = None, samples: int = 1) -> list:
    dtype, shape, view = array_payload(payload)
    c.seq = max(c.seq, seq)  # the client's own requests continue after crafted ones
    h = Header(kind=Kind.COMMIT, dtype=dtype, shape=shape, worker=c.worker, attempt=c.attempt,
               seq=seq, session=c.session, version=version, steps=1, samples=samples,
               position=c.position + samples if position is None else position,
               flags=Flag.PULL)
    return signed(c, h, bytes(view))


def assert_still_serving(s: Served) -> None:
    with client(s, worker=1) as other:
        into = torch.empty(N)
        other.pull(into)
        torch.testing.assert_close(into, s.center)


def test_a_good_worker_pulls_and_commits(served: Served) -> None:
    with client(served) as c:
        into = torch.empty(N)
        assert c.pull(into) == 0
        torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32))
        version = c.commit(torch.ones(N), steps=1, samples=4, pull_into=into)
        assert version == 1
        torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32) + 1)
    commits = served.recorder.of_type("commit")
    assert [(e["worker"], e["version"], e["samples"]) for e in commits] == [(0, 1, 4)]


def test_wrong_secret_is_rejected_logged_and_the_server_goes_on(served, caplog):
    before = served.snapshot()
    with pytest.raises(RemoteError, match="authentication failed"):
        NetClient(served.net.address, b"not the secret but long enough", timeout=5)
    assert "authentication failed: wrong or missing shared secret" in caplog.text
    assert_still_serving(served)
    assert torch.equal(served.center, before)


def test_missing_proof_and_unknown_session_are_rejected(served, caplog):
    sock = raw_socket(served)
    hello = b'{"nonce":"' + b"00" * 32 + b'","worker":0,"attempt":null,"total":null}'
    sock.send_multipart([Header(kind=Kind.HELLO, dtype=DType.JSON,
                                shape=(len(hello),)).pack(), b"", hello])
    assert Header is not None and reply_of(sock)  # the challenge
    sock.send_multipart([Header(kind=Kind.AUTH).pack(), b"", b""])  # no proof at all
    assert b"authentication failed" in reply_of(sock)[2]
    pull = Header(kind=Kind.PULL, worker=0, session=12345).pack()
    sock.send_multipart([pull, b"\0" * 32, b""])
    assert b"unknown session" in reply_of(sock)[2]
    assert caplog.text.count("rejected") >= 2
    assert_still_serving(served)
    sock.close()


def test_truncated_and_oversized_frames_are_rejected(served, caplog):
    before = served.snapshot()
    with client(served) as c:
        c.pull(torch.empty(N))
        # a header cut short
        good = commit_frames(c, np.ones((1, N), np.float32), seq=10)
        c.sock.send_multipart([good[0][:-3], good[1], good[2]])
        assert b"truncated header" in reply_of(c.sock)[2]
        # a payload shorter than the header announces
        c.sock.send_multipart([good[0], good[1], good[2][:-4]])
        assert b"truncated payload" in reply_of(c.sock)[2]
        # a payload bigger than any commit can be (limit: 2 x the model, at least 64 KiB)
        big = np.ones((1, 20_000), np.float32)
        c.sock.send_multipart(commit_frames(c, big, seq=11))
        assert b"exceeds the limit" in reply_of(c.sock)[2]
        # a frame too many
        c.sock.send_multipart([*good, b"extra"])
        assert b"3 frames" in reply_of(c.sock)[2]
    assert "truncated header" in caplog.text and "exceeds the limit" in caplog.text
    assert torch.equal(served.center, before)
    assert_still_serving(served)


def test_a_frame_over_the_transport_limit_is_cut_unread(served, caplog):
    caplog.set_level(logging.INFO, logger="distgrad.transport")
    before = served.snapshot()
    sock = raw_socket(served)
    sock.send_multipart([b"x" * 16, b"", b"\0" * (served.net.transport_limit + 1)])
    deadline = time.monotonic() + 5
    while "transport limit" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "transport limit" in caplog.text
    assert torch.equal(served.center, before)
    assert_still_serving(served)
    sock.close()


def test_wrong_shape_dtype_and_nan_commits_are_rejected(served, caplog):
    before = served.snapshot()
    with client(served) as c:
        c.pull(torch.empty(N))
        c.sock.send_multipart(commit_frames(c, np.ones((1, N + 1), np.float32), seq=10))
        assert b"shape (1, 6)" in reply_of(c.sock)[2]
        c.sock.send_multipart(commit_frames(c, np.ones((1, N), np.float64), seq=11))
        assert b"float32" in reply_of(c.sock)[2]
        nan = np.ones((1, N), np.float32)
        nan[0, 2] = np.nan
        c.sock.send_multipart(commit_frames(c, nan, seq=12))
        assert b"non-finite" in reply_of(c.sock)[2]
        with pytest.raises(RemoteError, match="non-finite"):
            c.commit(torch.full((N,), float("inf")), steps=1, samples=1)
    assert "non-finite" in caplog.text and "shape (1, 6)" in caplog.text
    assert torch.equal(served.center, before)
    assert served.recorder.of_type("commit") == []
    assert_still_serving(served)


def test_stale_and_future_versions_are_rejected(served, caplog):
    with client(served) as c, client(served, worker=1) as other:
        c.pull(torch.empty(N))
        other.pull(torch.empty(N))
        other.commit(torch.ones(N), steps=1, samples=1, pull_into=torch.empty(N))  # v1
        c.pull(torch.empty(N))  # c now holds version 1
        before = served.snapshot()
        c.sock.send_multipart(commit_frames(c, np.ones((1, N), np.float32), seq=50, version=0))
        assert b"last pulled version 1" in reply_of(c.sock)[2]
        c.sock.send_multipart(commit_frames(c, np.ones((1, N), np.float32), seq=51, version=7))
        assert b"future version 7" in reply_of(c.sock)[2]
        # a replayed (old) sequence number
        c.sock.send_multipart(commit_frames(c, np.ones((1, N), np.float32), seq=2, version=1))
        assert b"stale sequence number" in reply_of(c.sock)[2]
        assert torch.equal(served.center, before)
    assert "future version 7" in caplog.text and "stale sequence number" in caplog.text


def test_a_forged_mac_is_rejected(served, caplog):
    with client(served) as c:
        c.pull(torch.empty(N))
        frames = commit_frames(c, np.ones((1, N), np.float32), seq=10)
        payload = bytearray(frames[2])
        payload[0] ^= 1  # altered in flight
        c.sock.send_multipart([frames[0], frames[1], bytes(payload)])
        assert b"authentication failed" in reply_of(c.sock)[2]
    assert "message authentication failed" in caplog.text
    assert served.recorder.of_type("commit") == []


def test_a_retried_commit_is_applied_once(served, caplog):
    caplog.set_level(logging.INFO, logger="distgrad.protocol")
    with client(served) as c:
        c.pull(torch.empty(N))
        frames = commit_frames(c, np.ones((1, N), np.float32), seq=10)
        c.sock.send_multipart(frames)
        first = reply_of(c.sock)
        after_once = served.snapshot()
        c.sock.send_multipart(frames)  # the same (worker, attempt, seq) again
        second = reply_of(c.sock)
    assert Header is not None and first[0][4] == second[0][4] == Kind.COMMITTED
    assert torch.equal(served.center, after_once)
    torch.testing.assert_close(after_once, torch.arange(N, dtype=torch.float32) + 1)
    assert len(served.recorder.of_type("commit")) == 1
    assert "received again; answered again, not re-applied" in caplog.text


def test_a_new_attempt_fences_the_old_one_and_resumes_at_its_position(served, caplog):
    old = client(served, worker=0)
    old.pull(torch.empty(N))
    old.commit(torch.ones(N), steps=1, samples=3, pull_into=torch.empty(N))
    old.commit(torch.ones(N), steps=1, samples=2, pull_into=torch.empty(N))
    new = client(served, worker=0)
    assert (new.attempt, new.position) == (1, 5)
    before = served.snapshot()
    with pytest.raises(RemoteError, match="not live"):
        old.commit(torch.ones(N), steps=1, samples=1, pull_into=torch.empty(N))
    assert torch.equal(served.center, before)
    with pytest.raises(RemoteError, match="stale: attempt 1 already joined"):
        client(served, worker=0, attempt=0)
    new.pull(torch.empty(N))
    new.commit(torch.ones(N), steps=1, samples=4, pull_into=torch.empty(N))
    assert served.core.slots[0].position == 9
    faults = served.recorder.of_type("fault")
    assert [(f["worker"], f["kind"]) for f in faults] == [(0, "superseded")]
    old.close()
    new.close()


def test_synchronous_round_over_the_network() -> None:
    s = Served(algorithm="averaging", workers=2, window=1)
    try:
        clients = [client(s, worker=k) for k in range(2)]
        for c in clients:
            c.pull(torch.empty(N))
        out: dict[int, torch.Tensor] = {}

        def go(k: int) -> None:
            into = torch.empty(N)
            clients[k].commit(torch.full((N,), float(k + 1)), steps=1, samples=1,
                              pull_into=into)
            out[k] = into

        threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # the mean of 1 and 2, delivered to both after the barrier
        for k in range(2):
            torch.testing.assert_close(out[k], torch.full((N,), 1.5))
        rounds = s.recorder.of_type("round")
        assert len(rounds) == 1 and sorted(rounds[0]["workers"]) == [0, 1]
        for c in clients:
            c.close()
    finally:
        s.close()


def test_done_is_checked_against_the_samples_to_process() -> None:
    s = Served(totals=[3, 3])
    try:
        with client(s, worker=0) as c:
            c.pull(torch.empty(N))
            c.commit(torch.ones(N), steps=1, samples=2, pull_into=torch.empty(N))
            with pytest.raises(RemoteError, match="done at sample 2, but has 3"):
                c.done()
            c.commit(torch.ones(N), steps=1, samples=1, pull_into=torch.empty(N))
            c.done()
        assert s.recorder.of_type("done")[0]["worker"] == 0
    finally:
        s.close()


def test_client_gives_up_when_nobody_answers() -> None:
    ctx = zmq.Context.instance()
    sink = ctx.socket(zmq.ROUTER)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(TransportError, match="no answer"):
        NetClient(f"127.0.0.1:{port}", SECRET, timeout=0.3)
    sink.close(linger=0)
