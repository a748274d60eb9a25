"""The network parameter server against real sockets: every refusal is logged, the server
keeps serving, and the center is untouched; retries and task retries apply a window once."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from distgrad.algorithms import RunInfo, get_algorithm
from distgrad.errors import ConfigError
from distgrad.metrics.events import Recorder
from distgrad.protocol.core import ProtocolCore
from distgrad.server import ParameterServer
from distgrad.transport import client as client_module
from distgrad.transport.client import NetClient, RemoteError, TransportError
from distgrad.transport.frames import Flag, Header, Kind, array_payload
from distgrad.transport.server import NetServer

SECRET = b"correct horse battery staple 123"
N = 6


class Served:
    """A NetServer over a 6-parameter center, serving in a thread."""

    def __init__(self, algorithm: str = "agn", workers: int = 2, window: int = 1,
                 totals: list[int] | None = None, **net_kw) -> None:
        algo = get_algorithm(algorithm)
        cfg = algo.make_config({"window": window})
        info = RunInfo(workers=workers, lr=0.1, inner_optimizer="sgd")
        self.center = torch.arange(N, dtype=torch.float32)
        self.server = ParameterServer(self.center, algo.server_rule(cfg, info), workers)
        self.recorder = Recorder()
        start = time.perf_counter()
        self.core = ProtocolCore(self.server, self.recorder, lambda: time.perf_counter() - start,
                                 totals=totals)
        self.net = NetServer(self.core, SECRET, worker_timeout=3600, **net_kw)
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


def client(s: Served, **kw) -> NetClient:
    return NetClient(s.net.address, SECRET, timeout=5, retries=1, **kw)


def send(c: NetClient, header: Header, payload: bytes | memoryview = b"") -> None:
    """A crafted message, sealed under the client's own session (so it is authentic)."""
    c._send_frame(header, memoryview(payload))


def reply_of(c: NetClient) -> tuple[Header, bytes]:
    h, payload = c._recv(5)
    return h, bytes(payload)


def commit_header(c: NetClient, payload: np.ndarray, seq: int, version: int = 0,
                  position: int | None = None, samples: int = 1) -> tuple[Header, bytes]:
    dtype, shape, view = array_payload(payload)
    c.seq = max(c.seq, seq)  # the client's own requests continue after crafted ones
    h = Header(kind=Kind.COMMIT, dtype=dtype, shape=shape, worker=c.worker, attempt=c.attempt,
               seq=seq, version=version, steps=1, samples=samples,
               position=c.position + samples if position is None else position,
               flags=Flag.PULL)
    return h, bytes(view)


def assert_still_serving(s: Served) -> None:
    with client(s, worker=1) as other:
        into = torch.empty(N)
        other.pull(into)
        torch.testing.assert_close(into, s.center)


@pytest.mark.parametrize("protection", ["encrypt", "integrity", "header"])
def test_a_good_worker_pulls_and_commits(protection: str) -> None:
    s = Served(protection=protection)
    try:
        with client(s, protection=protection) as c:
            into = torch.empty(N)
            assert c.pull(into) == 0
            torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32))
            version = c.commit(torch.ones(N), steps=1, samples=4, pull_into=into)
            assert version == 1
            torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32) + 1)
        commits = s.recorder.of_type("commit")
        assert [(e["worker"], e["version"], e["samples"]) for e in commits] == [(0, 1, 4)]
    finally:
        s.close()


def test_protection_mismatch_is_refused_with_both_names(caplog) -> None:
    s = Served(protection="integrity")
    try:
        with pytest.raises(RemoteError, match="uses --protection integrity, the worker asked "
                                              "for encrypt"):
            client(s, protection="encrypt")
        with client(s) as c:  # None: take the server's (authenticated) choice
            assert c.protection == "integrity"
    finally:
        s.close()


def test_weak_secrets_are_refused_with_the_reason_and_a_remedy() -> None:
    from distgrad.transport.auth import check_secret

    for weak, why in ((b"\0" * 16, "too repetitive"), (b"short", "too short"),
                      (b"abababababababababababab", "too repetitive"),
                      (b"aaaaaaaabcdefghaaaaaaaaa", "too guessable")):
        with pytest.raises(ConfigError, match=why) as info:
            check_secret(weak)
        assert "secrets.token_hex(32)" in str(info.value)
    assert check_secret(SECRET) == SECRET


