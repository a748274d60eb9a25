"""Metrics of finished runs and the claim checks built from them.

Three accuracies exist for every run, and the reports show them side by side so a
difference with the thesis can be traced to the metric:

* ``test``: the center on the 10,000 test images (the thesis' "validation accuracy");
* ``train``: the center on every training image used (an honest training accuracy);
* ``last_batch``: the thesis' "training accuracy", the mean over workers of each worker's
  last mini-batch accuracy.

Curves against time come from the center's evaluations, or from the workers'
mini-batch accuracies pooled in windows as the thesis notebook did (``batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from distgrad.metrics.efficiency import center_curve
from distgrad.reproduce.analysis import batch_curve, max_drop_after
from distgrad.reproduce.report import pct
from distgrad.reproduce.spec import Results, RunData, Verdict

CheckFn = Callable[[Results], Verdict]

FINAL_STEPS = 10
""""Final" mini-batch accuracy = the mean over each worker's last 10 mini-batches."""


def final_batch_accuracy(run: RunData, steps: int = FINAL_STEPS) -> float:
    """Mean accuracy of the last ``steps`` mini-batches of every worker, pooled."""
    per: dict[int, list[float]] = {}
    for e in run.events:
        if e["type"] == "batch":
            per.setdefault(e["worker"], []).append(e["acc"])
    if not per:
        raise ValueError(f"run {run.label!r} has no mini-batch records")
    return float(np.mean([a for accs in per.values() for a in accs[-steps:]]))


def peak_batch_accuracy(run: RunData) -> float:
    """Highest value of the thesis' windowed mini-batch accuracy curve."""
    return float(max(batch_curve(run.events, run.step_time)[1]))


def batch_drop(run: RunData, threshold: float) -> tuple[float | None, float]:
    """(time the windowed batch accuracy first reaches ``threshold``, largest fall after)."""
    xs, ys = batch_curve(run.events, run.step_time)
    return max_drop_after(xs, ys, threshold)


def center_drop(run: RunData, threshold: float) -> tuple[float | None, float]:
    """As :func:`batch_drop` for the center's test accuracy at its evaluations."""
    xs, ys = center_curve(run.events)
    return max_drop_after(xs, ys, threshold)


def accuracies(run: RunData) -> str:
    """"final batch X (last-batch Y); center test Z, train W" for a claim's *ours* column."""
    s = run.summary
    return (f"batch {pct(final_batch_accuracy(run))} (last-batch "
            f"{pct(s.get('last_batch_train_accuracy'))}); center test "
            f"{pct(s.get('test_accuracy'))}, train {pct(s.get('train_accuracy'))}")


# --------------------------------------------------------------------------- check factories


def final_batch_below(label: str, level: float) -> CheckFn:
    """The run ends (final mini-batch accuracy) below ``level``."""

    def check(r: Results) -> Verdict:
        run = r[label]
        v = final_batch_accuracy(run)
        return Verdict(f"{label}: {accuracies(run)}", v < level)

    return check


def final_batch_at_least(labels: Sequence[str], level: float) -> CheckFn:
    """Every run ends (final mini-batch accuracy) at or above ``level``."""

    def check(r: Results) -> Verdict:
        vals = {lab: final_batch_accuracy(r[lab]) for lab in labels}
        ours = "; ".join(f"{lab}: {accuracies(r[lab])}" for lab in labels)
        return Verdict(ours, all(v >= level for v in vals.values()))

    return check


def peak_batch_at_least(label: str, level: float) -> CheckFn:
    def check(r: Results) -> Verdict:
        run = r[label]
        return Verdict(f"{label}: peak batch {pct(peak_batch_accuracy(run))}; "
                       f"{accuracies(run)}", peak_batch_accuracy(run) >= level)

    return check


def collapses(collapsing: Sequence[str], stable: Sequence[str], *, drop: float = 0.05
              ) -> CheckFn:
    """The ``collapsing`` runs' windowed batch accuracy falls by more than ``drop`` after
    first reaching the scale's ``collapse_from`` knob; the ``stable`` runs' does not. Not
    tested when a collapsing run never reaches the threshold (too few epochs)."""

    def check(r: Results) -> Verdict:
        level = r.knob("collapse_from")
        parts, ok, reached = [], True, True
        for label in [*collapsing, *stable]:
            when, fall = batch_drop(r[label], level)
            _, cfall = center_drop(r[label], level)
            parts.append(f"{label}: " + (f"largest fall {100 * fall:.1f} pts (center "
                                         f"{100 * cfall:.1f})" if when is not None
                                         else f"never reaches {pct(level, 0)}"))
            if label in collapsing:
                reached = reached and when is not None
                ok = ok and when is not None and fall > drop
            else:
                ok = ok and (when is None or fall <= drop)
        note = "" if level >= 0.98 else (f"threshold lowered to {pct(level, 0)} at this scale "
                                         "(fewer epochs than the thesis)")
        if not reached:
            return Verdict("; ".join(parts), None,
                           f"a run that should collapse never reaches {pct(level, 0)}")
        return Verdict("; ".join(parts), ok, note)

    return check
