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
unprocessed samples are reported lost and the run ends. A worker still building its
model and shard sends heartbeats (step reports of zero samples), so a slow start is not
a silence.

**Checkpoints and resume.** With ``checkpoint_every`` (``serve --checkpoint-every S``)
the server writes the run directory's ``checkpoint.pt`` every S seconds and as soon as a
worker is done, always between two messages; SIGINT/SIGTERM write a final one (with or
without ``checkpoint_every``) and stop. It is the server's state only: center, clock,
rule state, the protocol core's attempts and positions, the recorder's counters.
``serve --resume DIR`` (same ``--port``) restores it and *fences* every attempt that was
live (:meth:`~distgrad.protocol.core.ProtocolCore.fence`): whatever a worker did after
the checkpoint is gone with the old center, so its reconnection — and any resend of a
commit the checkpoint does not hold — is refused, and ``distgrad work`` rejoins by
itself as a new attempt of the same worker id, from its checkpointed position. Every
sample is then committed exactly once into the restored center; the events after the
checkpoint are dropped from ``events.jsonl``. A worker that finished after the last
checkpoint has exited: start it again (``distgrad work --worker K``), or its tail is
abandoned after ``rejoin_timeout`` (a checkpoint follows every DONE, so only a crash in
the instant between a DONE and that checkpoint leaves one).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distgrad.errors import ConfigError
from distgrad.rundir import save_snapshot, server_snapshot

if TYPE_CHECKING:
    from distgrad.metrics.events import Recorder
    from distgrad.metrics.schedule import EvalSchedule
    from distgrad.parts import RunParts
    from distgrad.protocol.core import ProtocolCore
    from distgrad.server import ParameterServer

log = logging.getLogger("distgrad.transport")

#: the ``format`` of this engine's checkpoints (the server's half only; see _checkpoint)
CHECKPOINT_FORMAT = "net-1"
#: seconds an interrupted server waits for a consistent moment (no commit waiting at a
#: barrier or the gate) to write its final checkpoint
_FINAL_WAIT = 10.0


