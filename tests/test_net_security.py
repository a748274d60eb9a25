"""Attacks on a real ``NetServer`` on loopback, one test each: the server stays up, serves an
honest worker afterwards, its memory stays bounded and the center is untouched.

Peers "from other hosts" connect from other loopback addresses (127.0.0.2, ...), which
Linux routes to the same interface."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

from distgrad.transport.client import NetClient
from distgrad.transport.frames import (
    MAX_PREAUTH,
    TAG,
    DType,
    Flag,
    Header,
    Kind,
    json_payload,
)
from distgrad.transport.server import MAX_PENDING_PER_ADDRESS, NetServer
from test_transport import SECRET, N, Served, assert_still_serving, client


@pytest.fixture()
def served():
    s = Served()
    yield s
    s.close()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raw(s: Served, source: str = "127.0.0.1") -> socket.socket:
    host, port = s.net.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5,
                                    source_address=(source, 0))
    return sock


def unsealed(header: Header, payload: bytes) -> bytes:
    return header.pack() + bytes(TAG) + payload


def hello_bytes(body: bytes) -> bytes:
    return unsealed(Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(len(body),)), body)


def closed_by_server(sock: socket.socket, within: float = 5.0) -> bool:
    """True if the server closes ``sock`` (reading whatever it sent first)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def check_up(s: Served, before: torch.Tensor) -> None:
    assert s.net.error is None and s.thread.is_alive()
    assert_still_serving(s)
    assert torch.equal(s.center, before)


@pytest.mark.parametrize("body", [
    b'{"nonce":' + b"[" * 3000 + b"]" * 3000 + b"}",  # nested deeper than the parser's stack
    b'{"nonce":"' + b"00" * 32 + b'","worker":' + b"9" * 4000 + b"}",  # a 4000-digit int
    json.dumps({"nonce": "00" * 32, "worker": 2**63, "attempt": 2**64}).encode(),
    json.dumps({"nonce": "00" * 32, "worker": 0, "attempt": "\u00e9\u4e2d" * 600},
               ensure_ascii=False).encode(),  # non-ASCII echoed into the reason
    b"\xff\xfe" * 100,
], ids=["nested", "huge-int", "overflow", "non-ascii", "not-utf8"])
def test_malformed_hello_drops_the_peer_only(served, caplog, body) -> None:
    before = served.snapshot()
    body = body[:MAX_PREAUTH]
    sock = raw(served)
    sock.sendall(hello_bytes(body))
    assert closed_by_server(sock)
    sock.close()
    check_up(served, before)
    assert all(len(r.getMessage()) < 400 for r in caplog.records)  # log lines stay short


def test_overflowing_worker_and_attempt_in_an_authentic_session_are_refused(served) -> None:
    before = served.snapshot()
    with client(served) as c:
        c.pull(torch.empty(N))
        with pytest.raises(Exception, match="out of range"):
            c._send_frame(Header(kind=Kind.PULL, worker=c.worker, attempt=2**63, seq=9),
                          memoryview(b""))
    check_up(served, before)


def test_a_huge_message_is_refused_before_it_is_read(served) -> None:
    """The old attack: 1,500 parts of 700 KB. Now a message's size is in its first bytes:
    an unauthenticated peer announcing more than MAX_PREAUTH is dropped unread, and streaming
    1 GB at the server does not grow it."""
    before = served.snapshot()
    start = rss_bytes()
    for _ in range(3):
        sock = raw(served)
        big = Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(1_500 * 700_000,))
        sock.sendall(big.pack() + bytes(TAG))
        sent = 0
        chunk = b"\0" * (1 << 20)
        try:
            while sent < 300 * len(chunk):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # dropped: expected
        assert sent < 300 * len(chunk)
        sock.close()
    assert rss_bytes() - start < 64 << 20
    check_up(served, before)


def test_authenticated_messages_are_bounded_by_the_largest_commit(served) -> None:
    before = served.snapshot()
    with client(served) as c:
        c.pull(torch.empty(N))
        big = Header(kind=Kind.COMMIT, dtype=DType.F32, shape=(1, 10**8), worker=c.worker,
                     attempt=c.attempt, seq=5)
        c._send_frame(big.replace(shape=(1, 1)), memoryview(np.zeros(1, np.float32)))
        # (a well-formed small one first, so the next header is checked in a live session)
        c._recv(5)
        with pytest.raises(Exception):  # noqa: B017 (the server drops the connection)
            c._send_frame(big, memoryview(np.zeros(10**8, np.float32)))
            c._recv(5)
    check_up(served, before)


def test_a_peer_that_does_not_read_its_replies_is_dropped() -> None:
    """Requests sent without ever reading the answers: the server queues the replies up to a
    bound, then drops that peer; the serving thread never blocks."""
    s = Served()
    try:
        n = s.core.parameters
        c = client(s)
        c.pull(torch.empty(n))
        c.sock.settimeout(10)
        sent = 0
        try:
            for i in range(200_000):
                c._send_frame(Header(kind=Kind.PULL, worker=c.worker, attempt=c.attempt,
                                     seq=100 + i, flags=Flag.READ), memoryview(b""))
                sent += 1
        except Exception:
            pass
        deadline = time.monotonic() + 20
        while s.net.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.net.dropped >= 1 and sent > 0
        c.close()
        check_up(s, s.snapshot())
    finally:
        s.close()


