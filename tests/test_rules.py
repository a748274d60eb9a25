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
from distgrad.replica import Replica

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


# --------------------------------------------------------------------------- beyond the thesis


def test_gem_worker_scales_by_energy_and_clamps():
    w, s = rules("gem", momentum=0.5, kappa=2.0, clamp=5.0)
    rep = replica(init=(0.0, 0.0))
    rep.base.copy_(T([1.0, 2.0]))  # the center at the first pull
    w.setup(rep)
    assert torch.equal(w.read_buffer(rep), rep.buffers["center_now"])
    rep.params.copy_(T([1.5, 1.0]))  # Δ = (0.5, -1)
    rep.buffers["center_now"].copy_(T([1.2, 2.0]))  # the center moved (0.2, 0) since
    # m = (0.5, -1); π = ((2·0.5 − 0.2)/0.5, (2·1 − 0)/1) = (1.6, 2)
    close(w.make_payload(rep, 1), [0.5 * 1.6, -1.0 * 2.0])
    close(rep.buffers["momentum"], [0.5, -1.0])
    close(rep.buffers["center_prev"], [1.2, 2.0])
    # second commit: base (2, 0), Δ = (0.1, 0.5); m = 0.5·(0.5, -1) + Δ = (0.35, 0)
    rep.base.copy_(T([2.0, 0.0]))
    rep.params.copy_(T([2.1, 0.5]))
    rep.buffers["center_now"].copy_(T([2.0, 0.0]))  # moved (0.8, -2) since (1.2, 2)
    # π = ((0.7 − 0.8)/0.1, (0 − 2)/0.5) = (-1, -4), clamped to (0, 0)
    close(w.make_payload(rep, 1), [0.0, 0.0])
    # the server only adds
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.apply(c, T([0.25, -0.5]), ctx())
    close(c, [1.25, 1.5])


def test_gem_without_clamp_keeps_negative_factors():
    w, _ = rules("gem", momentum=0.5, kappa=1.0, clamp=None)
    rep = replica(init=(0.0, 0.0))
    rep.base.copy_(T([0.0, 0.0]))
    w.setup(rep)
    rep.params.copy_(T([0.5, 1.0]))  # Δ = (0.5, 1); m = Δ
    rep.buffers["center_now"].copy_(T([1.0, 0.5]))  # moved (1, 0.5)
    # π = ((0.5 − 1)/0.5, (1 − 0.5)/1) = (-1, 0.5)
    close(w.make_payload(rep, 1), [0.5 * -1.0, 1.0 * 0.5])


def test_gem_server_placement_computes_pi_under_the_lock():
    w, s = rules("gem", momentum=0.5, kappa=2.0, placement="server")
    rep = replica(init=(1.5, 1.0))
    rep.base.copy_(T([1.0, 2.0]))
    w.setup(rep)
    assert w.read_buffer(rep) is None
    close(w.make_payload(rep, 1), [0.5, -1.0])  # the worker sends Δ unscaled
    c = T([1.2, 2.0])  # the center moved (0.2, 0) since the worker pulled (1, 2)
    s.setup(c, 2)
    m = s.apply(c, T([0.5, -1.0]), ctx(worker=1, version=3, base=1, stale=T([1.0, 2.0])))
    close(c, [1.2 + 0.5 * 1.6, 2.0 - 1.0 * 2.0])  # same π as the worker placement
    assert m["scale"] == pytest.approx((1.6 + 2.0) / 2)


def test_diloco_worker_sends_the_pseudo_gradient():
    w, _ = rules("diloco", window=2)
    rep = replica(init=(1.0, 2.0))
    rep.base.copy_(T([1.0, 2.0]))
    for _ in range(2):
        rep.train_step(*batch((0.0, 0.0)))  # w <- 0.9 w twice: (0.81, 1.62)
    close(w.make_payload(rep, 2), [1 - 0.81, 2 - 1.62])


