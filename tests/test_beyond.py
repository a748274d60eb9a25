"""The algorithms beyond the thesis, end to end: equivalences, the stale-synchronous gate
and torn reads of lock-free rules."""

from __future__ import annotations

import pytest
import torch

from conftest import Point, half_sq, point_data
from distgrad import Timing, train
from distgrad.algorithms import RunInfo, get_algorithm
from distgrad.server import ParameterServer

FAST = dict(epochs=1, batch_size=64, lr=1e-3, inner_optimizer="adam", eval_every=10.0)


def params_of(result) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(result.model.parameters()).detach()


def run(name, mnist_small, tiny_mlp, **kw):
    base = dict(FAST, seed=3, model=tiny_mlp, **mnist_small)
    base.update(kw)
    return train(engine="sim", algorithm=name, **base)


# --------------------------------------------------------------------------- equivalences


def test_diloco_with_outer_lr_one_and_no_momentum_is_model_averaging(mnist_small, tiny_mlp):
    d = run("diloco", mnist_small, tiny_mlp, workers=3, window=4,
            params={"outer_lr": 1.0, "outer_momentum": 0.0})
    a = run("averaging", mnist_small, tiny_mlp, workers=3, window=4)
    # θ − (1/n)Σ(θ − θ_k) and (1/n)Σθ_k differ only in rounding
    torch.testing.assert_close(params_of(d), params_of(a), rtol=1e-4, atol=1e-5)
    assert d.commits == a.commits


def test_slowmo_with_no_slow_momentum_is_model_averaging(mnist_small, tiny_mlp):
    s = run("slowmo", mnist_small, tiny_mlp, workers=3, window=4,
            params={"slow_momentum": 0.0, "slow_lr": 1.0})
    a = run("averaging", mnist_small, tiny_mlp, workers=3, window=4)
    torch.testing.assert_close(params_of(s), params_of(a), rtol=1e-4, atol=1e-5)


def test_localsgd_without_warmup_is_averaging_bit_for_bit(mnist_small, tiny_mlp):
    loc = run("localsgd", mnist_small, tiny_mlp, workers=3, window=4)
    avg = run("averaging", mnist_small, tiny_mlp, workers=3, window=4)
    assert loc.params_sha256 == avg.params_sha256


def test_localsgd_with_period_one_is_synchronous_averaging_of_steps(mnist_small, tiny_mlp):
    """H = 1 with plain SGD: the mean of θ − η g_k is θ − η·mean(g_k), which is what `sync`
    computes with equal batches (3,000 samples, 2 workers, batch 50: 30 full steps each)."""
    kw = dict(workers=2, batch_size=50, lr=0.1, inner_optimizer="sgd", sharding="contiguous")
    loc = run("localsgd", mnist_small, tiny_mlp, window=1, **kw)
    syn = run("sync", mnist_small, tiny_mlp, **kw)
    torch.testing.assert_close(params_of(loc), params_of(syn), rtol=1e-4, atol=1e-5)


def test_post_local_sgd_switches_after_the_warmup(mnist_small, tiny_mlp):
    res = run("localsgd", mnist_small, tiny_mlp, workers=2, window=5,
              params={"warmup_steps": 3})
    rounds = [e for e in res.events if e["type"] == "round"]
    assert [r["steps"] for r in rounds[:5]] == [2, 2, 2, 10, 10]


def test_ssp_with_bound_zero_is_synchronous(mnist_small, tiny_mlp):
    """s = 0 with each commit weighted 1/n: every worker waits for all the others at each
    tick, so the center after a tick is the mean of the workers' parameters — exactly
    synchronous model averaging, whatever the order the commits arrive in."""
    ssp = run("ssp", mnist_small, tiny_mlp, workers=3, window=4,
              params={"bound": 0, "average": True})
    avg = run("averaging", mnist_small, tiny_mlp, workers=3, window=4)
    torch.testing.assert_close(params_of(ssp), params_of(avg), rtol=1e-4, atol=1e-5)
    held = [e for e in ssp.events if e["type"] == "commit" and e.get("held")]
    assert held, "with s = 0 the gate must hold workers"


def test_ssp_without_bound_is_downpour_bit_for_bit(mnist_small, tiny_mlp):
    ssp = run("ssp", mnist_small, tiny_mlp, workers=4, window=2, params={"bound": None})
    dp = run("downpour", mnist_small, tiny_mlp, workers=4, window=2)
    assert ssp.params_sha256 == dp.params_sha256


def _clock_leads(events, workers):
    """For each commit: the committer's clock before it minus the slowest live worker's."""
    clock = [0] * workers
    live = set(range(workers))
    leads = []
    for e in events:
        if e["type"] == "done":
            live.discard(e["worker"])
        elif e["type"] == "commit":
            k = e["worker"]
            leads.append(clock[k] - min(clock[q] for q in live))
            clock[k] += 1
    return leads


@pytest.mark.parametrize("bound", [0, 2])
def test_ssp_never_lets_a_worker_run_more_than_s_ticks_ahead(bound, mnist_small, tiny_mlp):
    timing = Timing(stragglers=1, straggler_factor=3.0)
    res = run("ssp", mnist_small, tiny_mlp, workers=4, window=1, timing=timing,
              params={"bound": bound})
    leads = _clock_leads(res.events, 4)
    assert max(leads) <= bound
    free = run("ssp", mnist_small, tiny_mlp, workers=4, window=1, timing=timing,
               params={"bound": None})
    assert max(_clock_leads(free.events, 4)) > bound + 3  # without the gate it would
    assert res.samples == 3000 and res.test_accuracy > 0.5


