"""The worker side of the network transport: :class:`NetClient` and :func:`run_worker`.

A client authenticates (see :mod:`distgrad.transport.auth`), receives the
WELCOME (its worker id, attempt, the position to resume from, and what the
server chose to send, e.g. the job), then serves the requests of a
:class:`~distgrad.worker.Worker` generator: pulls, step statistics, commits.
A request that gets no answer within ``timeout`` seconds is sent again with the
same sequence number (the server answers a repeat without applying it twice);
after ``retries`` silent tries the client gives up with :class:`TransportError`.
A refusal from the server raises :class:`RemoteError` with the server's reason.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import zmq

from distgrad.algorithms.base import StepStats
from distgrad.errors import ConfigError
from distgrad.protocol.driver import WorkerDriver, drive
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    StatsRequest,
    reply_kind,
)
from distgrad.transport import auth
from distgrad.transport.frames import (
    MAX_JSON,
    DType,
    Flag,
    FrameError,
    Header,
    Kind,
    array_payload,
    as_array,
    as_json,
    check_mac,
    decode,
    json_payload,
    mac,
)
from distgrad.worker import Worker

log = logging.getLogger("distgrad.transport")


class RemoteError(RuntimeError):
    """The server refused a request; the message is its reason."""


class TransportError(RuntimeError):
    """The server could not be reached or answered something unreadable."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``tcp://`` prefix allowed; IPv6 as ``[::1]:PORT``)."""
    text = address.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 < number < 65536:
        raise ConfigError(f"address must be HOST:PORT, got {address!r}")
    return host, number


