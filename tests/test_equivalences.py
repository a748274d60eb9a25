"""Equivalences between algorithms, run end to end through the simulator."""

from __future__ import annotations

import pytest
import torch

from conftest import Point, half_sq, point_data
from distgrad import Timing, train
from distgrad.algorithms import get_algorithm, names

FAST = dict(engine="sim", epochs=1, batch_size=64, lr=1e-3, inner_optimizer="adam",
            eval_every=10.0)


def params_of(result) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(result.model.parameters()).detach()


def test_agn_with_window_one_is_downpour(mnist_small, tiny_mlp):
    a = train(algorithm="agn", window=1, workers=3, seed=3, model=tiny_mlp, **FAST, **mnist_small)
    d = train(algorithm="downpour", window=1, workers=3, seed=3, model=tiny_mlp, **FAST,
              **mnist_small)
    assert a.params_sha256 == d.params_sha256


def test_adag_with_one_worker_is_agn_bit_for_bit(mnist_small, tiny_mlp):
    # one worker: every commit has τ = 0, the factor is exactly 1
    a = train(algorithm="adag", window=4, workers=1, seed=2, model=tiny_mlp, **FAST, **mnist_small)
    g = train(algorithm="agn", window=4, workers=1, seed=2, model=tiny_mlp, **FAST, **mnist_small)
    assert a.params_sha256 == g.params_sha256
    assert a.scale_mean == 1.0


# With one worker an asynchronous method that commits its full delta and pulls is
# sequential training: the center is base + (params − base) and the worker pulls it
# back. That round trip can differ from params in the last bit, hence allclose.
# AGN/ADAG need λ = 1 (else they divide the delta); the elastic methods (aeasgd,
# eamsgd) are not sequential at any λ: the center trails the worker by design.
ONE_WORKER_SEQUENTIAL = [
    ("downpour", 3), ("dynsgd", 3), ("agn", 1), ("adag", 1),
]


@pytest.mark.parametrize(("name", "window"), ONE_WORKER_SEQUENTIAL)
def test_async_with_one_worker_is_sequential(name, window, mnist_small, tiny_mlp):
    seq = train(algorithm="sequential", workers=1, seed=5, model=tiny_mlp, **FAST, **mnist_small)
    one = train(algorithm=name, window=window, workers=1, seed=5, model=tiny_mlp, **FAST,
                **mnist_small)
    torch.testing.assert_close(params_of(one), params_of(seq), rtol=1e-4, atol=1e-5)
    assert one.test_accuracy == pytest.approx(seq.test_accuracy, abs=0.01)


def test_sequential_is_plain_torch_training_bit_for_bit(mnist_small, tiny_mlp):
    """The sequential algorithm equals a hand-written torch.optim loop."""
    from distgrad.data import make_shards
    from distgrad.worker import BatchSource

    x, y = mnist_small["data"]
    res = train(algorithm="sequential", seed=7, model=tiny_mlp, sharding="contiguous", **FAST,
                **mnist_small)
    ref = type(tiny_mlp)()
    ref.load_state_dict(tiny_mlp.state_dict())
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3, fused=True)
    shard = make_shards(y.numpy(), 1, "contiguous", 7)[0]
    from distgrad.job import worker_seed

    for xb, yb in BatchSource(x, y, shard, 64, 1, seed=worker_seed(7, 0)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(xb), yb).backward()
        opt.step()
    torch.testing.assert_close(params_of(res), torch.nn.utils.parameters_to_vector(
        ref.parameters()).detach(), rtol=0, atol=0)


