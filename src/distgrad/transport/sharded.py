"""A sharded network parameter server (``distgrad serve --shards S``), as in DistBelief.

The center is cut into S contiguous slices, each served by its own *process* (``spawn``,
one torch thread each; :mod:`distgrad.transport.shard_proc`): the center is one
shared-memory tensor, and shard i's process owns the slice ``[a_i, b_i)`` with its own
:class:`~distgrad.server.ParameterServer` (the algorithm's server rule over that slice,
built in the shard process from the job), its own
:class:`~distgrad.protocol.core.ProtocolCore` and its own
:class:`~distgrad.transport.server.NetServer` on its own port (``--port P``: P + i). So
the server side of a run moves S streams at once, and the shards' arithmetic, copies and
crypto run on S cores without sharing a GIL: the bandwidth a parameter server can take
grows with the shards (with S hosts' NICs once shards run on separate hosts). The
``serve`` process itself serves no worker: it starts the shards, gives every shard the
table of all shards' addresses (in every WELCOME before any worker is admitted), merges
their events into the one event log (:class:`ShardMerger`) and runs the evaluations, which
read the shared center. A shard process that fails or dies ends the run with its error
(the others are stopped); SIGINT/SIGTERM of ``serve`` stops them all.

On the worker side a :class:`ShardedChannel` (what :func:`connect` returns when the
server it reaches lists shards in its WELCOME) holds one authenticated
:class:`~distgrad.transport.client.NetClient` per shard and splits every request: a
commit's payload (and stale center) into the slices, a pull into slice pulls written
straight into the worker's buffer; it sends the S parts in parallel (one thread per
shard) and merges the S replies into one. Every worker sends the *same* request sequence
to every shard (the same sequence numbers, positions, attempts), so the shards' cores
agree on each worker's attempts, positions, resends, barrier rounds and gate. Between
workers, each shard serves requests in its own arrival order — each shard is its own
asynchronous server, as in DistBelief — unless a replay schedule is given, which puts
every shard in the recorded order (this is how the conformance test checks that S shards
give the bits of one server).

What the event log shows: each commit once, with shard 0's version and staleness, the
distance ‖θ̃_t − θ̃_{t−τ}‖ as the root of the sum of the shards' squared distances, the
other metrics (ADAG's mean scale) as the size-weighted mean of the shards', and the bytes
of all shards. Faults, pulls and steps are shard 0's (the other shards' faults are logged).
An evaluation is run once every shard's part of the commit that triggers it has been
merged, and reads the whole center while the shards may be applying later commits.

Limits: rules whose arithmetic is not element-wise across the vector (a norm clip, a
global reduction) would differ from one server; every built-in rule is element-wise
except the ensemble's, whose members are whole models (refused). A commit the center
guard refuses on one shard is refused there only (the worker then fails, as on any
refusal). Compressed commits (``--compress``) travel to each shard as the codec's bytes of
its slice (:func:`slice_encoded`: int8 carries the scale of every parameter tensor the
slice cuts into), so the bytes on the wire are the codec's size, as with one server. A
sharded server does not
checkpoint (``serve --shards`` refuses ``--checkpoint-every``/``--resume``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from distgrad.compression import Encoded
from distgrad.engines.net import NetEngine
from distgrad.errors import ConfigError, positive_int
from distgrad.protocol.messages import (
    AnyRequest,
    CommitRequest,
    DoneRequest,
    FailRequest,
    PullRequest,
    Reply,
    StatsRequest,
)
from distgrad.server import CommitRecord, RoundRecord
from distgrad.stats import StepStats
from distgrad.transport.client import NetClient, TransportError

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

log = logging.getLogger("distgrad.transport")

#: the most shards a server may be cut into
MAX_SHARDS = 64


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous slices ``[start, stop)`` covering ``range(n)``, as even as
    possible (the first ``n % shards`` one element longer)."""
    positive_int("shards", shards)
    if shards > min(n, MAX_SHARDS):
        raise ConfigError(f"shards must be at most {min(n, MAX_SHARDS)} for a model of "
                          f"{n} parameters, got {shards}")
    base, extra = divmod(n, shards)
    bounds, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def segment_sizes(sizes: list[int] | tuple[int, ...], a: int, b: int) -> list[int]:
    """The element counts of the parameter tensors (``sizes``, in order) that the slice
    ``[a, b)`` of the flat vector cuts into, clipped to it: the segments whose scales an
    int8 slice carries (they sum to ``b - a``)."""
    out, start = [], 0
    for n in sizes:
        lo, hi = max(start, a), min(start + n, b)
        if hi > lo:
            out.append(hi - lo)
        start += n
    return out


