"""The network parameter server: a ZeroMQ ROUTER socket in front of a :class:`ProtocolCore`.

One thread runs :meth:`NetServer.serve` and handles one message at a time, so
commits reach ``ParameterServer`` one at a time, in arrival order. Replies to
commits waiting at a synchronous barrier are sent when the round completes (a
ROUTER can answer any peer at any time). Every refused message is logged on the
``distgrad.transport`` logger with the peer and the reason; authenticated
peers also get the reason back. Nothing from the network is unpickled: frames
are decoded by :mod:`distgrad.transport.frames`.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq

from distgrad.algorithms.base import StepStats
from distgrad.errors import ConfigError, choose
from distgrad.protocol.core import ProtocolCore, Rejected
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    StatsRequest,
)
from distgrad.transport import auth
from distgrad.transport.frames import (
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

log = logging.getLogger("distgrad.transport")

#: payload limit for tiny models (JSON hello/fail messages must fit)
MIN_LIMIT = 64 * 1024
#: unauthenticated handshakes kept at once (older ones are dropped)
MAX_PENDING = 256
PENDING_TTL = 30.0
#: the message kind that carries each kind of reply
_REPLY_KIND = {"pull": Kind.PULLED, "read": Kind.PULLED, "commit": Kind.COMMITTED,
               "done": Kind.ACK, "fail": Kind.ACK}


@dataclass
class _Session:
    key: bytes
    worker: int
    attempt: int
    peer: bytes


@dataclass
class _Pending:
    client_nonce: bytes
    server_nonce: bytes
    worker: int | None
    attempt: int | None
    total: int | None
    created: float


class NetServer:
    """Serves a :class:`ProtocolCore` over TCP.

    ``bind`` is the interface to listen on (``127.0.0.1`` by default; ``0.0.0.0``
    for other hosts), ``port`` 0 lets the OS choose, ``advertise`` is the host name
    workers should use (default: the bind address, or this host's name when binding
    all interfaces). ``welcome`` is extra JSON sent to each worker after it
    authenticated (the job description). ``integrity="full"`` MACs payloads as
    well as headers; ``"header"`` only headers (faster; a peer must still hold the
    session key to send anything).
    """

    def __init__(self, core: ProtocolCore, secret: bytes, *, bind: str = "127.0.0.1",
                 port: int = 0, advertise: str | None = None, integrity: str = "full",
                 welcome: dict[str, Any] | None = None, worker_timeout: float = 120.0) -> None:
        self.core = core
        self.secret = auth.check_secret(secret)
        self.integrity = choose("integrity", integrity, auth.INTEGRITY)
        self.full = integrity == "full"
        self.welcome = dict(welcome or {})
        json_payload(self.welcome)  # fail now if it is not JSON or too big
        self.worker_timeout = worker_timeout
        n = core.parameters
        #: the biggest payload any peer may send: a commit with its stale center
        self.max_payload = max(2 * n * 4, MIN_LIMIT)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the limit are read and refused with a logged reason; ZeroMQ
        # cuts the connection of a peer sending a bigger one before reading it into memory
        # (seen here only as a disconnect on the socket monitor).
        self.transport_limit = 2 * self.max_payload + 4096
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.transport_limit)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
        try:
            if port:
                self.sock.bind(f"tcp://{bind}:{port}")
            else:
                port = self.sock.bind_to_random_port(f"tcp://{bind}")
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"cannot listen on {bind}:{port}: {exc}") from None
        self.port = int(port)
        if advertise is None:
            import socket

            advertise = socket.getfqdn() if bind in ("0.0.0.0", "*", "::") else bind
        self.address = f"{advertise}:{self.port}"
        self.sessions: dict[int, _Session] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.rejected = 0
        self.last_message = time.monotonic()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    # ------------------------------------------------------------------ loop
    def serve(self, until: Any = None, poll_ms: int = 100) -> None:
        """Handle messages until :meth:`stop` is called or ``until()`` is true."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        last_expiry = time.monotonic()
        while not self._stop.is_set() and not (until is not None and until()):
            ready = dict(poller.poll(poll_ms))
            if self.monitor in ready:
                self._monitor_events()
            if self.sock in ready:
                while True:
                    try:
                        parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(parts)
            if time.monotonic() - last_expiry > 1.0:
                last_expiry = time.monotonic()
                self._send_replies(self.core.expire(self.worker_timeout))

    def _monitor_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            log.info("a connection closed (%s): the peer left, or sent a frame over the "
                     "%d-byte transport limit, which ZeroMQ cuts without reading",
                     event.get("endpoint", b"").decode(errors="replace"), self.transport_limit)

    def serve_in_thread(self, until: Any = None) -> threading.Thread:
        """Run :meth:`serve` in a daemon thread; an exception in it is kept in ``error``."""

        def target() -> None:
            try:
                self.serve(until)
            except BaseException as exc:  # re-raised by the engine that joins the thread
                self.error = exc
                log.exception("network parameter server stopped by an error")

        thread = threading.Thread(target=target, name="distgrad-server", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()

    # ------------------------------------------------------------------ dispatch
    def handle(self, parts: list[Any]) -> None:
        """Handle one received message (routing id + three frames)."""
        self.last_message = time.monotonic()
        peer = bytes(parts[0].buffer) if hasattr(parts[0], "buffer") else bytes(parts[0])
        session: _Session | None = None
        header: Header | None = None
        try:
            header, payload, tag = decode(parts[1:], self.max_payload)
            if header.kind == Kind.HELLO:
                self._hello(peer, header, payload)
                return
            if header.kind == Kind.AUTH:
                self._auth(peer, header, tag)
                return
            session = self.sessions.get(header.session)
            if session is None:
                raise FrameError(f"unknown session {header.session:#x} (not authenticated)")
            check_mac(session.key, bytes(parts[1].buffer if hasattr(parts[1], "buffer")
                                         else parts[1]), payload, tag, self.full)
            session.peer = peer
            if header.worker != session.worker or header.attempt != session.attempt:
                raise FrameError(f"header names worker {header.worker} attempt "
                                 f"{header.attempt}, the session belongs to worker "
                                 f"{session.worker} attempt {session.attempt}")
            self._request(session, header, payload)
        except (FrameError, Rejected) as exc:
            self.rejected += 1
            who = (f"worker {session.worker} attempt {session.attempt}" if session
                   else f"peer {peer.hex()}")
            kind = header.kind.name if header is not None else "?"
            log.warning("rejected %s message from %s: %s", kind, who, exc)
            if header is not None and header.kind == Kind.STATS:
                return  # one-way message: no reply is awaited
            self._reject(peer, session, header, str(exc))

    def _request(self, session: _Session, h: Header, payload: memoryview) -> None:
        """Decode an authenticated request, hand it to the core, send the replies."""
        core, k, a = self.core, session.worker, session.attempt
        if h.kind == Kind.STATS:
            core.stats(StatsRequest(k, a, h.seq, StepStats(loss=h.value, correct=h.steps,
                                                           samples=h.samples)))
            return
        req: AnyRequest
        if h.kind == Kind.PULL:
            req = PullRequest(k, a, h.seq, record=not h.flags & Flag.READ)
        elif h.kind == Kind.COMMIT:
            req = self._commit_request(session, h, payload)
        elif h.kind == Kind.DONE:
            req = DoneRequest(k, a, h.seq)
        elif h.kind == Kind.FAIL:
            req = FailRequest(k, a, h.seq, reason=str(as_json(h, payload).get("reason", "")))
        else:
            raise FrameError(f"unexpected {h.kind.name} message from a worker")
        replies = core.handle(req)
        if h.kind == Kind.COMMIT and not any(r.worker == k and r.seq == h.seq
                                             for r in replies):
            # parked at the barrier or the gate: tell the worker to keep waiting
            self._send(session, Header(kind=Kind.WAIT, worker=k, attempt=a, seq=h.seq))
        self._send_replies(replies)

    def _commit_request(self, session: _Session, h: Header, payload: memoryview
                        ) -> CommitRequest:
        n = self.core.parameters
        rows = 2 if h.flags & Flag.STALE else 1
        if h.dtype != DType.F32 or h.shape != (rows, n):
            raise Rejected(f"commit must be float32 of shape ({rows}, {n}), got "
                           f"{h.dtype.name} {h.shape}")
        # one copy out of the receive buffer: the rule may rewrite the payload in place
        data = torch.from_numpy(as_array(h, payload).copy())
        return CommitRequest(
            session.worker, session.attempt, h.seq, base_version=h.version, steps=h.steps,
            samples=h.samples, position=h.position, payload=data[0],
            stale=data[1] if rows == 2 else None, want_reply=bool(h.flags & Flag.REPLY),
            want_pull=bool(h.flags & Flag.PULL), nbytes=int(data.numel()) * 4)

    def _send_replies(self, replies: list[Reply]) -> None:
        for r in replies:
            session = self._session_of(r.worker, r.attempt)
            if session is None:
                continue  # that attempt's connection is gone; it will resend or be replaced
            header = Header(kind=_REPLY_KIND[r.kind], worker=r.worker, attempt=r.attempt,
                            seq=r.seq, version=r.version, position=r.base_version,
                            flags=Flag.AGAIN if r.duplicate else Flag.NONE)
            if r.kind in ("pull", "read"):
                assert r.pulled is not None
                self._send(session, header, r.pulled.reshape(1, -1).numpy())
                continue
            if r.kind != "commit":
                self._send(session, header)
                continue
            rows = [t for t in (r.reply, r.pulled) if t is not None]
            flags = (Flag.REPLY if r.reply is not None else Flag.NONE) | (
                Flag.PULL if r.pulled is not None else Flag.NONE)
            if len(rows) == 1:
                array = rows[0].reshape(1, -1).numpy()  # no copy
            else:
                array = torch.stack(rows).numpy() if rows else None
            self._send(session, Header(**{**header.__dict__, "flags": header.flags | flags}),
                       array)

    def _session_of(self, worker: int, attempt: int) -> _Session | None:
        for s in self.sessions.values():
            if s.worker == worker and s.attempt == attempt:
                return s
        return None

    # ------------------------------------------------------------------ handshake
    def _hello(self, peer: bytes, h: Header, payload: memoryview) -> None:
        body = as_json(h, payload)
        try:
            client_nonce = bytes.fromhex(str(body["nonce"]))
        except (KeyError, ValueError):
            raise FrameError("HELLO without a valid nonce") from None
        if len(client_nonce) != 32:
            raise FrameError("HELLO nonce must be 32 bytes")
        worker = body.get("worker")
        attempt = body.get("attempt")
        total = body.get("total")
        for name, v in (("worker", worker), ("attempt", attempt), ("total", total)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise FrameError(f"HELLO field {name} must be an integer >= 0, got {v!r}")
        now = time.monotonic()
        for key in [p for p, v in self.pending.items() if now - v.created > PENDING_TTL]:
            del self.pending[key]
        if len(self.pending) >= MAX_PENDING:
            oldest = min(self.pending, key=lambda p: self.pending[p].created)
            del self.pending[oldest]
        server_nonce = auth.nonce()
        self.pending[peer] = _Pending(client_nonce, server_nonce, worker, attempt, total, now)
        self._raw(peer, Header(kind=Kind.CHALLENGE, dtype=DType.JSON),
                  json_payload({"nonce": server_nonce.hex()}))

    def _auth(self, peer: bytes, h: Header, tag: bytes) -> None:
        p = self.pending.pop(peer, None)
        if p is None:
            raise FrameError("AUTH without a pending HELLO")
        claimed_worker = -1 if p.worker is None else p.worker
        claimed_attempt = -1 if p.attempt is None else p.attempt
        expected = auth.client_proof(self.secret, p.server_nonce, p.client_nonce,
                                     claimed_worker, claimed_attempt)
        if len(tag) != len(expected) or not hmac.compare_digest(tag, expected):
            raise FrameError("authentication failed: wrong or missing shared secret")
        adm = self.core.admit(p.worker, p.attempt, p.total)
        key = auth.session_key(self.secret, p.client_nonce, p.server_nonce)
        session_id = secrets.randbits(63) + 1
        # Sessions of superseded attempts stay (their requests are then refused with an
        # authenticated reason); only the latest few per worker are kept.
        mine = [sid for sid, s in self.sessions.items() if s.worker == adm.worker]
        for sid in mine[: max(0, len(mine) - 3)]:
            del self.sessions[sid]
        session = _Session(key=key, worker=adm.worker, attempt=adm.attempt, peer=peer)
        self.sessions[session_id] = session
        log.info("worker %d attempt %d authenticated (resumes at sample %d)", adm.worker,
                 adm.attempt, adm.position)
        body = {
            "proof": auth.server_proof(self.secret, p.client_nonce, p.server_nonce).hex(),
            "session": session_id, "worker": adm.worker, "attempt": adm.attempt,
            "position": adm.position, "parameters": self.core.parameters,
            "workers": len(self.core.slots), "integrity": self.integrity,
            "synchronous": self.core.synchronous,
            "exchange": bool(self.core.server.rule.exchange), **self.welcome,
        }
        data = json_payload(body)
        header = Header(kind=Kind.WELCOME, dtype=DType.JSON, shape=(len(data),),
                        worker=adm.worker, attempt=adm.attempt, session=session_id)
        raw = header.pack()
        self._emit(peer, [raw, mac(key, raw, data, True), data])
        self._send_replies(adm.releases)

    # ------------------------------------------------------------------ sending
    def _send(self, session: _Session, header: Header, array: np.ndarray | None = None) -> None:
        if array is not None:
            dtype, shape, view = array_payload(np.ascontiguousarray(array))
            header = Header(**{**header.__dict__, "dtype": dtype, "shape": shape,
                               "length": -1, "session": 0})
        else:
            view = memoryview(b"")
        raw = header.pack()
        self._emit(session.peer, [raw, mac(session.key, raw, view, self.full), view])

    def _raw(self, peer: bytes, header: Header, data: bytes) -> None:
        header = Header(**{**header.__dict__, "shape": (len(data),), "length": -1})
        self._emit(peer, [header.pack(), b"", data])

    def _reject(self, peer: bytes, session: _Session | None, header: Header | None,
                reason: str) -> None:
        data = json_payload({"reason": reason})
        seq = header.seq if header is not None else 0
        if session is not None:
            h = Header(kind=Kind.REJECT, dtype=DType.JSON, shape=(len(data),),
                       worker=session.worker, attempt=session.attempt, seq=seq)
            raw = h.pack()
            self._emit(peer, [raw, mac(session.key, raw, data, True), data])
        else:
            self._raw(peer, Header(kind=Kind.REJECT, dtype=DType.JSON, seq=seq), data)

    def _emit(self, peer: bytes, frames: list[Any]) -> None:
        try:
            self.sock.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as exc:  # the peer is gone (ROUTER_MANDATORY): it will resend
            log.warning("could not answer peer %s: %s", peer.hex(), exc)
