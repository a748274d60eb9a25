"""The simulator: determinism, staleness statistics, timing models, crashes, aliasing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import Point, half_sq, point_data
from distgrad import Timing, train
from distgrad.engines.sim import SimEngine
from distgrad.job import Job
from distgrad.replica import Replica

FAST = dict(epochs=1, batch_size=32, lr=1e-3, inner_optimizer="adam", eval_every=0.5)


def test_same_seed_gives_identical_parameters_and_event_log(mnist_small, tiny_mlp, tmp_path):
    runs = [train(engine="sim", algorithm="adag", workers=4, window=3, seed=11, model=tiny_mlp,
                  out=tmp_path / f"r{i}", **FAST, **mnist_small) for i in range(2)]
    assert runs[0].params_sha256 == runs[1].params_sha256
    assert (tmp_path / "r0" / "events.jsonl").read_bytes() == \
        (tmp_path / "r1" / "events.jsonl").read_bytes()
    other = train(algorithm="adag", workers=4, window=3, seed=12, model=tiny_mlp, **FAST,
                  engine="sim", **mnist_small)
    assert other.params_sha256 != runs[0].params_sha256


@pytest.mark.parametrize("n", [4, 8])
def test_mean_staleness_is_close_to_n_minus_one(n, mnist_small, tiny_mlp):
    res = train(engine="sim", algorithm="downpour", workers=n, window=1, seed=1, model=tiny_mlp,
                track_distance=False, record_batches=False, epochs=2, batch_size=16, lr=1e-3,
                eval_every=100.0, **mnist_small)
    assert abs(res.staleness_mean - (n - 1)) <= 0.1 * (n - 1)


def test_constant_timing_is_lockstep_round_robin(mnist_small, tiny_mlp):
    res = train(engine="sim", algorithm="downpour", workers=4, window=2, seed=1, model=tiny_mlp,
                timing=Timing(model="constant"), **FAST, **mnist_small)
    commits = [e for e in res.events if e["type"] == "commit"]
    assert [c["worker"] for c in commits[:12]] == [0, 1, 2, 3] * 3
    assert {c["staleness"] for c in commits[4:-4]} == {3}


def test_jitter_breaks_the_lockstep(mnist_small, tiny_mlp):
    res = train(algorithm="downpour", workers=4, window=2, seed=1, model=tiny_mlp, **FAST,
                engine="sim", **mnist_small)
    commits = [e for e in res.events if e["type"] == "commit"]
    rounds = [tuple(c["worker"] for c in commits[i:i + 4]) for i in range(0, 40, 4)]
    assert len(set(rounds)) > 1
    assert len({c["staleness"] for c in commits}) > 2


def test_commit_records_carry_staleness_distance_and_scale(mnist_small, tiny_mlp):
    res = train(engine="sim", algorithm="adag", workers=3, window=2, seed=1, model=tiny_mlp, **FAST,
                **mnist_small)
    commits = [e for e in res.events if e["type"] == "commit"]
    for c in commits:
        assert {"worker", "base_version", "version", "staleness", "distance", "scale"} <= set(c)
        assert c["staleness"] == c["version"] - 1 - c["base_version"]
        assert 0 < c["scale"] <= 1
        assert (c["distance"] == 0) == (c["staleness"] == 0)


def test_stragglers_commit_less_often(mnist_small, tiny_mlp):
    res = train(engine="sim", algorithm="agn", workers=4, window=2, seed=1, model=tiny_mlp,
                timing=Timing(stragglers=1, straggler_factor=3.0), **FAST, **mnist_small)
    commits = [e for e in res.events if e["type"] == "commit"]
    # every worker does the same work; the straggler finishes about 3x later
    done = {e["worker"]: e["t"] for e in res.events if e["type"] == "done"}
    assert done[0] > 2.5 * max(done[k] for k in (1, 2, 3))
    # while the others run, the straggler commits a third as often
    t_fast = max(done[k] for k in (1, 2, 3))
    early = [c["worker"] for c in commits if c["t"] <= t_fast]
    assert early.count(0) < 0.5 * early.count(1)


def test_crash_is_an_event_and_the_run_finishes(mnist_small, tiny_mlp):
    res = train(engine="sim", algorithm="agn", workers=3, window=2, seed=1, model=tiny_mlp,
                timing=Timing(crashes=((1, 0.5),)), **FAST, **mnist_small)
    faults = [e for e in res.events if e["type"] == "fault"]
    assert len(faults) == 1 and faults[0]["worker"] == 1 and faults[0]["t"] == 0.5
    assert res.samples_lost == faults[0]["samples_lost"] > 0
    assert res.samples + res.samples_lost >= 3000
    assert not any(e["type"] == "commit" and e["worker"] == 1 and e["t"] > 0.5
                   for e in res.events)


def test_crash_during_a_synchronous_round_releases_the_barrier(mnist_small, tiny_mlp):
    res = train(engine="sim", algorithm="averaging", workers=3, window=2, seed=1, model=tiny_mlp,
                timing=Timing(crashes=((2, 0.3),)), **FAST, **mnist_small)
    rounds = [e for e in res.events if e["type"] == "round"]
    assert rounds[-1]["workers"] == [0, 1] or sorted(rounds[-1]["workers"]) == [0, 1]
    assert res.test_accuracy > 0.5


def test_server_queue_applies_one_commit_at_a_time():
    """With ``server_time`` the server applies one commit per 0.5 s: four workers that all
    commit at t = 1.0 land at 1.0, 1.5, 2.0 and 2.5 (not 1.0, then three at 1.5), and no
    two commits of the run land less than server_time apart."""
    x, y = point_data([[float(i), 1.0] for i in range(16)])
    res = train(engine="sim", algorithm="downpour", workers=4, window=1, seed=1,
                model=Point(), data=(x, y), test_data=(x, y), loss_fn=half_sq,
                batch_size=4, epochs=2, lr=0.1, inner_optimizer="sgd", sharding="contiguous",
                timing=Timing(model="constant", step_time=1.0, server_time=0.5))
    landed = [e["t"] for e in res.events if e["type"] == "commit"]
    assert landed[:4] == [1.0, 1.5, 2.0, 2.5]
    assert len(landed) == 8
    gaps = np.diff(sorted(landed))
    assert gaps.min() >= 0.5 - 1e-12, gaps


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_no_aliasing(engine: SimEngine) -> None:
    """The sim engine's replicas: each module trains in its own flat buffer, and no
    replica buffer shares storage with the server's center or with another buffer."""
    center = _storage(engine.server.center)
    seen: dict[int, str] = {center: "center"}
    for w in engine.workers:
        rep = w.rep
        for p in rep.module.parameters():
            assert _storage(p) == _storage(rep.params), f"worker {w.id} module"
        for name, t in (("params", rep.params), ("base", rep.base), ("payload", rep.payload)):
            ptr = _storage(t)
            assert ptr not in seen, f"worker {w.id} {name} aliases {seen.get(ptr)}"
            seen[ptr] = f"worker {w.id} {name}"