def slice_encoded(enc: Encoded, a: int, b: int) -> Encoded:
    """The compressed message of the slice ``[a, b)`` of what ``enc`` stands for, exactly:
    its values ``data[a:b]``, and for int8 the scales of the tensors the slice cuts into,
    with those segments as its sizes (decoding it gives ``decode(enc)[a:b]`` bit for bit)."""
    scales = None
    if enc.scales is not None:
        first = [i for i, start in enumerate(_starts(enc.sizes))
                 if start < b and start + enc.sizes[i] > a]
        scales = enc.scales[first[0]:first[-1] + 1]
    return Encoded(enc.codec, enc.data[a:b], scales,
                   tuple(segment_sizes(enc.sizes, a, b)))


def _starts(sizes: tuple[int, ...]) -> list[int]:
    out, start = [], 0
    for n in sizes:
        out.append(start)
        start += n
    return out


# --------------------------------------------------------------------------- worker side


class ShardedChannel:
    """One worker attempt's connections to every shard of a sharded server; the
    :class:`~distgrad.protocol.driver.Channel` that splits each request across them and
    merges the replies. Built by :func:`connect`; has the attributes of a
    :class:`NetClient` that :func:`~distgrad.transport.client.run_worker` reads."""

    transport_errors: tuple[type[BaseException], ...] = (TransportError,)

    def __init__(self, clients: list[NetClient], bounds: list[tuple[int, int]]) -> None:
        if len(clients) != len(bounds) or not clients:
            raise ValueError(f"{len(clients)} clients for {len(bounds)} shards")
        self.clients = clients
        self.bounds = bounds
        first = clients[0]
        self.info = first.info
        self.worker, self.attempt, self.position = first.worker, first.attempt, first.position
        self.parameters = bounds[-1][1]
        for i, (c, (a, b)) in enumerate(zip(clients, bounds, strict=True)):
            if (c.worker, c.attempt, c.position) != (self.worker, self.attempt, self.position):
                raise TransportError(
                    f"shard {i} admitted worker {c.worker} attempt {c.attempt} at sample "
                    f"{c.position}, shard 0 worker {self.worker} attempt {self.attempt} at "
                    f"sample {self.position}: the shards disagree (restart the worker)")
            if c.parameters != b - a:
                raise TransportError(f"shard {i} holds {c.parameters} parameters, its slice "
                                     f"[{a}, {b}) has {b - a}")
        #: per shard, the version the worker's next commit there is built on
        self.base = [0] * len(clients)
        #: (shard 0's, every shard's) base versions of the pull before the last one: what a
        #: pipelined commit is built on (:mod:`distgrad.protocol.pipeline`)
        self._earlier: tuple[int, list[int]] | None = None
        # one thread per shard, so each socket always lives on the same thread
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"distgrad-shard{i}")
                       for i in range(1, len(clients))]

    # ------------------------------------------------------------------ the channel
    def call(self, req: AnyRequest) -> Reply | None:
        """Send ``req`` to every shard at once (its slice of any tensor) and merge."""
        if isinstance(req, StatsRequest | DoneRequest | FailRequest):
            replies = self._each(lambda i: self.clients[i].call(req))
            return None if isinstance(req, StatsRequest) else self._merge(req, replies)
        if isinstance(req, PullRequest):
            out = req.into if req.into is not None else torch.empty(self.parameters)

            def pull(i: int) -> Reply | None:
                r = self.clients[i].call(PullRequest(req.worker, req.attempt, req.seq,
                                                     record=req.record))
                self._take(r, "pulled", out, i)
                return r

            replies = self._each(pull)
            return self._merge(req, replies, pulled=out)
        if isinstance(req, CommitRequest):
            return self._commit(req)
        raise TypeError(f"unknown request {req!r}")

    def _commit(self, req: CommitRequest) -> Reply:
        pulled = None
        if req.want_pull:
            pulled = req.pull_into if req.pull_into is not None else torch.empty(
                self.parameters)

        base = self.base
        if (self._earlier is not None and req.base_version == self._earlier[0]
                and req.base_version != self.base[0]):  # pipelined: built on the pull before
            base = self._earlier[1]

        def commit(i: int) -> Reply | None:
            a, b = self.bounds[i]
            part = CommitRequest(
                req.worker, req.attempt, req.seq, base_version=base[i], steps=req.steps,
                samples=req.samples, position=req.position, payload=req.payload[a:b],
                stale=None if req.stale is None else req.stale[a:b],
                want_reply=req.want_reply, want_pull=req.want_pull, nbytes=req.nbytes,
                encoded=None if req.encoded is None else slice_encoded(req.encoded, a, b))
            r = self.clients[i].call(part)
            if req.want_reply:
                self._take(r, "reply", req.payload, i)  # sent already: overwrite in place
            if pulled is not None:
                self._take(r, "pulled", pulled, i)
            return r

        replies = self._each(commit)
        return self._merge(req, replies, reply=req.payload if req.want_reply else None,
                           pulled=pulled)

    def _take(self, r: Reply | None, what: str, out: torch.Tensor, i: int) -> None:
        src = None if r is None else getattr(r, what)
        if src is None:
            raise TransportError(f"shard {i} sent no {what} tensor")
        a, b = self.bounds[i]
        if src.data_ptr() != out[a:b].data_ptr():
            out[a:b].copy_(src)

    def _each(self, fn: Callable[[int], Reply | None]) -> list[Reply | None]:
        """``fn(i)`` for every shard, shard 0 on this thread and the others on theirs;
        when a shard fails, the first transport error (else the first refusal) is raised
        once all have answered."""
        futures: list[Future[Reply | None]] = [
            pool.submit(fn, i) for i, pool in enumerate(self._pools, start=1)]
        results: list[Reply | None] = []
        errors: list[BaseException] = []
        try:
            results.append(fn(0))
        except Exception as exc:
            results.append(None)
            errors.append(exc)
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:
                results.append(None)
                errors.append(exc)
        if errors:
            transport = [e for e in errors if isinstance(e, TransportError)]
            raise (transport or errors)[0]
        return results

    def _merge(self, req: AnyRequest, replies: list[Reply | None], *,
               reply: torch.Tensor | None = None, pulled: torch.Tensor | None = None
               ) -> Reply:
        rs = [r for r in replies if r is not None]
        if len(rs) != len(self.clients):
            raise TransportError(f"{len(self.clients) - len(rs)} shard(s) sent no reply")
        if isinstance(req, CommitRequest) or (isinstance(req, PullRequest) and req.record):
            self._earlier = (self.base[0], self.base) if isinstance(req, CommitRequest) \
                else None
            self.base = [r.base_version for r in rs]
        first = rs[0]
        return Reply(first.worker, first.attempt, first.seq, first.version,
                     first.base_version, reply=reply, pulled=pulled,
                     duplicate=all(r.duplicate for r in rs), kind=first.kind)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)
        for c in self.clients:
            c.close()

    def __enter__(self) -> ShardedChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str, secret: bytes, *, worker: int | None = None,
            attempt: int | None = None, total: int | None = None, timeout: float = 60.0,
            retries: int = 3, protection: str | None = None) -> NetClient | ShardedChannel:
    """Connect a worker to the server at ``address``: a :class:`NetClient`, or — when that
    server's WELCOME lists shards — a :class:`ShardedChannel` over all of them (the other
    shards joined as the same worker and attempt)."""
    kw: dict[str, Any] = dict(total=total, timeout=timeout, retries=retries,
                              protection=protection)
    first = NetClient(address, secret, worker=worker, attempt=attempt, **kw)
    try:
        shards = _shard_list(first.info.get("shards"))
        if shards is None or len(shards) == 1:
            return first
        mine = int(first.info.get("shard", 0))
        clients: list[NetClient] = []
        try:
            for i, (addr, _, _) in enumerate(shards):
                clients.append(first if i == mine else NetClient(
                    addr, secret, worker=first.worker, attempt=first.attempt, **kw))
            return ShardedChannel(clients, [(a, b) for _, a, b in shards])
        except BaseException:
            for c in clients:
                if c is not first:
                    c.close()
            raise
    except BaseException:
        first.close()
        raise


