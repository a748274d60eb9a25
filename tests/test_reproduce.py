"""`distgrad reproduce`: every experiment runs end to end at the tiny scale, the report is
right on a fixed event log, and the analysis functions match hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distgrad import Job, Timing
from distgrad.cli import main
from distgrad.errors import ConfigError
from distgrad.reproduce import get_experiment, names, run_experiment
from distgrad.reproduce import thesis_data as T
from distgrad.reproduce.analysis import (
    fit_heavy_ball,
    max_drop_after,
    max_rise_after_min,
    notebook_window,
    staleness_stats,
    te_pair,
)
from distgrad.reproduce.provenance import METHOD, code_fingerprint
from distgrad.reproduce.report import evaluate_claims, write_report
from distgrad.reproduce.runner import load_runs
from distgrad.reproduce.toy import BEALE_OPTIMUM, Vector, beale, beale_loss, simulate

# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs directory for the whole module, as `reproduce all` shares it."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("name", names())
def test_every_experiment_runs_at_tiny_scale_and_reports_every_claim(name, shared_runs,
                                                                     tmp_path):
    exp = get_experiment(name)
    torch.set_num_threads(1)
    outcome = run_experiment(name, scale="tiny", out=tmp_path / name, runs_dir=shared_runs,
                             log=lambda msg: None)
    text = outcome.report.read_text()
    assert f"`{name}`" in text and "scale `tiny`" in text
    assert len(outcome.verdicts) == len(exp.claims) >= 1
    for claim, verdict in outcome.verdicts:
        assert f"| {claim.id} |" in text
        assert verdict.ours and verdict.label in ("holds", "does not hold", "not tested")
    for fig in exp.figures:
        png = tmp_path / name / fig.file
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000
    if exp.execute is None:  # MNIST runs: one run directory per distinct job
        assert len(outcome.results.runs) == len(exp.run_specs("tiny"))


def test_experiment_configs_validate():
    for name in names():
        exp = get_experiment(name)
        for scale in ("quick", "full"):
            if exp.execute is None:
                setup = exp.setup(scale)
                for spec in exp.run_specs(scale):
                    job = spec.job(setup, seed=exp.seed, engine="sim")
                    assert job.workers == spec.workers
    with pytest.raises(ConfigError, match="unknown experiment 'e9'"):
        get_experiment("e9")
    with pytest.raises(ConfigError, match="unknown scale 'huge'"):
        get_experiment("e1-downpour-workers").setup("huge")


def test_toy_experiments_refuse_other_engines(tmp_path):
    with pytest.raises(ConfigError, match="sim engine only"):
        run_experiment("e8-easgd-beale", scale="tiny", out=tmp_path, engine="local",
                       log=lambda m: None)


# --------------------------------------------------------------------------- fixed event log


def _write_run(path: Path, workers: int, accs: list[float], summary: dict) -> None:
    """A run directory by hand: each worker takes len(accs) steps of 0.05 s with the given
    mini-batch accuracies; the center is evaluated at t = 0 and at the end."""
    path.mkdir(parents=True)
    events = [{"type": "eval", "t": 0.0, "version": 0, "samples": 0, "test_loss": 2.3,
               "test_acc": 0.1}]
    for s, acc in enumerate(accs):
        for w in range(workers):
            events.append({"type": "batch", "t": 0.05 * s + 0.001 * w, "worker": w,
                           "loss": 1.0, "acc": acc})
    end = 0.05 * len(accs)
    events.append({"type": "eval", "t": end, "version": 1, "samples": 1,
                   "test_loss": 0.5, "test_acc": summary["test_accuracy"]})
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    base = {"algorithm": "downpour", "workers": workers, "window": 1, "epochs": 5,
            "commits": workers * len(accs), "staleness_mean": workers - 1.0,
            "virtual_seconds": end, "wall_seconds": 1.0}
    (path / "summary.json").write_text(json.dumps({**base, **summary}))
    # finished, by this code
    (path / "reproduce.json").write_text(json.dumps({"code_fingerprint": code_fingerprint(),
                                                    "fingerprint_method": METHOD}))


def test_report_on_a_fixed_event_log(tmp_path):
    exp = get_experiment("e1-downpour-workers")
    setup = exp.setup("quick")
    specs = {s.label: s for s in exp.run_specs("quick")}
    runs = tmp_path / "runs"
    # n=10: 10 steps at 50 %, then 10 steps at 97 %: the windowed curve (10 steps = 0.5 s)
    # peaks at exactly 97 %, and the final mini-batch accuracy is 97 %.
    _write_run(runs / specs["n10"].dirname(setup, exp.seed), 10, [0.5] * 10 + [0.97] * 10,
               {"test_accuracy": 0.96, "train_accuracy": 0.965,
                "last_batch_train_accuracy": 0.97})
    # n=20: 40 % then 10 %: ends at chance; the exponential-timing variant recovers to 80 %
    _write_run(runs / specs["n20"].dirname(setup, exp.seed), 20, [0.4] * 10 + [0.1] * 10,
               {"test_accuracy": 0.098, "train_accuracy": 0.1,
                "last_batch_train_accuracy": 0.1})
    _write_run(runs / specs["n20-exponential"].dirname(setup, exp.seed), 20,
               [0.4] * 10 + [0.8] * 10, {"test_accuracy": 0.79, "train_accuracy": 0.8,
                                         "last_batch_train_accuracy": 0.8})
    results = load_runs(exp, "quick", runs)
    assert results["n10"].step_time == pytest.approx(0.05)
    verdicts = {c.id: v for c, v in evaluate_claims(results)}
    assert verdicts["1a"].holds is True
    assert verdicts["1a"].ours == ("n10: peak batch 97.00 %; batch 97.00 % (last-batch 97.00 %)"
                                   "; center test 96.00 %, train 96.50 %")
    assert verdicts["1b"].holds is True
    assert verdicts["1b"].ours.startswith("n20: batch 10.00 % (last-batch 10.00 %)")
    assert verdicts["1b-exp"].holds is False
    assert verdicts["1b-exp"].ours.startswith("n20-exponential: batch 80.00 %")
    report, _, figures = write_report(results, tmp_path / "out", command="distgrad reproduce x")
    text = report.read_text()
    assert ("| 1a | DOWNPOUR, λ=1, n=10 reaches ≥ 95 % mini-batch accuracy | ≈98 % after "
            "≈1,090 s | n10: peak batch 97.00 %") in text
    assert "✅ holds" in text and "*Command:* `distgrad reproduce x`" in text
    assert "| n20 | downpour | 20 | 1 | 5 | 400 | 19.0 | 1.0 | 1 | 9.80 % | 10.00 % | 10.00 % |" \
        in text
    assert [f for f, _ in figures] == ["accuracy.png"]

    # the same log with n=20 recovering: claim 1b no longer holds
    events = (runs / specs["n20"].dirname(setup, exp.seed) / "events.jsonl")
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    for e in rows:
        if e["type"] == "batch" and e["t"] > 0.499:  # steps 10..19
            e["acc"] = 0.9
    events.write_text("".join(json.dumps(e) + "\n" for e in rows))
    verdicts = {c.id: v for c, v in evaluate_claims(load_runs(exp, "quick", runs))}
    assert verdicts["1b"].holds is False and "batch 90.00 %" in verdicts["1b"].ours


def test_results_page_from_a_fixed_event_log(tmp_path):
    from distgrad.reproduce import Outcome
    from distgrad.reproduce.page import write_page

    exp = get_experiment("e1-downpour-workers")
    setup = exp.setup("quick")
    runs = tmp_path / "runs"
    for spec in exp.run_specs("quick"):
        _write_run(runs / spec.dirname(setup, exp.seed), spec.workers, [0.5] * 10 + [0.97] * 10,
                   {"test_accuracy": 0.96, "train_accuracy": 0.965,
                    "last_batch_train_accuracy": 0.97})
    results = load_runs(exp, "quick", runs)
    report, verdicts, figures = write_report(results, tmp_path / "e1")
    discussion = tmp_path / "discussion.md"
    discussion.write_text("## Why\n\nBecause.\n")
    page = write_page([Outcome(exp, results, verdicts, figures, report)],
                      tmp_path / "docs" / "reproduction.md", command="distgrad reproduce all",
                      scale="quick", discussion_file=discussion)
    text = page.read_text()
    assert "```bash\ndistgrad reproduce all\n```" in text
    assert "**Claims: 1 hold · 2 do not hold · 0 not tested here.**" in text
    assert "| [e1-downpour-workers](#e1-downpour-workers) | quick | 1a |" in text
    assert "## Why\n\nBecause." in text and "## Notes (hand-written)" in text
    # the discussion is generated from the verdicts; the why of 1b is marked hand-written
    assert "**Confirmed (1).** `e1-downpour-workers`: 1a." in text
    assert "**Not confirmed (2).**" in text and "* **1b** (`e1-downpour-workers`" in text
    assert "*Why (hand-written): with the thesis' Adam" in text
    # with the outcomes of another scale: a column, and the verdicts that changed
    other = write_page([Outcome(exp, results, verdicts, figures, report)],
                       tmp_path / "docs2" / "reproduction.md", command="c", scale="full",
                       compare=[Outcome(exp, results, [(c, v.__class__(v.ours, True))
                                                       for c, v in verdicts],
                                        figures, report)]).read_text()
    assert "other scale: ours, verdict |" in other
    assert ("**At `quick`** (the column \"other scale\", from its finished runs): 3 hold · "
            "0 do not hold · 0 not tested; 0 claims have no runs at that scale." in other)
    assert "## Verdicts that changed between scales" in other
    assert "* **1b** (`e1-downpour-workers`): holds at `quick`" in other
    assert "33/49 = 67.35 %" in text and "34/49 = 69.39 %" in text
    assert "(reproduction/e1-downpour-workers-accuracy.png)" in text
    assert (tmp_path / "docs" / "reproduction" / "e1-downpour-workers-accuracy.png").exists()


def test_a_partial_grid_reports_its_missing_runs_and_tests_nothing_it_lacks(tmp_path):
    exp = get_experiment("e6-agn-aeasgd-grid")
    results = load_runs(exp, "full", tmp_path, allow_missing=True)
    assert results.data["missing"][:2] == ["agn-n10-l10", "aeasgd-n10-l10"]  # core first
    assert len(results.data["missing"]) == 98
    assert all(v.holds is None for _, v in evaluate_claims(results))
    report, verdicts, figures = write_report(results, tmp_path / "report")
    assert "**Partial:** 0 of 98 runs finished" in report.read_text() and figures == []
    # a page compared with it lists what of the grid is finished: its complete cells
    from distgrad.reproduce import Outcome
    from distgrad.reproduce.page import write_page

    quick = load_runs(exp, "quick", tmp_path / "quick", allow_missing=True)
    page = write_page([Outcome(exp, quick, evaluate_claims(quick), [], report)],
                      tmp_path / "docs" / "reproduction.md", command="c", scale="quick",
                      compare=[Outcome(exp, results, verdicts, [], report)]).read_text()
    assert ("## Unfinished at `full`" in page and "* `e6-agn-aeasgd-grid`: 0 of 98 runs "
            "finished; cells (n, λ) with both runs: none." in page)
    setup = exp.setup("full")
    for spec in exp.run_specs("full")[:3]:  # agn and aeasgd at (10, 10), agn at (10, 20)
        _write_run(tmp_path / spec.dirname(setup, exp.seed), spec.workers, [0.9] * 4,
                   {"test_accuracy": 0.9, "train_accuracy": 0.9})
    partial = load_runs(exp, "full", tmp_path, allow_missing=True)
    assert len(partial.data["missing"]) == 95
    assert exp.progress(partial) == "cells (n, λ) with both runs: (10, 10)"
    # claim 6 reads the largest λ finished for two n or more, not a λ finished for one n
    specs = {s.label: s for s in exp.run_specs("full")}
    for label in ("aeasgd-n10-l20", "agn-n20-l10", "aeasgd-n20-l10"):
        spec = specs[label]
        _write_run(tmp_path / spec.dirname(setup, exp.seed), spec.workers, [0.9] * 4,
                   {"test_accuracy": 0.9, "train_accuracy": 0.9})
    claim = next(c for c in exp.claims if c.id == "6")
    six = claim.check(load_runs(exp, "full", tmp_path, allow_missing=True))
    assert six.ours.startswith("λ=10: t(n=10)/t(n=20) = 1.00 for n ratio 2.00"), six.ours


def test_missing_run_is_named(tmp_path):
    exp = get_experiment("e1-downpour-workers")
    with pytest.raises(FileNotFoundError, match="run 'n10' of 'e1-downpour-workers'"):
        load_runs(exp, "quick", tmp_path)


# --------------------------------------------------------------------------- analysis


def test_max_drop_after_threshold():
    xs = [0, 1, 2, 3, 4, 5]
    ys = [0.5, 0.91, 0.95, 0.80, 0.96, 0.90]
    # reaches 0.9 at x=1; running max 0.95 then 0.80: drop 0.15
    when, drop = max_drop_after(xs, ys, 0.9)
    assert when == 1 and drop == pytest.approx(0.95 - 0.80)
    assert max_drop_after(xs, ys, 0.99) == (None, 0.0)


def test_max_rise_after_min():
    # running minimum 2.0, 0.5, 0.5, 0.5, 0.3; largest rise 1.6 - 0.5
    assert max_rise_after_min([2.0, 0.5, 1.6, 0.7, 0.3]) == pytest.approx(1.1)


def test_staleness_stats():
    events = [{"type": "commit", "staleness": s} for s in (0, 2, 2, 3, 9)]
    st = staleness_stats(events)
    assert st["mean"] == pytest.approx(16 / 5) and st["mode"] == 2 and st["median"] == 2
    assert st["max"] == 9 and st["commits"] == 5


def test_notebook_window_matches_the_thesis_in_steps():
    # thesis: 5 s windows, 1 s stride at ≈0.5 s per step; simulator step 0.05 s
    assert notebook_window(0.05) == pytest.approx((0.5, 0.1))


def test_te_pair_on_two_linear_curves():
    # center: a(t) = t/10 up to 10, b(t) = t/20 up to 20: E = 5 / 2.5 = 2 (M = 10)
    def ev(end: float, slope: float) -> list[dict]:
        events = [{"type": "eval", "t": t, "test_acc": slope * t} for t in (0.0, end)]
        # mini-batches: one worker, constant accuracy, 1 s steps
        events += [{"type": "batch", "t": float(t), "worker": 0, "acc": slope * 10}
                   for t in range(int(end) + 1)]
        return events

    e = te_pair(ev(10, 0.1), ev(20, 0.05), step_time=0.5)
    assert e["center"] == pytest.approx(2.0)
    # windows of 5 s, stride 1 s over constant curves 1.0 and 0.5: E = 2 as well
    assert e["notebook"] == pytest.approx(2.0)


def test_heavy_ball_fit_recovers_known_parameters():
    h = (0.5, 1.0, 2.0)
    mu, c = 0.9, 0.0025
    x = np.zeros((500, 3))
    x[0] = x[1] = 1.0
    for t in range(1, 499):
        x[t + 1] = x[t] + mu * (x[t] - x[t - 1]) - c * np.array(h) * x[t]
    fit = fit_heavy_ball(x, h, lr=0.025)
    assert fit["mu"] == pytest.approx(mu, abs=2e-3)
    assert fit["c"] == pytest.approx(c, rel=0.02)
    assert fit["r2"] > 0.9999
    noisy = x + np.random.default_rng(0).normal(0, 0.01, x.shape)
    assert fit_heavy_ball(noisy, h, lr=0.025)["mu"] == pytest.approx(mu, abs=0.01)


def test_thesis_tables_give_the_thesis_counts():
    assert T.te_wins() == (33, 34, 49)
    assert T.agn_training_wins() == (42, 49)
    assert T.validation_split() == {"aeasgd_ge_small": (14, 14), "agn_gt_large": (28, 35)}
    means = T.aeasgd_mean_train_by_n()
    assert round(means[10], 2) == 98.89 and round(means[40], 2) == 96.60
    assert round(T.agn_speedup(40), 2) == 3.28
    # 69.73 % matches no share of 49 cells
    assert all(abs(100 * k / 49 - 69.73) > 0.01 for k in range(50))


# --------------------------------------------------------------------------- toys


def test_beale_has_its_minimum_at_three_one_half():
    assert float(beale(torch.tensor(BEALE_OPTIMUM))) == 0.0
    assert float(beale(torch.tensor([1.0, 1.0]))) == pytest.approx(1.5**2 + 2.25**2 + 2.625**2)


def test_probe_traces_every_step_and_changes_nothing():
    job = Job(algorithm="easgd", engine="sim", workers=2, window=3,
              params={"rho": 5.0, "elastic_lr": 1e-3}, lr=1e-3, inner_optimizer="sgd",
              batch_size=1, epochs=1, sharding="contiguous",
              timing=Timing(model="constant", step_time=1.0), track_distance=False,
              record_batches=False)
    noise = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    a = simulate(job, Vector((1.0, 1.5)), beale_loss, torch.zeros(20, 1), noise, probe=True)
    b = simulate(job, Vector((1.0, 1.5)), beale_loss, torch.zeros(20, 1), noise)
    assert torch.equal(a.centers, b.centers)
    assert len(a.trace.rows) == 20  # 2 workers × 10 steps
    # 10 steps per worker, window 3: rounds after steps 3, 6, 9 and the final step 10
    assert len(a.centers) == 1 + 4
    first = next(r for r in a.trace.rows if r[0] == 0)
    assert first[3] == 0.0  # the worker starts at the center: no elastic term
    # first step: η·‖∇f(1, 1.5) + ξ‖ with ξ the first row worker 0 draws from its shard
    from distgrad.data import make_shards
    from distgrad.job import worker_seed
    from distgrad.worker import BatchSource

    shard = make_shards(np.zeros(20), 2, "contiguous", 0)[0]
    row = BatchSource(torch.zeros(20, 1), noise, shard, 1, 1, seed=worker_seed(0, 0)).order[0]
    w = torch.tensor([1.0, 1.5], requires_grad=True)
    (beale(w) + (w * noise[row]).sum()).backward()
    assert first[2] == pytest.approx(1e-3 * float(w.grad.norm()), rel=1e-5)


def test_simulate_records_the_center_after_every_commit():
    job = Job(algorithm="downpour", engine="sim", workers=2, window=1, lr=0.5,
              inner_optimizer="sgd", batch_size=1, epochs=1, sharding="contiguous",
              timing=Timing(model="constant", step_time=1.0), track_distance=False,
              record_batches=False)
    # the hand-computed lockstep of tests/test_equivalences.py: centers (1,0), (1,2), ...
    y = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 4.0]])
    from distgrad.reproduce.toy import quadratic_loss

    sim = simulate(job, Vector((0.0, 0.0)), quadratic_loss, torch.zeros(4, 1), y)
    expected = [[0, 0], [1, 0], [1, 2], [1.5, 2], [1, 3]]
    torch.testing.assert_close(sim.centers, torch.tensor(expected, dtype=torch.float32))
    assert sim.versions == [0, 1, 2, 3, 4]
    assert not math.isnan(sim.end_time)


# --------------------------------------------------------------------------- CLI


def test_cli_lists_every_experiment(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in names():
        assert name in out
    for required in ("e1-", "e2-", "e3-", "e4-", "e6-", "e7-", "e8-", "staleness", "momentum"):
        assert required in out


@pytest.mark.parametrize(("argv", "message"), [
    (["reproduce", "e9"], "unknown experiment 'e9'"),
    (["reproduce", "e1-downpour-workers", "--scale", "huge"], "unknown scale 'huge'"),
    (["reproduce", "e1-downpour-workers", "--page", "x.md"], "--page needs every experiment"),
    (["reproduce"], "name an experiment"),
    (["reproduce", "e1-downpour-workers", "--full", "e8-easgd-beale"],
     "--full e8-easgd-beale: not among the experiments to run"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
