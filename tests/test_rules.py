"""Every worker and server rule against values worked out by hand on 2-element tensors.

The expected values are written as arithmetic so the derivation can be checked by
reading. Worker steps use the quadratic 0.5·‖w − y‖² with plain SGD, whose step is
s = −η(w − y).
"""

from __future__ import annotations

import pytest
import torch

from conftest import Point, half_sq
from distgrad.algorithms import RunInfo, get_algorithm
from distgrad.algorithms.base import CommitContext
from distgrad.worker import Replica

T = torch.tensor


def run_info(workers: int = 2, lr: float = 0.1) -> RunInfo:
    return RunInfo(workers=workers, lr=lr, inner_optimizer="sgd")


def rules(name: str, workers: int = 2, lr: float = 0.1, **params):
    algo = get_algorithm(name)
    cfg = algo.make_config(params)
    info = run_info(workers, lr)
    return algo.worker_rule(cfg, info), algo.server_rule(cfg, info)


def replica(worker: int = 0, lr: float = 0.1, init=(0.0, 0.0)) -> Replica:
    return Replica(worker, Point(init), half_sq, "sgd", lr)


def ctx(worker=0, version=0, base=0, stale=None, samples=1, steps=1) -> CommitContext:
    return CommitContext(worker=worker, version=version, base_version=base,
                         staleness=version - base, samples=samples, steps=steps,
                         stale_center=stale)


