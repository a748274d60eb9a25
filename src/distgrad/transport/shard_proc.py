"""The shard processes of a sharded parameter server (``serve --shards S``).

:class:`ShardProcesses` starts one process per shard (``spawn``, one torch thread each),
so the shards' arithmetic, copies and crypto run on as many cores without sharing a GIL.
The center is one shared-memory tensor (``share_memory_()``); shard ``i``'s process builds
its :class:`~distgrad.server.ParameterServer` over the view ``center[a_i:b_i]`` (with a
picklable ``build`` callable the parent gives it) and serves it with its own
:class:`~distgrad.protocol.core.ProtocolCore` and
:class:`~distgrad.transport.server.NetServer` on ``bind``, port ``P + i`` (or one the
OS chooses), until every worker is done — as the ``net`` engine's
:meth:`~distgrad.engines.net.NetEngine.serve_to_the_end` — or until the parent tells it
to stop.

Between the parent and each shard process there are two one-way pipes (local IPC
between our own processes; what crosses them is pickled, nothing from the network is):

* shard → parent: its listening address; every event its core sinks (``commit``,
  ``round``, ``fault`` from every shard; ``batch``, ``pull``, ``done`` from shard 0
  only), sent by a thread of its own so that serving never waits for the parent; its log
  records (re-emitted by the parent's ``distgrad`` loggers, prefixed ``shard i:``); and at
  the end ``finished`` with its server's clock state, ``stopped``, or ``error`` with the
  reason;
* parent → shard: the table of every shard's address and slice (each WELCOME lists all
  shards, and no shard serves a handshake before it has the table), then ``stop``.

Failure handling: a shard that raises or dies (killed, out of memory) ends
:meth:`ShardProcesses.serve` with :class:`ShardFailed` naming the shard, its pid and the
reason, at once (the parent waits on every shard's pipe and process sentinel, one second
at a time); :meth:`ShardProcesses.close` then stops the others — ``stop`` on their pipe,
SIGTERM after :data:`STOP_TIMEOUT`, SIGKILL two seconds later — and reaps them all. A
shard process whose parent disappears (its control pipe closes) stops by itself; shard
processes ignore SIGINT (a Ctrl-C in a terminal reaches the whole process group: the
parent decides).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as tmp

log = logging.getLogger("distgrad.transport")

_CTX = tmp.get_context("spawn")
#: seconds every shard process has to start (import torch, build its server, listen)
START_TIMEOUT = 180.0
#: seconds stopped shard processes have to exit before they are terminated
STOP_TIMEOUT = 10.0
#: the event-sink methods a shard forwards (the parent calls only these)
EVENTS = ("batch", "pull", "commit", "round", "fault", "done")

#: ``build(index, view, sink, clock)``: shard ``index``'s protocol core over ``view``
CoreBuilder = Callable[[int, torch.Tensor, Any, Callable[[], float]], Any]


class ShardFailed(RuntimeError):
    """A shard process raised, died, or did not start in time."""


@dataclass
class _Spec:
    """What one shard process needs (sent over the spawn pipe)."""

    index: int
    bounds: tuple[int, int]
    center: torch.Tensor  # the whole center, in shared memory
    build: CoreBuilder
    secret: bytes
    net: dict[str, Any]  # NetServer keywords
    welcome: dict[str, Any]
    origin: float  # the parent's time.perf_counter() at t = 0
    until_finished: bool
    rejoin_timeout: float
    linger: float
    log_level: int


class ShardProcesses:
    """S shard processes serving the slices ``bounds`` of the shared tensor ``center``.

    ``build``: a picklable ``build(index, view, sink, clock) -> ProtocolCore`` run in each
    shard process. ``port`` (when not 0) is shard 0's; shard i listens on ``port + i``.
    ``welcome`` goes to shard 0's WELCOME (every shard's also lists all shards).
    ``until_finished``: a shard serves until every worker is done or abandoned, then
    lingers ``linger`` seconds (as the ``net`` engine); otherwise until :meth:`stop`.
    ``origin``: the parent's ``time.perf_counter()`` at the run's t = 0 (the shards' event
    times count from it; ``perf_counter`` is the system's monotonic clock, shared by the
    processes of one host). ``sizes``: per shard, the parameter-tensor segments of its
    slice (its server's ``sizes``, which compressed commits are decoded with; default: one
    segment). ``options``: the other :class:`NetServer` keywords (``bind``, ``advertise``,
    ``protection``, ``worker_timeout``, ``codec``, ...)."""

    def __init__(self, center: torch.Tensor, bounds: list[tuple[int, int]],
                 build: CoreBuilder, secret: bytes, *, port: int = 0,
                 welcome: dict[str, Any] | None = None, origin: float | None = None,
                 until_finished: bool = True, rejoin_timeout: float = 120.0,
                 linger: float = 3.0, sizes: list[list[int]] | None = None,
                 **options: Any) -> None:
        if not center.is_shared():
            center.share_memory_()  # in place: every view of it is shared too
        self.center = center
        self.bounds = list(bounds)
        self.origin = time.perf_counter() if origin is None else origin
        level = logging.getLogger("distgrad").getEffectiveLevel()
        self.specs = [
            _Spec(index=i, bounds=(a, b), center=center, build=build, secret=secret,
                  net={**options, "port": port + i if port else 0,
                       "sizes": None if sizes is None else sizes[i]},
                  welcome=dict(welcome or {}) if i == 0 else {}, origin=self.origin,
                  until_finished=until_finished, rejoin_timeout=rejoin_timeout,
                  linger=linger, log_level=level)
            for i, (a, b) in enumerate(bounds)]
        self.procs: list[Any] = []
        self._out: list[Connection] = []  # shard -> parent
        self._ctl: list[Connection] = []  # parent -> shard
        self.addresses: list[str] = []
        #: per shard, its final state once it sent one (``finished``/``stopped``)
        self.finals: list[dict[str, Any] | None] = [None] * len(bounds)
        self._ended = [False] * len(bounds)
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = START_TIMEOUT) -> list[str]:
        """Start every shard process, wait until each listens, send them the table of
        addresses and slices; return the addresses (shard 0's first)."""
        for spec in self.specs:
            out_r, out_w = _CTX.Pipe(duplex=False)
            ctl_r, ctl_w = _CTX.Pipe(duplex=False)
            proc = _CTX.Process(target=_shard_main, args=(spec, out_w, ctl_r),
                                name=f"distgrad-shard{spec.index}", daemon=True)
            proc.start()
            out_w.close()
            ctl_r.close()
            self.procs.append(proc)
            self._out.append(out_r)
            self._ctl.append(ctl_w)
        addresses: list[str | None] = [None] * len(self.specs)

        def on_listen(i: int, msg: tuple) -> None:
            addresses[i] = str(msg[1])

        deadline = time.monotonic() + timeout
        while any(a is None for a in addresses):
            left = deadline - time.monotonic()
            if left <= 0:
                late = [i for i, a in enumerate(addresses) if a is None]
                raise ShardFailed(f"shard(s) {late} of the parameter server did not start "
                                  f"within {timeout:g} s")
            self._pump(min(left, 1.0), None, on_listen)
        self.addresses = [str(a) for a in addresses]
        table = [{"address": addr, "start": a, "stop": b}
                 for addr, (a, b) in zip(self.addresses, self.bounds, strict=True)]
        for i, ctl in enumerate(self._ctl):
            self._send(i, ctl, ("table", table))
        return self.addresses

    # ------------------------------------------------------------------ serve
    def serve(self, handle: Callable[[int, str, tuple, dict], None],
              until: Callable[[], bool] | None = None,
              tick: Callable[[], None] | None = None) -> list[dict[str, Any] | None]:
        """Pass every shard's events to ``handle(shard, method, args, kwargs)`` until every
        shard has finished (or, once ``until()`` is true, stop them and take their last
        events); return their final states. ``tick()`` is called at least once a second.
        Raises :class:`ShardFailed` as soon as a shard fails."""
        while not all(self._ended):
            if until is not None and not self._stopping and until():
                self.stop()
                deadline = time.monotonic() + STOP_TIMEOUT
                while not all(self._ended) and time.monotonic() < deadline:
                    self._pump(min(deadline - time.monotonic(), 1.0), handle, None)
                break
            self._pump(1.0, handle, None)
            if tick is not None:
                tick()
        return list(self.finals)

    def _pump(self, timeout: float, handle: Callable[[int, str, tuple, dict], None] | None,
              on_listen: Callable[[int, tuple], None] | None) -> None:
        """Wait up to ``timeout`` for any shard's message or exit; handle what came."""
        live = [i for i in range(len(self.procs)) if not self._ended[i]]
        waitables: list[Any] = [self._out[i] for i in live]
        waitables += [self.procs[i].sentinel for i in live]
        ready = set(wait(waitables, max(timeout, 0.0)))
        for i in live:
            if self._out[i] in ready or self.procs[i].sentinel in ready:
                self._drain(i, handle, on_listen)
            if self.procs[i].sentinel in ready and not self._ended[i]:
                self._drain(i, handle, on_listen)  # what it sent just before it exited
                if not self._ended[i]:
                    self._ended[i] = True
                    raise ShardFailed(self._died(i))

    def _drain(self, i: int, handle: Callable[[int, str, tuple, dict], None] | None,
               on_listen: Callable[[int, tuple], None] | None) -> None:
        conn = self._out[i]
        for _ in range(100_000):  # bounded: the rest waits for the next pump
            try:
                if self._ended[i] or not conn.poll():
                    return
                msg = conn.recv()
            except (EOFError, OSError):
                return  # its sentinel tells the rest
            kind = msg[0]
            if kind == "event":
                if handle is not None and msg[1] in EVENTS:
                    handle(i, msg[1], msg[2], msg[3])
            elif kind == "log":
                logging.getLogger(str(msg[2])).log(int(msg[1]), "shard %d: %s", i, msg[3])
            elif kind == "listening":
                if on_listen is not None:
                    on_listen(i, msg)
            elif kind in ("finished", "stopped"):
                self._ended[i] = True
                self.finals[i] = msg[1]
                if kind == "stopped" and not self._stopping:
                    raise ShardFailed(f"shard {i} of the parameter server (pid "
                                      f"{self.procs[i].pid}) stopped before the run ended")
            elif kind == "error":
                self._ended[i] = True
                raise ShardFailed(f"shard {i} of the parameter server (pid "
                                  f"{self.procs[i].pid}) failed: {msg[1]}")

    def _died(self, i: int) -> str:
        proc = self.procs[i]
        proc.join(1.0)
        code = proc.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        return (f"shard {i} of the parameter server (pid {proc.pid}) {how} before the run "
                "ended")

    # ------------------------------------------------------------------ stop
    def _send(self, i: int, ctl: Connection, msg: tuple) -> None:
        with contextlib.suppress(OSError, ValueError):  # it is gone: its sentinel says so
            ctl.send(msg)

    def stop(self) -> None:
        """Tell every shard to stop serving (each sends its last events, then exits)."""
        self._stopping = True
        for i, ctl in enumerate(self._ctl):
            self._send(i, ctl, ("stop",))

    def close(self) -> None:
        """Stop every shard process and reap it: ``stop``, then SIGTERM after
        :data:`STOP_TIMEOUT`, then SIGKILL; every pipe closed. Safe to call twice."""
        self.stop()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.0))
        for sig_step in ("terminate", "kill"):
            alive = [p for p in self.procs if p.is_alive()]
            if not alive:
                break
            log.warning("%s shard process(es) %s", sig_step, [p.pid for p in alive])
            for p in alive:
                getattr(p, sig_step)()
            for p in alive:
                p.join(2.0)
        for conn in self._out + self._ctl:
            conn.close()
        self._ctl, self._out = [], []

    def __enter__(self) -> ShardProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- in a shard