def test_wrong_secret_is_rejected_logged_and_the_server_goes_on(served, caplog):
    before = served.snapshot()
    with pytest.raises(RemoteError, match="authentication failed"):
        NetClient(served.net.address, b"not the secret but long enough", timeout=5)
    assert "authentication failed: wrong or missing shared secret" in caplog.text
    assert_still_serving(served)
    assert torch.equal(served.center, before)


def test_wrong_shape_dtype_and_nan_commits_are_rejected(served, caplog):
    before = served.snapshot()
    with client(served) as c:
        c.pull(torch.empty(N))
        send(c, *commit_header(c, np.ones((1, N + 1), np.float32), seq=10))
        assert b"shape (1, 6)" in reply_of(c)[1]
        send(c, *commit_header(c, np.ones((1, N), np.float64), seq=11))
        assert b"float32" in reply_of(c)[1]
        nan = np.ones((1, N), np.float32)
        nan[0, 2] = np.nan
        send(c, *commit_header(c, nan, seq=12))
        assert b"non-finite" in reply_of(c)[1]
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
        send(c, *commit_header(c, np.ones((1, N), np.float32), seq=50, version=0))
        assert b"last pulled version 1" in reply_of(c)[1]
        send(c, *commit_header(c, np.ones((1, N), np.float32), seq=51, version=7))
        assert b"future version 7" in reply_of(c)[1]
        # a replayed (old) sequence number
        send(c, *commit_header(c, np.ones((1, N), np.float32), seq=2, version=1))
        assert b"stale sequence number" in reply_of(c)[1]
        assert torch.equal(served.center, before)
    assert "future version 7" in caplog.text and "stale sequence number" in caplog.text


def test_a_retried_commit_is_applied_once(served, caplog):
    caplog.set_level(logging.INFO, logger="distgrad.protocol")
    with client(served) as c:
        c.pull(torch.empty(N))
        frames = commit_header(c, np.ones((1, N), np.float32), seq=10)
        send(c, *frames)
        first = reply_of(c)
        after_once = served.snapshot()
        send(c, *frames)  # the same (worker, attempt, seq) again
        second = reply_of(c)
    assert first[0].kind == second[0].kind == Kind.COMMITTED
    assert second[0].flags & Flag.AGAIN and first[1] == second[1]
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


def test_client_gives_up_when_nobody_answers(monkeypatch) -> None:
    """A listener that accepts and never answers: the handshake is tried a bounded number
    of times, with back-off, then the client gives up."""
    monkeypatch.setattr(client_module, "HANDSHAKE_TRIES", 2)
    monkeypatch.setattr(client_module, "BACKOFF", 0.05)
    sink = socket.create_server(("127.0.0.1", 0))
    try:
        port = sink.getsockname()[1]
        with pytest.raises(TransportError, match="after 2 tries"):
            NetClient(f"127.0.0.1:{port}", SECRET, timeout=0.3)
    finally:
        sink.close()


def test_the_handshake_is_retried_until_the_server_is_up(monkeypatch) -> None:
    """A worker started before its server connects once the server listens."""
    monkeypatch.setattr(client_module, "BACKOFF", 0.1)
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    holder: dict = {}

    def start_later() -> None:
        time.sleep(0.4)
        holder["s"] = Served(port=port)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with NetClient(f"127.0.0.1:{port}", SECRET, timeout=5) as c:
            c.pull(torch.empty(N))
    finally:
        t.join(10)
        if "s" in holder:
            holder["s"].close()


