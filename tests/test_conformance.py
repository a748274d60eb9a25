"""Conformance: one scripted schedule, every transport, the same run.

A run on ``sim`` records the order in which the server saw pulls, reads, commits and
dones. That schedule is replayed through each engine's real transport — ``local``'s
processes and pipes, ``net``'s sockets, ``ray``'s actors, ``spark``'s barrier tasks —
whose :class:`~distgrad.protocol.core.ProtocolCore` holds every request until it is
next. Every engine must then produce the same commit records (worker, version, τ,
distance) and the same ``params_sha256`` as ``sim``. A new engine passes this before it
lands. The algorithms cover each capability of the protocol: plain asynchrony, the
stale center sent by the worker (ADAG), reads (GEM), elastic exchange (AEASGD), the
barrier (averaging) and the stale-synchronous gate (SSP).

The retry half: the same schedule over the network with every kind of reply dropped
once (the client resends; the core answers again without a second effect), and with
every request sent twice.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from distgrad import train
from distgrad.engines.local import LocalEngine
from distgrad.engines.net import NetEngine
from distgrad.job import Job
from distgrad.protocol.core import replay_schedule
from distgrad.protocol.driver import WorkerDriver, drive
from distgrad.transport.client import NetClient
from distgrad.transport.frames import Kind
from distgrad.transport.jobspec import job_from_dict, parts_from_job
from distgrad.transport.server import NetServer

SECRET = b"conformance-secret-conformance-secret"
SMALL = dict(model="cnn", train_samples=480, batch_size=40, epochs=1, eval_every=1.0,
             seed=3, workers=2)
ALGORITHMS = [("downpour", 2, {}), ("adag", 3, {}), ("gem", 2, {}), ("aeasgd", 2, {}),
              ("averaging", 2, {}), ("ssp", 1, {"bound": 1})]


def job_for(algorithm: str, window: int, params: dict, engine: str) -> Job:
    return Job(algorithm=algorithm, window=window, params=params, engine=engine, threads=1,
               **SMALL)


def records(events: list[dict[str, Any]]) -> list[tuple]:
    """What must agree between engines: every commit's (worker, version, τ, distance) and
    every round's (participants, version)."""
    out: list[tuple] = []
    for e in events:
        if e["type"] == "commit":
            out.append((e["worker"], e["version"], e["staleness"], e["distance"]))
        elif e["type"] == "round":
            out.append((tuple(e["workers"]), e["version"]))
    return out


_SIM: dict[str, Any] = {}


def on_sim(algorithm: str, window: int, params: dict) -> Any:
    """The reference run (one torch thread, as each worker of the other engines)."""
    if algorithm not in _SIM:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _SIM[algorithm] = train(job_for(algorithm, window, params, "sim"))
        finally:
            torch.set_num_threads(threads)
    return _SIM[algorithm]


def assert_conforms(run: Any, ref: Any) -> None:
    assert records(run.events) == records(ref.events)
    assert run.params_sha256 == ref.params_sha256
    assert run.samples == ref.samples


# --------------------------------------------------------------------------- net plumbing


def net_worker(address: str, worker: int, wrap: Any, errors: list[BaseException]) -> None:
    try:
        with NetClient(address, SECRET, worker=worker, timeout=2, retries=20) as client:
            job = job_from_dict(client.info["job"])
            w = parts_from_job(job).make_worker(client.worker)
            channel = wrap(client) if wrap is not None else client
            drive(WorkerDriver(w, attempt=client.attempt, position=client.position), channel)
    except BaseException as exc:
        errors.append(exc)


def run_on_net(job: Job, schedule: list[tuple[str, int]], wrap: Any = None) -> Any:
    ready = threading.Event()
    addresses: list[str] = []
    out: dict[str, Any] = {}

    def on_listen(address: str) -> None:
        addresses.append(address)
        ready.set()

    engine = NetEngine(SECRET, on_listen=on_listen, replay=schedule, worker_timeout=120)

    def serve() -> None:
        try:
            out["result"] = train(job, engine=engine)
        except BaseException as exc:
            out["error"] = exc
            ready.set()

    server = threading.Thread(target=serve)
    server.start()
    assert ready.wait(120) and "error" not in out, out.get("error")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        errors: list[BaseException] = []
        workers = [threading.Thread(target=net_worker, args=(addresses[0], k, wrap, errors))
                   for k in range(int(job.workers))]
        for t in workers:
            t.start()
        for t in workers:
            t.join(300)
    finally:
        torch.set_num_threads(threads)
    server.join(300)
    assert "error" not in out, out.get("error")
    assert not errors, errors  # no worker of a completed run fails
    return out["result"]


# --------------------------------------------------------------------------- the suite


