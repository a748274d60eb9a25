"""The ``ray`` engine: the parameter server and the workers as Ray actors.

* **Server**: one async actor holding the center (``ParameterServer`` behind the
  same :class:`~distgrad.protocol.core.ProtocolCore` as every engine: attempts,
  resume positions, validation, exactly-once, replay schedules). Workers drive the
  protocol with :class:`RayChannel`: each request is one actor call per shard.
  A model with more than ``shard_threshold`` parameters (default 50M) is split into
  contiguous slices over several server actors; every worker pulls from and commits to all of them
  in parallel. Rules are element-wise, so each slice follows the same arithmetic;
  but slices apply concurrent commits in their own arrival order (as in
  DistBelief), and the staleness, distance and scale recorded in the events are
  those of slice 0.
* **Workers**: one actor per worker, ``num_cpus=1`` each, one torch thread. A
  worker receives only its own shard of the data.
* **Faults**: a worker actor that dies (its process crashed, its node left) is
  recorded as a ``fault`` event and replaced by a new actor — a new *attempt* —
  that resumes the shard at the first sample not yet committed, with the current
  center, up to ``max_restarts`` times; then the run fails loudly.
* **Synchronous** rules work: a commit waits inside the server actor until every
  live worker has committed (a dead worker releases the barrier).

``address=None`` starts a local Ray instance (``num_cpus`` = max(cores,
workers), on the loopback interface only) and shuts it down afterwards;
``"auto"`` or ``"HOST:PORT"`` joins a running cluster (``ray start``), where
distgrad must be installed on every node (or shipped with ``ray job submit
--runtime-env-json``). If Ray is already initialised in this process, that
instance is used. Ray moves tensors between actors with its own serialisation,
inside the cluster's trust boundary (Ray's token authentication); nothing here
listens on a socket of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distgrad.algorithms.base import StepStats
from distgrad.errors import ConfigError, nonnegative_int, positive_int

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

log = logging.getLogger("distgrad.ray")

#: parameters per server actor when sharding and no shard count is given
SHARD_SIZE = 25_000_000


def _import_ray(local: bool = False) -> Any:
    """Import Ray. For a local instance, make Ray keep to the loopback interface
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by Ray at import) unless set already."""
    import sys

    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray: pip install 'distgrad[ray]'") from None
    return ray


class EventBuffer:
    """A Recorder-like sink that keeps events for the driver to replay."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.samples_committed = 0

    def batch(self, t: float, worker: int, stats: StepStats) -> None:
        self.events.append(("batch", t, worker, stats))

    def pull(self, t: float, worker: int, version: int, read: bool = False) -> None:
        self.events.append(("pull", t, worker, version, read))

    def commit(self, t: float, rec: Any, nbytes: int | None = None) -> None:
        self.samples_committed += rec.samples
        self.events.append(("commit", t, rec, nbytes))

    def round(self, t: float, rec: Any, nbytes: int | None = None) -> None:
        self.samples_committed += rec.samples
        self.events.append(("round", t, rec, nbytes))

    def fault(self, t: float, worker: int, kind: str, samples_lost: int, **extra: Any) -> None:
        self.events.append(("fault", t, worker, kind, samples_lost, extra))

    def done(self, t: float, worker: int) -> None:
        self.events.append(("done", t, worker))

    def drain(self) -> list[tuple[Any, ...]]:
        out, self.events = self.events, []
        return out


def replay(events: list[tuple[Any, ...]], recorder: Recorder) -> None:
    for e in events:
        kind = e[0]
        if kind == "batch":
            recorder.batch(e[1], e[2], e[3])
        elif kind == "pull":
            recorder.pull(e[1], e[2], e[3], read=e[4])
        elif kind == "commit":
            recorder.commit(e[1], e[2], nbytes=e[3])
        elif kind == "round":
            recorder.round(e[1], e[2], nbytes=e[3])
        elif kind == "fault":
            recorder.fault(e[1], e[2], e[3], samples_lost=e[4], **e[5])
        elif kind == "done":
            recorder.done(e[1], e[2])
        else:
            raise ValueError(f"unknown event {kind!r}")


# --------------------------------------------------------------------------- actors


