"""Exact resume on ``sim``: a run checkpointed at a commit and resumed ends with the same
parameters and the same events after the cut as the uninterrupted run — for every
registered algorithm, at several cut points, and with crashes, queues and compression."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyMLP
from distgrad import Timing, train
from distgrad.algorithms import REGISTRY
from distgrad.data import load_mnist
from distgrad.engines.sim import SimEngine
from distgrad.job import Job
from distgrad.models import initialize
from distgrad.rundir import CHECKPOINT, read_checkpoint

CUTS = (0.2, 0.5, 0.8)  # early, middle and late, as fractions of the final version


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    d = load_mnist()
    return {"data": (d.x_train[:240], d.y_train[:240]),
            "test_data": (d.x_test[:100], d.y_test[:100])}


def _job(name: str, **fields: Any) -> Job:
    algo = REGISTRY[name]
    base: dict[str, Any] = dict(
        algorithm=name, engine="sim", workers=algo.exact_workers or 3, epochs=2,
        batch_size=16, lr=1e-3, seed=5, threads=1, eval_every=0.5)
    try:
        Job(**{**base, "window": 2})
        base["window"] = 2
    except Exception:  # an algorithm with a fixed window (sync, hogwild, ...) keeps its own
        pass
    return Job(**{**base, **fields})


def _run(job: Job, data: dict[str, Any], engine: SimEngine | None = None):
    engine = engine or SimEngine(job.timing, job.seed, threads=job.threads)
    return train(job, model=initialize(TinyMLP(hidden=8), seed=0), engine=engine,
                 figures=False, **data)


def _plain(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] not in ("checkpoint", "resume")]


def _updates(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] in ("commit", "round")]


def check_exact_resume(job: Job, data: dict[str, Any], tmp_path: Path) -> int:
    """Run ``job`` uninterrupted, then with checkpoints at the CUTS, then resumed from each
    checkpoint; assert all end alike. Returns the number of checkpoints checked (a cut
    that falls where the run is not quiescent is taken later, and may merge with the next)."""
    whole = _run(job, data)
    final = whole.summary["versions"]
    cuts = sorted({max(1, min(final - 1, round(f * final))) for f in CUTS})
    engine = SimEngine(job.timing, job.seed, threads=job.threads,
                       checkpoint_path=tmp_path / "ckpt-{version}.pt", checkpoint_at=cuts)
    cut_run = _run(job, data, engine)
    # taking snapshots changes nothing
    assert cut_run.params_sha256 == whole.params_sha256
    assert _plain(cut_run.events) == _plain(whole.events)
    assert 1 <= len(engine.checkpoints) <= len(cuts), (cuts, engine.checkpoints)
    for path in engine.checkpoints:
        snap = read_checkpoint(path)  # the file as written: tensors and plain data only
        assert snap["server"]["version"] >= min(cuts)
        assert path.name == f"ckpt-{snap['server']['version']}.pt"
        resumed = _run(job, data, SimEngine(job.timing, job.seed, threads=job.threads,
                                            resume=snap))
        assert resumed.params_sha256 == whole.params_sha256, (job.algorithm, path.name)
        after = _plain(cut_run.events[snap["events"]:])
        assert _updates(resumed.events) == _updates(after), (job.algorithm, path.name)
        assert _plain(resumed.events) == after
        # counters carried in the snapshot (event statistics need the events before the
        # cut, which train(resume=DIR) reads back from the run directory)
        for key in ("samples", "commits", "bytes_committed", "last_batch_train_accuracy",
                    "virtual_seconds", "versions"):
            assert resumed.summary[key] == whole.summary[key], key
    return len(engine.checkpoints)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_algorithm_resumes_exactly(name, data, tmp_path):
    assert check_exact_resume(_job(name), data, tmp_path) == 3


@pytest.mark.parametrize("name, fields", [
    ("agn", dict(timing=Timing(crashes=((1, 0.3),)))),  # asynchronous, one worker dies
    ("averaging", dict(timing=Timing(crashes=((2, 0.2),)))),  # dies while others wait
    ("ssp", dict(timing=Timing(stragglers=1, straggler_factor=3.0))),  # the gate holds
    ("downpour", dict(timing=Timing(commit_time=0.01, server_time=0.02))),  # queues
    ("hogwild", dict(params={"read_fraction": 0.9})),  # long torn reads
    ("easgd", dict(timing=Timing(model="constant"))),  # lockstep
    ("adag", dict(timing=Timing(model="exponential"), compression="int8")),  # residuals
    ("dynsgd", dict(timing=Timing(sigma=0.8), workers=4)),  # lognormal, heavy jitter
])
def test_resume_with_crashes_queues_and_timing_models(name, fields, data, tmp_path):
    job = _job(name, **fields)
    assert check_exact_resume(job, data, tmp_path) >= 2


def test_crash_after_the_cut_still_happens(data, tmp_path):
    job = _job("agn", timing=Timing(crashes=((0, 0.4),)))
    whole = _run(job, data)
    engine = SimEngine(job.timing, job.seed, threads=1, checkpoint_path=tmp_path / "c.pt",
                       checkpoint_at=(2,))
    _run(job, data, engine)
    snap = read_checkpoint(tmp_path / "c.pt")
    assert snap["t"] < 0.4
    resumed = _run(job, data, SimEngine(job.timing, job.seed, threads=1, resume=snap))
    faults = [e for e in resumed.events if e["type"] == "fault"]
    assert [(f["worker"], f["t"]) for f in faults] == [(0, 0.4)]
    assert resumed.params_sha256 == whole.params_sha256
    assert resumed.samples_lost == whole.samples_lost > 0


def test_train_resume_dir_continues_a_sim_run(tmp_path):
    """The public path: ``checkpoint_every`` (virtual seconds) writes DIR/checkpoint.pt,
    ``train(resume=DIR)`` continues from it."""
    fields = dict(engine="sim", algorithm="adag", model="cnn", workers=3, window=2, epochs=2,
                  batch_size=16, train_samples=192, seed=2, threads=1, eval_every=100.0)
    run_dir = tmp_path / "cut"
    # checkpoints change nothing (test_every_algorithm_resumes_exactly): this is the
    # uninterrupted run as well
    whole = train(out=run_dir, figures=False, checkpoint_every=0.15, **fields)
    snap = read_checkpoint(run_dir / CHECKPOINT)  # the last one
    assert 0 < snap["server"]["version"] < whole.summary["versions"]
    resumed = train(resume=run_dir, figures=False)
    assert resumed.params_sha256 == whole.params_sha256
    assert _updates(resumed.events) == _updates(whole.events)
    for key in ("samples", "commits", "bytes_committed", "staleness_mean", "distance_mean",
                "last_batch_train_accuracy", "virtual_seconds", "test_accuracy"):
        assert resumed.summary[key] == whole.summary[key], key
    assert [e["type"] for e in resumed.events].count("resume") == 1


def test_resume_from_each_of_several_run_directories(data, tmp_path):
    """One checkpoint per directory: copy the run directory at each cut and resume it (a
    run of a model and data of one's own resumes with the same model and data)."""
    job = _job("easgd", workers=2)
    model = initialize(TinyMLP(hidden=8), seed=0)
    whole = train(job, model=model, out=tmp_path / "whole", figures=False, **data)
    src = tmp_path / "src"
    engine = SimEngine(job.timing, job.seed, threads=1, checkpoint_path=src / "ckpt-{version}.pt",
                       checkpoint_at=(1, 4, 7))
    train(job, model=model, out=src, engine=engine, figures=False, **data)
    assert len(engine.checkpoints) == 3
    for path in engine.checkpoints:
        run_dir = tmp_path / path.stem
        shutil.copytree(src, run_dir)
        shutil.copy(path, run_dir / CHECKPOINT)
        resumed = train(resume=run_dir, model=model, figures=False, **data)
        assert resumed.params_sha256 == whole.params_sha256, path.name
        assert _updates(resumed.events) == _updates(whole.events)


def test_a_snapshot_is_refused_while_a_request_is_in_flight(data):
    job = _job("sync")
    engine = SimEngine(job.timing, job.seed, threads=1)
    _run(job, data, engine)  # ends finished: quiescent
    assert engine.quiescent()
    engine.states[0].finished, engine.states[0].paused = False, False
    with pytest.raises(RuntimeError, match="not quiescent"):
        engine.snapshot()


def test_resume_needs_a_sim_snapshot():
    with pytest.raises(ValueError, match="sim"):
        SimEngine(Timing(), 0, resume={"server": {}, "t": 0.0})


@pytest.mark.parametrize("name", ["adag", "sync"])
def test_a_checkpoint_before_the_first_event_resumes_exactly(name, data, tmp_path):
    job = _job(name)
    whole = _run(job, data)
    engine = SimEngine(job.timing, job.seed, threads=1, checkpoint_path=tmp_path / "c.pt",
                       checkpoint_at=(0,))
    _run(job, data, engine)
    snap = read_checkpoint(tmp_path / "c.pt")
    assert snap["t"] == 0.0 and snap["server"]["version"] == 0
    assert all(not w["worker"]["started"] for w in snap["sim"]["workers"])
    resumed = _run(job, data, SimEngine(job.timing, job.seed, threads=1, resume=snap))
    assert resumed.params_sha256 == whole.params_sha256


def test_a_resumed_run_checkpoints_and_resumes_again(data, tmp_path):
    job = _job("gem", timing=Timing(crashes=((2, 0.5),)))
    whole = _run(job, data)
    first = SimEngine(job.timing, job.seed, threads=1, checkpoint_path=tmp_path / "a.pt",
                      checkpoint_at=(3,))
    _run(job, data, first)
    second = SimEngine(job.timing, job.seed, threads=1, checkpoint_path=tmp_path / "b.pt",
                       checkpoint_at=(3, 12), resume=read_checkpoint(tmp_path / "a.pt"))
    assert _run(job, data, second).params_sha256 == whole.params_sha256
    assert second.checkpoints == [tmp_path / "b.pt"]  # version 3 was the resumed one
    snap = read_checkpoint(tmp_path / "b.pt")
    assert snap["server"]["version"] >= 12
    third = _run(job, data, SimEngine(job.timing, job.seed, threads=1, resume=snap))
    assert third.params_sha256 == whole.params_sha256
