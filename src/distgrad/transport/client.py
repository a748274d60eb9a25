"""The worker side of the network transport: :class:`NetClient` and :func:`run_worker`.

A client connects over TCP, authenticates (see :mod:`distgrad.transport.auth`;
retried with back-off when the server is busy or not up yet), receives the WELCOME
(its worker id, attempt, the position to resume from, and what the server chose to
send, e.g. the job), then serves the requests of a :class:`~distgrad.worker.Worker`
generator: pulls, step statistics, commits.

Retries: a request that gets no answer within ``timeout`` seconds is sent again
with the same sequence number (the server answers a repeat from its cache without
applying it twice); a connection that breaks — reset, closed, unreadable bytes — is
replaced by a new one that re-authenticates as the same worker and attempt
(``resume``), and the request is sent again on it. After ``retries`` silent tries or
``retries`` reconnections for one request the client gives up with
:class:`TransportError`. A refusal from the server raises :class:`RemoteError`
with the server's reason.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any

import numpy as np
import torch

from distgrad.algorithms.base import StepStats
from distgrad.compression import to_bytes
from distgrad.errors import ConfigError, choose
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
from distgrad.protocol.pipeline import drive_pipelined
from distgrad.transport import auth
from distgrad.transport.buffers import BufferPool
from distgrad.transport.frames import (
    HEADER,
    MAX_JSON,
    PREAMBLE,
    PROTECTIONS,
    TAG,
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
from distgrad.transport.seal import Sealer, effective
from distgrad.worker import Worker

log = logging.getLogger("distgrad.transport")

#: handshake tries (connection refused, closed or silent) before giving up, and the
#: first back-off between them in seconds (doubling, at most 5 s)
HANDSHAKE_TRIES = 6
BACKOFF = 0.2
_COUNTER_AT = struct.calcsize("<4sBBBBiqq")


class RemoteError(RuntimeError):
    """The server refused a request; the message is its reason."""


class TransportError(RuntimeError):
    """The server could not be reached or answered something unreadable."""


class _Broken(Exception):
    """This connection is unusable (closed, reset, desynchronised): make a new one."""


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
    cannot know it (Spark partitions). ``protection`` is the protection this worker
    insists on (``encrypt``, ``integrity``, ``header``); None takes the server's (which
    the handshake authenticates, so it cannot be downgraded on the way). It is the
    network's protocol :class:`~distgrad.protocol.driver.Channel` (:meth:`call`);
    :meth:`pull`, :meth:`commit` and friends build requests by hand. A pulled center is
    received (or decrypted) straight into the request's ``into``/``pull_into`` when that
    is a float32 buffer of the center's size that shares no memory with what the request
    sends (which a resend needs intact); other replies land in reused buffers, each one
    reused only once nothing refers to it (:class:`~distgrad.transport.buffers.BufferPool`).
    """

    transport_errors: tuple[type[BaseException], ...] = (TransportError,)

    def __init__(self, address: str, secret: bytes, *, worker: int | None = None,
                 attempt: int | None = None, total: int | None = None,
                 timeout: float = 60.0, retries: int = 3, protection: str | None = None
                 ) -> None:
        self.host, self.port = parse_address(address)
        self.secret = auth.check_secret(secret)
        self.timeout = float(timeout)
        self.retries = retries
        self.wanted = None if protection is None else choose("protection", protection,
                                                             PROTECTIONS)
        self.total = total
        self.seq = 0
        #: the server version of the center this worker last pulled (what a commit is built on)
        self.base_version = 0
        #: bytes of the last commit message as sent on the wire
        self.last_commit_bytes = 0
        self.reconnects = 0
        self.max_payload = MAX_JSON
        self.sock: socket.socket | None = None
        self._pool = BufferPool(keep=3)
        self.info = self._connect(worker, attempt, resume=False)
        self.worker = int(self.info["worker"])
        self.attempt = int(self.info["attempt"])
        self.position = int(self.info["position"])
        self.parameters = int(self.info["parameters"])
        self.max_payload = max(2 * self.parameters * 4, MAX_JSON)

    # ------------------------------------------------------------------ connecting
    def _connect(self, worker: int | None, attempt: int | None, resume: bool
                 ) -> dict[str, Any]:
        """Connect and authenticate, retrying with back-off while the server is
        unreachable, busy or silent; a refusal (:class:`RemoteError`) is final."""
        delay = BACKOFF
        for tries in range(1, HANDSHAKE_TRIES + 1):
            try:
                return self._handshake(worker, attempt, resume)
            except (OSError, _Broken) as exc:
                self._drop_socket()
                if tries == HANDSHAKE_TRIES:
                    raise TransportError(f"cannot authenticate with {self.host}:{self.port} "
                                         f"after {tries} tries: {clip(exc)}") from None
                log.info("handshake with %s:%d failed (%s); trying again in %.1f s",
                         self.host, self.port, clip(exc), delay)
                time.sleep(delay)
                delay = min(5.0, delay * 2)
            except BaseException:
                self._drop_socket()
                raise
        raise AssertionError("unreachable")

    def _handshake(self, worker: int | None, attempt: int | None, resume: bool
                   ) -> dict[str, Any]:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.session = sock, None
        client_nonce = auth.nonce()
        hello = json_payload({"nonce": client_nonce.hex(), "worker": worker,
                              "attempt": attempt, "total": self.total,
                              "protection": self.wanted, "resume": resume})
        self._send_frame(Header(kind=Kind.HELLO, dtype=DType.JSON, shape=(len(hello),)),
                         memoryview(hello))
        h, challenge = self._recv(self.timeout, unsealed=True)
        if h.kind == Kind.REJECT:
            raise RemoteError(f"the server refused: {clip(as_json(h, challenge).get('reason'))}")
        if h.kind != Kind.CHALLENGE:
            raise _Broken(f"expected CHALLENGE, got {h.kind.name}")
        challenge = bytes(challenge)
        body = as_json(h, challenge)
        protection = body.get("protection")
        if protection not in PROTECTIONS:
            raise _Broken(f"the server announced an unknown protection {clip(protection, 20)}")
        if self.wanted is not None and protection != self.wanted:
            raise RemoteError(f"protection mismatch: the server uses --protection "
                              f"{protection}, this worker asked for {self.wanted}")
        try:
            server_nonce = bytes.fromhex(str(body["nonce"]))
        except (KeyError, ValueError):
            raise _Broken("CHALLENGE without a valid nonce") from None
        t = auth.transcript(hello, challenge)
        proof = json_payload({"proof": auth.client_proof(self.secret, t).hex()})
        self._send_frame(Header(kind=Kind.AUTH, dtype=DType.JSON, shape=(len(proof),)),
                         memoryview(proof))
        c2s, s2c = auth.session_keys(self.secret, client_nonce, server_nonce, t)
        self.protection = str(protection)
        self.session = (Sealer(c2s), Sealer(s2c))
        try:
            h, payload = self._recv(self.timeout, refusal=True)
        except _Broken as exc:
            if "authentication" in str(exc):
                raise TransportError("the server's WELCOME is not authentic: it does not "
                                     "know the shared secret") from None
            raise
        if h.kind == Kind.REJECT:  # refused before a session exists: unsealed
            raise RemoteError(f"the server refused: {clip(as_json(h, payload).get('reason'))}")
        if h.kind != Kind.WELCOME:
            raise _Broken(f"expected WELCOME, got {h.kind.name}")
        info = as_json(h, payload)
        if info.get("proof") != auth.server_proof(self.secret, t).hex():
            raise TransportError("the server failed to prove it knows the shared secret")
        return info

    def _reconnect(self, why: str) -> None:
        self.reconnects += 1
        log.warning("worker %d: connection lost (%s); reconnecting", self.worker, clip(why))
        self._drop_socket()
        info = self._connect(self.worker, self.attempt, resume=True)
        if (int(info["worker"]), int(info["attempt"])) != (self.worker, self.attempt):
            raise TransportError("the server resumed another worker or attempt")

    def _drop_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ------------------------------------------------------------------ plumbing
    def _send_frame(self, header: Header, payload: memoryview) -> int:
        """Seal (once authenticated) and send one message; return its size on the wire."""
        assert self.sock is not None
        raw = header.pack()
        if self.session is None:
            parts: list[Any] = [raw, bytes(TAG), payload]
        else:
            send = self.session[0]
            hb = bytearray(raw)
            struct.pack_into("<Q", hb, _COUNTER_AT, send.counter)
            raw = bytes(hb)
            parts = [raw, *send.seal(raw, payload, effective(self.protection, header.dtype))]
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except OSError as exc:  # includes the timeout of a server that does not read
            raise _Broken(f"send failed: {exc}") from None
        return total

    def _read_into(self, view: memoryview, deadline: float) -> None:
        assert self.sock is not None
        got = 0
        while got < len(view):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise
            except OSError as exc:
                raise _Broken(f"receive failed: {exc}") from None
            if n == 0:
                raise _Broken("the server closed the connection")
            got += n

    def _recv(self, timeout: float, unsealed: bool = False, refusal: bool = False,
              dest: tuple[int, memoryview] | None = None) -> tuple[Header, memoryview]:
        """One message from the server (``TimeoutError`` on silence, :class:`_Broken` when
        the connection is unusable); its payload is a view of a pooled buffer.
        ``refusal``: an unsealed REJECT is expected too (the answer to AUTH). ``dest``:
        (seq, buffer) — the pulled center of the reply to request ``seq`` goes straight
        into ``buffer`` (its bytes there are only trusted once this returns)."""
        deadline = time.monotonic() + timeout
        pre = bytearray(PREAMBLE)
        self._read_into(memoryview(pre), deadline)
        raw = bytes(pre[:HEADER.size])
        try:
            h = decode_header(raw, self.max_payload)
        except FrameError as exc:
            raise _Broken(f"unreadable message from the server: {exc}") from None
        if refusal and h.kind == Kind.REJECT and not any(pre[HEADER.size:]):
            unsealed = True
        sealed = not unsealed and self.session is not None
        if sealed:
            recv = self.session[1]
            try:
                recv.check_header(raw, h.counter, memoryview(pre)[HEADER.size:])
            except FrameError as exc:
                raise _Broken(str(exc)) from None
        mode = effective(self.protection, h.dtype) if sealed else None
        need = body_size(h.length, mode)
        target = dest[1] if sealed and dest is not None and _pulled_only(h, *dest) else None
        try:
            if target is not None and mode != "encrypt":
                # the payload in clear: received where it belongs, then checked
                self._read_into(target, deadline)
                tags = memoryview(bytearray(need - h.length))
                self._read_into(tags, deadline)
                return h, recv.open(target, h.length, mode, tags=tags)
            body = memoryview(self._pool.get(need))
            self._read_into(body, deadline)
            if not sealed:
                return h, body
            out = None
            if mode == "encrypt" and h.length:
                out = target if target is not None else memoryview(self._pool.get(h.length))
            return h, recv.open(body, h.length, mode, out)
        except FrameError as exc:
            raise _Broken(str(exc)) from None

    def _call(self, header: Header, payload: memoryview, seq: int,
              into: memoryview | None = None) -> tuple[Header, memoryview]:
        """Send a request and wait for its answer: resent on silence, and on a new
        connection when this one breaks (the server answers a resent request again
        without applying it twice). ``into``: where the pulled center of the answer goes
        (see :meth:`_recv`)."""
        silent = broken = 0
        send = True
        while True:
            try:
                if self.sock is None:
                    self._reconnect("no connection")
                if send:
                    size = self._send_frame(header, payload)
                    if header.kind == Kind.COMMIT:
                        self.last_commit_bytes = size
                    send = False
                h, reply = self._recv(self.timeout, dest=None if into is None else (seq, into))
            except TimeoutError:
                silent += 1
                if silent > self.retries:
                    raise TransportError(f"no answer from the server after {silent} tries of "
                                         f"{self.timeout:g} s") from None
                log.warning("worker %d: no answer to request %d, sending it again",
                            self.worker, seq)
                send = True
                continue
            except _Broken as exc:
                broken += 1
                self._drop_socket()
                if broken > self.retries:
                    raise TransportError(f"connection to the server lost {broken} times: "
                                         f"{clip(exc)}") from None
                self._reconnect(str(exc))
                send = True
                continue
            if h.seq != seq:
                continue  # the answer to an earlier copy of a resent request
            if h.kind == Kind.REJECT:
                raise RemoteError(str(as_json(h, reply).get("reason")))
            if h.kind == Kind.WAIT:
                silent = 0
                continue
            return h, reply

    def _header(self, kind: Kind, seq: int, *, flags: Flag = Flag.NONE,
                dtype: DType = DType.NONE, shape: tuple[int, ...] = (),
                **fields: int | float) -> Header:
        return Header(kind=kind, flags=flags, dtype=dtype, shape=shape, worker=self.worker,
                      attempt=self.attempt, seq=seq, **fields)

    # ------------------------------------------------------------------ the channel
    def call(self, req: AnyRequest) -> Reply | None:
        """Carry one protocol request to the server and return its reply (the
        :class:`~distgrad.protocol.driver.Channel` of the network transport)."""
        if isinstance(req, StatsRequest):  # one-way: no answer; lost with a connection
            s = req.stats
            h = self._header(Kind.STATS, req.seq, value=float(s.loss), steps=s.correct,
                             samples=s.samples)
            try:
                if self.sock is None:
                    self._reconnect("no connection")
                self._send_frame(h, memoryview(b""))
            except _Broken as exc:
                self._drop_socket()
                log.warning("worker %d: a step report was lost (%s)", self.worker, clip(exc))
            return None
        if isinstance(req, PullRequest):
            flags = Flag.NONE if req.record else Flag.READ
            h, payload = self._call(self._header(Kind.PULL, req.seq, flags=flags),
                                    memoryview(b""), req.seq, self._into(req.into))
            if h.kind != Kind.PULLED or h.shape != (1, self.parameters):
                raise TransportError(f"bad answer to PULL: {h.kind.name} {h.shape}")
            return self._reply(req, h, pulled=torch.from_numpy(as_array(h, payload)[0]))
        if isinstance(req, CommitRequest):
            return self._commit(req)
        if isinstance(req, DoneRequest | FailRequest):
            data = b""
            if isinstance(req, FailRequest):
                data = json_payload({"reason": req.reason[-2000:]})
            kind = Kind.FAIL if isinstance(req, FailRequest) else Kind.DONE
            header = self._header(kind, req.seq, dtype=DType.JSON if data else DType.NONE,
                                  shape=(len(data),) if data else ())
            h, _ = self._call(header, memoryview(data), req.seq)
            if h.kind != Kind.ACK:
                raise TransportError(f"bad answer to {kind.name}: {h.kind.name}")
            return self._reply(req, h)
        raise TypeError(f"unknown request {req!r}")

    def _reply(self, req: AnyRequest, h: Header, **tensors: torch.Tensor | None) -> Reply:
        return Reply(req.worker, req.attempt, req.seq, h.version, h.position, **tensors,
                     duplicate=bool(h.flags & Flag.AGAIN), kind=reply_kind(req))

    def _commit_payload(self, req: CommitRequest) -> tuple[DType, tuple[int, ...], memoryview]:
        """What a commit puts on the wire: the compressed bytes of its payload when this
        worker compresses and the server takes that codec, else float32 rows."""
        enc = req.encoded
        codec = self.info.get("codec", "none")
        if (enc is not None and enc.codec == codec and codec not in ("none", "fp32")
                and list(enc.sizes) == list(self.info.get("sizes", []))):
            views = to_bytes(enc)
            if req.stale is not None:
                views.append(memoryview(req.stale.detach().contiguous().numpy()).cast("B"))
            data = self._pool.get(sum(len(v) for v in views))  # one contiguous payload
            off = 0
            for v in views:
                data[off:off + len(v)] = np.frombuffer(v, dtype=np.uint8)
                off += len(v)
            return DType.BYTES, (len(data),), memoryview(data)
        if req.stale is not None:
            n = req.payload.numel()
            rows = torch.from_numpy(self._pool.get(8 * n).view("<f4").reshape(2, n))
            array = torch.stack([req.payload.detach(), req.stale.detach()], out=rows).numpy()
        else:
            array = req.payload.detach().reshape(1, -1).numpy()
        return array_payload(array)

    def _commit(self, req: CommitRequest) -> Reply:
        flags = (Flag.REPLY if req.want_reply else Flag.NONE) | (
            Flag.PULL if req.want_pull else Flag.NONE)
        if req.stale is not None:
            flags |= Flag.STALE
        dtype, shape, view = self._commit_payload(req)
        header = self._header(Kind.COMMIT, req.seq, flags=flags, dtype=dtype, shape=shape,
                              version=req.base_version, steps=req.steps, samples=req.samples,
                              position=req.position)
        into = self._into(req.pull_into, req.payload, req.stale) if req.want_pull else None
        h, reply = self._call(header, view, req.seq, into)
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

    def _into(self, into: torch.Tensor | None, *sent: torch.Tensor | None
              ) -> memoryview | None:
        """The bytes of ``into`` when a pulled center may be written straight into it: a
        contiguous float32 CPU tensor of the center's size that shares no memory with the
        tensors the request sends (a resend after a broken reply needs them intact)."""
        if (into is None or into.dtype != torch.float32 or into.device.type != "cpu"
                or not into.is_contiguous() or into.numel() != self.parameters
                or into.requires_grad):
            return None
        lo, hi = _span(into)
        if any(t is not None and _span(t)[0] < hi and lo < _span(t)[1] for t in sent):
            return None
        return memoryview(into.numpy()).cast("B")

    def commit_wire_bytes(self, length: int) -> int:
        """Bytes a commit with a payload of ``length`` bytes puts on the wire."""
        return frame_size(length, effective(self.protection, DType.BYTES))

    # ------------------------------------------------------------------ requests by hand
    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def pull(self, into: torch.Tensor, record: bool = True) -> int:
        """Copy the center into ``into``; ``record=False`` is a read (no new pull clock)."""
        r = self.call(PullRequest(self.worker, self.attempt, self._next(), record=record,
                                  into=into))
        assert r is not None and r.pulled is not None
        if r.pulled.data_ptr() != into.data_ptr():
            into.copy_(r.pulled)
        if record:
            self.base_version = r.base_version
        return r.version

    def stats(self, stats: StepStats) -> None:
        """Report one local step (one-way: no answer)."""
        self.call(StatsRequest(self.worker, self.attempt, self._next(), stats))

    def commit(self, payload: torch.Tensor, steps: int, samples: int,
               stale: torch.Tensor | None = None, want_reply: bool = False,
               pull_into: torch.Tensor | None = None, encoded: Any = None) -> int:
        """Send a commit; write the server's reply payload into ``payload`` (if asked) and
        the pulled center into ``pull_into``; return the version the worker now holds.
        ``encoded``: ``payload``'s compressed message (it travels as the codec's bytes)."""
        position = self.position + samples
        r = self._commit(CommitRequest(
            self.worker, self.attempt, self._next(), base_version=self.base_version,
            steps=steps, samples=samples, position=position, payload=payload, stale=stale,
            want_reply=want_reply, want_pull=pull_into is not None, pull_into=pull_into,
            encoded=encoded))
        if want_reply and r.reply is not None:
            payload.copy_(r.reply)
        if pull_into is not None and r.pulled is not None \
                and r.pulled.data_ptr() != pull_into.data_ptr():
            pull_into.copy_(r.pulled)
        self.position = position
        self.base_version = r.base_version
        return r.version

    def done(self) -> None:
        self.call(DoneRequest(self.worker, self.attempt, self._next()))

    def fail(self, reason: str) -> None:
        self.call(FailRequest(self.worker, self.attempt, self._next(), reason=reason))

    def close(self) -> None:
        self._drop_socket()

    def __enter__(self) -> NetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The address range of ``t``'s whole storage (conservative for overlap tests)."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _pulled_only(h: Header, seq: int, dest: memoryview) -> bool:
    """Is ``h`` the answer to request ``seq`` whose payload is just a pulled center of
    ``dest``'s size (a PULLED, or a COMMITTED carrying the pull and no reply row)?"""
    if h.seq != seq or h.length != len(dest) or h.dtype != DType.F32:
        return False
    return h.kind == Kind.PULLED or (h.kind == Kind.COMMITTED and bool(h.flags & Flag.PULL)
                                     and not h.flags & Flag.REPLY)


def run_worker(client: NetClient, worker: Worker, pipeline: bool | None = None) -> int:
    """Serve ``worker``'s requests over ``client`` until its data is done, resuming at the
    position the server gave; return the position reached (samples committed). A failure
    is reported to the server, then re-raised. Compressed commits travel as their codec's
    bytes. ``pipeline``: commits travel while the worker computes its next window
    (:mod:`distgrad.protocol.pipeline`); None: as the job in the server's WELCOME says."""
    driver = WorkerDriver(worker, attempt=client.attempt, position=client.position)
    if pipeline is None:
        job = client.info.get("job")
        pipeline = isinstance(job, dict) and bool(job.get("pipeline", False))
    (drive_pipelined if pipeline else drive)(driver, client)
    return driver.position