class ServerShard:
    """One slice [lo, hi) of the center with its own rule state, behind a ProtocolCore."""

    def __init__(self, job: Any, center: np.ndarray, workers: int, totals: list[int],
                 t0: float, record: bool, schedule: list[tuple[str, int]] | None = None
                 ) -> None:
        torch.set_num_threads(1)
        from distgrad.algorithms import get_algorithm
        from distgrad.protocol.pipeline import make_core
        from distgrad.server import ParameterServer

        rule = get_algorithm(job.algorithm).server_rule(job.algorithm_config(), job.run_info())
        self.server = ParameterServer(torch.from_numpy(center.copy()), rule, workers,
                                      track_distance=job.track_distance)
        self.buffer = EventBuffer() if record else None
        self.t0 = t0
        self.core = make_core(job, self.server, self.buffer, self.clock, totals=totals,
                              schedule=schedule)
        self.waiting: dict[tuple[int, int, int], asyncio.Future] = {}

    def clock(self) -> float:
        return time.time() - self.t0

    def _release(self, replies: list[Any]) -> list[Any]:
        """Resolve the waiting commits among ``replies`` (a round or the gate let them go)."""
        for r in replies:
            fut = self.waiting.pop((r.worker, r.attempt, r.seq), None)
            if fut is not None and not fut.done():
                fut.set_result(r)
        return replies

    @staticmethod
    def _out(r: Any) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
        return (r.version, r.base_version, None if r.reply is None else r.reply.numpy(),
                None if r.pulled is None else r.pulled.numpy())

    async def admit(self, worker: int, attempt: int) -> int:
        adm = self.core.admit(worker, attempt)
        self._release(adm.releases)
        return adm.position

    async def call(self, req: Any, stats: list[Any] = (), payload: np.ndarray | None = None,
                   stale: np.ndarray | None = None) -> Any:
        """Serve one protocol request (with the step reports sent since the last one);
        a commit's tensors come as this shard's slices."""
        from distgrad.protocol.messages import CommitRequest

        for s in stats:
            self.core.stats(s)
        if isinstance(req, CommitRequest):
            req.payload = torch.from_numpy(np.array(payload, dtype=np.float32))
            req.stale = None if stale is None else torch.from_numpy(
                np.array(stale, dtype=np.float32))
        key = (req.worker, req.attempt, req.seq)
        for r in self._release(self.core.handle(req)):
            if (r.worker, r.attempt, r.seq) == key:
                return self._out(r)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        return self._out(await fut)

    async def fail(self, worker: int, attempt: int, reason: str, kind: str) -> bool:
        """The driver reports a dead attempt; False if it was not live any more."""
        slot = self.core.slots[worker]
        if slot.state != "live" or slot.attempt != attempt:
            return False
        self._release(self.core.crash(worker, kind, reason=reason))
        return True

    async def abandon(self, worker: int) -> None:
        self.core.abandon(worker)

    async def drain(self) -> list[tuple[Any, ...]]:
        return self.buffer.drain() if self.buffer is not None else []

    async def snapshot(self) -> tuple[int, list[np.ndarray], list[int]]:
        """(version, the models' slices, committed positions)."""
        return (self.server.version, [m.numpy().copy() for m in self.server.models()],
                self.core.positions())


class RayChannel:
    """The worker end of the protocol on Ray: each request is an actor call to every
    server shard, with its slice of the tensors; step reports ride on the next call."""

    transport_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, shards: list[Any], bounds: list[tuple[int, int]], t0: float,
                 crash_after: int | None) -> None:
        self.shards, self.bounds, self.t0 = shards, bounds, t0
        self.crash_after = crash_after
        self.stats: list[Any] = []
        self.commits = 0

    def call(self, req: Any) -> Any:
        import ray

        from distgrad.protocol.messages import (
            CommitRequest,
            PullRequest,
            Reply,
            StatsRequest,
            reply_kind,
        )

        if isinstance(req, StatsRequest):
            req.t = time.time() - self.t0
            self.stats.append(req)
            return None
        stats, self.stats = self.stats, []
        if not isinstance(req, CommitRequest):
            into = req.into if isinstance(req, PullRequest) else None
            bare = replace(req, into=None) if into is not None else req
            got = ray.get([s.call.remote(bare, stats if i == 0 else [])
                           for i, s in enumerate(self.shards)])
            if into is not None:
                for (lo, hi), out in zip(self.bounds, got, strict=True):
                    into[lo:hi].numpy()[:] = out[3]
            version, base = got[0][0], got[0][1]
            return Reply(req.worker, req.attempt, req.seq, version, base, pulled=into,
                         kind=reply_kind(req))
        if self.crash_after is not None and self.commits == self.crash_after:
            os._exit(17)  # fault injection: the process dies as a crash would
        payload = req.payload.numpy()
        stale = None if req.stale is None else req.stale.numpy()
        bare = replace(req, payload=None, stale=None, pull_into=None)
        got = ray.get([s.call.remote(bare, stats if i == 0 else [], payload[lo:hi],
                                     None if stale is None else stale[lo:hi])
                       for i, (s, (lo, hi)) in enumerate(zip(self.shards, self.bounds,
                                                               strict=True))])
        for (lo, hi), (_, _, rep, pulled) in zip(self.bounds, got, strict=True):
            if req.want_reply and rep is not None:
                req.payload[lo:hi].numpy()[:] = rep
            if req.pull_into is not None:
                req.pull_into[lo:hi].numpy()[:] = pulled
        self.commits += 1
        return Reply(req.worker, req.attempt, req.seq, got[0][0], got[0][1],
                     reply=req.payload if req.want_reply else None, pulled=req.pull_into)