def test_diloco_outer_nesterov_on_the_mean_pseudo_gradient():
    _, s = rules("diloco", outer_lr=0.5, outer_momentum=0.5)
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.accumulate(T([0.2, -0.4]), ctx(0))
    s.accumulate(T([0.4, 0.0]), ctx(1))
    s.apply_round(c, 2)
    # Δ = (0.3, -0.2); b = Δ; step Δ + 0.5 b = (0.45, -0.3)
    close(c, [1 - 0.5 * 0.45, 2 + 0.5 * 0.3])
    s.accumulate(T([0.1, 0.1]), ctx(0))
    s.accumulate(T([0.1, 0.1]), ctx(1))
    s.apply_round(c, 2)
    # b = 0.5·(0.3, -0.2) + (0.1, 0.1) = (0.25, 0); step (0.1 + 0.125, 0.1 + 0)
    close(c, [1 - 0.5 * 0.45 - 0.5 * 0.225, 2 + 0.5 * 0.3 - 0.5 * 0.1])


def test_diloco_outer_step_is_pytorch_nesterov_sgd():
    from distgrad.algorithms.diloco import OuterNesterov

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen) for _ in range(4)]
    mine, ref = torch.zeros(5), torch.zeros(5, requires_grad=True)
    outer = OuterNesterov(0.7, 0.9, nesterov=True)
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for g in grads:
        outer.step(mine, g.clone())
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(mine, ref.detach())


def test_diloco_async_applies_each_arrival_with_adag_factor_and_weight():
    _, s = rules("diloco-async", outer_lr=1.0, outer_momentum=0.0, adag_gamma=1e-2)
    c = T([1.0, 2.0])
    s.setup(c, 2)
    stale = T([0.9, 2.0])  # factors 1/(0.1²/0.01 + 1) = 1/2 and 1
    m = s.apply(c, T([0.4, -0.2]), ctx(version=2, base=0, stale=stale))
    # g = f ⊙ Δ / n = (0.2, -0.2) / 2; θ ← θ − g
    close(c, [1 - 0.1, 2 + 0.1])
    assert m["scale"] == pytest.approx(0.75)


def test_dcasgd_constant_compensation():
    w, s = rules("dcasgd", lam=0.5, lr=0.1)
    rep = replica(init=(1.0, 2.0))
    w.local_step(rep, *batch((3.0, 0.0), (1.0, 0.0)))  # mean gradient (1 - 2, 2 - 0)
    close(rep.params, [1.0, 2.0])  # workers only compute gradients
    close(w.make_payload(rep, 1), [-1.0, 2.0])
    c = T([1.0, 2.0])
    s.setup(c, 2)
    # g = (2, 1), w_t − w_bak = (0.5, 0): g̃ = g + 0.5·g²·(0.5, 0) = (2 + 0.5·4·0.5, 1)
    s.apply(c, T([2.0, 1.0]), ctx(version=2, base=1, stale=T([0.5, 2.0])))
    close(c, [1 - 0.1 * 3.0, 2 - 0.1 * 1.0])


def test_dcasgd_adaptive_lambda():
    _, s = rules("dcasgd", mode="adaptive", lam=0.5, ms_decay=0.5, lr=0.1)
    c = T([1.0, 2.0])
    s.setup(c, 2)
    # MS = 0.5·g² = (2, 0.5); λ_t = 0.5/√(MS + 1e-7); g̃_0 = 2 + λ_t·4·0.5, g̃_1 = 1
    s.apply(c, T([2.0, 1.0]), ctx(version=2, base=1, stale=T([0.5, 2.0])))
    lam0 = 0.5 / (2.0 + 1e-7) ** 0.5
    close(c, [1 - 0.1 * (2 + lam0 * 4 * 0.5), 2 - 0.1 * 1.0])


def test_localsgd_commits_every_step_during_warmup_then_every_window():
    w, s = rules("localsgd", window=3, warmup_steps=2)
    stats = None
    fired = []
    steps = 0
    for _ in range(8):
        steps += 1
        if w.should_commit(None, steps, stats):
            fired.append(steps)
            steps = 0
    assert fired == [1, 1, 3, 3]
    c = T([0.0, 0.0])
    s.setup(c, 2)
    s.accumulate(T([3.0, 4.0]), ctx(0))
    s.accumulate(T([5.0, 0.0]), ctx(1))
    s.apply_round(c, 2)
    close(c, [(3 + 5) / 2, (4 + 0) / 2])