@pytest.mark.parametrize("algorithm", ["downpour", "aeasgd"])
def test_sim_replicas_never_alias_center_or_other_replicas(algorithm, mnist_small, tiny_mlp):
    """The thesis' simulator shared one array between the server and every worker: checked
    on the engine's own replicas at every batch of a real run and after it."""
    engine = SimEngine(Timing(), seed=5)
    checks = [0]

    def progress(done: int, total: int) -> None:
        _check_no_aliasing(engine)
        checks[0] += 1

    job = Job(algorithm=algorithm, engine="sim", workers=3, window=2, seed=5, **FAST)
    res = train(job, model=tiny_mlp, engine=engine, progress=progress, **mnist_small)
    assert checks[0] == res.samples // FAST["batch_size"] + 3  # every batch (3 short tails)
    _check_no_aliasing(engine)
    # and behaviourally: writing one replica changes neither the center nor the others
    reps = [w.rep for w in engine.workers]
    center, others = engine.server.center.clone(), [r.params.clone() for r in reps[1:]]
    reps[0].params.add_(1.0)
    reps[0].base.add_(1.0)
    reps[0].payload.add_(1.0)
    assert torch.equal(engine.server.center, center)
    assert all(torch.equal(r.params, o) for r, o in zip(reps[1:], others, strict=True))
    assert torch.equal(next(reps[0].module.parameters()).reshape(-1),
                       reps[0].params[:next(reps[0].module.parameters()).numel()])


