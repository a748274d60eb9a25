"""Contract tests over the whole registry: every algorithm learns, is deterministic, and its
server state round-trips through a snapshot."""

from __future__ import annotations

import pytest
import torch

from distgrad import train
from distgrad.algorithms import RunInfo, get_algorithm, names
from distgrad.server import ParameterServer


def workers_for(name: str) -> int:
    return get_algorithm(name).exact_workers or 2


def window_for(name: str) -> int:
    """4, or 1 for the algorithms that commit every step (sync, dcasgd, hogwild)."""
    from distgrad.errors import ConfigError

    try:
        get_algorithm(name).make_config({"window": 4})
    except ConfigError:
        return 1
    return 4


@pytest.mark.parametrize("name", names())
def test_every_algorithm_learns_mnist_and_is_deterministic(name, mnist_small, tiny_mlp):
    kw = dict(algorithm=name, workers=workers_for(name), window=window_for(name), epochs=2,
              batch_size=32, lr=2e-3, seed=4, model=tiny_mlp, eval_every=10.0, **mnist_small)
    a = train(engine="sim", **kw)
    # 3,000 images, 2 epochs, a 32-unit MLP: sequential reaches ~0.87, EAMSGD (momentum 0.9
    # on top of Adam) ~0.73; chance is 0.1
    assert a.test_accuracy > 0.7, (name, a.test_accuracy)
    assert not a.diverged
    b = train(engine="sim", **kw)
    assert a.params_sha256 == b.params_sha256


def _drive(server: ParameterServer, worker: int, step: torch.Tensor) -> None:
    into = torch.empty_like(server.center)
    server.pull(worker, into)
    payload = into + step
    if server.rule.synchronous:
        server.submit(worker, payload, steps=1, samples=1)
    else:
        server.commit(worker, payload, steps=1, samples=1, stale_center=into)


@pytest.mark.parametrize("name", names())
def test_server_state_round_trips(name):
    algo = get_algorithm(name)
    n = workers_for(name)
    cfg = algo.make_config({"window": window_for(name)})
    info = RunInfo(workers=n, lr=0.1, inner_optimizer="adam")
    servers = [ParameterServer(torch.tensor([1.0, -2.0]), algo.server_rule(cfg, info), n)
               for _ in range(2)]
    steps = [torch.tensor([0.25, 0.5]), torch.tensor([-0.5, 0.125])]
    for k in range(n):  # one full round / n commits on the first server
        _drive(servers[0], k, steps[k])
    servers[1].load_state_dict(servers[0].state_dict())
    assert servers[1].version == servers[0].version
    for s in servers:  # the same next commits give the same state
        for k in range(n):
            _drive(s, k, steps[(k + 1) % n])
    assert servers[0].version == servers[1].version
    for a, b in zip(servers[0].models(), servers[1].models(), strict=True):
        assert torch.equal(a, b)