class NetClient:
    """One authenticated connection of one worker attempt to a :class:`NetServer`.

    ``worker``/``attempt`` None let the server choose (a free slot; the next attempt).
    ``total`` is the number of samples this worker will process, when the server
    cannot know it (Spark partitions). It is the network's protocol
    :class:`~distgrad.protocol.driver.Channel` (:meth:`call`); :meth:`pull`,
    :meth:`commit` and friends build requests by hand.
    """

    transport_errors: tuple[type[BaseException], ...] = (TransportError,)

    def __init__(self, address: str, secret: bytes, *, worker: int | None = None,
                 attempt: int | None = None, total: int | None = None,
                 timeout: float = 60.0, retries: int = 3) -> None:
        host, port = parse_address(address)
        self.secret = auth.check_secret(secret)
        self.timeout_ms = int(timeout * 1000)
        self.retries = retries
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
        self.sock.connect(f"tcp://{host}:{port}")
        self.seq = 0
        #: the server version of the center this worker last pulled (what a commit is built on)
        self.base_version = 0
        self.max_payload = MAX_JSON
        try:
            self.info = self._handshake(worker, attempt, total)
        except BaseException:
            self.close()
            raise
        self.worker = int(self.info["worker"])
        self.attempt = int(self.info["attempt"])
        self.position = int(self.info["position"])
        self.parameters = int(self.info["parameters"])
        self.full = self.info.get("integrity", "full") == "full"
        self.max_payload = max(2 * self.parameters * 4, MAX_JSON)

    # ------------------------------------------------------------------ handshake
    def _handshake(self, worker: int | None, attempt: int | None, total: int | None
                   ) -> dict[str, Any]:
        client_nonce = auth.nonce()
        hello = json_payload({"nonce": client_nonce.hex(), "worker": worker,
                              "attempt": attempt, "total": total})
        self._plain(Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(len(hello),)), hello)
        h, payload, _ = self._recv_any(self.timeout_ms)
        if h.kind == Kind.REJECT:
            raise RemoteError(str(as_json(h, payload).get("reason")))
        if h.kind != Kind.CHALLENGE:
            raise TransportError(f"expected CHALLENGE, got {h.kind.name}")
        server_nonce = bytes.fromhex(str(as_json(h, payload)["nonce"]))
        proof = auth.client_proof(self.secret, server_nonce, client_nonce,
                                  -1 if worker is None else worker,
                                  -1 if attempt is None else attempt)
        self.sock.send_multipart([Header(kind=Kind.AUTH).pack(), proof, b""])
        h, payload, tag = self._recv_any(self.timeout_ms)
        if h.kind == Kind.REJECT:
            raise RemoteError(str(as_json(h, payload).get("reason")))
        if h.kind != Kind.WELCOME:
            raise TransportError(f"expected WELCOME, got {h.kind.name}")
        self.key = auth.session_key(self.secret, client_nonce, server_nonce)
        try:
            check_mac(self.key, h.pack(), payload, tag, True)
        except FrameError:
            raise TransportError("the server's WELCOME is not authentic: it does not know "
                                 "the shared secret") from None
        body = as_json(h, payload)
        expected = auth.server_proof(self.secret, client_nonce, server_nonce).hex()
        if body.get("proof") != expected:
            raise TransportError("the server failed to prove it knows the shared secret")
        self.session = int(body["session"])
        return body

    # ------------------------------------------------------------------ plumbing
    def _plain(self, header: Header, data: bytes) -> None:
        self.sock.send_multipart([header.pack(), b"", data])

    def _recv_any(self, timeout_ms: int) -> tuple[Header, memoryview, bytes]:
        if not self.sock.poll(timeout_ms):
            raise TransportError(f"no answer from the server within {timeout_ms / 1000:g} s")
        parts = self.sock.recv_multipart(copy=False)
        try:
            return decode(parts, self.max_payload)
        except FrameError as exc:
            raise TransportError(f"unreadable message from the server: {exc}") from None

    def _frames(self, kind: Kind, seq: int, *, flags: Flag = Flag.NONE,
                array: np.ndarray | None = None, data: bytes | None = None,
                **fields: int | float) -> list[Any]:
        if array is not None:
            dtype, shape, view = array_payload(array)
        elif data is not None:
            dtype, shape, view = DType.JSON, (len(data),), memoryview(data)
        else:
            dtype, shape, view = DType.NONE, (), memoryview(b"")
        header = Header(kind=kind, flags=flags, dtype=dtype, shape=shape, worker=self.worker,
                        attempt=self.attempt, seq=seq, session=self.session, **fields)
        raw = header.pack()
        full = self.full or dtype == DType.JSON
        return [raw, mac(self.key, raw, view, full), view]

    def _call(self, frames: list[Any], seq: int) -> tuple[Header, memoryview]:
        """Send a request and wait for its answer, resending it on silence (the server
        answers a resent request again without applying it twice)."""
        tries = 0
        self.sock.send_multipart(frames, copy=False)
        while True:
            if not self.sock.poll(self.timeout_ms):
                tries += 1
                if tries > self.retries:
                    raise TransportError(f"no answer from the server after {tries} tries of "
                                         f"{self.timeout_ms / 1000:g} s")
                log.warning("worker %d: no answer to request %d, sending it again",
                            self.worker, seq)
                self.sock.send_multipart(frames, copy=False)
                continue
            parts = self.sock.recv_multipart(copy=False)
            try:
                h, payload, tag = decode(parts, self.max_payload)
                if h.kind == Kind.REJECT and not tag:
                    reason = as_json(h, payload).get("reason")
                    raise RemoteError(f"unauthenticated refusal from the server: {reason}")
                full = self.full or h.dtype == DType.JSON
                check_mac(self.key, bytes(parts[0].buffer), payload, tag, full)
            except FrameError as exc:
                raise TransportError(f"unreadable message from the server: {exc}") from None
            if h.seq != seq:
                continue  # the answer to an earlier copy of a resent request
            if h.kind == Kind.REJECT:
                raise RemoteError(str(as_json(h, payload).get("reason")))
            if h.kind == Kind.WAIT:
                tries = 0
                continue
            return h, payload

    # ------------------------------------------------------------------ the channel
    def call(self, req: AnyRequest) -> Reply | None:
        """Carry one protocol request to the server and return its reply (the
        :class:`~distgrad.protocol.driver.Channel` of the network transport)."""
        if isinstance(req, StatsRequest):  # one-way: no answer
            s = req.stats
            self.sock.send_multipart(self._frames(Kind.STATS, req.seq, value=float(s.loss),
                                                  steps=s.correct, samples=s.samples),
                                     copy=False)
            return None
        if isinstance(req, PullRequest):
            flags = Flag.NONE if req.record else Flag.READ
            h, payload = self._call(self._frames(Kind.PULL, req.seq, flags=flags), req.seq)
            if h.kind != Kind.PULLED or h.shape != (1, self.parameters):
                raise TransportError(f"bad answer to PULL: {h.kind.name} {h.shape}")
            return self._reply(req, h, pulled=torch.from_numpy(as_array(h, payload)[0]))
        if isinstance(req, CommitRequest):
            return self._commit(req)
        if isinstance(req, DoneRequest | FailRequest):
            data = (json_payload({"reason": req.reason[:2000]})
                    if isinstance(req, FailRequest) else None)
            kind = Kind.FAIL if isinstance(req, FailRequest) else Kind.DONE
            h, _ = self._call(self._frames(kind, req.seq, data=data), req.seq)
            if h.kind != Kind.ACK:
                raise TransportError(f"bad answer to {kind.name}: {h.kind.name}")
            return self._reply(req, h)
        raise TypeError(f"unknown request {req!r}")

    def _reply(self, req: AnyRequest, h: Header, **tensors: torch.Tensor | None) -> Reply:
        return Reply(req.worker, req.attempt, req.seq, h.version, h.position, **tensors,
                     duplicate=bool(h.flags & Flag.AGAIN), kind=reply_kind(req))

    def _commit(self, req: CommitRequest) -> Reply:
        flags = (Flag.REPLY if req.want_reply else Flag.NONE) | (
            Flag.PULL if req.want_pull else Flag.NONE)
        if req.stale is not None:
            flags |= Flag.STALE
            array = torch.stack([req.payload, req.stale]).numpy()
        else:
            array = req.payload.detach().reshape(1, -1).numpy()
        frames = self._frames(Kind.COMMIT, req.seq, flags=flags, array=array,
                              version=req.base_version, steps=req.steps, samples=req.samples,
                              position=req.position)
        h, reply = self._call(frames, req.seq)
        if h.kind != Kind.COMMITTED:
            raise TransportError(f"bad answer to COMMIT: {h.kind.name}")
        rows = as_array(h, reply) if h.dtype == DType.F32 else np.empty((0, self.parameters))
        expected = int(bool(h.flags & Flag.REPLY)) + int(bool(h.flags & Flag.PULL))
        if rows.shape != (expected, self.parameters):
            raise TransportError(f"COMMITTED holds shape {rows.shape}, expected "
                                 f"({expected}, {self.parameters})")
        if req.want_pull and not h.flags & Flag.PULL:
            raise TransportError("the server did not send the pulled center")
        return self._reply(
            req, h, reply=torch.from_numpy(rows[0]) if h.flags & Flag.REPLY else None,
            pulled=torch.from_numpy(rows[-1]) if h.flags & Flag.PULL else None)

    # ------------------------------------------------------------------ requests by hand
    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def pull(self, into: torch.Tensor, record: bool = True) -> int:
        """Copy the center into ``into``; ``record=False`` is a read (no new pull clock)."""
        r = self.call(PullRequest(self.worker, self.attempt, self._next(), record=record))
        assert r is not None and r.pulled is not None
        into.copy_(r.pulled)
        if record:
            self.base_version = r.base_version
        return r.version

    def stats(self, stats: StepStats) -> None:
        """Report one local step (one-way: no answer)."""
        self.call(StatsRequest(self.worker, self.attempt, self._next(), stats))

    def commit(self, payload: torch.Tensor, steps: int, samples: int,
               stale: torch.Tensor | None = None, want_reply: bool = False,
               pull_into: torch.Tensor | None = None) -> int:
        """Send a commit; write the server's reply payload into ``payload`` (if asked) and
        the pulled center into ``pull_into``; return the version the worker now holds."""
        position = self.position + samples
        r = self._commit(CommitRequest(
            self.worker, self.attempt, self._next(), base_version=self.base_version,
            steps=steps, samples=samples, position=position, payload=payload, stale=stale,
            want_reply=want_reply, want_pull=pull_into is not None))
        if want_reply and r.reply is not None:
            payload.copy_(r.reply)
        if pull_into is not None and r.pulled is not None:
            pull_into.copy_(r.pulled)
        self.position = position
        self.base_version = r.base_version
        return r.version

    def done(self) -> None:
        self.call(DoneRequest(self.worker, self.attempt, self._next()))

    def fail(self, reason: str) -> None:
        self.call(FailRequest(self.worker, self.attempt, self._next(), reason=reason))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> NetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_worker(client: NetClient, worker: Worker) -> int:
    """Serve ``worker``'s requests over ``client`` until its data is done, resuming at the
    position the server gave; return the position reached (samples committed). A failure
    is reported to the server, then re-raised."""
    driver = WorkerDriver(worker, attempt=client.attempt, position=client.position)
    drive(driver, client)
    return driver.position
