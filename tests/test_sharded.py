"""The sharded network server (``serve --shards S``): S shard processes replaying a
recorded schedule give the run one server gives — the same ``params_sha256``, the same
commit records (worker, version, τ; the distance merged across shards to float rounding)
— over loopback, with workers talking to every shard through a :class:`ShardedChannel`;
a shard process that dies fails the run at once, and no shard process outlives it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distgrad import compression, train
from distgrad.errors import ConfigError
from distgrad.job import Job
from distgrad.protocol.core import replay_schedule
from distgrad.protocol.driver import WorkerDriver, drive
from distgrad.transport.jobspec import job_from_dict, parts_from_job
from distgrad.transport.sharded import (
    ShardedChannel,
    ShardedNetEngine,
    connect,
    shard_bounds,
    slice_encoded,
)

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


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def gone(pids: list[int], within: float = 30.0) -> bool:
    """Whether every process of ``pids`` has ended, waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_sharded(job: Job, shards: int, schedule: list[tuple[str, int]] | None) -> Any:
    """Serve ``job`` on ``shards`` shards in a thread; two workers join over loopback.
    The shards are processes of their own while the run lasts, and gone after it."""
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
    pids = list(engine.pids)
    assert len(set(pids)) == shards and os.getpid() not in pids
    assert all(alive(p) for p in pids)
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
    assert gone(pids)
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


@pytest.mark.parametrize("codec", ["int8", "fp16", "bf16"])
def test_a_slice_of_a_compressed_commit_decodes_to_the_same_bits(codec):
    gen = torch.Generator().manual_seed(5)
    sizes = (7, 1, 30, 12, 50)
    x = torch.randn(sum(sizes), generator=gen) * torch.repeat_interleave(
        torch.tensor([1e-3, 5.0, 0.1, 30.0, 1.0]), torch.tensor(sizes))
    enc = compression.encode(codec, x, sizes)
    whole = compression.decode(enc, torch.empty(x.numel()))
    for a, b in [(0, 100), (3, 40), (7, 8), (38, 100), (50, 51), *shard_bounds(100, 3)]:
        part = slice_encoded(enc, a, b)
        assert sum(part.sizes) == b - a
        raw = b"".join(bytes(v) for v in compression.to_bytes(part))  # as on the wire
        assert len(raw) == compression.payload_bytes(codec, b - a, len(part.sizes))
        got = compression.decode_bytes(codec, raw, part.sizes)
        assert torch.equal(got, whole[a:b]), (a, b)


def test_int8_commits_travel_compressed_to_every_shard_with_the_bits_of_sim():
    def job(engine: str) -> Job:
        return Job(algorithm="downpour", window=2, engine=engine, compression="int8", **SMALL)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(job("sim"))
    finally:
        torch.set_num_threads(threads)
    run = run_sharded(job("net"), 2, replay_schedule(ref.events))
    assert run.params_sha256 == ref.params_sha256
    float32 = 4 * run.summary["parameters"]
    assert run.summary["bytes_per_commit"] < 0.26 * float32  # int8 bytes, not float32


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


def serve_until_listening(job: Job, engine: ShardedNetEngine
                          ) -> tuple[threading.Thread, dict[str, Any]]:
    """``train(job, engine)`` in a daemon thread, returned once the shards listen."""
    ready = threading.Event()
    out: dict[str, Any] = {}
    engine.on_listen = lambda address: ready.set()

    def serve() -> None:
        try:
            out["result"] = train(job, engine=engine)
        except BaseException as exc:
            out["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(120) and "error" not in out, out.get("error")
    return thread, out


def test_a_killed_shard_process_fails_the_run_and_stops_the_others():
    """SIGKILL one shard process of a serving run: the run fails within seconds with an
    error naming the shard, its pid and the signal, and no shard process is left."""
    from distgrad.run import RunFailed

    engine = ShardedNetEngine(SECRET, shards=2)
    thread, out = serve_until_listening(job_for("downpour", 2, {}, "net"), engine)
    pids = list(engine.pids)
    assert len(set(pids)) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)
    os.kill(pids[1], signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the run did not end after a shard process was killed"
    assert isinstance(out.get("error"), RunFailed), out
    assert (f"shard 1 of the parameter server (pid {pids[1]}) was killed by SIGKILL before "
            "the run ended") in str(out["error"])
    assert gone(pids)


def test_an_interrupted_sharded_server_stops_its_shard_processes():
    """SIGTERM to the serving process (here: this one, whose main thread trains) ends the
    run as interrupted and stops every shard process."""
    engine = ShardedNetEngine(SECRET, shards=2)
    pids: list[int] = []

    def on_listen(address: str) -> None:
        pids.extend(engine.pids)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    engine.on_listen = on_listen
    with pytest.raises(KeyboardInterrupt):
        train(job_for("downpour", 2, {}, "net"), engine=engine)
    assert len(pids) == 2 and gone(pids)


@pytest.mark.slow  # ~3 interpreter starts; the default suite runs the same path in-process
def test_cli_serve_with_two_shard_processes_trains_a_work_process(tmp_path: Path):
    """`distgrad serve --shards 2` (two shard processes, named with their pids in its log)
    and one `distgrad work` process train the whole job; both exit 0 and the shard
    processes are gone."""
    import json

    secret, addr, run = tmp_path / "secret", tmp_path / "addr", tmp_path / "run"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    serve_log = tmp_path / "serve.log"
    with serve_log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "distgrad", "serve", "--shards", "2", "--model", "cnn",
             "--train-samples", "240", "--batch-size", "40", "--window", "2", "--workers",
             "1", "--algorithm", "downpour", "--eval-every", "1", "--seed", "5",
             "--secret-file", str(secret), "--address-file", str(addr), "--out", str(run),
             "--worker-timeout", "60"],
            stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    try:
        deadline = time.monotonic() + 120
        while not addr.exists():
            assert server.poll() is None and time.monotonic() < deadline, \
                serve_log.read_text()
            time.sleep(0.1)
        line = next(x for x in serve_log.read_text().splitlines() if "shard processes" in x)
        pids = [int(p) for p in line.rpartition("pids ")[2].rstrip(")").split()]
        assert len(set(pids)) == 2 and server.pid not in pids
        assert all(alive(p) for p in pids)
        work = subprocess.run(
            [sys.executable, "-m", "distgrad", "work", "--connect", addr.read_text().strip(),
             "--secret-file", str(secret), "--timeout", "30"],
            capture_output=True, text=True, env=env, timeout=300)
        assert work.returncode == 0, work.stderr
        assert server.wait(120) == 0, serve_log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert gone(pids)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples_committed"] == 240 and summary["status"] == "completed"