class WorkerActor:
    """One worker: its replica and shard; drives the worker loop against the server actors."""

    def __init__(self, parts: RunParts, worker: int) -> None:
        torch.set_num_threads(1)
        self.parts = parts
        self.k = worker

    def ready(self) -> int:
        """Returns once the actor is constructed (so all workers start together)."""
        return self.k

    def run(self, shards: list[Any], bounds: list[tuple[int, int]], attempt: int, t0: float,
            crash_after: int | None = None) -> dict[str, int]:
        import ray

        from distgrad.parts import with_job_code
        from distgrad.protocol.driver import WorkerDriver, drive
        from distgrad.protocol.pipeline import drive_pipelined

        k = self.k
        self.parts = with_job_code(self.parts)  # a job named by import paths: built here
        w = self.parts.make_worker(k)
        positions = ray.get([s.admit.remote(k, attempt) for s in shards])
        channel = RayChannel(shards, bounds, t0, crash_after)
        (drive_pipelined if self.parts.job.pipeline else drive)(
            WorkerDriver(w, attempt=attempt, position=min(positions)), channel)
        return {"worker": k, "attempt": attempt, "commits": channel.commits}


# --------------------------------------------------------------------------- engine


def worker_parts(parts: RunParts, k: int) -> RunParts:
    """``parts`` holding only worker k's shard of the training data (what its actor gets).
    The batch order is the same: a seeded permutation of positions 0..m-1 applied to the
    shard equals the same permutation applied to the shard's indices."""
    from distgrad.data import Dataset
    from distgrad.parts import without_code

    if parts.streams is not None:  # each actor opens its own stream
        return without_code(parts)
    idx = torch.from_numpy(np.asarray(parts.shards[k], dtype=np.int64))
    d = parts.dataset
    small = Dataset(d.name, d.x_train[idx].clone(), d.y_train[idx].clone(), d.x_test[:0],
                    d.y_test[:0])
    shards = [np.arange(len(idx)) if i == k else np.empty(0, dtype=np.int64)
              for i in range(len(parts.shards))]
    return without_code(replace(parts, dataset=small, shards=shards))


