"""The sharded network server (``serve --shards S``): S shards replaying a recorded
schedule give the run one server gives — the same ``params_sha256``, the same commit
records (worker, version, τ; the distance merged across shards to float rounding) —
over loopback, with workers talking to every shard through a :class:`ShardedChannel`."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch

from distgrad import train
from distgrad.errors import ConfigError
from distgrad.job import Job
from distgrad.protocol.core import replay_schedule
from distgrad.protocol.driver import WorkerDriver, drive
from distgrad.transport.jobspec import job_from_dict, parts_from_job
from distgrad.transport.sharded import ShardedChannel, ShardedNetEngine, connect, shard_bounds

SECRET = b"sharded-test-secret-sharded-test-secret"
SMALL = dict(model="cnn", train_samples=480, batch_size=40, epochs=1, eval_every=1.0,
             seed=3, workers=2, threads=1)
#: asynchronous with the distance (merged across shards), and a synchronous barrier
CASES = [("downpour", 2, {}), ("averaging", 2, {})]


def job_for(algorithm: str, window: int, params: dict, engine: str) -> Job:
    return Job(algorithm=algorithm, window=window, params=params, engine=engine, **SMALL)


def records(events: list[dict[str, Any]]) -> list[tuple]:
    out: list[tuple] = []
    for e in events:
        if e["type"] == "commit":
            out.append((e["worker"], e["version"], e["staleness"], e["distance"]))
        elif e["type"] == "round":
            out.append((tuple(e["workers"]), e["version"]))
    return out


def same_records(a: list[tuple], b: list[tuple]) -> bool:
    """Equal, except distances (a root of a sum of per-shard squares) to 1e-5 relative."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if len(x) == 4 and x[3] is not None and y[3] is not None:
            if x[:3] != y[:3] or not math.isclose(x[3], y[3], rel_tol=1e-5, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def run_sharded(job: Job, shards: int, schedule: list[tuple[str, int]] | None) -> Any:
    """Serve ``job`` on ``shards`` shards in a thread; two workers join over loopback."""
    ready = threading.Event()
    out: dict[str, Any] = {}
    engine = ShardedNetEngine(SECRET, shards=shards, replay=schedule, linger=0.3,
                              on_listen=lambda address: ready.set(), worker_timeout=120)

    def serve() -> None:
        try:
            out["result"] = train(job, engine=engine)
        except BaseException as exc:
            out["error"] = exc
            ready.set()

    server = threading.Thread(target=serve)
    server.start()
    assert ready.wait(120) and "error" not in out, out.get("error")
    errors: list[BaseException] = []
    kinds: list[str] = []

    def work(k: int) -> None:
        try:
            with connect(engine.address, SECRET, worker=k, timeout=10, retries=20) as ch:
                kinds.append(type(ch).__name__)
                w = parts_from_job(job_from_dict(ch.info["job"])).make_worker(ch.worker)
                drive(WorkerDriver(w, attempt=ch.attempt, position=ch.position), ch)
        except BaseException as exc:
            errors.append(exc)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers = [threading.Thread(target=work, args=(k,)) for k in range(int(job.workers))]
        for t in workers:
            t.start()
        for t in workers:
            t.join(300)
    finally:
        torch.set_num_threads(threads)
    server.join(300)
    assert not server.is_alive() and "error" not in out, out.get("error")
    assert not errors, errors
    expected = "ShardedChannel" if shards > 1 else "NetClient"
    assert kinds == [expected] * int(job.workers)
    return out["result"]


_SIM: dict[str, Any] = {}


def on_sim(algorithm: str, window: int, params: dict) -> Any:
    if algorithm not in _SIM:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _SIM[algorithm] = train(job_for(algorithm, window, params, "sim"))
        finally:
            torch.set_num_threads(threads)
    return _SIM[algorithm]


@pytest.mark.parametrize(("algorithm", "window", "params"), CASES,
                         ids=[c[0] for c in CASES])
def test_two_shards_replay_a_schedule_with_the_bits_of_one_server(algorithm, window, params):
    ref = on_sim(algorithm, window, params)
    schedule = replay_schedule(ref.events)
    run = run_sharded(job_for(algorithm, window, params, "net"), 2, schedule)
    assert run.params_sha256 == ref.params_sha256
    assert same_records(records(run.events), records(ref.events))
    assert run.samples == ref.samples


def test_shard_bounds_tile_the_vector():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ConfigError, match="shards must be at most 4"):
        shard_bounds(4, 5)
    with pytest.raises(ConfigError, match="shards"):
        shard_bounds(10, 0)


def test_an_ensemble_cannot_be_sharded():
    """The ensemble's members are whole models beside the center: refused, not cut."""
    job = job_for("ensemble", 2, {}, "net")
    with pytest.raises(ConfigError, match="cannot be served by shards"):
        train(job, engine=ShardedNetEngine(SECRET, shards=2))


def test_serve_takes_a_shard_count():
    from distgrad.cli import build_parser
    from distgrad.engines.options import NetOptions

    assert NetOptions(shards=3).shards == 3
    for bad in (0, 65, True):
        with pytest.raises(ConfigError, match="shards must be an integer in"):
            NetOptions(shards=bad)
    args = build_parser().parse_args(["serve", "--shards", "2"])
    assert args.shards == 2


def test_a_channel_refuses_shards_that_disagree():
    class Fake:
        def __init__(self, worker: int, position: int, parameters: int) -> None:
            self.info, self.worker, self.attempt = {}, worker, 0
            self.position, self.parameters = position, parameters

        def close(self) -> None:
            pass

    from distgrad.transport.client import TransportError

    with pytest.raises(TransportError, match="the shards disagree"):
        ShardedChannel([Fake(0, 0, 2), Fake(0, 4, 2)], [(0, 2), (2, 4)])
    with pytest.raises(TransportError, match="holds 3 parameters"):
        ShardedChannel([Fake(0, 0, 2), Fake(0, 0, 3)], [(0, 2), (2, 4)])