def test_a_handshake_flood_from_other_addresses_does_not_keep_a_worker_out(served) -> None:
    hello = json_payload({"nonce": "11" * 32, "worker": 0, "attempt": None})
    flood = []
    try:
        for _ in range(300):
            try:
                sock = raw(served, source="127.0.0.2")
                sock.sendall(hello_bytes(hello))
                flood.append(sock)
            except OSError:
                break
        time.sleep(0.3)
        pending = [c for c in served.net.conns.values() if c.session is None]
        assert len([c for c in pending if c.address == "127.0.0.2"]) <= MAX_PENDING_PER_ADDRESS
        with client(served, worker=0) as c:  # an honest worker still joins at once
            c.pull(torch.empty(N))
    finally:
        for sock in flood:
            sock.close()


def _wrong_secret_from(s: Served, source: str) -> bytes:
    sock = raw(s, source)
    body = json_payload({"nonce": "22" * 32, "worker": None, "attempt": None})
    sock.sendall(hello_bytes(body))
    data = b""
    sock.settimeout(5)
    try:
        data = sock.recv(4096)
        if data:
            proof = json_payload({"proof": "00" * 32})
            sock.sendall(unsealed(Header(kind=Kind.AUTH, dtype=DType.JSON,
                                         shape=(len(proof),)), proof))
            data = sock.recv(4096)
    except OSError:
        data = b""
    sock.close()
    return data


def test_repeated_failed_authentications_are_rate_limited(served) -> None:
    answers = [_wrong_secret_from(served, "127.0.0.3") for _ in range(5)]
    assert b"authentication failed" in answers[0]
    assert answers[-1] == b""  # backed off: closed without an answer
    assert served.net.failures["127.0.0.3"][0] >= 3
    check_up(served, served.snapshot())  # others are not affected


def test_a_replayed_commit_from_another_connection_cannot_take_the_reply() -> None:
    """On a synchronous job, worker 0's commit waits at the barrier; its exact bytes sent
    again from another connection are refused (no session there) and the round's answer
    still reaches worker 0."""
    s = Served(algorithm="averaging", workers=2, window=1)
    try:
        clients = [client(s, worker=k) for k in range(2)]
        for c in clients:
            c.pull(torch.empty(N))
        captured: list[bytes] = []
        real = clients[0].sock.sendmsg

        def spy(buffers):
            captured.append(b"".join(bytes(b) for b in buffers))
            return real(buffers)

        clients[0].sock = _Spy(clients[0].sock, spy)
        out: dict[int, torch.Tensor] = {}

        def go(k: int) -> None:
            into = torch.empty(N)
            clients[k].commit(torch.full((N,), float(k + 1)), steps=1, samples=1,
                              pull_into=into)
            out[k] = into

        first = threading.Thread(target=go, args=(0,))
        first.start()
        deadline = time.monotonic() + 5
        while not captured and time.monotonic() < deadline:
            time.sleep(0.01)
        attacker = raw(s, "127.0.0.4")
        attacker.sendall(captured[-1])
        assert closed_by_server(attacker)
        attacker.close()
        go(1)
        first.join(10)
        torch.testing.assert_close(out[0], torch.full((N,), 1.5))
        for c in clients:
            c.close()
    finally:
        s.close()


class _Spy:
    """A socket whose sendmsg is observed."""

    def __init__(self, sock: socket.socket, sendmsg) -> None:
        self._sock, self.sendmsg = sock, sendmsg

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


@pytest.mark.parametrize("kind", [Kind.PULLED, Kind.COMMITTED, Kind.ACK])
def test_a_dropped_reply_of_each_kind_is_resent_and_answered_once(monkeypatch, kind) -> None:
    s = Served(totals=[2, 2])
    dropped: list[int] = []
    real_emit = NetServer._emit

    def lossy(self, conn, frames):
        if frames[0][4] == kind and not dropped:
            dropped.append(kind)
            return
        real_emit(self, conn, frames)

    monkeypatch.setattr(NetServer, "_emit", lossy)
    try:
        c = NetClient(s.net.address, SECRET, worker=0, timeout=0.5, retries=3)
        into = torch.empty(N)
        c.pull(into)
        c.commit(torch.ones(N), steps=1, samples=2, pull_into=into)
        c.done()
        c.close()
        assert dropped == [kind]
        assert len(s.recorder.of_type("commit")) == 1
        torch.testing.assert_close(s.center, torch.arange(N, dtype=torch.float32) + 1)
    finally:
        s.close()


def test_a_connection_cut_mid_run_is_re_established_and_the_commit_applied_once(
        monkeypatch) -> None:
    """The server applies a commit, then the connection breaks before the answer leaves:
    the worker reconnects as the same attempt, resends, and gets the cached answer."""
    s = Served(totals=[3, 3])
    real_emit = NetServer._emit
    cut: list[bool] = []

    def cutting(self, conn, frames):
        if frames[0][4] == Kind.COMMITTED and not cut:
            cut.append(True)
            conn.sock.shutdown(socket.SHUT_RDWR)
            return
        real_emit(self, conn, frames)

    monkeypatch.setattr(NetServer, "_emit", cutting)
    try:
        c = NetClient(s.net.address, SECRET, worker=0, timeout=5, retries=3)
        into = torch.empty(N)
        c.pull(into)
        c.commit(torch.ones(N), steps=1, samples=2, pull_into=into)
        assert cut and c.reconnects == 1 and c.attempt == 0
        torch.testing.assert_close(into, torch.arange(N, dtype=torch.float32) + 1)
        c.sock.shutdown(socket.SHUT_RDWR)  # and once more from the worker's side
        c.commit(torch.ones(N), steps=1, samples=1, pull_into=into)
        c.done()
        c.close()
        assert c.reconnects == 2
        assert len(s.recorder.of_type("commit")) == 2
        torch.testing.assert_close(s.center, torch.arange(N, dtype=torch.float32) + 2)
        assert s.recorder.of_type("fault") == []
    finally:
        s.close()