def _shard_list(value: Any) -> list[tuple[str, int, int]] | None:
    """The WELCOME's ``shards``: [{address, start, stop}, ...] covering the center."""
    if value is None:
        return None
    try:
        shards = [(str(s["address"]), int(s["start"]), int(s["stop"])) for s in value]
    except (TypeError, KeyError, ValueError):
        raise TransportError(f"the server's shard list is unreadable: {str(value)[:200]}"
                             ) from None
    stop = 0
    for addr, a, b in shards:
        if a != stop or b <= a:
            raise TransportError(f"the server's shards do not tile the center at {addr}: "
                                 f"[{a}, {b}) after {stop}")
        stop = b
    if not 1 <= len(shards) <= MAX_SHARDS:
        raise TransportError(f"the server lists {len(shards)} shards")
    return shards


# --------------------------------------------------------------------------- server side


class ShardMerger:
    """The shards' event sinks: commits and rounds reach the recorder once, merged across
    shards (see the module docstring), and drive the evaluation schedule (``evals``, when
    given); everything else is shard 0's. Runs in the ``serve`` process: :meth:`handle`
    takes the events the shard processes send
    (:meth:`~distgrad.transport.shard_proc.ShardProcesses.serve`)."""

    def __init__(self, recorder: Recorder, evals: EvalSchedule | None,
                 bounds: list[tuple[int, int]]) -> None:
        self.recorder = recorder
        self.evals = evals
        self.weights = [(b - a) / bounds[-1][1] for a, b in bounds]
        self.lock = threading.Lock()
        self.pending: dict[tuple[Any, ...], list[tuple[int, Any, int | None]]] = {}
        self.version = 0
        self.sinks = [_ShardSink(self, i) for i in range(len(bounds))]

    def handle(self, shard: int, method: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Shard ``shard``'s sink call ``method(*args, **kwargs)`` (one of the core's
        ``EventSink`` methods)."""
        getattr(self.sinks[shard], method)(*args, **kwargs)

    def add(self, key: tuple[Any, ...], shard: int, t: float, rec: Any,
            nbytes: int | None) -> None:
        with self.lock:
            parts = self.pending.setdefault(key, [])
            parts.append((shard, rec, nbytes))
            if len(parts) < len(self.weights):
                return
            del self.pending[key]
            parts.sort(key=lambda p: p[0])
            first = parts[0][1]
            metrics = self._metrics([p[1] for p in parts])
            total = sum(p[2] or 0 for p in parts)
            if isinstance(first, CommitRecord):
                d = [p[1].distance for p in parts]
                distance = (math.sqrt(sum(x * x for x in d)) if all(x is not None for x in d)
                            else None)
                self.recorder.commit(t, CommitRecord(
                    worker=first.worker, version=first.version,
                    base_version=first.base_version, staleness=first.staleness,
                    distance=distance, steps=first.steps, samples=first.samples,
                    metrics=metrics, held=first.held), nbytes=total)
            else:
                self.recorder.round(t, RoundRecord(
                    version=first.version, participants=first.participants, steps=first.steps,
                    samples=first.samples, metrics=metrics,
                    rejected="; ".join(p[1].rejected for p in parts if p[1].rejected)),
                    nbytes=total)
            self.version = max(self.version, first.version)
            if self.evals is not None:
                self.evals.maybe(t, first.version, self.recorder.samples_committed)

    def _metrics(self, recs: list[Any]) -> dict[str, float]:
        names = set().union(*(r.metrics for r in recs))
        out = {}
        for name in names:
            values = [r.metrics.get(name) for r in recs]
            if all(isinstance(v, int | float) for v in values):
                out[name] = sum(w * v for w, v in zip(self.weights, values, strict=True))
        return out


class _ShardSink:
    """One shard's event sink (the core's ``EventSink``)."""

    def __init__(self, merger: ShardMerger, shard: int) -> None:
        self.merger = merger
        self.shard = shard
        self.commits: dict[int, int] = {}  # per worker: commits seen (the merge key)
        self.primary = shard == 0

    @property
    def samples_committed(self) -> int:
        return self.merger.recorder.samples_committed

    def batch(self, t: float, worker: int, stats: StepStats) -> None:
        if self.primary:
            self.merger.recorder.batch(t, worker, stats)

    def pull(self, t: float, worker: int, version: int, read: bool = False) -> None:
        if self.primary:
            self.merger.recorder.pull(t, worker, version, read=read)

    def commit(self, t: float, rec: CommitRecord, nbytes: int | None = None) -> None:
        n = self.commits[rec.worker] = self.commits.get(rec.worker, 0) + 1
        self.merger.add(("commit", rec.worker, n), self.shard, t, rec, nbytes)

    def round(self, t: float, rec: RoundRecord, nbytes: int | None = None) -> None:
        self.merger.add(("round", rec.version), self.shard, t, rec, nbytes)

    def fault(self, t: float, worker: int, kind: str, samples_lost: int, **extra: Any) -> None:
        if self.primary:
            self.merger.recorder.fault(t, worker, kind, samples_lost, **extra)
        else:
            log.warning("shard %d: worker %d %s %s", self.shard, worker, kind,
                        str(extra)[:300])

    def done(self, t: float, worker: int) -> None:
        if self.primary:
            self.merger.recorder.done(t, worker)


def job_core(parts: RunParts, totals: list[int], schedule: list[tuple[str, int]] | None,
             index: int, view: torch.Tensor, sink: Any, clock: Callable[[], float]) -> Any:
    """Shard ``index``'s protocol core over ``view`` (its slice of the shared center), run
    in its shard process: the job's server rule (:meth:`RunParts.make_server`) and core
    (:func:`~distgrad.protocol.pipeline.make_core`), as the ``net`` engine builds them.
    ``parts``: :func:`server_parts` of the run's."""
    from distgrad.protocol.pipeline import make_core

    return make_core(parts.job, parts.make_server(view), sink, clock, totals=totals,
                     schedule=None if schedule is None else list(schedule))