def test_json_header_and_type_codes_are_checked(served) -> None:
    with client(served) as c:
        c.pull(torch.empty(N))
        send(c, Header(kind=Kind.PULLED, worker=c.worker, attempt=c.attempt, seq=20))
        h, body = reply_of(c)
        assert h.kind == Kind.REJECT and b"unexpected PULLED" in body


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_a_compressed_commit_is_its_codec_bytes_plus_a_fixed_preamble(codec: str) -> None:
    """On the wire a commit is the codec's bytes + the preamble + one tag per chunk, and the
    server applies exactly the values the worker's compressor says it will."""
    from distgrad.compression import Compressor, payload_bytes
    from distgrad.transport.frames import frame_size

    sizes = [2, 4]
    s = Served(codec=codec, sizes=sizes)
    try:
        with client(s) as c:
            c.pull(torch.empty(N))
            payload = torch.tensor([0.1, -0.2, 0.3, 1e-3, 2.5, -7.0])
            # payload now holds the decoded values
            enc = Compressor(codec, sizes, error_feedback=False).compress(payload)
            c.commit(payload, steps=1, samples=1, pull_into=torch.empty(N), encoded=enc)
            wire = frame_size(payload_bytes(codec, N, len(sizes)), "encrypt")
            assert c.last_commit_bytes == s.net.last_commit_bytes == wire
            assert s.recorder.of_type("commit")[0]["bytes"] == wire
            assert torch.equal(s.center, torch.arange(N, dtype=torch.float32) + payload)
    finally:
        s.close()


def test_a_pooled_buffer_is_reused_only_once_nothing_refers_to_it() -> None:
    from distgrad.transport.buffers import BufferPool

    pool = BufferPool(keep=2)
    a, b = pool.get(64), pool.get(64)
    assert pool.allocations == 2
    del a
    c = pool.get(48)  # a's buffer is free again
    assert pool.allocations == 2
    tensor = torch.from_numpy(c.view("<f4"))  # a tensor over it keeps it busy
    view = memoryview(b)  # so does a memoryview (a queued send)
    del b, c
    pool.get(16)
    assert pool.allocations == 3
    del tensor, view
    big = pool.get(128)  # a free buffer too small is replaced, not kept beside
    assert pool.allocations == 4 and big.nbytes == 128
    del big
    pool.get(100)
    assert pool.allocations == 4


@pytest.mark.parametrize("protection", ["encrypt", "integrity", "header"])
def test_the_pulled_center_lands_straight_in_the_workers_buffer(protection: str) -> None:
    from distgrad.protocol.messages import CommitRequest, PullRequest

    s = Served(protection=protection)
    try:
        with client(s, protection=protection) as c:
            into = torch.empty(N)
            r = c.call(PullRequest(c.worker, c.attempt, 1, into=into))
            assert r is not None and r.pulled is not None
            assert r.pulled.data_ptr() == into.data_ptr()
            torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32))
            payload = torch.ones(N)
            r = c.call(CommitRequest(c.worker, c.attempt, 2, base_version=0, steps=1,
                                     samples=1, position=1, payload=payload, want_pull=True,
                                     pull_into=into))
            assert r is not None and r.pulled is not None
            assert r.pulled.data_ptr() == into.data_ptr()
            torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32) + 1)
            # a buffer that shares memory with what the request sends is not written
            # until the reply is complete (a resend would need the payload intact)
            r = c.call(CommitRequest(c.worker, c.attempt, 3, base_version=1, steps=1,
                                     samples=1, position=2, payload=payload, want_pull=True,
                                     pull_into=payload))
            assert r is not None and r.pulled is not None
            assert r.pulled.data_ptr() != payload.data_ptr()
            torch.testing.assert_close(r.pulled, torch.arange(N, dtype=torch.float32) + 2)
            assert c._into(torch.empty(N + 1)) is None and c._into(torch.empty(N)) is not None
    finally:
        s.close()


def test_a_cached_reply_keeps_its_payload_while_later_messages_arrive() -> None:
    """The server receives commits straight into reused buffers: the payload the core keeps
    as a cached reply (AEASGD rewrites it into the elastic difference) is never
    overwritten by the messages that follow, so a resend gets the same answer."""
    s = Served(algorithm="aeasgd", workers=2, window=1, protection="header")
    try:
        with client(s, worker=0) as c:
            c.pull(torch.empty(N))
            h, body = commit_header(c, np.full((1, N), 10.0, np.float32), seq=10)
            h = h.replace(flags=Flag.REPLY)
            send(c, h, body)
            first = reply_of(c)
            assert first[0].kind == Kind.COMMITTED and first[0].flags & Flag.REPLY
            for seq in (12, 13):  # refused requests, received meanwhile
                send(c, *commit_header(c, np.full((1, N), 1e3, np.float32), seq=seq))
                assert reply_of(c)[0].kind == Kind.REJECT
            send(c, h, body)  # the first commit again
            again = reply_of(c)
        assert again[0].flags & Flag.AGAIN and again[1] == first[1]
    finally:
        s.close()