def shard_bounds(n: int, threshold: int, shards: int | None) -> list[tuple[int, int]]:
    count = 1 if n <= threshold else shards if shards is not None else math.ceil(n / SHARD_SIZE)
    count = max(1, min(count, n))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class RayEngine:
    """Run the job on Ray (see the module docstring).

    ``inject_crash=(worker, commits)`` makes that worker's first attempt kill its
    own process after that many commits (fault-injection for tests and drills).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, shard_threshold: int = 50_000_000,
                 shards: int | None = None, max_restarts: int = 3, server_cpus: float = 0,
                 num_cpus: int | None = None, poll_seconds: float = 0.5,
                 inject_crash: tuple[int, int] | None = None,
                 replay: list[tuple[str, int]] | None = None) -> None:
        positive_int("shard_threshold", shard_threshold)
        if shards is not None:
            positive_int("shards", shards)
        nonnegative_int("max_restarts", max_restarts)
        self.address = address
        self.shard_threshold = shard_threshold
        self.shards = shards
        self.max_restarts = max_restarts
        self.server_cpus = server_cpus
        self.num_cpus = num_cpus
        self.poll_seconds = poll_seconds
        self.inject_crash = inject_crash
        self.replay = replay
        self.now = 0.0
        self.bounds: list[tuple[int, int]] = []
        self.restarts = 0

    def _init(self, workers: int) -> bool:
        """Connect to (or start) Ray; True if this call started it."""
        ray = _import_ray(local=self.address is None)
        if ray.is_initialized():
            return False
        if self.address is not None:
            ray.init(address=self.address, log_to_driver=True)
        else:
            cpus = self.num_cpus or max(os.cpu_count() or 1, workers)
            # "local": a new instance, never a cluster another user started on this host
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     log_to_driver=True)
        return True

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        started = self._init(len(parts.shards))
        ray = _import_ray()
        try:
            return self._run(ray, parts, server, recorder, evals)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any, parts: RunParts, server: ParameterServer, recorder: Recorder,
             evals: EvalSchedule) -> float:
        n_workers = len(parts.shards)
        center = server.center.numpy()
        self.bounds = shard_bounds(len(center), self.shard_threshold, self.shards)
        t0 = time.time()
        totals = [parts.job.epochs * len(s) for s in parts.shards]
        shard_cls = ray.remote(num_cpus=self.server_cpus, max_restarts=0)(ServerShard)
        shard_actors = [shard_cls.remote(parts.job, center[lo:hi], n_workers, totals, t0,
                                         i == 0, self.replay)
                        for i, (lo, hi) in enumerate(self.bounds)]
        worker_cls = ray.remote(num_cpus=1, max_restarts=0)(WorkerActor)
        worker_data = [ray.put(worker_parts(parts, k)) for k in range(n_workers)]
        attempts = [0] * n_workers
        actors: dict[int, Any] = {}
        running: dict[Any, int] = {}

        def launch(k: int, actor: Any = None) -> None:
            actor = actor or worker_cls.remote(worker_data[k], k)
            actors[k] = actor
            crash = (self.inject_crash[1] if self.inject_crash is not None
                     and self.inject_crash[0] == k and attempts[k] == 0 else None)
            ref = actor.run.remote(shard_actors, self.bounds, attempts[k], t0, crash)
            running[ref] = k

        def fetch() -> tuple[int, list[torch.Tensor]]:
            snaps = ray.get([s.snapshot.remote() for s in shard_actors])
            version = snaps[0][0]
            models = [torch.from_numpy(np.concatenate([s[1][m] for s in snaps]))
                      for m in range(len(snaps[0][1]))]
            return version, models

        def sync_driver_server() -> int:
            version, models = fetch()
            for dst, src in zip(server.models(), models, strict=True):
                dst.copy_(src)
            if server.models()[0] is not server.center:
                server.center.copy_(models[0])
            server.version = version
            return version

        def pump() -> None:
            replay(ray.get(shard_actors[0].drain.remote()), recorder)
            if recorder.samples_committed >= evals.next_at:
                version = sync_driver_server()
                evals.maybe(time.time() - t0, version, recorder.samples_committed)

        evals.maybe(0.0, server.version, 0)
        try:
            first = [worker_cls.remote(worker_data[k], k) for k in range(n_workers)]
            actors.update(enumerate(first))
            ray.get([a.ready.remote() for a in first])  # start together, as in sim
            for k in range(n_workers):
                launch(k, first[k])
            self._loop(ray, running, attempts, shard_actors, launch, pump)
            pump()
            sync_driver_server()
        finally:
            for a in [*shard_actors, *actors.values()]:
                ray.kill(a)
        self.now = time.time() - t0
        return self.now

    def _loop(self, ray: Any, running: dict[Any, int], attempts: list[int],
              shard_actors: list[Any], launch: Any, pump: Any) -> None:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_seconds)
            for ref in ready:
                k = running.pop(ref)
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    if getattr(exc, "actor_init_failed", False):
                        # not a crash: the actor cannot be built (e.g. the model's class is
                        # not importable on the node); restarting would fail the same way
                        raise RuntimeError(f"worker {k} could not be created on Ray: "
                                           f"{str(exc).splitlines()[0]}") from exc
                    self._lost(ray, k, attempts, shard_actors, exc)
                    attempts[k] += 1
                    self.restarts += 1
                    log.warning("worker %d died; starting attempt %d", k, attempts[k])
                    launch(k)
                except ray.exceptions.RayTaskError as exc:
                    # a Python error inside the worker loop: a bug or a refused commit
                    self._lost(ray, k, attempts, shard_actors, exc)
                    for ref2 in running:
                        ray.cancel(ref2, force=True)
                    pump()
                    raise RuntimeError(f"worker {k} failed: {exc}") from exc
            pump()

    def _lost(self, ray: Any, k: int, attempts: list[int], shard_actors: list[Any],
              exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        crashed = isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.WorkerCrashedError)
        ray.get([s.fail.remote(k, attempts[k], reason[:500], "crash" if crashed else "error")
                 for s in shard_actors])
        if crashed and attempts[k] >= self.max_restarts:
            raise RuntimeError(f"worker {k} died {attempts[k] + 1} times (max_restarts="
                               f"{self.max_restarts}); giving up: {reason}") from exc