def test_downpour_two_workers_lockstep_by_hand():
    """λ=1, SGD η=0.5, quadratic 0.5‖w − y‖², worker 0 owns y=(2,0), worker 1 y=(0,4).

    Constant timing: both start at t=0 and worker 0 is served first at every tie.
    t=0  w0: pull c=(0,0), step -> (1,0)        w1: pull (0,0), step -> (0,2)
    t=1  w0: commit (1,0), τ=0 -> c=(1,0); pull; step -> (1,0)-0.5((1,0)-(2,0)) = (1.5,0)
         w1: commit (0,2), τ=1 -> c=(1,2); pull; step -> (1,2)-0.5((1,2)-(0,4)) = (0.5,3)
    t=2  w0: commit (1.5,0)-(1,0) = (0.5,0), τ=1 -> c=(1.5,2)
         w1: commit (0.5,3)-(1,2) = (-0.5,1), τ=1 -> c=(1,3)
    """
    res = train(algorithm="downpour", engine="sim", window=1, workers=2, epochs=2, batch_size=1,
                lr=0.5, inner_optimizer="sgd", sharding="contiguous", model=Point(),
                loss_fn=half_sq,
                data=point_data([[2, 0], [0, 4]]), test_data=point_data([[0, 0]]),
                timing=Timing(model="constant", step_time=1.0))
    torch.testing.assert_close(params_of(res), torch.tensor([1.0, 3.0]))
    commits = [e for e in res.events if e["type"] == "commit"]
    assert [c["staleness"] for c in commits] == [0, 1, 1, 1]
    assert [c["worker"] for c in commits] == [0, 1, 0, 1]


def test_dynsgd_two_workers_lockstep_by_hand():
    """As above with DynSGD's 1/(τ+1):
    t=1  w0: (1,0), τ=0 -> c=(1,0); pull; step -> (1.5,0)
         w1: (0,2), τ=1 -> c=(1,0)+(0,2)/2=(1,1); pull; step -> (1,1)-0.5((1,1)-(0,4))=(0.5,2.5)
    t=2  w0: (1.5,0)-(1,0)=(0.5,0), τ=1 -> c=(1.25,1)
         w1: (0.5,2.5)-(1,1)=(-0.5,1.5), τ=1 -> c=(1.25-0.25, 1+0.75)=(1,1.75)
    """
    res = train(algorithm="dynsgd", engine="sim", window=1, workers=2, epochs=2, batch_size=1,
                lr=0.5, inner_optimizer="sgd", sharding="contiguous", model=Point(),
                loss_fn=half_sq,
                data=point_data([[2, 0], [0, 4]]), test_data=point_data([[0, 0]]),
                timing=Timing(model="constant", step_time=1.0))
    torch.testing.assert_close(params_of(res), torch.tensor([1.0, 1.75]))


def test_sync_equals_large_batch_sequential(mnist_small, tiny_mlp):
    """sync with n workers of batch B takes the same steps as one worker with batch n·B
    (same samples per step, contiguous shards, no shuffling differences: SGD)."""
    x, y = mnist_small["data"]
    res = train(algorithm="sync", engine="sim", workers=2, batch_size=50, epochs=1, lr=0.1,
                inner_optimizer="sgd", sharding="contiguous", model=tiny_mlp, eval_every=10.0,
                **mnist_small)
    ref = type(tiny_mlp)()
    ref.load_state_dict(tiny_mlp.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    from distgrad.data import make_shards
    from distgrad.job import worker_seed
    from distgrad.worker import BatchSource

    shards = make_shards(y.numpy(), 2, "contiguous", 0)
    its = [iter(BatchSource(x, y, shards[k], 50, 1, seed=worker_seed(0, k))) for k in range(2)]
    for (xa, ya), (xb, yb) in zip(*its, strict=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(torch.cat([xa, xb])), torch.cat([ya, yb])).backward()
        opt.step()
    torch.testing.assert_close(params_of(res), torch.nn.utils.parameters_to_vector(
        ref.parameters()).detach(), rtol=1e-4, atol=1e-5)


def test_every_registered_algorithm_has_a_hand_computed_rule_test(monkeypatch):
    """Runs every test of tests/test_rules.py, recording whose rules each one builds: every
    registered algorithm must have its rules built by at least one of those (passing) tests
    — a name merely mentioned in that file does not count."""
    import test_rules

    real = test_rules.get_algorithm
    current = [""]
    built: dict[str, set[str]] = {}

    def recording(name: str):
        built.setdefault(name, set()).add(current[0])
        return real(name)

    monkeypatch.setattr(test_rules, "get_algorithm", recording)
    tests = [(n, f) for n, f in vars(test_rules).items() if n.startswith("test_")]
    for test_name, fn in tests:
        current[0] = test_name
        fn()  # hand-computed values: must pass here too
    missing = [name for name in names() if not built.get(name)]
    assert not missing, f"no hand-computed rule test in test_rules.py runs: {missing}"
    for name in names():
        assert get_algorithm(name).summary
