"""Extending distgrad from outside: registering algorithms, naming them by import path,
declared capabilities, and the shared server transforms.

The example rule in ``examples/custom_rule.py`` trains end to end on ``sim`` (in this
process) and on ``local`` (a fresh ``distgrad train`` process whose worker processes
import the example module by its path).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distgrad
from distgrad import fast
from distgrad.algorithms import _BY_PATH as BY_PATH
from distgrad.algorithms import (
    REGISTRY,
    Algorithm,
    AlgorithmConfig,
    Capabilities,
    RunInfo,
    ServerRule,
    WorkerRule,
    algorithm_ref,
    audit_rules,
    get_algorithm,
    names,
    register_algorithm,
)
from distgrad.algorithms.base import AddServer, CommitContext
from distgrad.algorithms.transforms import OuterSGD, adag_factor
from distgrad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples.custom_rule:ALGORITHM"
SMALL = dict(workers=2, epochs=1, train_samples=600, model="mlp", batch_size=32, window=2,
             lr=2e-3, seed=1, eval_every=10.0)


@pytest.fixture()
def registry():
    """Restore the registry after a test that registers throwaway algorithms."""
    saved, saved_paths = dict(REGISTRY), dict(BY_PATH)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)
    BY_PATH.clear()
    BY_PATH.update(saved_paths)


@pytest.fixture()
def on_path(monkeypatch):
    """The repository root on sys.path, so that ``examples`` imports (spawned workers
    inherit the parent's sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT))


def ctx(stale=None) -> CommitContext:
    return CommitContext(worker=0, version=1, base_version=0, staleness=1, samples=1, steps=1,
                         stale_center=stale)


def _toy(name="toy", worker=WorkerRule, server=AddServer, summary="a test algorithm",
         **kw) -> Algorithm:
    return Algorithm(name=name, summary=summary, config=AlgorithmConfig, worker_rule=worker,
                     server_rule=server, **kw)


# --------------------------------------------------------------------------- end to end


def test_example_rule_by_hand(on_path):
    algo = get_algorithm(EXAMPLE)
    cfg = algo.make_config({"max_norm": 0.5})
    server = algo.server_rule(cfg, RunInfo(workers=2, lr=0.1, inner_optimizer="sgd"))
    c = torch.tensor([1.0, 2.0])
    server.setup(c, 2)
    m = server.apply(c, torch.tensor([0.3, 0.4]), ctx())  # ‖Δ‖ = 0.5: not clipped
    torch.testing.assert_close(c, torch.tensor([1.3, 2.4]))
    assert m["scale"] == 1.0 and server.clipped == 0
    m = server.apply(c, torch.tensor([0.0, -2.0]), ctx())  # ‖Δ‖ = 2: scaled by 0.5/2
    torch.testing.assert_close(c, torch.tensor([1.3, 2.4 - 0.5]))
    assert m["scale"] == 0.25 and server.state_dict() == {"clipped": 1}


def test_example_rule_trains_on_sim(on_path):
    res = distgrad.train(algorithm=EXAMPLE, engine="sim", **SMALL)
    assert res.status == "completed"
    assert res.commits == 10  # 300 samples per worker, batches of 32, a commit every 2
    assert res.test_accuracy > 0.5, res.test_accuracy  # chance is 0.1
    assert res.scale_mean is not None and res.scale_mean < 1.0  # the server clipped


def test_example_rule_trains_on_local_from_the_command_line(tmp_path):
    """A fresh interpreter: nothing is registered until the path is resolved, in the
    parent and in every worker process."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "distgrad", "train", "--algorithm", EXAMPLE,
           "--engine", "local", "--workers", "2", "--epochs", "1", "--train-samples", "600",
           "--model", "mlp", "--batch-size", "32", "--window", "2", "--lr", "2e-3",
           "--seed", "1", "--eval-every", "10", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "local" and summary["status"] == "completed"
    assert summary["commits"] == 10
    assert summary["test_accuracy"] > 0.5, summary["test_accuracy"]
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == EXAMPLE  # a later resume or replay imports it again


# --------------------------------------------------------------------------- registry


def test_import_path_loads_and_registers(on_path, registry):
    algo = get_algorithm(EXAMPLE)
    assert algo.name == "clipped-downpour"
    assert registry["clipped-downpour"] is algo
    assert get_algorithm("clipped-downpour") is algo
    assert "clipped-downpour" not in names()  # names() is the built-in list
    # a job records the path, whichever way the algorithm was named
    assert algorithm_ref(algo) == EXAMPLE
    assert algorithm_ref("clipped-downpour") == EXAMPLE
    assert algorithm_ref(EXAMPLE) == EXAMPLE
    assert algorithm_ref("adag") == "adag"
    assert algorithm_ref(get_algorithm("adag")) == "adag"


def test_register_algorithm(registry):
    toy = _toy()
    assert register_algorithm(toy) is toy
    assert register_algorithm(toy) is toy  # the same object again: a no-op
    assert get_algorithm("toy") is toy
    other = _toy(summary="another")
    with pytest.raises(ConfigError, match=r"already registered.*replace=True"):
        register_algorithm(other)
    assert register_algorithm(other, replace=True) is other
    assert get_algorithm("toy") is other
    with pytest.raises(ConfigError, match="built-in"):
        register_algorithm(_toy(name="adag"), replace=True)
    with pytest.raises(ConfigError, match="name"):
        register_algorithm(_toy(name="a:b"))
    with pytest.raises(TypeError):
        register_algorithm("toy")  # type: ignore[arg-type]


def test_an_algorithm_built_in_a_function_is_recorded_by_name(registry):
    local = _toy(name="made-here")
    assert algorithm_ref(local) == "made-here"  # no module holds it: sim only
    assert registry["made-here"] is local


def test_unknown_names_and_paths_say_what_is_known(on_path):
    with pytest.raises(ConfigError, match=r"unknown algorithm 'nope'.*adag.*package\.module:ATTR"):
        get_algorithm("nope")
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_pkg\.mod'.*PYTHONPATH"):
        get_algorithm("no_such_pkg.mod:ALGORITHM")
    with pytest.raises(ConfigError, match=r"no attribute 'MISSING'.*ALGORITHM"):
        get_algorithm("examples.custom_rule:MISSING")
    with pytest.raises(ConfigError, match="not an Algorithm"):
        get_algorithm("examples.custom_rule:ClippedConfig.__doc__")
    with pytest.raises(ConfigError, match="looks like"):
        get_algorithm("examples.custom_rule:")


# --------------------------------------------------------------------------- capabilities


def _worker_rule_classes() -> list[type]:
    """Every WorkerRule subclass defined in distgrad.algorithms (all modules imported)."""
    seen, todo = [], [WorkerRule]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return [c for c in seen if c.__module__.startswith("distgrad.algorithms.")]


def test_every_rule_declares_what_it_overrides():
    """Engines read uses_reply/reads from declarations only: a rule overriding after_commit
    or read_buffer must declare them (in the same class or below it)."""
    classes = _worker_rule_classes()
    assert len(classes) >= 10
    for cls in classes:
        algo = _toy(worker=cls)
        assert audit_rules(algo) == [], cls
    for name in names():
        assert audit_rules(get_algorithm(name)) == [], name


def test_audit_catches_an_undeclared_reply_reader(registry):
    class ReadsReply(WorkerRule):
        def after_commit(self, rep, reply):
            rep.params.sub_(reply)

    with pytest.raises(TypeError, match="uses_reply"):
        register_algorithm(_toy(name="bad", worker=ReadsReply))

    class Declared(ReadsReply):
        uses_reply = True

    class Forgot(Declared):  # overrides again below the declaration: must declare again
        def after_commit(self, rep, reply):
            rep.params.add_(reply)

    assert audit_rules(_toy(worker=Declared)) == []
    assert "uses_reply" in audit_rules(_toy(worker=Forgot))[0]

    class SyncServer(ServerRule):
        synchronous = True

    assert "synchronous" in audit_rules(_toy(server=SyncServer))[0]


def test_capabilities_of_the_registry():
    caps = {name: get_algorithm(name).capabilities() for name in names()}
    assert all(isinstance(c, Capabilities) for c in caps.values())
    assert {n for n, c in caps.items() if c.uses_reply} == {"aeasgd", "eamsgd"}
    assert {n for n, c in caps.items() if c.exchange} == {"aeasgd", "eamsgd"}
    assert {n for n, c in caps.items() if c.lock_free} == {"hogwild"}
    assert {n for n, c in caps.items() if c.gated} == {"ssp"}
    assert {n for n, c in caps.items() if c.reads} == {"gem"}
    for name, c in caps.items():
        assert c.synchronous == get_algorithm(name).synchronous, name
    # capabilities that depend on the config
    ssp = get_algorithm("ssp")
    assert ssp.capabilities(ssp.make_config({"bound": 1})).clock_bound == 1
    assert not ssp.capabilities(ssp.make_config({"bound": None})).gated
    adag = get_algorithm("adag")
    worker_side = adag.capabilities(adag.make_config({"placement": "worker"}))
    assert worker_side.sends_stale_center and worker_side.stale_from_worker
    assert not adag.capabilities().sends_stale_center
    gem = get_algorithm("gem")
    assert not gem.capabilities(gem.make_config({"placement": "server"})).reads
    hog = get_algorithm("hogwild")
    assert hog.capabilities(hog.make_config({"read_fraction": 0.25})).read_fraction == 0.25


def test_capabilities_reject_inconsistent_rules():
    class SendsNothing(WorkerRule):
        pass

    class WantsStaleFromWorker(AddServer):
        stale_from_worker = True
        needs_stale_center = True

    with pytest.raises(TypeError, match="sends_stale_center"):
        _toy(worker=SendsNothing, server=WantsStaleFromWorker).capabilities()

    class LockFreeWithoutUnlocked(AddServer):
        lock_free = True

    with pytest.raises(TypeError, match="apply_unlocked"):
        _toy(server=LockFreeWithoutUnlocked).capabilities()


def test_hogwild_unlocked_apply_is_its_locked_add():
    hog = get_algorithm("hogwild")
    assert isinstance(inspect.getattr_static(hog.server_rule, "apply_unlocked"), staticmethod)
    g = torch.Generator().manual_seed(0)
    center, payload = torch.randn(1001, generator=g), torch.randn(1001, generator=g) * 1e-3
    locked, unlocked = center.clone(), center.clone()
    rule = hog.server_rule(hog.make_config(), RunInfo(workers=2, lr=0.1, inner_optimizer="sgd"))
    rule.setup(locked, 2)
    rule.apply(locked, payload.clone(), ctx(stale=center.clone()))
    hog.apply_unlocked(unlocked, payload.clone())
    assert torch.equal(locked, unlocked)
    with pytest.raises(TypeError):
        get_algorithm("downpour").apply_unlocked(unlocked, payload)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("rewrite2", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
def test_adag_factor_is_what_the_fused_kernel_applies(rewrite2, kernels):
    """ADAG (fused kernel or its reference) = adag_factor, then payload ← f⊙payload,
    center ← center + payload: the same bits."""
    if kernels and not fast.kernels_available():
        pytest.skip("distgrad was installed without its C kernels")
    g = torch.Generator().manual_seed(3)
    c = torch.randn(10_001, generator=g)
    s = c + torch.randn(10_001, generator=g) * 1e-2
    p = torch.randn(10_001, generator=g) * 1e-3
    fused_c, fused_p = c.clone(), p.clone()
    old = fast.USE_KERNELS
    fast.USE_KERNELS = kernels
    try:
        dist_fused, scale_fused = fast.adag_apply(fused_c, fused_p, s, 1e-3, rewrite2=rewrite2)
    finally:
        fast.USE_KERNELS = old
    mine_c, mine_p, f = c.clone(), p.clone(), torch.empty_like(c)
    dist, scale = adag_factor(mine_c, s, 1e-3, out=f, rewrite2=rewrite2)
    mine_p.mul_(f)
    mine_c.add_(mine_p)
    assert torch.equal(mine_c, fused_c) and torch.equal(mine_p, fused_p)
    assert dist == pytest.approx(dist_fused, rel=1e-4)
    assert scale == pytest.approx(scale_fused, rel=1e-4)


def test_adag_factor_is_one_for_a_fresh_center():
    c = torch.tensor([1.0, -2.0, 3.0])
    f = torch.empty_like(c)
    assert adag_factor(c, c.clone(), 1e-4, out=f) == (0.0, 1.0)
    assert torch.equal(f, torch.ones(3))


def test_outer_sgd_heavy_ball_is_torch_sgd():
    """(The Nesterov form: test_rules.py::test_diloco_outer_step_is_pytorch_nesterov_sgd.)"""
    gen = torch.Generator().manual_seed(1)
    mine, ref = torch.zeros(7), torch.zeros(7, requires_grad=True)
    outer = OuterSGD(0.3, 0.8)
    opt = torch.optim.SGD([ref], lr=0.3, momentum=0.8)
    for g in (torch.randn(7, generator=gen) for _ in range(5)):
        outer.step(mine, g.clone())
        ref.grad = g
        opt.step()
    torch.testing.assert_close(mine, ref.detach())


def test_outer_sgd_grad_scale_is_slowmo():
    """SlowMo: u ← βu + d/γ; x ← x − αγu, written as arithmetic."""
    beta, alpha, gamma = 0.5, 0.8, 0.1
    outer = OuterSGD(alpha * gamma, beta, grad_scale=1 / gamma, buffer=True)
    x = torch.tensor([1.0, 2.0])
    outer.init(x)
    outer.step(x, torch.tensor([0.5, 0.5]))  # u = (5, 5); x − 0.08·u
    torch.testing.assert_close(x, torch.tensor([1 - 0.4, 2 - 0.4]))
    outer.step(x, torch.tensor([0.0, 0.1]))  # u = (2.5, 2.5 + 1)
    torch.testing.assert_close(x, torch.tensor([0.6 - 0.08 * 2.5, 1.6 - 0.08 * 3.5]))
    state = outer.state_dict()
    copy = OuterSGD(alpha * gamma, beta, grad_scale=1 / gamma, buffer=True)
    copy.load_state_dict(state)
    assert torch.equal(copy.buf, outer.buf) and copy.buf is not outer.buf
