"""The run lifecycle (prepare -> execute -> finalize), the engine options and the CLI flags
generated from the dataclasses."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest

from distgrad import ConfigError, Job, Timing, train
from distgrad.cli import _TIMING_FLAGS, TIMING_PREFIX, _job_from_args, build_parser
from distgrad.engines import make_engine
from distgrad.engines.options import (
    ENGINE_OPTIONS,
    ENGINES,
    LocalOptions,
    NetOptions,
    RayOptions,
    SimOptions,
    SparkOptions,
    options_for,
)
from distgrad.engines.sim import SimEngine
from distgrad.metrics.schedule import EvalSchedule
from distgrad.parts import ENGINE_FIELDS, build_parts
from distgrad.run import Run
from distgrad.rundir import prepare_out

FAST = dict(epochs=1, batch_size=64, lr=1e-3, eval_every=0.5)


def test_api_and_cli_default_to_the_same_engine():
    args = build_parser().parse_args(["train"])
    assert Job().engine == args.engine == ENGINES[0] == "local"


def test_cli_defaults_are_the_dataclass_defaults():
    args = build_parser().parse_args(["train"])
    job = _job_from_args(args)
    assert job == Job()
    for f in fields(Timing):
        if f.name != "crashes":
            assert getattr(args, TIMING_PREFIX + f.name) == f.default
    for cls in (RayOptions, SparkOptions):
        assert options_for(cls.__name__[:-7].lower(), **vars(args)) == cls()


def test_cli_flags_reach_the_job_and_options():
    args = build_parser().parse_args([
        "train", "--engine", "sim", "--algorithm", "adag", "--workers", "3", "--set",
        "gamma=0.5", "--window", "4", "--no-distance", "--no-error-feedback", "--compress",
        "fp16", "--threads", "2", "--timing", "constant", "--step-time", "0.1",
        "--crash", "1@2.5", "--ray-address", "auto", "--max-restarts", "5"])
    job = _job_from_args(args)
    assert (job.engine, job.algorithm, job.workers, job.window) == ("sim", "adag", 3, 4)
    assert job.params == {"gamma": "0.5"} and job.algorithm_config().gamma == 0.5
    assert not job.track_distance and not job.error_feedback and job.compression == "fp16"
    assert job.threads == 2 and job.engine_options() == SimOptions(threads=2)
    assert job.timing == Timing(model="constant", step_time=0.1, crashes=((1, 2.5),))
    assert options_for("ray", **vars(args)) == RayOptions(address="auto", max_restarts=5)
    assert options_for("spark", **vars(args)).engine_kwargs()["max_failures"] == 6


def test_every_field_with_help_is_a_flag_and_every_timing_field_has_help():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    dests = {a.dest for a in train_parser._actions}
    for f in fields(Job):
        flag = "help" in f.metadata or f.name in ENGINE_FIELDS  # those from LocalOptions
        assert (f.name in dests) == flag, f.name
    assert set(_TIMING_FLAGS) == {f.name for f in fields(Timing)}
    for cls in (LocalOptions, SimOptions, RayOptions, SparkOptions):
        for f in fields(cls):
            assert f.name in dests and f.metadata["help"], (cls.__name__, f.name)
    # a field several engines share has one flag with one meaning
    assert set(ENGINE_FIELDS) == {f.name for f in fields(LocalOptions)}
    assert fields(RayOptions)[-1].metadata == fields(SparkOptions)[-1].metadata


def test_help_is_generated_with_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "--engine NAME" in out and "local, sim, net, ray, spark" in out
    assert "(default local)" in out and "(default 0.001)" in out
    assert "--inner-optimizer NAME" in out and "sgd|adam" in out
    assert "--no-distance" in out and "--step-time SEC" in out and "--crash W@T" in out
    assert "--ray-shard-threshold N" in out and "(default 50,000,000)" in out


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (LocalOptions, {"threads": 0}, r"threads must be an integer >= 1, got 0"),
    (LocalOptions, {"device": "tpu"}, r"unknown device 'tpu'; choose from: cpu, cuda"),
    (LocalOptions, {"on_failure": "retry"}, r"unknown on_failure 'retry'"),
    (LocalOptions, {"checkpoint_every": 0}, r"checkpoint_every must be a finite number > 0"),
    (SimOptions, {"threads": -1}, r"threads must be an integer >= 1, got -1"),
    (NetOptions, {"port": 70000}, r"port must be an integer in \[0, 65535\], got 70000"),
    (NetOptions, {"integrity": "none"}, r"unknown integrity 'none'; choose from: full, header"),
    (NetOptions, {"worker_timeout": 0}, r"worker_timeout must be a finite number > 0"),
    (RayOptions, {"shards": 0}, r"shards must be an integer >= 1, got 0"),
    (RayOptions, {"max_restarts": -1}, r"max_restarts must be an integer >= 0, got -1"),
    (SparkOptions, {"max_restarts": -2}, r"max_restarts must be an integer >= 0, got -2"),
])
def test_options_reject_bad_values(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_options_belong_to_their_engine():
    assert set(ENGINE_OPTIONS) == set(ENGINES)
    with pytest.raises(ConfigError, match="engine 'ray' takes RayOptions, got SparkOptions"):
        make_engine(Job(engine="ray"), options=SparkOptions())
    with pytest.raises(ConfigError, match=r"use job\.with_options"):
        make_engine(Job(engine="sim"), options=SimOptions(threads=3))
    job = Job(engine="local").with_options(LocalOptions(on_failure="drop", threads=2))
    assert job.on_failure == "drop" and job.engine_options() == LocalOptions(
        on_failure="drop", threads=2)
    assert isinstance(make_engine(Job(engine="sim"), options=SimOptions()), SimEngine)


def test_train_takes_sim_options(mnist_small, tiny_mlp):
    res = train(algorithm="agn", engine="sim", workers=2, window=2, model=tiny_mlp,
                options=SimOptions(threads=1), **FAST, **mnist_small)
    assert res.summary["threads"] == 1


def test_lifecycle_by_hand_equals_train(mnist_small, tiny_mlp, tmp_path):
    """prepare -> execute -> finalize, as train() runs it, writes the same run."""
    job = Job(algorithm="adag", engine="sim", workers=2, window=3, seed=3, **FAST)
    ref = train(job, model=tiny_mlp, out=tmp_path / "train", **mnist_small)
    parts = build_parts(job, model=tiny_mlp, data=mnist_small["data"],
                        test_data=mnist_small["test_data"])
    run = Run.prepare(parts, out=prepare_out(tmp_path / "hand", overwrite=False))
    assert isinstance(run.evals, EvalSchedule)
    assert run.evals.every_samples == int(job.eval_every * 3000)
    outcome = run.execute(make_engine(job))
    assert outcome.status == "completed"
    res = run.finalize(outcome, extra={"model": type(tiny_mlp).__name__}, figures=False)
    assert res.params_sha256 == ref.params_sha256
    assert (tmp_path / "hand" / "events.jsonl").read_bytes() == \
        (tmp_path / "train" / "events.jsonl").read_bytes()
    a = json.loads((tmp_path / "hand" / "summary.json").read_text())
    b = json.loads((tmp_path / "train" / "summary.json").read_text())
    for key in ("wall_seconds", "samples_per_second", "samples_per_wall_second"):
        a.pop(key, None), b.pop(key, None)
    assert a == b
    assert json.loads((tmp_path / "hand" / "config.json").read_text()) == \
        json.loads((tmp_path / "train" / "config.json").read_text())
    assert not list((tmp_path / "hand").glob("*.png")) and list((tmp_path / "train").glob("*"))


def test_interrupted_run_is_finalized_then_reraised(mnist_small, tiny_mlp, tmp_path):
    def stop(done: int, total: int) -> None:
        if done > 500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="partial run written"):
        train(algorithm="agn", engine="sim", workers=2, window=2, model=tiny_mlp,
              out=tmp_path, progress=stop, **FAST, **mnist_small)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["samples"] < 3000


def test_old_private_names_still_import():
    from distgrad.job import (  # noqa: F401
        RunParts,
        _as_tensors,
        _load_replay,
        _load_resume,
        _model_with,
        _prepare_out,
        _summarize,
        worker_seed,
    )


def test_resume_rejects_changed_flags_by_their_flag_name(tmp_path, capsys):
    from distgrad.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path), "--no-distance"])
    assert "--no-distance cannot be combined with --resume" in capsys.readouterr().err


def test_namespace_has_no_unknown_job_fields():
    args = build_parser().parse_args(["train"])
    assert isinstance(args, argparse.Namespace)
    assert {f.name for f in fields(Job) if f.metadata.get("help")} <= set(vars(args))