@pytest.mark.parametrize(("algorithm", "window", "params"), ALGORITHMS,
                         ids=[a[0] for a in ALGORITHMS])
def test_local_replays_the_sim_schedule_bit_for_bit(algorithm, window, params):
    ref = on_sim(algorithm, window, params)
    job = job_for(algorithm, window, params, "local")
    run = train(job, engine=LocalEngine(job, replay=replay_schedule(ref.events)))
    assert_conforms(run, ref)


@pytest.mark.parametrize(("algorithm", "window", "params"), ALGORITHMS,
                         ids=[a[0] for a in ALGORITHMS])
def test_net_replays_the_sim_schedule_bit_for_bit(algorithm, window, params):
    ref = on_sim(algorithm, window, params)
    run = run_on_net(job_for(algorithm, window, params, "net"), replay_schedule(ref.events))
    assert_conforms(run, ref)


@pytest.mark.slow  # a Ray instance per case; local and net replays stay in the default suite
@pytest.mark.ray
@pytest.mark.parametrize(("algorithm", "window", "params"),
                         [ALGORITHMS[1], ALGORITHMS[4], ALGORITHMS[5]],
                         ids=["adag", "averaging", "ssp"])
def test_ray_replays_the_sim_schedule_bit_for_bit(algorithm, window, params):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from distgrad.engines.ray import RayEngine

    ref = on_sim(algorithm, window, params)
    run = train(job_for(algorithm, window, params, "ray"),
                engine=RayEngine(replay=replay_schedule(ref.events)))
    assert_conforms(run, ref)


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.parametrize(("algorithm", "window", "params"), [ALGORITHMS[1], ALGORITHMS[4]],
                         ids=["adag", "averaging"])
def test_spark_replays_the_sim_schedule_bit_for_bit(algorithm, window, params):
    pytest.importorskip("pyspark", reason="the spark extra is not installed")
    from distgrad.engines.spark import SparkEngine

    ref = on_sim(algorithm, window, params)
    run = train(job_for(algorithm, window, params, "spark"),
                engine=SparkEngine(replay=replay_schedule(ref.events)))
    assert_conforms(run, ref)


# --------------------------------------------------------------------------- retries


class Twice:
    """A channel that sends every request twice, as a network that duplicates messages
    would: the second answer must equal the first and have no effect of its own."""

    def __init__(self, inner: NetClient) -> None:
        self.inner = inner
        self.transport_errors = inner.transport_errors
        self.resent: dict[str, int] = {}

    def call(self, req: Any) -> Any:
        first = self.inner.call(req)
        again = self.inner.call(req)
        if first is not None:
            assert again is not None and again.duplicate
            assert (again.version, again.base_version) == (first.version, first.base_version)
            for a, b in ((first.pulled, again.pulled), (first.reply, again.reply)):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
            self.resent[first.kind] = self.resent.get(first.kind, 0) + 1
        return first


@pytest.mark.parametrize("algorithm", ["gem", "averaging"])
def test_every_request_sent_twice_changes_nothing(algorithm):
    window, params = next((w, p) for a, w, p in ALGORITHMS if a == algorithm)
    ref = on_sim(algorithm, window, params)
    channels: list[Twice] = []

    def wrap(client: NetClient) -> Twice:
        channels.append(Twice(client))
        return channels[-1]

    run = run_on_net(job_for(algorithm, window, params, "net"), replay_schedule(ref.events),
                     wrap)
    assert_conforms(run, ref)
    kinds = set().union(*(c.resent for c in channels))
    assert {"pull", "commit", "done"} <= kinds
    if algorithm == "gem":
        assert "read" in kinds


def test_a_dropped_reply_of_every_kind_is_resent_and_answered_once(monkeypatch):
    """The server loses its first reply of each kind (PULLED, COMMITTED, ACK — a DONE's);
    the workers resend after their timeout and the run is the same as without losses, with
    no worker failing."""
    algorithm, window, params = ALGORITHMS[2]  # gem: pulls, reads, commits, dones
    ref = on_sim(algorithm, window, params)
    dropped: list[int] = []
    real_emit = NetServer._emit

    def lossy_emit(self, peer, frames):
        kind = frames[0][4] if isinstance(frames[0], bytes) else bytes(frames[0])[4]
        if kind in (Kind.PULLED, Kind.COMMITTED, Kind.ACK) and kind not in dropped:
            dropped.append(kind)
            return  # lost on the way
        real_emit(self, peer, frames)

    monkeypatch.setattr(NetServer, "_emit", lossy_emit)
    run = run_on_net(job_for(algorithm, window, params, "net"), replay_schedule(ref.events))
    assert sorted(set(dropped)) == [Kind.PULLED, Kind.COMMITTED, Kind.ACK]
    assert_conforms(run, ref)
