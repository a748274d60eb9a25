"""The fused C kernels against the torch reference path: bit-identical centers."""

from __future__ import annotations

import pytest
import torch

from distgrad import fast

pytestmark = pytest.mark.skipif(not fast.kernels_available(),
                                reason="distgrad was installed without its C kernels")


def tensors(n: int = 100_003, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=g)
    return c, c + torch.randn(n, generator=g) * 1e-2, torch.randn(n, generator=g) * 1e-3


def both(fn):
    fast.USE_KERNELS = True
    try:
        a = fn()
    finally:
        fast.USE_KERNELS = False
    try:
        b = fn()
    finally:
        fast.USE_KERNELS = True
    return a, b


@pytest.mark.parametrize("alpha", [1.0, 1 / 3, 0.5, 1 / 21])
@pytest.mark.parametrize("with_stale", [True, False])
def test_add_scaled_matches_reference(alpha, with_stale):
    c, s, p = tensors()

    def run():
        center = c.clone()
        d = fast.add_scaled(center, p, alpha, s if with_stale else None)
        return center, d

    (ck, dk), (cr, dr) = both(run)
    assert torch.equal(ck, cr)
    if with_stale:
        assert dk == pytest.approx(dr, rel=1e-4)
    else:
        assert dk is None and dr is None


@pytest.mark.parametrize("rewrite2", [False, True])
@pytest.mark.parametrize("gamma", [1e-4, 1e-2])
def test_adag_matches_reference(rewrite2, gamma):
    c, s, p = tensors(seed=1)

    def run():
        center, payload = c.clone(), p.clone()
        d, f = fast.adag_apply(center, payload, s, gamma, rewrite2=rewrite2)
        return center, payload, d, f

    (ck, pk, dk, fk), (cr, pr, dr, fr) = both(run)
    assert torch.equal(ck, cr) and torch.equal(pk, pr)
    assert dk == pytest.approx(dr, rel=1e-4) and fk == pytest.approx(fr, rel=1e-4)


def test_distance_matches_reference():
    c, s, _ = tensors(seed=2)
    dk, dr = both(lambda: fast.distance(c, s))
    assert dk == pytest.approx(dr, rel=1e-4)
    assert dk == pytest.approx(float((c.double() - s.double()).norm()), rel=1e-4)


def test_non_contiguous_or_other_dtype_falls_back():
    c, _, p = tensors(n=10)
    view = torch.zeros(20)[::2]
    fast.add_scaled(view, p, 1.0)
    assert torch.equal(view, p)
    c64 = c.double()
    fast.add_scaled(c64, p.double(), 1.0)
    assert torch.allclose(c64, (c + p).double())