def server_parts(parts: RunParts) -> RunParts:
    """``parts`` less its data and model: what a shard process needs to build the server
    side (the job and the number of workers), cheap to send."""
    import dataclasses

    import numpy as np

    return dataclasses.replace(
        parts, dataset=None, template=None, loss_fn=None, step_fn=None, streams=None,  # type: ignore[arg-type]
        shards=[np.empty(0, dtype=np.int64) for _ in parts.shards])


class ShardedNetEngine(NetEngine):
    """``distgrad serve --shards S``: the ``net`` engine with the center cut into S
    slices, each served by its own process (its own parameter server, core and socket;
    see the module docstring). Takes :class:`~distgrad.engines.net.NetEngine`'s options;
    ``port`` (when not 0) is shard 0's, shard i listens on ``port + i``. ``address`` /
    ``on_listen`` give shard 0's address: workers connect there and learn the others from
    its WELCOME. ``pids``: the shard processes' ids while it runs."""

    def __init__(self, secret: bytes, shards: int = 2, **options: Any) -> None:
        super().__init__(secret, **options)
        self.shards = positive_int("shards", shards)
        self.addresses: list[str] = []
        self.pids: list[int] = []

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        import functools

        from distgrad.transport.datacheck import welcome_data
        from distgrad.transport.jobspec import check_portable
        from distgrad.transport.shard_proc import ShardProcesses

        check_portable(parts)
        center = server.center
        models = server.rule.models(center)
        if len(models) != 1 or models[0] is not center:
            raise ConfigError(f"algorithm {parts.job.algorithm!r} keeps whole models apart "
                              "from the center; it cannot be served by shards")
        bounds = shard_bounds(int(center.numel()), self.shards)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        def tick() -> None:
            self.now = clock()

        totals = [parts.job.epochs * len(s) for s in parts.shards]
        merger = ShardMerger(recorder, evals, bounds)
        build = functools.partial(job_core, server_parts(parts), totals, self.replay)
        sizes = [p.numel() for p in parts.template.parameters() if p.requires_grad]
        group = ShardProcesses(center, bounds, build, self.secret, port=self.port,
                               welcome={"job": parts.job.to_dict(), **welcome_data(parts)},
                               origin=start, rejoin_timeout=self.rejoin_timeout,
                               linger=self.linger, bind=self.bind, advertise=self.advertise,
                               protection=self.protection,
                               worker_timeout=self.worker_timeout,
                               codec=parts.job.compression,
                               sizes=[segment_sizes(sizes, a, b) for a, b in bounds])
        try:
            self.addresses = group.start()
            self.pids = group.pids
            self.address = self.addresses[0]
            evals.maybe(0.0, server.version, 0)
            if self.on_listen is not None:
                self.on_listen(self.address)
            log.info("sharded parameter server listening on %s (%d shard processes: %s; "
                     "pids %s)", self.address, len(bounds), ", ".join(self.addresses),
                     " ".join(map(str, self.pids)))
            finals = group.serve(merger.handle, tick=tick)
        finally:
            group.close()
        first = finals[0]
        assert first is not None  # serve() returns once every shard finished
        server.version = first["version"]
        server.base_version = list(first["base_version"])
        server.clock = list(first["clock"])
        server.active = set(first["active"])
        self.now = clock()
        return self.now


__all__ = ["MAX_SHARDS", "ShardMerger", "ShardedChannel", "ShardedNetEngine", "connect",
           "job_core", "segment_sizes", "server_parts", "shard_bounds", "slice_encoded"]
