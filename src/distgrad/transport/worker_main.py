"""``distgrad work``: worker processes that join a ``distgrad serve`` server.

Each process authenticates, receives the job as JSON in the WELCOME, rebuilds
the data shard and the model from it (:func:`parts_from_job`), refuses to train on
data other than the server's (:mod:`~distgrad.transport.datacheck`), resumes at the
position the server gives (a worker started again continues where the dead one's
commits stopped) and trains until its data is done. Several processes use the
``spawn`` start method and one torch thread each by default. A worker sends heartbeats
while it sets up, and rejoins by itself as a new attempt when its server is restarted
from a checkpoint or has declared it dead (see :func:`work_one`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("distgrad.transport")


#: how long a worker keeps trying to rejoin after it lost its server (a server killed and
#: restarted with ``serve --resume`` on the same port) or was told its attempt is dead
#: (declared dead while out of reach, or fenced by a resumed server), in seconds
REJOIN_FOR = 60.0
#: new attempts one worker process makes at most (each after a lost server or a fence)
MAX_REJOINS = 50


def work_one(address: str, secret: bytes, worker: int | None = None, threads: int = 1,
             timeout: float = 60.0, device: str = "cpu", log_level: int | None = None,
             protection: str | None = "encrypt", rejoin_for: float = REJOIN_FOR) -> None:
    """One worker: connect, authenticate, train the assigned shard, report done.

    While it builds its model and data shard it sends heartbeats, so a slow start is not
    taken for a dead worker. If the server goes away (killed, restarted with ``serve
    --resume``) or refuses its attempt as dead (:data:`~distgrad.protocol.core.REJOIN`),
    it rejoins as a new attempt of the same worker id, from the position the server
    gives, for ``rejoin_for`` seconds after each loss; then the last error is raised."""
    import torch

    if log_level is not None:
        logging.basicConfig(level=log_level,
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(threads)
    from distgrad.errors import ConfigError
    from distgrad.protocol.core import REJOIN
    from distgrad.transport.client import RemoteError, TransportError, run_worker
    from distgrad.transport.datacheck import check_same_data
    from distgrad.transport.jobspec import job_from_dict, parts_from_job
    from distgrad.transport.sharded import connect

    parts: Any = None
    job_dict: dict[str, Any] | None = None
    lost_at: float | None = None  # when the server was last lost (None: never)
    for _ in range(MAX_REJOINS):
        try:
            client = connect(address, secret, worker=worker, timeout=timeout,
                             protection=protection)  # all shards of a sharded server
        except TransportError:
            if lost_at is None or time.monotonic() - lost_at > rejoin_for:
                raise
            time.sleep(1.0)  # (the client already retried with back-off)
            continue
        with client:
            if "job" not in client.info:
                raise RuntimeError("the server sent no job description (is it a `distgrad "
                                   "serve` server?)")
            if job_dict is not None and client.info["job"] != job_dict:
                raise RuntimeError(f"the server at {address} now serves another job; this "
                                   "worker stops")
            with _heartbeats(client):
                if parts is None:
                    job_dict = client.info["job"]
                    parts = parts_from_job(job_from_dict(job_dict))
                w = parts.make_worker(client.worker, device=device)
            try:  # before any commit: this host built the server's data
                check_same_data(client.info, parts, address)
            except ConfigError as exc:
                with contextlib.suppress(Exception):  # the server records why (best effort)
                    client.fail(str(exc))
                raise
            worker = client.worker
            log.info("worker %d attempt %d: %s, %d samples to go from sample %d",
                     client.worker, client.attempt, parts.job.algorithm,
                     w.batches.total - client.position, client.position)
            start = time.perf_counter()
            try:
                run_worker(client, w)
            except TransportError as exc:
                log.warning("worker %d: lost the server (%s); rejoining for up to %.0f s",
                            worker, exc, rejoin_for)
            except RemoteError as exc:
                if REJOIN not in str(exc):
                    raise
                log.warning("worker %d: %s; rejoining from the server's position", worker,
                            exc)
            else:
                log.info("worker %d done in %.1f s", client.worker,
                         time.perf_counter() - start)
                return
            lost_at = time.monotonic()
    raise RuntimeError(f"worker {worker}: gave up after {MAX_REJOINS} attempts")


@contextlib.contextmanager
def _heartbeats(client: Any) -> Iterator[None]:
    """Send heartbeats (step reports of zero samples) from a thread while the body runs
    (the worker builds its model and shard; the connection is otherwise idle). The thread
    is joined before the body's caller uses the client again."""
    from distgrad.algorithms.base import StepStats
    from distgrad.protocol.messages import StatsRequest

    timeout = client.info.get("worker_timeout")
    every = min(1.0, float(timeout) / 4) if isinstance(timeout, int | float) and timeout > 0 \
        else 1.0
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                client.call(StatsRequest(client.worker, client.attempt, 0,
                                         StepStats(loss=0.0, correct=0, samples=0)))
            except Exception as exc:  # the first request will reconnect or fail loudly
                log.debug("heartbeat failed: %s", exc)
                return

    thread = threading.Thread(target=beat, name="distgrad-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def work(address: str, secret: bytes, processes: int = 1, worker: int | None = None,
         threads: int = 1, timeout: float = 60.0, device: str = "cpu",
         protection: str | None = "encrypt") -> int:
    """Run ``processes`` workers (in this process when 1); return the exit code.
    ``protection``: what the server must use (None: whatever it uses)."""
    level = logging.getLogger().getEffectiveLevel()
    if processes == 1:
        work_one(address, secret, worker, threads, timeout, device, protection=protection)
        return 0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=work_one, name=f"distgrad-worker-{i}",
                         args=(address, secret, None if worker is None else worker + i,
                               threads, timeout, device, level, protection))
             for i in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        log.error("worker process(es) failed: %s", ", ".join(failed))
        return 1
    return 0
