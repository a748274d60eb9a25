"""The ``ray`` engine on a real local Ray instance (loopback only, one per test session)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.ray

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray reads it at import
ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from distgrad import train  # noqa: E402
from distgrad.engines.ray import RayEngine, shard_bounds  # noqa: E402
from distgrad.job import Job  # noqa: E402
from distgrad.models import initialize  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small_model() -> nn.Module:
    # built from torch classes only, so Ray's workers can unpickle it
    return initialize(nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), 0)


def run(mnist_small, engine: RayEngine | None = None, **job_kw) -> tuple:
    job = Job(**{"engine": "ray", "epochs": 1, "batch_size": 32, "seed": 1, **job_kw})
    on_ray = train(job, model=small_model(), engine=engine or RayEngine(), **mnist_small)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker actor: the same float summation order
    try:
        on_sim = train(Job(**{**job.__dict__, "engine": "sim"}), model=small_model(),
                       **mnist_small)
    finally:
        torch.set_num_threads(threads)
    return on_ray, on_sim


def test_adag_on_ray_reaches_the_sim_accuracy_band(mnist_small):
    on_ray, on_sim = run(mnist_small, algorithm="adag", workers=2, window=3, epochs=2)
    assert on_ray.samples == on_sim.samples == 6000
    assert on_ray.test_accuracy >= 0.7  # an asynchronous run: its interleaving varies
    assert abs(on_ray.test_accuracy - on_sim.test_accuracy) < 0.05
    commits = [e for e in on_ray.events if e["type"] == "commit"]
    assert all(0 < c["scale"] <= 1 for c in commits)
    assert {c["worker"] for c in commits} == {0, 1}


def test_one_worker_and_a_sharded_server_give_the_sim_parameters_bit_for_bit(mnist_small):
    engine = RayEngine(shard_threshold=1000, shards=3)
    on_ray, on_sim = run(mnist_small, engine=engine, algorithm="agn", workers=1, window=4)
    assert len(engine.bounds) == 3
    assert on_ray.params_sha256 == on_sim.params_sha256
    assert on_ray.commits == on_sim.commits


def test_synchronous_averaging_on_ray_equals_sim(mnist_small):
    on_ray, on_sim = run(mnist_small, algorithm="averaging", workers=2, window=3)
    rounds = [e for e in on_ray.events if e["type"] == "round"]
    assert rounds and all(sorted(r["workers"]) == [0, 1] for r in rounds)
    # two payloads sum the same in either order: the result is exact
    assert on_ray.params_sha256 == on_sim.params_sha256


def test_reads_on_ray_leave_the_pull_clock_alone(mnist_small):
    """GEM (worker placement) reads the center before every commit; one worker on Ray ends
    with the sim's parameters, so reads do not count as pulls there either."""
    on_ray, on_sim = run(mnist_small, algorithm="gem", workers=1, window=3)
    assert on_ray.params_sha256 == on_sim.params_sha256


def test_stale_synchronous_gate_on_ray(mnist_small):
    """SSP with bound 0: no worker is ever more than one commit ahead of the other."""
    on_ray, _ = run(mnist_small, algorithm="ssp", params={"bound": 0}, workers=2, window=4)
    clocks = {0: 0, 1: 0}
    for e in on_ray.events:
        if e["type"] == "commit":
            clocks[e["worker"]] += 1
            assert abs(clocks[0] - clocks[1]) <= 1
    assert on_ray.samples == 3000 and clocks[0] + clocks[1] == on_ray.commits


def test_a_crashed_worker_actor_is_replaced_and_resumes(mnist_small):
    engine = RayEngine(inject_crash=(0, 5))
    on_ray, _ = run(mnist_small, engine=engine, algorithm="agn", workers=2, window=3)
    assert engine.restarts == 1
    faults = [e for e in on_ray.events if e["type"] == "fault"]
    assert [(f["worker"], f["kind"]) for f in faults] == [(0, "crash")]
    commits = [e for e in on_ray.events if e["type"] == "commit"]
    per_worker = {k: sum(c["samples"] for c in commits if c["worker"] == k) for k in (0, 1)}
    assert per_worker == {0: 1500, 1: 1500}  # each sample committed once, none lost
    assert on_ray.test_accuracy > 0.5


def test_a_refused_commit_fails_the_run_loudly(mnist_small):
    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(784, 10))

        def forward(self, x):
            return x @ (self.w * float("inf"))

    job = Job(engine="ray", algorithm="agn", workers=1, window=2, epochs=1, batch_size=32)
    with pytest.raises(RuntimeError, match=r"non-finite|could not be created"):
        train(job, model=Exploding(), engine=RayEngine(), **mnist_small)


def test_shard_bounds_cover_the_vector():
    assert shard_bounds(10, 100, None) == [(0, 10)]
    b = shard_bounds(120_000_000, 50_000_000, None)
    assert len(b) == 5 and b[0][0] == 0 and b[-1][1] == 120_000_000
    assert all(x[1] == y[0] for x, y in itertools.pairwise(b))


def test_user_code_by_import_path_on_ray():
    """The model and data of a user module (imported by every actor, nothing of the user's
    pickled by distgrad) train on Ray as on sim."""
    user = dict(model="examples.user_model:make_model", dataset="examples.user_model:make_data",
                data_args={"n": 600}, algorithm="downpour", window=2, batch_size=25, epochs=2,
                lr=0.01, workers=2, seed=0)
    res = train(engine="ray", **user)
    assert res.summary["status"] == "completed" and res.samples == 1000
    assert res.test_accuracy > 0.9