def test_gate_protocol_by_hand():
    algo = get_algorithm("ssp")
    rule = algo.server_rule(algo.make_config({"bound": 1}),
                            RunInfo(workers=3, lr=0.1, inner_optimizer="sgd"))
    server = ParameterServer(torch.zeros(2), rule, 3)
    buf = torch.empty(2)
    for k in range(3):
        server.pull(k, buf)
    one = torch.ones(2)
    assert not server.commit(0, one.clone(), 1, 1).held  # clocks (1, 0, 0): lead 1 <= 1
    assert server.commit(0, one.clone(), 1, 1).held  # (2, 0, 0): lead 2 > 1
    assert server.released() == []
    with pytest.raises(RuntimeError, match="held by the stale-synchronous gate"):
        server.pull(0, buf)
    assert not server.commit(1, one.clone(), 1, 1).held  # (2, 1, 0)
    assert server.released() == []  # worker 2 is still at 0
    server.leave(2)  # the slowest leaves: min is now 1
    assert server.released() == [0]
    assert server.held == frozenset()
    torch.testing.assert_close(server.center, 3 * one)


def test_ssp_with_a_crash_of_the_slowest_does_not_deadlock(mnist_small, tiny_mlp):
    res = run("ssp", mnist_small, tiny_mlp, workers=3, window=1, params={"bound": 0},
              timing=Timing(stragglers=1, straggler_factor=2.0, crashes=((0, 0.4),)))
    assert res.faults == 1 and res.samples + res.samples_lost >= 3000


def test_hogwild_without_read_window_is_downpour_bit_for_bit(mnist_small, tiny_mlp):
    hog = run("hogwild", mnist_small, tiny_mlp, workers=4, params={"read_fraction": 0.0})
    dp = run("downpour", mnist_small, tiny_mlp, workers=4, window=1)
    assert hog.params_sha256 == dp.params_sha256


def test_hogwild_torn_read_by_hand():
    """SGD η = 0.5 on 0.5‖w − y‖², worker 0 owns y = (2, 2) and is 1.25× slower, worker 1
    owns y = (0, 4); steps take 1 s, a read sweeps the 2 elements over R = 0.5 s.

    t=0     both read (0, 0) until 0.5, then compute: s0 = (1, 1), s1 = (0, 2)
    t=1.0   w1 commits (0, 2): c = (0, 2); w1 reads c over [1.0, 1.5]
    t=1.25  w0 commits (1, 1): c = (1, 3). w1's read is half done: element 0 was read
            before, element 1 after the commit, so w1 holds (0, 3) — a center that
            never existed (a locked read at 1.0 would give (0, 2))
    t=1.5   w1 steps from (0, 3): s = (0, 0.5); t=1.75 w0 steps from (1, 3): (0.5, -0.5)
    t=2.0   w1 commits (0, 0.5): c = (1, 3.5);  t=2.5 w0 commits: c = (1.5, 3)
    """
    res = train(engine="sim", algorithm="hogwild", workers=2, epochs=2, batch_size=1, lr=0.5,
                inner_optimizer="sgd", sharding="contiguous", model=Point(), loss_fn=half_sq,
                data=point_data([[2, 2], [0, 4]]), test_data=point_data([[0, 0]]),
                params={"read_fraction": 0.5},
                timing=Timing(model="constant", step_time=1.0, stragglers=1,
                              straggler_factor=1.25))
    commits = [(c["t"], c["worker"]) for c in res.events if c["type"] == "commit"]
    assert commits == [(1.0, 1), (1.25, 0), (2.0, 1), (2.5, 0)]
    torch.testing.assert_close(params_of(res), torch.tensor([1.5, 3.0]))


def test_gem_placements_agree_bit_for_bit(mnist_small, tiny_mlp):
    kw = dict(workers=4, inner_optimizer="sgd", lr=0.05)
    on_worker = run("gem", mnist_small, tiny_mlp, params={"placement": "worker"}, **kw)
    on_server = run("gem", mnist_small, tiny_mlp, params={"placement": "server"}, **kw)
    assert on_worker.params_sha256 == on_server.params_sha256
    assert 0 < on_server.scale_mean <= 5


def test_gem_read_does_not_reset_staleness(mnist_small, tiny_mlp):
    gem = run("gem", mnist_small, tiny_mlp, workers=4, inner_optimizer="sgd", lr=0.05)
    assert gem.staleness_mean == pytest.approx(3, abs=0.5)  # ≈ n − 1, not 0


@pytest.mark.parametrize(("name", "window"), [("dcasgd", 1), ("staleness-lr", 1), ("ssp", 3),
                                              ("hogwild", 1)])
def test_more_async_rules_with_one_worker_are_sequential(name, window, mnist_small, tiny_mlp):
    kw = dict(inner_optimizer="sgd", lr=0.05, seed=5)
    seq = run("sequential", mnist_small, tiny_mlp, workers=1, **kw)
    one = run(name, mnist_small, tiny_mlp, workers=1, window=window, **kw)
    torch.testing.assert_close(params_of(one), params_of(seq), rtol=1e-4, atol=1e-5)
