"""The network parameter server: non-blocking TCP in front of a :class:`ProtocolCore`.

One thread runs :meth:`NetServer.serve` (a ``selectors`` loop) and handles one
message at a time, so commits reach ``ParameterServer`` one at a time, in arrival
order. Nothing a peer sends can stop, hang or bloat it:

* **bounded before buffering** — a message's size is in its fixed-size header
  (:mod:`~distgrad.transport.frames`); a header announcing more than the peer may
  send (:data:`~distgrad.transport.frames.MAX_PREAUTH` bytes before it
  authenticated, the largest commit after) is refused before its body is read, and
  the peer is dropped. Memory per connection is one message; connections are
  bounded in number (in all, unauthenticated, and unauthenticated per address).
* **exception-safe** — anything raised while reading, decoding or handling one
  peer's message drops that peer with a log line of bounded length; ``serve``
  goes on. Authenticated peers get refusals back with the reason.
* **never blocked** — replies are queued per connection and sent without
  blocking; a peer whose unread replies exceed a bound is dropped.
* **handshakes** — one per connection, finished within :data:`HANDSHAKE_TIMEOUT`
  seconds; when the table of unauthenticated connections is full, the oldest one
  of the address holding the most is dropped (a flood from some addresses does not
  evict handshakes from others). Failed authentications put the address in a
  growing back-off (:data:`FREE_FAILURES` free tries).
* **replies go where accepted requests come from** — a (worker, attempt)'s reply
  address moves to a connection only when the core admitted it or accepted an
  authenticated request on it.

Every message of a session is sealed (:mod:`~distgrad.transport.seal`):
AES-256-GCM by default. Nothing from the network is unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distgrad import compression
from distgrad.algorithms.base import StepStats
from distgrad.errors import ConfigError, choose
from distgrad.protocol.core import ProtocolCore, Rejected, not_live
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
from distgrad.transport.buffers import BufferPool
from distgrad.transport.frames import (
    HEADER,
    MAX_JSON,
    MAX_PREAUTH,
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

log = logging.getLogger("distgrad.transport")

#: seconds a connection has to complete its handshake
HANDSHAKE_TIMEOUT = 10.0
#: unauthenticated connections kept at once, and per peer address
MAX_PENDING = 512
MAX_PENDING_PER_ADDRESS = 64
#: authenticated connections kept per worker slot (older ones are closed)
MAX_CONNECTIONS_PER_WORKER = 4
#: failed authentications an address may make before it is backed off
FREE_FAILURES = 3
MAX_BACKOFF = 60.0
#: messages handled per connection per readiness event (fairness between peers)
MAX_BATCH = 64
#: the message kind that carries each kind of reply
_REPLY_KIND = {"pull": Kind.PULLED, "read": Kind.PULLED, "commit": Kind.COMMITTED,
               "done": Kind.ACK, "fail": Kind.ACK}
_COUNTER_AT = struct.calcsize("<4sBBBBiqq")
_LIMIT = 1 << 62


@dataclass
class _Session:
    worker: int
    attempt: int
    recv: Sealer
    send: Sealer
    protection: str


@dataclass
class _Conn:
    sock: socket.socket
    address: str
    created: float
    session: _Session | None = None
    hello: bytes | None = None
    hello_fields: dict[str, Any] | None = None
    server_nonce: bytes = b""
    challenge: bytes = b""
    pre: bytearray = field(default_factory=lambda: bytearray(PREAMBLE))
    pos: int = 0
    header: Header | None = None
    header_bytes: bytes = b""
    #: the message body being received: a small bytearray before authentication, then a
    #: view of a buffer of ``pool`` that becomes the request's tensor (no copy out)
    body: bytearray | np.ndarray | None = None
    body_need: int = 0
    pool: BufferPool = field(default_factory=lambda: BufferPool(keep=2))
    out: deque[memoryview] = field(default_factory=deque)
    out_bytes: int = 0
    closing: bool = False
    closed: bool = False
    writing: bool = False

    @property
    def name(self) -> str:
        s = self.session
        return (f"worker {s.worker} attempt {s.attempt} ({self.address})" if s
                else f"peer {self.address}")


class _Drop(Exception):
    """Close this connection (the reason is logged)."""


class NetServer:
    """Serves a :class:`ProtocolCore` over TCP.

    ``bind`` is the interface to listen on (``127.0.0.1`` by default; ``0.0.0.0``
    for other hosts), ``port`` 0 lets the OS choose, ``advertise`` is the host name
    workers should use (default: the bind address, or this host's name when binding
    all interfaces). ``welcome`` is extra JSON sent to each worker after it
    authenticated (the job description). ``protection``: ``encrypt`` (AES-256-GCM
    over every byte, the default), ``integrity`` (every byte authenticated, payloads
    in clear) or ``header`` (only headers and JSON authenticated; for trusted
    networks); workers must ask for the same. ``integrity="full"|"header"`` is the
    older spelling of ``protection="integrity"|"header"``. ``codec``/``sizes``: the
    job's commit compression and parameter-tensor sizes, so workers may send
    commits compressed (:mod:`distgrad.compression`).
    """

    def __init__(self, core: ProtocolCore, secret: bytes, *, bind: str = "127.0.0.1",
                 port: int = 0, advertise: str | None = None, protection: str = "encrypt",
                 integrity: str | None = None, welcome: dict[str, Any] | None = None,
                 worker_timeout: float = 120.0, codec: str = "none",
                 sizes: list[int] | None = None) -> None:
        self.core = core
        self.secret = auth.check_secret(secret)
        if integrity is not None:
            choose("integrity", integrity, ("full", "header"))
            protection = "integrity" if integrity == "full" else "header"
        self.protection = choose("protection", protection, PROTECTIONS)
        self.welcome = dict(welcome or {})
        json_payload(self.welcome)  # fail now if it is not JSON or too big
        self.worker_timeout = worker_timeout
        n = core.parameters
        self.codec = choose("compression", codec, compression.CODECS)
        self.sizes = [int(s) for s in sizes] if sizes is not None else [n]
        if sum(self.sizes) != n:
            raise ConfigError(f"parameter tensor sizes sum to {sum(self.sizes)}, the center "
                              f"has {n} values")
        #: the biggest payload any peer may send: a commit with its stale center
        self.max_payload = max(2 * n * 4, MAX_JSON)
        #: buffers the core pulls the center into (reused once sent and no longer cached)
        self.pulls = BufferPool(keep=2 * len(core.slots) + 2)
        self.listener = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((bind, port))
        except OSError as exc:
            self.listener.close()
            raise ConfigError(f"cannot listen on {bind}:{port}: {exc}") from None
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        if advertise is None:
            advertise = socket.getfqdn() if bind in ("0.0.0.0", "*", "::") else bind
        self.address = f"{advertise}:{self.port}"
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.conns: dict[int, _Conn] = {}
        #: where replies to (worker, attempt) go
        self.routes: dict[tuple[int, int], _Conn] = {}
        self.failures: dict[str, list[float]] = {}  # address -> [count, blocked until, last]
        self.rejected = 0
        self.dropped = 0
        #: bytes of the last commit received, as it was on the wire
        self.last_commit_bytes = 0
        self.last_message = time.monotonic()
        self._stop = threading.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ loop
    def serve(self, until: Callable[[], bool] | None = None, poll_ms: int = 100) -> None:
        """Handle messages until :meth:`stop` is called or ``until()`` is true."""
        last_tick = time.monotonic()
        while not self._stop.is_set() and not (until is not None and until()):
            for key, events in self.selector.select(poll_ms / 1000):
                if key.data is None:
                    self._accept()
                    continue
                conn: _Conn = key.data
                if conn.closed:  # closed while serving another peer of this batch
                    continue
                try:
                    if events & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if events & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
                except _Drop as exc:
                    self._close(conn, str(exc))
                except Exception as exc:  # one peer's problem never ends the server
                    log.error("error while serving %s (connection dropped): %s: %s",
                              conn.name, type(exc).__name__, clip(exc))
                    log.debug("traceback", exc_info=True)
                    self._close(conn, None)
            if time.monotonic() - last_tick > 0.5:
                last_tick = time.monotonic()
                self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.session is None and now - conn.created > HANDSHAKE_TIMEOUT:
                self._close(conn, f"no handshake within {HANDSHAKE_TIMEOUT:g} s")
        for address in [a for a, f in self.failures.items() if now - f[2] > 600]:
            del self.failures[address]
        self._send_replies(self.core.expire(self.worker_timeout))

    def serve_in_thread(self, until: Callable[[], bool] | None = None) -> threading.Thread:
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
        for conn in list(self.conns.values()):
            self._close(conn, None)
        self.selector.close()
        self.listener.close()

    # ------------------------------------------------------------------ connections
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, or the peer reset first
                log.warning("accept failed: %s", exc)
                return
            address = str(addr[0])
            now = time.monotonic()
            f = self.failures.get(address)
            if f is not None and f[1] > now:
                sock.close()
                continue
            pending = [c for c in self.conns.values() if c.session is None]
            mine = [c for c in pending if c.address == address]
            if len(mine) >= MAX_PENDING_PER_ADDRESS:
                log.warning("refused a connection from %s: %d handshakes pending from it",
                            address, len(mine))
                sock.close()
                continue
            if len(pending) >= MAX_PENDING:
                counts: dict[str, list[_Conn]] = {}
                for c in pending:
                    counts.setdefault(c.address, []).append(c)
                biggest = max(counts.values(), key=len)
                self._close(min(biggest, key=lambda c: c.created),
                            "handshake table full: the oldest of the busiest address goes")
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock=sock, address=address, created=now)
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: _Conn, reason: str | None) -> None:
        if conn.closed:
            return
        if reason is not None:
            # a peer that hangs up is ordinary (a worker that finished); the rest is not
            level = logging.INFO if reason.endswith("closed the connection") or \
                reason == "the connection closed" else logging.WARNING
            log.log(level, "dropped %s: %s", conn.name, clip(reason))
        conn.closed = True
        self.dropped += 1
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()
        conn.out.clear()
        conn.body = None
        for route in [r for r, c in self.routes.items() if c is conn]:
            del self.routes[route]

    def _failed_auth(self, conn: _Conn) -> None:
        now = time.monotonic()
        f = self.failures.setdefault(conn.address, [0.0, 0.0, now])
        f[0] += 1
        f[2] = now
        if f[0] >= FREE_FAILURES:
            f[1] = now + min(MAX_BACKOFF, 0.5 * 2 ** (f[0] - FREE_FAILURES))
        if len(self.failures) > 4096:
            del self.failures[min(self.failures, key=lambda a: self.failures[a][2])]

    # ------------------------------------------------------------------ reading
    def _read(self, conn: _Conn) -> None:
        for _ in range(MAX_BATCH):
            if conn.header is None:
                if not self._fill(conn, memoryview(conn.pre), PREAMBLE):
                    return
                self._preamble(conn)
            if conn.body_need:
                assert conn.body is not None
                if not self._fill(conn, memoryview(conn.body), conn.body_need):
                    return
            header, conn.header, conn.pos = conn.header, None, 0
            assert header is not None
            self.last_message = time.monotonic()
            body = memoryview(conn.body if conn.body is not None else b"")[:conn.body_need]
            if conn.session is not None:
                conn.body = None  # the request may keep the buffer; the pool knows
            self._message(conn, header, body)
            del body
            if conn.closed or conn.closing:
                return

    def _fill(self, conn: _Conn, view: memoryview, need: int) -> bool:
        """Read into ``view[pos:need]``; True once it is full."""
        while conn.pos < need:
            try:
                got = conn.sock.recv_into(view[conn.pos:need])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise _Drop(f"connection error: {exc}") from None
            if got == 0:
                raise _Drop("the peer closed the connection") if conn.session is None \
                    else _Drop("the connection closed")
            conn.pos += got
        return True

    def _preamble(self, conn: _Conn) -> None:
        """A complete header and header tag: check them, prepare to read the body."""
        raw = bytes(conn.pre[:HEADER.size])
        session = conn.session
        try:
            header = decode_header(raw, self.max_payload if session else MAX_PREAUTH)
        except FrameError as exc:
            raise _Drop(f"bad header: {exc}") from None
        if session is None:
            mode = None
            allowed = Kind.HELLO if conn.hello is None else Kind.AUTH
            if header.kind != allowed or header.dtype != DType.JSON:
                raise _Drop(f"expected a {allowed.name} with a JSON payload before "
                            f"authentication, got {header.kind.name}")
        else:
            try:
                session.recv.check_header(raw, header.counter, memoryview(conn.pre)[HEADER.size:])
            except FrameError as exc:
                self._failed_auth(conn)
                raise _Drop(str(exc)) from None
            mode = effective(session.protection, header.dtype)
        need = body_size(header.length, mode)
        if session is None:
            conn.body = bytearray(need)  # at most MAX_PREAUTH bytes
        else:
            # received straight into a reusable buffer that the request may keep
            conn.body = conn.pool.get(need)
        conn.header, conn.header_bytes, conn.body_need, conn.pos = header, raw, need, 0

    # ------------------------------------------------------------------ dispatch
    def _message(self, conn: _Conn, h: Header, body: memoryview) -> None:
        session = conn.session
        if session is None:
            if h.kind == Kind.HELLO:
                self._hello(conn, h, bytes(body))
            else:
                self._auth(conn, h, body)
            return
        mode = effective(session.protection, h.dtype)
        out = None
        if mode == "encrypt" and h.kind == Kind.COMMIT and h.length:
            out = conn.pool.get(h.length)  # decrypted straight into the tensor
        try:
            payload = session.recv.open(body, h.length, mode,
                                        None if out is None else memoryview(out))
        except FrameError as exc:
            self._failed_auth(conn)
            raise _Drop(str(exc)) from None
        try:
            if h.worker != session.worker or h.attempt != session.attempt:
                raise FrameError(f"header names worker {h.worker} attempt {h.attempt}, the "
                                 f"session belongs to worker {session.worker} attempt "
                                 f"{session.attempt}")
            self._request(conn, session, h, payload, out, frame_size(h.length, mode))
        except (FrameError, Rejected) as exc:
            self.rejected += 1
            log.warning("rejected %s message from %s: %s", h.kind.name, conn.name, clip(exc))
            if h.kind != Kind.STATS:  # one-way message: no reply is awaited
                self._reject(conn, h.seq, str(exc))

    def _request(self, conn: _Conn, session: _Session, h: Header, payload: memoryview,
                 out: np.ndarray | None, wire_bytes: int) -> None:
        """Decode an authenticated request, hand it to the core, send the replies."""
        core, k, a = self.core, session.worker, session.attempt
        req: AnyRequest
        if h.kind == Kind.STATS:
            if h.samples < 0 or h.steps < 0 or h.samples > _LIMIT or h.steps > _LIMIT:
                raise FrameError(f"step statistics out of range: correct {h.steps}, samples "
                                 f"{h.samples}")
            core.stats(StatsRequest(k, a, h.seq, StepStats(loss=h.value, correct=h.steps,
                                                           samples=h.samples)))
            return
        if h.kind == Kind.PULL:
            req = PullRequest(k, a, h.seq, record=not h.flags & Flag.READ,
                              into=self._pull_buffer())
        elif h.kind == Kind.COMMIT:
            req = self._commit_request(session, h, payload, out, wire_bytes)
        elif h.kind == Kind.DONE:
            req = DoneRequest(k, a, h.seq)
        elif h.kind == Kind.FAIL:
            req = FailRequest(k, a, h.seq,
                              reason=clip(as_json(h, payload).get("reason", ""), 2000))
        else:
            raise FrameError(f"unexpected {h.kind.name} message from a worker")
        replies = core.handle(req)
        # authenticated and accepted: this connection is now where (k, a)'s replies go
        self.routes[(k, a)] = conn
        if h.kind == Kind.COMMIT and not any(r.worker == k and r.seq == h.seq
                                             for r in replies):
            # parked at the barrier or the gate: tell the worker to keep waiting
            self._send(conn, Header(kind=Kind.WAIT, worker=k, attempt=a, seq=h.seq))
        self._send_replies(replies)

    def _commit_request(self, session: _Session, h: Header, payload: memoryview,
                        out: np.ndarray | None, wire_bytes: int) -> CommitRequest:
        n = self.core.parameters
        stale = bool(h.flags & Flag.STALE)
        if h.dtype == DType.BYTES and self.codec not in ("none", "fp32"):
            code = compression.payload_bytes(self.codec, n, len(self.sizes))
            expected = code + (4 * n if stale else 0)
            if h.shape != (expected,):
                raise Rejected(f"a {self.codec} commit{' with its stale center' if stale else ''}"
                               f" is {expected} bytes, got {h.shape}")
            payload_t = compression.decode_bytes(self.codec, payload[:code], self.sizes)
            stale_t = (torch.from_numpy(np.frombuffer(payload[code:], dtype="<f4"))
                       if stale else None)
        else:
            rows = 2 if stale else 1
            if h.dtype != DType.F32 or h.shape != (rows, n):
                what = (f"float32 of shape ({rows}, {n})" if self.codec in ("none", "fp32")
                        else f"float32 of shape ({rows}, {n}) or {self.codec} bytes")
                raise Rejected(f"commit must be {what}, got {h.dtype.name} {h.shape}")
            # decrypted into, or received straight into, a pooled buffer that is not
            # reused while this tensor lives: used as is (the rule may rewrite it in place)
            array = (out.view("<f4").reshape(rows, n) if out is not None
                     else as_array(h, payload))
            data = torch.from_numpy(array)
            payload_t, stale_t = data[0], (data[1] if stale else None)
        self.last_commit_bytes = wire_bytes
        return CommitRequest(
            session.worker, session.attempt, h.seq, base_version=h.version, steps=h.steps,
            samples=h.samples, position=h.position, payload=payload_t, stale=stale_t,
            want_reply=bool(h.flags & Flag.REPLY), want_pull=bool(h.flags & Flag.PULL),
            pull_into=self._pull_buffer() if h.flags & Flag.PULL else None,
            nbytes=wire_bytes)

    def _pull_buffer(self, rows: int = 1) -> torch.Tensor:
        """Where the core writes a pulled center (``rows`` of them): a pooled buffer, free
        once its reply is sent and the core no longer caches it for a resend."""
        n = self.core.parameters
        return torch.from_numpy(self.pulls.get(4 * n * rows).view("<f4").reshape(rows, n)
                                if rows > 1 else self.pulls.get(4 * n).view("<f4"))

    def _send_replies(self, replies: list[Reply]) -> None:
        for r in replies:
            conn = self.routes.get((r.worker, r.attempt))
            if conn is None or conn.closed:
                continue  # that attempt's connection is gone; it will resend or be replaced
            header = Header(kind=_REPLY_KIND[r.kind], worker=r.worker, attempt=r.attempt,
                            seq=r.seq, version=r.version, position=r.base_version,
                            flags=Flag.AGAIN if r.duplicate else Flag.NONE)
            if r.kind in ("pull", "read"):
                assert r.pulled is not None
                self._send(conn, header, r.pulled.reshape(1, -1).numpy())
                continue
            if r.kind != "commit":
                self._send(conn, header)
                continue
            rows = [t for t in (r.reply, r.pulled) if t is not None]
            flags = (Flag.REPLY if r.reply is not None else Flag.NONE) | (
                Flag.PULL if r.pulled is not None else Flag.NONE)
            if len(rows) == 1:
                array = rows[0].reshape(1, -1).numpy()  # no copy
            else:
                array = (torch.stack(rows, out=self._pull_buffer(len(rows))).numpy()
                         if rows else None)
            self._send(conn, header.replace(flags=header.flags | flags), array)

    # ------------------------------------------------------------------ handshake
    def _hello(self, conn: _Conn, h: Header, payload: bytes) -> None:
        body = as_json(h, payload)
        try:
            client_nonce = bytes.fromhex(str(body["nonce"]))
        except (KeyError, ValueError):
            raise _Drop("HELLO without a valid nonce") from None
        if len(client_nonce) != 32:
            raise _Drop("HELLO nonce must be 32 bytes")
        fields: dict[str, Any] = {"nonce": client_nonce}
        bounds = {"worker": _LIMIT, "attempt": _LIMIT, "total": _LIMIT}  # the core checks the id
        for name, bound in bounds.items():
            v = body.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v < bound):
                raise _Drop(f"HELLO field {name} must be an integer in [0, {bound}), got "
                            f"{clip(v, 40)}")
            fields[name] = v
        fields["resume"] = body.get("resume") is True
        wanted = body.get("protection")
        if wanted is not None and wanted != self.protection:
            self._raw_reject(conn, f"protection mismatch: this server uses "
                                   f"--protection {self.protection}, the worker asked for "
                                   f"{clip(wanted, 20)}; start both with the same")
            return
        conn.hello, conn.hello_fields = payload, fields
        conn.server_nonce = auth.nonce()
        conn.challenge = json_payload({"nonce": conn.server_nonce.hex(),
                                       "protection": self.protection})
        self._raw(conn, Header(kind=Kind.CHALLENGE), conn.challenge)

    def _auth(self, conn: _Conn, h: Header, payload: memoryview) -> None:
        assert conn.hello is not None and conn.hello_fields is not None
        body = as_json(h, payload)
        t = auth.transcript(conn.hello, conn.challenge)
        try:
            proof = bytes.fromhex(str(body.get("proof", "")))
        except ValueError:
            proof = b""
        if not auth.proofs_equal(proof, auth.client_proof(self.secret, t)):
            self._failed_auth(conn)
            self._raw_reject(conn, "authentication failed: wrong or missing shared secret")
            return
        f = conn.hello_fields
        worker, attempt = f["worker"], f["attempt"]
        try:
            if f["resume"]:
                # the same attempt on a new connection (the old one was cut): no new attempt
                if worker is None or attempt is None:
                    raise Rejected("a resumed connection must name its worker and attempt")
                if not 0 <= worker < len(self.core.slots):
                    raise Rejected(f"worker id {worker} out of range 0.."
                                   f"{len(self.core.slots) - 1}")
                slot = self.core.slots[worker]
                if slot.state != "live" or slot.attempt != attempt:
                    raise Rejected(not_live(worker, attempt, slot))
                position, releases = slot.position, []
            else:
                adm = self.core.admit(worker, attempt, f["total"])
                worker, attempt, position, releases = (adm.worker, adm.attempt, adm.position,
                                                       adm.releases)
        except Rejected as exc:
            self._raw_reject(conn, str(exc))
            return
        c2s, s2c = auth.session_keys(self.secret, f["nonce"], conn.server_nonce, t)
        conn.session = _Session(worker, attempt, Sealer(c2s), Sealer(s2c), self.protection)
        conn.body = None
        if not f["resume"]:
            self.routes[(worker, attempt)] = conn
        mine = [c for c in self.conns.values()
                if c.session is not None and c.session.worker == worker and not c.closed]
        for old in sorted(mine, key=lambda c: c.created)[:-MAX_CONNECTIONS_PER_WORKER]:
            self._close(old, f"superseded by a newer connection of worker {worker}")
        log.info("worker %d attempt %d authenticated from %s (%s at sample %d)", worker,
                 attempt, conn.address, "reconnects" if f["resume"] else "resumes", position)
        info = {
            "proof": auth.server_proof(self.secret, t).hex(),
            "worker": worker, "attempt": attempt, "position": position,
            "parameters": self.core.parameters, "workers": len(self.core.slots),
            "protection": self.protection, "synchronous": self.core.synchronous,
            "exchange": bool(self.core.server.rule.exchange),
            "codec": self.codec, "sizes": self.sizes, **self.welcome,
            "worker_timeout": self.worker_timeout,  # heartbeats while a worker sets up
        }
        data = json_payload(info)
        self._emit(conn, [Header(kind=Kind.WELCOME, dtype=DType.JSON, shape=(len(data),),
                                 worker=worker, attempt=attempt).pack(), memoryview(data)])
        self._send_replies(releases)

    # ------------------------------------------------------------------ sending
    def _send(self, conn: _Conn, header: Header, array: np.ndarray | None = None) -> None:
        if array is not None:
            dtype, shape, view = array_payload(np.ascontiguousarray(array))
            header = header.replace(dtype=dtype, shape=shape)
        else:
            view = memoryview(b"")
        self._emit(conn, [header.pack(), view])

    def _reject(self, conn: _Conn, seq: int, reason: str) -> None:
        s = conn.session
        assert s is not None
        data = json_payload({"reason": clip(reason)})
        self._emit(conn, [Header(kind=Kind.REJECT, dtype=DType.JSON, shape=(len(data),),
                                 worker=s.worker, attempt=s.attempt, seq=seq).pack(),
                          memoryview(data)])

    def _raw(self, conn: _Conn, header: Header, data: bytes) -> None:
        """An unsealed message of the handshake."""
        header = header.replace(dtype=DType.JSON, shape=(len(data),))
        self._emit(conn, [header.pack(), memoryview(data)])

    def _raw_reject(self, conn: _Conn, reason: str) -> None:
        """Refuse a handshake: say why, then close once it is sent."""
        self.rejected += 1
        log.warning("refused %s: %s", conn.name, clip(reason))
        self._raw(conn, Header(kind=Kind.REJECT), json_payload({"reason": clip(reason)}))
        # the peer waits for this answer, so nothing unread is left to reset the connection
        self._close(conn, None)

    def _emit(self, conn: _Conn, frames: list[Any]) -> None:
        """Queue ``[packed header, payload]`` for ``conn``: sealed under the session's
        next counter once authenticated. Never blocks: a peer whose unread replies pass
        the bound is dropped."""
        if conn.closed:
            return
        raw, payload = frames
        s = conn.session
        if s is None:
            parts = [raw, bytes(TAG), payload]
        else:
            hb = bytearray(raw)
            struct.pack_into("<Q", hb, _COUNTER_AT, s.send.counter)
            raw = bytes(hb)
            kind_dtype = DType(raw[6])
            parts = [raw, *s.send.seal(raw, payload, effective(s.protection, kind_dtype))]
        size = sum(len(p) for p in parts)
        if conn.out_bytes + size > 4 * frame_size(self.max_payload, "encrypt") + (1 << 20):
            self._close(conn, f"{conn.out_bytes} bytes of replies unread: not reading")
            return
        conn.out.extend(memoryview(p).cast("B") for p in parts if len(p))
        conn.out_bytes += size
        try:
            self._flush(conn)
        except _Drop as exc:
            self._close(conn, str(exc))

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.sendmsg(list(conn.out)[:64])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise _Drop(f"connection error: {exc}") from None
            conn.out_bytes -= sent
            while sent:
                first = conn.out[0]
                if sent >= len(first):
                    sent -= len(first)
                    conn.out.popleft()
                else:
                    conn.out[0] = first[sent:]
                    sent = 0
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if conn.closing and not conn.out:
            self._close(conn, None)
            return
        if (want & selectors.EVENT_WRITE) != conn.writing:
            conn.writing = bool(want & selectors.EVENT_WRITE)
            self.selector.modify(conn.sock, want, conn)