def test_flat_gradient_is_the_parameters_gradient(tiny_mlp):
    rep = Replica(0, tiny_mlp, torch.nn.functional.cross_entropy, "sgd", 0.1)
    x, y = torch.randn(8, 784, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    rep.gradient(x, y)
    ref = type(tiny_mlp)()
    ref.load_state_dict(tiny_mlp.state_dict())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(rep.grad, expected)


def test_run_directory_files(mnist_small, tiny_mlp, tmp_path):
    res = train(engine="sim", algorithm="dynsgd", workers=2, window=2, seed=0, model=tiny_mlp,
                out=tmp_path / "run", **FAST, **mnist_small)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "events.jsonl", "summary.json", "accuracy.png", "loss.png",
            "staleness.png"} <= files
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("algorithm", "engine", "workers", "window", "seed", "epochs", "samples",
                "commits", "wall_seconds", "samples_per_second", "staleness_mean",
                "staleness_max", "test_accuracy", "test_loss", "train_accuracy", "diverged",
                "params_sha256", "last_batch_train_accuracy"):
        assert key in summary, key
    assert summary["params_sha256"] == res.params_sha256
    assert summary["samples"] == 3000
    evals = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()
             if '"eval"' in line]
    assert evals[0]["version"] == 0 and evals[-1]["version"] == summary["versions"]
    assert np.isclose(evals[-1]["test_acc"], summary["test_accuracy"])


def test_out_directory_with_a_run_is_not_overwritten(mnist_small, tiny_mlp, tmp_path):
    from distgrad import ConfigError

    train(engine="sim", algorithm="agn", workers=2, seed=0, model=tiny_mlp, out=tmp_path, **FAST,
          **mnist_small)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(algorithm="agn", workers=2, seed=0, model=tiny_mlp, out=tmp_path, **FAST,
              engine="sim", **mnist_small)


def test_adag_placements_server_and_worker_are_equal(mnist_small, tiny_mlp):
    kw = dict(algorithm="adag", workers=4, window=2, seed=9, model=tiny_mlp, **FAST, **mnist_small)
    on_server = train(engine="sim", params={"placement": "server", "gamma": 1e-3}, **kw)
    on_worker = train(engine="sim", params={"placement": "worker", "gamma": 1e-3},
                      track_distance=False, **kw)
    assert on_server.params_sha256 == on_worker.params_sha256
    assert on_server.scale_mean < 1.0
    ev_s = [e for e in on_server.events if e["type"] == "commit"]
    ev_w = [e for e in on_worker.events if e["type"] == "commit"]
    assert [e["scale"] for e in ev_s] == [e["scale"] for e in ev_w]


def test_label_skewed_shards_give_each_worker_few_classes(mnist_small):
    from distgrad.data import make_shards

    y = mnist_small["data"][1].numpy()
    shards = make_shards(y, 10, "label_skewed", 0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(y)))
    assert max(len(set(y[s].tolist())) for s in shards) <= 2
    iid = make_shards(y, 10, "shuffled", 0)
    assert min(len(set(y[s].tolist())) for s in iid) == 10


def test_torch_dataset_and_exponential_timing(mnist_small, tiny_mlp):
    x, y = mnist_small["data"]
    ds = torch.utils.data.TensorDataset(x, y)
    res = train(engine="sim", algorithm="agn", workers=2, window=2, model=tiny_mlp, data=ds,
                test_data=torch.utils.data.TensorDataset(*mnist_small["test_data"]),
                timing=Timing(model="exponential"), **FAST)
    assert res.samples == 3000 and res.test_accuracy > 0.5
    assert isinstance(res.model, type(tiny_mlp))


def test_ensemble_model_averages_members(mnist_small, tiny_mlp):
    res = train(algorithm="ensemble", workers=3, window=5, seed=1, model=tiny_mlp, **FAST,
                engine="sim", **mnist_small)
    members = res.model.members
    assert len(members) == 3
    x, y = mnist_small["test_data"]
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        acc = float((probs.argmax(1) == y).float().mean())
        assert acc == pytest.approx(res.test_accuracy, abs=1e-6)
        first = [p.clone() for p in members[0].parameters()]
        assert not all(torch.equal(a, b) for a, b in zip(first, members[1].parameters(),
                                                           strict=True))


