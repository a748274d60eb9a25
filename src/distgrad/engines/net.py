"""The ``net`` engine: a network parameter server that workers on other hosts join.

``distgrad serve`` runs it: the server listens on TCP (see
:mod:`distgrad.transport`), prints its address, and waits for ``distgrad work
--connect HOST:PORT`` processes started by hand, by SLURM (``srun``), by a
Kubernetes Job or over SSH. Each worker authenticates with the shared secret,
receives the job as JSON, rebuilds its data shard and model from it and trains.

A worker that goes silent for ``worker_timeout`` seconds is declared dead (a
``fault`` event; a synchronous round stops waiting for it). Starting a worker
again (``distgrad work`` with the same ``--worker K``, or any free id) resumes
that shard at the first sample not yet committed. A slot dead for
``rejoin_timeout`` seconds while no other worker is running is abandoned: its
unprocessed samples are reported lost and the run ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.server import ParameterServer

log = logging.getLogger("distgrad.transport")


class NetEngine:
    """Serve the job to remote workers; return when every worker is done or abandoned."""

    name = "net"

    def __init__(self, secret: bytes, *, bind: str = "127.0.0.1", port: int = 0,
                 advertise: str | None = None, integrity: str = "full",
                 worker_timeout: float = 120.0, rejoin_timeout: float | None = None,
                 on_listen: Callable[[str], None] | None = None,
                 replay: list[tuple[str, int]] | None = None, linger: float = 3.0
                 ) -> None:
        from distgrad.errors import positive_float
        from distgrad.transport.auth import check_secret

        self.secret = check_secret(secret)
        self.bind, self.port, self.advertise = bind, port, advertise
        self.integrity = integrity
        self.worker_timeout = positive_float("worker_timeout", worker_timeout)
        self.rejoin_timeout = positive_float(
            "rejoin_timeout", worker_timeout if rejoin_timeout is None else rejoin_timeout)
        self.on_listen = on_listen
        self.replay = replay
        self.linger = linger
        self.now = 0.0
        self.address: str | None = None

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        from distgrad.protocol.core import ProtocolCore
        from distgrad.transport.jobspec import check_portable
        from distgrad.transport.server import NetServer

        check_portable(parts)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        totals = [parts.job.epochs * len(s) for s in parts.shards]
        core = ProtocolCore(server, recorder, clock, totals=totals, on_update=evals.maybe,
                            schedule=self.replay)
        net = NetServer(core, self.secret, bind=self.bind, port=self.port,
                        advertise=self.advertise, integrity=self.integrity,
                        welcome={"job": parts.job.to_dict()},
                        worker_timeout=self.worker_timeout)
        self.address = net.address
        try:
            evals.maybe(0.0, server.version, 0)
            if self.on_listen is not None:
                self.on_listen(net.address)
            log.info("parameter server listening on %s", net.address)

            def finished() -> bool:
                if not core.live():
                    for k, slot in enumerate(core.slots):
                        if (slot.state == "dead" and slot.dead_since is not None
                                and clock() - slot.dead_since > self.rejoin_timeout):
                            log.warning("worker %d did not come back within %.0f s: "
                                        "abandoned", k, self.rejoin_timeout)
                            core.abandon(k)
                return core.finished()

            net.serve(until=finished)
            # The run is complete; stay a moment to answer resends whose first answer was
            # lost (a worker's last DONE), so no worker of a finished run fails for it.
            stop = time.monotonic() + 30.0
            net.serve(until=lambda: time.monotonic() - net.last_message > self.linger
                      or time.monotonic() > stop)
        finally:
            net.close()
        self.now = clock()
        return self.now