class _Sender:
    """Sends a shard's messages to the parent from a thread of its own, in order, so
    that serving never waits on the pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.broken = False
        self.thread = threading.Thread(target=self._run, name="distgrad-shard-sender",
                                       daemon=True)
        self.thread.start()

    def put(self, msg: tuple) -> None:
        if not self.broken:
            self.queue.put(msg)

    def _run(self) -> None:
        while (msg := self.queue.get()) is not None:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):  # the parent is gone
                self.broken = True
                return

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
        self.conn.close()


class _PipeSink:
    """A shard's event sink (the core's ``EventSink``): forwards to the parent, where
    the shards' events are merged. Shard 0 forwards everything; the others their
    commits, rounds and faults (the parent keeps only shard 0's batches, pulls and dones)."""

    def __init__(self, sender: _Sender, shard: int) -> None:
        self.sender = sender
        self.primary = shard == 0
        self.samples_committed = 0  # (this shard's; the core reads it only for on_update)

    def _event(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.sender.put(("event", method, args, kwargs))

    def batch(self, t: float, worker: int, stats: Any) -> None:
        if self.primary:
            self._event("batch", t, worker, stats)

    def pull(self, t: float, worker: int, version: int, read: bool = False) -> None:
        if self.primary:
            self._event("pull", t, worker, version, read=read)

    def commit(self, t: float, rec: Any, nbytes: int | None = None) -> None:
        self.samples_committed += rec.samples
        self._event("commit", t, rec, nbytes=nbytes)

    def round(self, t: float, rec: Any, nbytes: int | None = None) -> None:
        self.samples_committed += rec.samples
        self._event("round", t, rec, nbytes=nbytes)

    def fault(self, t: float, worker: int, kind: str, samples_lost: int, **extra: Any) -> None:
        self._event("fault", t, worker, kind, samples_lost, **extra)

    def done(self, t: float, worker: int) -> None:
        if self.primary:
            self._event("done", t, worker)


class _ForwardLogs(logging.Handler):
    """A shard's ``distgrad`` log records, re-emitted by the parent."""

    def __init__(self, sender: _Sender) -> None:
        super().__init__()
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.sender.put(("log", record.levelno, record.name, text[:4000]))
        except Exception:
            self.handleError(record)


def _state(server: Any) -> dict[str, Any]:
    return {"version": int(server.version), "base_version": list(server.base_version),
            "clock": list(server.clock), "active": sorted(server.active)}


def _shard_main(spec: _Spec, out: Connection, control: Connection) -> None:
    """A shard process: build its core over its slice, listen, get the table, serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its shards
    torch.set_num_threads(1)
    sender = _Sender(out)
    logger = logging.getLogger("distgrad")
    logger.setLevel(spec.log_level)
    logger.addHandler(_ForwardLogs(sender))
    logger.propagate = False
    net = None
    try:
        from distgrad.engines.net import NetEngine
        from distgrad.transport.server import NetServer

        def clock() -> float:
            return time.perf_counter() - spec.origin

        a, b = spec.bounds
        core = spec.build(spec.index, spec.center[a:b], _PipeSink(sender, spec.index), clock)
        net = NetServer(core, spec.secret, welcome=spec.welcome, **spec.net)
        sender.put(("listening", net.address))
        msg = control.recv() if control.poll(START_TIMEOUT) else ("stop",)
        if msg[0] != "table":
            sender.put(("stopped", None))
            return
        net.welcome.update(shards=msg[1], shard=spec.index)
        stopped = threading.Event()

        def watch() -> None:  # "stop" from the parent, or the parent gone
            with contextlib.suppress(EOFError, OSError):
                control.recv()
            stopped.set()
            net.stop()

        threading.Thread(target=watch, name="distgrad-shard-control", daemon=True).start()
        if spec.until_finished:
            engine = NetEngine(spec.secret, worker_timeout=spec.net.get("worker_timeout",
                                                                        120.0),
                               rejoin_timeout=spec.rejoin_timeout, linger=spec.linger)
            engine.serve_to_the_end(net, core, clock)
        else:
            net.serve()
        sender.put(("stopped" if stopped.is_set() else "finished", _state(core.server)))
    except BaseException as exc:
        sender.put(("error", f"{type(exc).__name__}: {exc}"[:2000]))
    finally:
        if net is not None:
            net.close()
        sender.close()


__all__ = ["STOP_TIMEOUT", "ShardFailed", "ShardProcesses"]
