"""Temporal efficiency against curves integrated by hand."""

from __future__ import annotations

import pytest

from distgrad.metrics.efficiency import area, notebook_curve, temporal_efficiency


def test_two_linear_curves_with_different_end_times():
    # a(t) = t/10 on [0, 10]; b(t) = t/20 on [0, 20]; M = min(10, 20) = 10
    a = ([0.0, 10.0], [0.0, 1.0])
    b = ([0.0, 20.0], [0.0, 1.0])
    # ∫0^10 t/10 dt = 5; ∫0^10 t/20 dt = 2.5
    assert temporal_efficiency(a, b) == pytest.approx(5 / 2.5)
    assert temporal_efficiency(b, a) == pytest.approx(2.5 / 5)


def test_area_of_piecewise_curve_with_extrapolation():
    # points (1, 0.5) and (3, 0.9): slope 0.2; extrapolated f(0) = 0.3, f(4) = 1.1
    assert area([1.0, 3.0], [0.5, 0.9], upto=4.0) == pytest.approx((0.3 + 1.1) / 2 * 4)
    # a knot inside: (0,0), (2,1), (4,1): 1 + 2 = 3
    assert area([0.0, 2.0, 4.0], [0.0, 1.0, 1.0], upto=4.0) == pytest.approx(3.0)


def test_notebook_curve_uses_five_second_windows_with_one_second_stride():
    events = [{"type": "batch", "t": t, "acc": a}
              for t, a in [(10.0, 0.2), (11.5, 0.4), (16.2, 1.0), (17.0, 0.6)]]
    xs, ys = notebook_curve(events)
    # t shifted to start at 0: 0, 1.5, 6.2, 7.0
    # window [0,5): 0.2,0.4 -> 0.3; [1,6): 0.4; [2,7): 6.2 -> 1.0; [3,8) -> 0.8; ... [7,12): 0.6
    assert xs == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert ys == pytest.approx([0.3, 0.4, 1.0, 0.8, 0.8, 0.8, 0.8, 0.6])