def test_slowmo_slow_momentum_step():
    _, s = rules("slowmo", lr=0.1, slow_momentum=0.5, slow_lr=1.0)
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.accumulate(T([0.0, 2.0]), ctx(0))
    s.accumulate(T([1.0, 1.0]), ctx(1))
    s.apply_round(c, 2)
    # x̄ = (0.5, 1.5); u = ((1, 2) − x̄)/0.1 = (5, 5); x0 ← x0 − 1·0.1·u = x̄
    close(c, [0.5, 1.5])
    s.accumulate(T([0.5, 1.0]), ctx(0))
    s.accumulate(T([0.5, 1.0]), ctx(1))
    s.apply_round(c, 2)
    # d = (0, 0.5); u = 0.5·(5, 5) + d/0.1 = (2.5, 7.5); x0 ← (0.5, 1.5) − 0.1·u
    close(c, [0.5 - 0.25, 1.5 - 0.75])


def test_ssp_server_adds_or_averages():
    _, s = rules("ssp", bound=2)
    assert s.clock_bound == 2
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.apply(c, T([0.5, -1.0]), ctx())
    close(c, [1.5, 1.0])
    _, s = rules("ssp", bound=None, average=True)
    assert s.clock_bound is None
    s.setup(c, 2)
    s.apply(c, T([0.5, -1.0]), ctx())
    close(c, [1.5 + 0.25, 1.0 - 0.5])


def test_hogwild_server_is_a_lock_free_add():
    w, s = rules("hogwild", read_fraction=0.25)
    assert s.lock_free and s.read_fraction == 0.25 and w.pull_after_commit
    c = T([1.0, 2.0])
    s.setup(c, 2)
    s.apply(c, T([0.5, -1.0]), ctx())
    close(c, [1.5, 1.0])


def test_staleness_lr_divides_by_update_staleness():
    _, s = rules("staleness-lr")  # softsync = workers: every commit is one update
    c = T([0.0, 0.0])
    s.setup(c, 2)
    s.apply(c, T([1.0, 1.0]), ctx(version=0, base=0))  # τ = 0: α₀
    s.apply(c, T([1.0, 0.0]), ctx(version=1, base=0))  # one update since its pull: α₀/1
    m = s.apply(c, T([0.0, 1.0]), ctx(version=2, base=0))  # two updates: α₀/2
    close(c, [1 + 1, 1 + 0 + 0.5])
    assert m["scale"] == 0.5 and m["update_staleness"] == 2.0


def test_staleness_lr_softsync_batches_commits():
    _, s = rules("staleness-lr", workers=4, softsync=2)  # c = 4 // 2 = 2
    c = T([0.0, 0.0])
    s.setup(c, 4)
    s.apply(c, T([2.0, 0.0]), ctx(version=0, base=0))
    close(c, [0.0, 0.0])  # held back
    s.apply(c, T([0.0, 4.0]), ctx(version=1, base=0))  # τ = 0 for both: mean of the two
    close(c, [1.0, 2.0])
    s.apply(c, T([2.0, 2.0]), ctx(version=2, base=2))  # pulled after the update: τ = 0
    m = s.apply(c, T([4.0, 0.0]), ctx(version=3, base=0))  # one update since: α₀/1
    close(c, [1 + (2 + 4) / 2, 2 + (2 + 0) / 2])
    assert m["update_staleness"] == 1.0
    s.apply(c, T([2.0, 2.0]), ctx(version=4, base=0))  # τ = 2, scale 1/2, held back
    s.on_leave(c, 3, remaining=3)  # a worker leaves: what is held is applied
    close(c, [4.0 + 1, 3.0 + 1])  # (2, 2)/2 applied alone