def test_adag_placements_at_the_server_level():
    """Placement 2 (the server keeps each worker's pulled center) and placement 1 (the worker
    sends it) give the same center, commit by commit."""
    from distgrad.algorithms import RunInfo, get_algorithm
    from distgrad.server import ParameterServer

    algo = get_algorithm("adag")
    info = RunInfo(workers=2, lr=1e-3, inner_optimizer="sgd")
    kept = ParameterServer(torch.tensor([1.0, 2.0, 3.0]),
                           algo.server_rule(algo.make_config({"placement": "server",
                                                              "gamma": 0.01}), info), 2)
    sent = ParameterServer(torch.tensor([1.0, 2.0, 3.0]),
                           algo.server_rule(algo.make_config({"placement": "worker",
                                                              "gamma": 0.01}), info), 2,
                           track_distance=False)
    assert kept.keep_stale and not sent.keep_stale
    pulled = {k: torch.empty(3) for k in range(2)}
    for s in (kept, sent):
        for k in range(2):
            s.pull(k, pulled[k] if s is sent else torch.empty(3))
    deltas = [torch.tensor([0.1, -0.2, 0.05]), torch.tensor([-0.3, 0.1, 0.2])]
    for step in range(4):
        k = step % 2
        a = kept.commit(k, deltas[k].clone(), 1, 1)
        b = sent.commit(k, deltas[k].clone(), 1, 1, stale_center=pulled[k])
        assert torch.equal(kept.center, sent.center)
        assert a.metrics["scale"] == b.metrics["scale"] and a.distance == b.distance
        kept.pull(k, torch.empty(3))
        sent.pull(k, pulled[k])


# --------------------------------------------------------------------------- honest summary


def test_summary_reports_simulated_and_host_rates_and_counts_samples_once(mnist_small,
                                                                          tiny_mlp):
    res = train(engine="sim", algorithm="agn", workers=3, window=2, seed=0, model=tiny_mlp,
                **FAST, **mnist_small)
    s = res.summary
    assert s["samples"] == s["samples_processed"] == s["samples_committed"] == 3000
    assert s["samples_redone"] == 0
    assert s["samples_per_virtual_second"] == pytest.approx(3000 / s["virtual_seconds"])
    assert s["samples_per_wall_second"] == pytest.approx(3000 / s["wall_seconds"])
    assert s["samples_per_second"] == s["samples_per_wall_second"]  # the old name, an alias
    # 3 workers of 0.05 virtual s per batch of 32: the simulated cluster is far faster
    # than the host (one core runs all three)
    assert s["samples_per_virtual_second"] > 3 * 32 / 0.05 * 0.8
    assert not s["diverged"] and not s["not_learned"]


def test_not_learned_is_not_diverged(mnist_small, tiny_mlp):
    # a learning rate too small to move: finite loss near ln 10, accuracy near chance
    stalled = train(engine="sim", algorithm="downpour", workers=2, window=1, seed=0,
                    model=tiny_mlp, epochs=1, batch_size=32, lr=1e-9, inner_optimizer="sgd",
                    eval_every=0.5, **mnist_small).summary
    assert stalled["not_learned"] and not stalled["diverged"]
    # plain SGD with a huge step: the loss explodes or overflows
    blown = train(engine="sim", algorithm="downpour", workers=2, window=1, seed=0,
                  model=tiny_mlp, epochs=1, batch_size=32, lr=1e4, inner_optimizer="sgd",
                  eval_every=0.5, **mnist_small).summary
    assert blown["diverged"]


def test_fixed_order_repeats_each_shard_every_pass(mnist_small, tiny_mlp):
    orders = {}
    for fixed in (False, True):
        job = Job(algorithm="agn", engine="sim", workers=2, window=2, seed=3, epochs=2,
                  batch_size=32, eval_every=10.0, timing=Timing(fixed_order=fixed))
        engine = SimEngine(job.timing, job.seed)
        x, y = mnist_small["data"]
        train(job, engine=engine, model=tiny_mlp, data=(x[:640], y[:640]),
              test_data=mnist_small["test_data"])
        orders[fixed] = [w.batches.order for w in engine.workers]
    for order in orders[True]:  # dist-keras: one order, the same in both passes
        half = len(order) // 2
        assert np.array_equal(order[:half], order[half:])
    for order in orders[False]:  # default: each pass reshuffled
        half = len(order) // 2
        assert not np.array_equal(order[:half], order[half:])
        assert sorted(order[:half]) == sorted(order[half:])