def batch(*ys: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(len(ys), 1), T(list(ys))


def close(a: torch.Tensor, b: list[float]) -> None:
    torch.testing.assert_close(a, T(b), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- worker rules


def test_inner_sgd_step_is_the_quadratic_step():
    rep = replica(init=(1.0, 2.0))
    rep.train_step(*batch((3.0, 0.0)))
    close(rep.params, [1 - 0.1 * (1 - 3), 2 - 0.1 * (2 - 0)])


def test_downpour_worker_commits_unnormalized_sum_of_steps():
    w, _ = rules("downpour", window=2)
    rep = replica(init=(1.0, 2.0))
    rep.base.copy_(T([1.0, 2.0]))
    for _ in range(2):
        rep.train_step(*batch((0.0, 0.0)))
    # two steps of w <- 0.9 w from (1, 2): (0.81, 1.62); delta = 0.81 w0 - w0
    close(w.make_payload(rep, 2), [0.81 * 1 - 1, 0.81 * 2 - 2])
    assert w.pull_after_commit


def test_agn_worker_divides_the_accumulated_delta_by_the_steps():
    w, _ = rules("agn", window=2)
    rep = replica(init=(1.0, 2.0))
    rep.base.copy_(T([1.0, 2.0]))
    for _ in range(2):
        rep.train_step(*batch((0.0, 0.0)))
    close(w.make_payload(rep, 2), [(0.81 * 1 - 1) / 2, (0.81 * 2 - 2) / 2])


def test_easgd_worker_moves_by_the_elastic_term_and_sends_it():
    w, _ = rules("easgd", window=1, rho=5.0, elastic_lr=0.05)  # alpha = 0.25
    rep = replica(init=(3.0, 0.0))
    rep.params.copy_(T([3.0, 0.0]))
    rep.base.copy_(T([1.0, 2.0]))  # center of the previous sync
    e = w.make_payload(rep, 1)
    close(e, [0.25 * (3 - 1), 0.25 * (0 - 2)])
    close(rep.params, [3 - 0.5, 0 + 0.5])
    w.after_pull(rep)  # the worker keeps its own parameters after a pull
    close(rep.params, [2.5, 0.5])


def test_easgd_early_commit_fires_when_step_and_elastic_norms_meet():
    w, _ = rules("easgd", window=100, rho=5.0, elastic_lr=0.05, early_commit=True,
                 early_commit_threshold=0.05)
    rep = replica(init=(0.0, 0.0))
    w.setup(rep)
    rep.base.copy_(T([0.0, 0.0]))
    # at w = (1, 0) with target (1, 0): gradient 0, step norm 0; elastic 0.25 * 1:
    # 0 - 0.25 < 0.05 -> commit early
    rep.params.copy_(T([1.0, 0.0]))
    stats = w.local_step(rep, *batch((1.0, 0.0)))
    assert w.should_commit(rep, 1, stats)
    # at w = 0 = center with target (10, 0): step norm 0.1*10 = 1, elastic 0: 1 - 0 >= 0.05
    rep.params.zero_()
    stats = w.local_step(rep, *batch((10.0, 0.0)))
    assert not w.should_commit(rep, 1, stats)


def test_eamsgd_paper_form_is_nesterov():
    w, _ = rules("eamsgd", momentum=0.5)
    rep = replica(init=(1.0, 2.0))
    w.setup(rep)
    rep.buffers["velocity"].copy_(T([0.1, 0.0]))
    w.local_step(rep, *batch((0.0, 0.0)))
    # look-ahead x + δv = (1.05, 2); s = -0.1 * (1.05, 2); v = δv + s; x = x + v
    v = [0.5 * 0.1 - 0.1 * 1.05, 0 - 0.1 * 2]
    close(rep.buffers["velocity"], v)
    close(rep.params, [1 + v[0], 2 + v[1]])


def test_eamsgd_distkeras_form_flips_the_lookahead_and_scales_by_elastic_lr():
    w, _ = rules("eamsgd", momentum=0.5, nesterov_sign="distkeras", elastic_lr=0.1, rho=1.0)
    rep = replica(init=(1.0, 2.0))
    w.setup(rep)
    rep.buffers["velocity"].copy_(T([0.1, 0.0]))
    w.local_step(rep, *batch((0.0, 0.0)))
    # step evaluated at x - δv = (0.95, 2): s = -0.1 * (0.95, 2); v = δv + 0.1 s; x = x + v
    v = [0.5 * 0.1 + 0.1 * (-0.1 * 0.95), 0 + 0.1 * (-0.1 * 2)]
    close(rep.buffers["velocity"], v)
    close(rep.params, [1 + v[0], 2 + v[1]])


def test_sync_worker_sends_batch_size_times_gradient_without_stepping():
    w, _ = rules("sync")
    rep = replica(init=(1.0, 2.0))
    w.local_step(rep, *batch((3.0, 0.0), (1.0, 0.0)))  # mean gradient w - mean(y) = (-1, 2)
    close(rep.params, [1.0, 2.0])
    close(w.make_payload(rep, 1), [2 * -1.0, 2 * 2.0])


# --------------------------------------------------------------------------- server rules


def test_add_server_adds():
    _, s = rules("downpour")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.apply(c, T([0.5, -1.0]), ctx())
    close(c, [1 + 0.5, 2 - 1])


def test_dynsgd_scales_by_one_over_staleness_plus_one():
    _, s = rules("dynsgd")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    m = s.apply(c, T([0.3, -0.6]), ctx(version=5, base=3))  # tau = 2
    close(c, [1 + 0.3 / 3, 2 - 0.6 / 3])
    assert m["scale"] == pytest.approx(1 / 3)


def test_dynsgd_with_zero_staleness_adds_the_full_delta():
    _, s = rules("dynsgd")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.apply(c, T([0.3, -0.6]), ctx(version=4, base=4))
    assert torch.equal(c, T([1.0, 2.0]) + T([0.3, -0.6]))


def test_adag_factor_is_elementwise():
    _, s = rules("adag", gamma=1e-2)
    c = T([1.0, 2.0])
    s.setup(c, 2)
    stale = T([0.9, 2.0])  # d = (0.1, 0): factors 1/(0.1²/0.01 + 1) = 1/2 and 1/(0 + 1) = 1
    m = s.apply(c, T([0.2, -0.4]), ctx(version=3, base=1, stale=stale))
    close(c, [1 + 0.2 * 0.5, 2 - 0.4 * 1.0])
    assert m["scale"] == pytest.approx((0.5 + 1.0) / 2, rel=1e-5)
    assert m["distance"] == pytest.approx(0.1, rel=1e-5)


def test_adag_rewrite2_form():
    _, s = rules("adag", gamma=0.1, form="rewrite2")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    stale = T([0.9, 1.8])  # d/γ = (1, 2): factors 1/(1 + 1) and 1/(4 + 1)
    s.apply(c, T([0.2, -0.5]), ctx(version=3, base=1, stale=stale))
    close(c, [1 + 0.2 / 2, 2 - 0.5 / 5])


def test_adag_with_a_fresh_center_scales_by_exactly_one():
    _, s = rules("adag")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    payload = T([0.123, -0.456])
    m = s.apply(c, payload.clone(), ctx(stale=c.clone()))
    assert torch.equal(c, T([1.0, 2.0]) + payload)
    assert m["scale"] == 1.0


def test_elastic_exchange_moves_center_and_worker_toward_each_other():
    w, s = rules("aeasgd", rho=5.0, elastic_lr=0.05)  # alpha = 0.25
    rep = replica(init=(3.0, 0.0))
    rep.params.copy_(T([3.0, 0.0]))
    c = T([1.0, 2.0])
    s.setup(c, 2)
    payload = w.make_payload(rep, 1)
    s.apply(c, payload, ctx())
    w.after_commit(rep, payload)
    e = [0.25 * (3 - 1), 0.25 * (0 - 2)]
    close(c, [1 + e[0], 2 + e[1]])
    close(rep.params, [3 - e[0], 0 - e[1]])
    assert not w.pull_after_commit


def test_sync_easgd_server_adds_the_sum_once_per_round():
    _, s = rules("easgd")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.accumulate(T([0.1, 0.2]), ctx(0))
    s.accumulate(T([0.3, -0.4]), ctx(1))
    close(c, [1.0, 2.0])
    s.apply_round(c, 2)
    close(c, [1 + 0.1 + 0.3, 2 + 0.2 - 0.4])


def test_averaging_server_takes_the_mean():
    _, s = rules("averaging")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.accumulate(T([3.0, 4.0]), ctx(0))
    s.accumulate(T([5.0, 0.0]), ctx(1))
    s.apply_round(c, 2)
    close(c, [(3 + 5) / 2, (4 + 0) / 2])
    s.accumulate(T([1.0, 1.0]), ctx(0))  # the buffer was re-zeroed (dist-keras' bug)
    s.accumulate(T([1.0, 1.0]), ctx(1))
    s.apply_round(c, 2)
    close(c, [1.0, 1.0])


def test_sync_server_steps_on_the_sample_weighted_mean_gradient():
    _, s = rules("sync", lr=0.1)
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.accumulate(T([2 * 1.0, 2 * 2.0]), ctx(0, samples=2))  # 2 samples, gradient (1, 2)
    s.accumulate(T([1 * 4.0, 1 * -1.0]), ctx(1, samples=1))  # 1 sample, gradient (4, -1)
    s.apply_round(c, 2)
    g = [(2 * 1 + 4) / 3, (2 * 2 - 1) / 3]
    close(c, [1 - 0.1 * g[0], 2 - 0.1 * g[1]])


def test_sequential_server_replaces_the_center():
    w, s = rules("sequential", workers=1)
    rep = replica(init=(0.0, 0.0))
    rep.params.copy_(T([7.0, 8.0]))
    c = T([1.0, 2.0])
    s.setup(c, 1)
    s.apply(c, w.make_payload(rep, 1), ctx())
    close(c, [7.0, 8.0])
    assert not w.pull_after_commit


def test_ensemble_server_keeps_one_slot_per_member():
    _, s = rules("ensemble")
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.apply(c, T([5.0, 6.0]), ctx(1))
    close(s.models(c)[0], [1.0, 2.0])
    close(s.models(c)[1], [5.0, 6.0])
