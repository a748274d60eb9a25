"""``net`` engine end to end: the same run as ``sim``, remote workers that resume, the CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distgrad import train
from distgrad.engines.net import NetEngine
from distgrad.errors import ConfigError
from distgrad.job import Job
from distgrad.protocol.messages import CommitRequest
from distgrad.transport.client import NetClient, RemoteError, run_worker
from distgrad.transport.jobspec import job_from_dict, parts_from_job

SECRET = b"0123456789abcdef0123456789abcdef"
SMALL = dict(model="mlp", train_samples=600, batch_size=60, epochs=1, eval_every=0.5)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The in-process workers compute with one torch thread, as ``distgrad work`` does by
    default and as ``sim`` does for these small models (a CNN's float results depend on
    the thread count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def serve_in_thread(job: Job, **engine_kw) -> tuple[NetEngine, threading.Thread, dict, str]:
    ready = threading.Event()
    addresses: list[str] = []
    out: dict = {}

    def on_listen(address: str) -> None:
        addresses.append(address)
        ready.set()

    engine = NetEngine(SECRET, on_listen=on_listen, **engine_kw)

    def target() -> None:
        try:
            out["result"] = train(job, engine=engine)
        except BaseException as exc:
            out["error"] = exc
            ready.set()

    thread = threading.Thread(target=target)
    thread.start()
    assert ready.wait(120)
    assert "error" not in out, out.get("error")
    return engine, thread, out, addresses[0]


def remote_worker(address: str, worker: int | None = None, stop_after: int | None = None
                  ) -> None:
    with NetClient(address, SECRET, worker=worker, timeout=30) as client:
        job = job_from_dict(client.info["job"])
        w = parts_from_job(job).make_worker(client.worker)
        if stop_after is not None:  # die after a few commits, as a killed process would
            commits = [0]
            real = client.call

            def call(req):
                if isinstance(req, CommitRequest):
                    if commits[0] == stop_after:
                        raise KeyboardInterrupt("killed")
                    commits[0] += 1
                return real(req)

            client.call = call  # type: ignore[method-assign]
        run_worker(client, w)


def test_job_travels_as_json_and_comes_back_equal() -> None:
    job = Job(algorithm="adag", params={"gamma": 1e-3}, workers=3, window=4, engine="net",
              **SMALL)
    assert job_from_dict(job.to_dict()).to_dict() == job.to_dict()
    with pytest.raises(ConfigError, match="fields this distgrad does not know: bogus"):
        job_from_dict({**job.to_dict(), "bogus": 1})


@pytest.mark.parametrize("algorithm", ["agn", "aeasgd"])
def test_one_remote_worker_gives_the_sim_parameters_bit_for_bit(algorithm: str) -> None:
    sim = train(Job(algorithm=algorithm, engine="sim", workers=1, window=3, seed=4, **SMALL))
    job = Job(algorithm=algorithm, workers=1, window=3, seed=4, engine="net", **SMALL)
    _, thread, out, address = serve_in_thread(job)
    remote_worker(address)
    thread.join(120)
    net = out["result"]
    assert net.params_sha256 == sim.params_sha256
    assert net.commits == sim.commits and net.samples == sim.samples == 600
    assert [e["version"] for e in net.events if e["type"] == "commit"] == \
        [e["version"] for e in sim.events if e["type"] == "commit"]


def test_a_dead_worker_is_replaced_and_no_window_is_applied_twice(caplog) -> None:
    job = Job(algorithm="agn", workers=2, window=2, seed=1, engine="net", **SMALL)
    _, thread, out, address = serve_in_thread(job, worker_timeout=60)
    other = threading.Thread(target=remote_worker, args=(address, 1))
    other.start()
    with pytest.raises(KeyboardInterrupt):
        remote_worker(address, worker=0, stop_after=1)
    remote_worker(address, worker=0)  # started again: attempt 1 resumes at the position
    other.join(120)
    thread.join(120)
    res = out["result"]
    commits = [e for e in res.events if e["type"] == "commit"]
    per_worker = {k: sum(c["samples"] for c in commits if c["worker"] == k) for k in (0, 1)}
    assert per_worker == {0: 300, 1: 300}  # every sample committed exactly once
    faults = [e for e in res.events if e["type"] == "fault"]
    assert [(f["worker"], f["kind"]) for f in faults] == [(0, "error")]
    assert res.samples_lost == faults[0]["samples_lost"] > 0  # trained, never committed
    assert res.test_accuracy > 0.5


def test_custom_models_cannot_travel(tiny_mlp) -> None:
    job = Job(algorithm="agn", workers=1, engine="net", **SMALL)
    with pytest.raises(ConfigError, match="cannot be sent to remote workers"):
        train(job, model=tiny_mlp, engine=NetEngine(SECRET))


def test_rejected_worker_id_is_named() -> None:
    job = Job(algorithm="agn", workers=1, window=3, engine="net", **SMALL)
    _, thread, out, address = serve_in_thread(job)
    with pytest.raises(RemoteError, match="worker id 5 out of range"):
        NetClient(address, SECRET, worker=5, timeout=10)
    remote_worker(address)
    thread.join(120)
    assert out["result"].samples == 600


def test_cli_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "distgrad", "work", "--connect", "127.0.0.1:1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "no shared secret: pass --secret-file PATH or set $DISTGRAD_SECRET" in r.stderr
    secret = tmp_path / "s"
    secret.write_text("x" * 40)
    secret.chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "distgrad", "work", "--connect", "127.0.0.1:1",
                        "--secret-file", str(secret)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "readable by others" in r.stderr
    assert secret.read_text() == "x" * 40 and secret.stat().st_mode & 0o777 == 0o644


def test_cli_worker_with_a_private_secret_file_trains_the_served_job(tmp_path: Path) -> None:
    """The refusals above are about the secret alone: against a live server, a group/other
    readable copy of the right secret is refused before connecting (nothing is admitted),
    and the same file at mode 600 joins as attempt 0 and trains the whole job."""
    job = Job(algorithm="agn", workers=1, window=3, seed=4, engine="net", **SMALL)
    _, thread, out, address = serve_in_thread(job)
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    secret = tmp_path / "s"
    secret.write_bytes(SECRET + b"\n")
    cmd = [sys.executable, "-m", "distgrad", "work", "--connect", address, "--secret-file",
           str(secret), "--timeout", "30"]
    secret.chmod(0o640)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "readable by others (mode 640)" in r.stderr
    secret.chmod(0o600)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "worker 0 attempt 0" in r.stderr  # the refused run was never admitted
    thread.join(120)
    assert out["result"].samples == 600 and out["result"].commits == 4  # windows 3+3+3+1


def test_one_remote_worker_with_reads_gives_the_sim_parameters() -> None:
    """GEM (worker placement) reads the center before each commit: a read over the network
    leaves the worker's pull clock alone, as in sim."""
    sim = train(Job(algorithm="gem", engine="sim", workers=1, window=3, seed=4, **SMALL))
    job = Job(algorithm="gem", workers=1, window=3, seed=4, engine="net", **SMALL)
    _, thread, out, address = serve_in_thread(job)
    remote_worker(address)
    thread.join(120)
    assert out["result"].params_sha256 == sim.params_sha256