class NetEngine:
    """Serve the job to remote workers; return when every worker is done or abandoned."""

    name = "net"

    def __init__(self, secret: bytes, *, bind: str = "127.0.0.1", port: int = 0,
                 advertise: str | None = None, protection: str = "encrypt",
                 integrity: str | None = None,
                 worker_timeout: float = 120.0, rejoin_timeout: float | None = None,
                 on_listen: Callable[[str], None] | None = None,
                 replay: list[tuple[str, int]] | None = None, linger: float = 3.0
                 ) -> None:
        from distgrad.errors import choose, positive_float
        from distgrad.transport.auth import check_secret
        from distgrad.transport.frames import PROTECTIONS

        self.secret = check_secret(secret)
        self.bind, self.port, self.advertise = bind, port, advertise
        if integrity is not None:  # the older spelling
            choose("integrity", integrity, ("full", "header"))
            protection = "integrity" if integrity == "full" else "header"
        self.protection = choose("protection", protection, PROTECTIONS)
        self.worker_timeout = positive_float("worker_timeout", worker_timeout)
        self.rejoin_timeout = positive_float(
            "rejoin_timeout", worker_timeout if rejoin_timeout is None else rejoin_timeout)
        self.on_listen = on_listen
        self.replay = replay
        self.linger = linger
        self.now = 0.0
        self.address: str | None = None
        #: where checkpoints go (the run lifecycle sets the run directory's checkpoint.pt)
        self.checkpoint_path: Path | None = None
        #: a checkpoint of this engine to continue from (``serve --resume``)
        self.resume: dict[str, Any] | None = None
        self.checkpoints_tried = 0  # checkpoint writes attempted by this run
        self.written = 0  # checkpoints written by this run

    def run(self, parts: RunParts, server: ParameterServer, recorder: Recorder,
            evals: EvalSchedule) -> float:
        from distgrad.protocol.pipeline import make_core
        from distgrad.transport.datacheck import welcome_data
        from distgrad.transport.jobspec import check_portable
        from distgrad.transport.server import NetServer

        check_portable(parts)
        start = time.perf_counter() - (float(self.resume["t"]) if self.resume else 0.0)

        def clock() -> float:
            return time.perf_counter() - start

        totals = [parts.job.epochs * len(s) for s in parts.shards]
        core = make_core(parts.job, server, recorder, clock, totals=totals,
                         on_update=evals.maybe, schedule=self.replay)
        if self.resume is not None:
            if self.resume.get("format") != CHECKPOINT_FORMAT:
                raise ConfigError("the checkpoint was not written by the net engine "
                                  f"(format {self.resume.get('format')!r})")
            core.load_state_dict(self.resume["core"])
            fenced = core.fence()
            log.info("resumed at version %d from the checkpoint at %.1f s; workers %s "
                     "rejoin from their checkpointed positions %s", server.version,
                     self.resume["t"], fenced, core.positions())
        # SIGINT/SIGTERM while serving: a final checkpoint between two messages, then stop
        # (see _interrupts in distgrad.run; set here, so engines built on this one that do
        # not checkpoint are interrupted at once)
        self.stop_requested = False
        every = parts.job.checkpoint_every if self.checkpoint_path is not None else None
        ckpt = {"next": clock() + every if every else math.inf, "dones": _dones(core),
                "stop_by": None}

        def checkpoints() -> None:
            """Between two messages (no request half-handled): the periodic checkpoint,
            one as soon as a worker is done (it exits and cannot rejoin to redo its tail
            after a crash), and on SIGINT/SIGTERM a final one, then KeyboardInterrupt."""
            self.now = t = clock()
            if self.stop_requested:
                if ckpt["stop_by"] is None:
                    ckpt["stop_by"] = t + _FINAL_WAIT
                if self.checkpoint_path is None or self._checkpoint(core, recorder, t):
                    raise KeyboardInterrupt("interrupted: final checkpoint written"
                                            if self.checkpoint_path else "interrupted")
                if t > ckpt["stop_by"]:
                    log.warning("no final checkpoint: a request stayed waiting (barrier or "
                                "gate) for %.0f s; the last checkpoint stands", _FINAL_WAIT)
                    raise KeyboardInterrupt("interrupted")
                return
            if core.finished():
                return
            due = every and (t >= ckpt["next"] or _dones(core) > ckpt["dones"])
            if due and self._checkpoint(core, recorder, t):
                ckpt["next"], ckpt["dones"] = clock() + every, _dones(core)
        sizes = [p.numel() for p in parts.template.parameters() if p.requires_grad]
        net = NetServer(core, self.secret, bind=self.bind, port=self.port,
                        advertise=self.advertise, protection=self.protection,
                        welcome={"job": parts.job.to_dict(), **welcome_data(parts)},
                        worker_timeout=self.worker_timeout, codec=parts.job.compression,
                        sizes=sizes)
        self.address = net.address
        try:
            evals.maybe(0.0, server.version, 0)
            if self.on_listen is not None:
                self.on_listen(net.address)
            log.info("parameter server listening on %s", net.address)

            self.serve_to_the_end(net, core, clock, between=checkpoints)
        finally:
            net.close()
            del self.stop_requested  # outside run: a signal interrupts at once
        self.now = clock()
        return self.now

    def serve_to_the_end(self, net: Any, core: ProtocolCore, clock: Callable[[], float],
                         between: Callable[[], None] | None = None) -> None:
        """Serve until every worker is done or abandoned (dead and not back within
        ``rejoin_timeout``), calling ``between`` between two messages; then stay a moment
        to answer resends whose first answer was lost (a worker's last DONE), so that no
        worker of a finished run fails for it."""
        def finished() -> bool:
            if between is not None:
                between()
            if not core.live():
                for k, slot in enumerate(core.slots):
                    if (slot.state == "dead" and slot.dead_since is not None
                            and clock() - slot.dead_since > self.rejoin_timeout):
                        log.warning("worker %d did not come back within %.0f s: "
                                    "abandoned", k, self.rejoin_timeout)
                        core.abandon(k)
            return core.finished()

        net.serve(until=finished)
        stop = time.monotonic() + 30.0
        net.serve(until=lambda: time.monotonic() - net.last_message > self.linger
                  or time.monotonic() > stop)

    def _checkpoint(self, core: ProtocolCore, recorder: Recorder, t: float) -> bool:
        """Write the server's checkpoint now if no request is waiting (at a barrier or the
        gate); False when it must wait. A write that fails (full disk, no permission) is a
        ``checkpoint_failed`` event and the run goes on; it counts as done (True).

        It holds the server (center, clock, base versions, rule state), the protocol core
        (attempts, positions), the recorder's counters and ``events`` (the event-log lines
        it covers): the parent's half of the ``local`` engine's checkpoint, without the
        workers' half — remote workers keep their own state, and a resumed server fences
        their attempts (:meth:`ProtocolCore.fence`) so that they restart from the
        checkpointed positions."""
        assert self.checkpoint_path is not None
        try:
            snap = server_snapshot(core, recorder, t, CHECKPOINT_FORMAT)
        except RuntimeError:  # a commit waits at a barrier or the gate: not consistent now
            return False
        self.checkpoints_tried += 1
        self.written += save_snapshot(self.checkpoint_path, snap, recorder, t)
        return True


def _dones(core: ProtocolCore) -> int:
    return sum(s.state == "done" for s in core.slots)
