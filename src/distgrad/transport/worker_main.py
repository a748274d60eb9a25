"""``distgrad work``: worker processes that join a ``distgrad serve`` server.

Each process authenticates, receives the job as JSON in the WELCOME, rebuilds
the data shard and the model from it (:func:`parts_from_job`), resumes at the
position the server gives (a worker started again continues where the dead one's
commits stopped) and trains until its data is done. Several processes use the
``spawn`` start method and one torch thread each by default.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

log = logging.getLogger("distgrad.transport")


def work_one(address: str, secret: bytes, worker: int | None = None, threads: int = 1,
             timeout: float = 60.0, device: str = "cpu", log_level: int | None = None) -> None:
    """One worker: connect, authenticate, train the assigned shard, report done."""
    import torch

    if log_level is not None:
        logging.basicConfig(level=log_level,
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(threads)
    from distgrad.transport.client import NetClient, run_worker
    from distgrad.transport.jobspec import job_from_dict, parts_from_job

    with NetClient(address, secret, worker=worker, timeout=timeout) as client:
        if "job" not in client.info:
            raise RuntimeError("the server sent no job description (is it a `distgrad serve` "
                               "server?)")
        job = job_from_dict(client.info["job"])
        parts = parts_from_job(job)
        w = parts.make_worker(client.worker, device=device)
        log.info("worker %d attempt %d: %s, %d samples to go from sample %d", client.worker,
                 client.attempt, job.algorithm, w.batches.total - client.position,
                 client.position)
        start = time.perf_counter()
        run_worker(client, w)
        log.info("worker %d done in %.1f s", client.worker, time.perf_counter() - start)


def work(address: str, secret: bytes, processes: int = 1, worker: int | None = None,
         threads: int = 1, timeout: float = 60.0, device: str = "cpu") -> int:
    """Run ``processes`` workers (in this process when 1); return the exit code."""
    level = logging.getLogger().getEffectiveLevel()
    if processes == 1:
        work_one(address, secret, worker, threads, timeout, device)
        return 0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=work_one, name=f"distgrad-worker-{i}",
                         args=(address, secret, None if worker is None else worker + i,
                               threads, timeout, device, level))
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