def test_stale_synchronous_gate_over_the_network() -> None:
    """SSP with bound 0 is a barrier: two remote workers take turns commit by commit."""
    job = Job(algorithm="ssp", params={"bound": 0}, workers=2, window=1, seed=2, engine="net",
              **SMALL)
    _, thread, out, address = serve_in_thread(job)
    others = [threading.Thread(target=remote_worker, args=(address, k)) for k in (0, 1)]
    for t in others:
        t.start()
    for t in others:
        t.join(120)
    thread.join(120)
    res = out["result"]
    clocks = {0: 0, 1: 0}
    for e in res.events:
        if e["type"] == "commit":
            clocks[e["worker"]] += 1
            assert abs(clocks[0] - clocks[1]) <= 1
    assert clocks == {0: 5, 1: 5} and res.samples == 600


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["int8", "fp16", "bf16"])
def test_compressed_commits_travel_as_their_codec_bytes(codec: str) -> None:
    """With --compress, a commit's bytes on the wire are exactly the codec's size plus the
    fixed preamble and one tag per chunk (summary's bytes_per_commit), and the run equals
    sim's with the same codec."""
    from distgrad.compression import payload_bytes
    from distgrad.transport.frames import frame_size

    kw = dict(SMALL, algorithm="agn", workers=1, window=3, seed=4, compression=codec,
              model="cnn")
    sim = train(Job(engine="sim", **kw))
    _, thread, out, address = serve_in_thread(Job(engine="net", **kw))
    remote_worker(address)
    thread.join(120)
    res = out["result"]
    tensors = 8  # the CNN's weights and biases
    wire = frame_size(payload_bytes(codec, res.parameters, tensors), "encrypt")
    assert res.bytes_per_commit == wire
    assert wire < (0.26 if codec == "int8" else 0.51) * frame_size(4 * res.parameters,
                                                                   "encrypt")
    assert res.params_sha256 == sim.params_sha256


DATA_MODULE = '''
import numpy as np


def make_data(n=360):
    rng = np.random.default_rng({seed})
    centers = rng.normal(0.0, 2.0, size=(3, 8))
    y = rng.integers(0, 3, size=n)
    x = (centers[y] + rng.normal(0.0, 1.0, size=(n, 8))).astype(np.float32)
    return (x[:300], y[:300]), (x[300:], y[300:])
'''


def test_a_worker_with_other_data_is_refused_before_it_commits(tmp_path: Path) -> None:
    """`distgrad serve` and `distgrad work` import the data module ``dgdata`` each from its
    own PYTHONPATH: a worker whose version makes other data exits non-zero naming both
    fingerprints and the data import path, before any commit; an honest worker then trains
    the whole job."""
    import json
    import os
    import time

    from distgrad.transport.auth import read_secret_file

    root = Path(__file__).resolve().parents[1]
    for side, seed in (("server", 7), ("other", 8)):
        (tmp_path / side).mkdir()
        (tmp_path / side / "dgdata.py").write_text(DATA_MODULE.format(seed=seed))

    def env(side: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / side), str(root)])}

    addr_file, secret_file = tmp_path / "addr", tmp_path / "secret"
    server = subprocess.Popen(
        [sys.executable, "-m", "distgrad", "serve", "--model", "examples.user_model:make_model",
         "--data", "dgdata:make_data", "--algorithm", "agn", "--workers", "1", "--window", "3",
         "--batch-size", "50", "--lr", "0.02", "--secret-file", str(secret_file),
         "--address-file",
         str(addr_file), "--out", str(tmp_path / "run"), "--quiet", "--worker-timeout", "60"],
        cwd=tmp_path, env=env("server"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 120
        while not addr_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.1)
        address = addr_file.read_text().strip()
        assert read_secret_file(secret_file)
        work = [sys.executable, "-m", "distgrad", "work", "--connect", address,
                "--secret-file", str(secret_file), "--timeout", "30", "--worker", "0"]
        bad = subprocess.run(work, cwd=tmp_path, env=env("other"), capture_output=True,
                             text=True, timeout=300)
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        ours = config["data_fingerprint"]
        assert bad.returncode != 0
        message = bad.stderr.strip().splitlines()[-1]
        assert message.startswith("distgrad: error: this worker's data differ from the "
                                  "server's: data 'dgdata:make_data' has fingerprint ")
        assert f"{ours} on the server at {address}" in message
        assert len(message.split("fingerprint ")[1].split(" ")[0]) == 16  # its own, named
        honest = subprocess.run(work, cwd=tmp_path, env=env("server"), capture_output=True,
                                text=True, timeout=300)
        assert honest.returncode == 0, honest.stderr
        server.communicate(timeout=300)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    faults = [e for e in events if e["type"] == "fault"]
    assert [(f["worker"], f["samples_lost"]) for f in faults] == [(0, 0)]
    assert "data differ" in faults[0]["reason"]
    assert summary["samples"] == 300 and summary["samples_committed"] == 300
    assert summary["test_accuracy"] > 0.6  # chance: 1/3 (6 steps of 50)
