"""Bad input fails early with an error naming the bad value (API and CLI)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distgrad import ConfigError, Job, Timing
from distgrad.algorithms import get_algorithm
from distgrad.cli import main


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"algorithm": "adagg"}, r"unknown algorithm 'adagg'; choose from: adag, aeasgd"),
    ({"engine": "spark2"}, r"unknown engine 'spark2'"),
    ({"workers": 0}, r"workers must be an integer >= 1, got 0"),
    ({"workers": -3}, r"workers must be an integer >= 1, got -3"),
    ({"window": 0}, r"window must be an integer >= 1, got 0"),
    ({"window": -1}, r"window must be an integer >= 1, got -1"),
    ({"lr": 0.0}, r"lr must be a finite number > 0, got 0.0"),
    ({"lr": -0.1}, r"lr must be a finite number > 0, got -0.1"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0"),
    ({"epochs": 0}, r"epochs must be an integer >= 1"),
    ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
    ({"inner_optimizer": "rmsprop"}, r"unknown inner optimizer 'rmsprop'; choose from: sgd, "
                                     r"adam, a torch\.optim class \(e\.g\. AdamW, RMSprop\)"),
    ({"model": "resnet"}, None),
    ({"sharding": "random"}, r"unknown sharding 'random'"),
    ({"params": {"gamma": 0.0}}, r"gamma must be a finite number > 0, got 0.0"),
    ({"params": {"gamma": -1e-4}}, r"gamma must be a finite number > 0"),
    ({"params": {"gama": 1e-4}}, r"unknown parameter 'gama' for this algorithm; valid keys: "
                                 r"form, gamma, placement, window"),
    ({"params": {"placement": "client"}}, r"unknown placement 'client'"),
    ({"algorithm": "sequential", "workers": 4}, r"'sequential' runs with exactly 1 worker"),
    ({"algorithm": "sync", "window": 3}, r"window must be 1, got 3"),
    ({"algorithm": "aeasgd", "params": {"rho": 50.0, "elastic_lr": 0.1}},
     r"alpha = rho \* elastic_lr must lie in \(0, 1\], got 5\.0"),
    ({"algorithm": "eamsgd", "params": {"momentum": 1.0}}, r"momentum must lie in \[0, 1\)"),
    ({"timing": Timing(stragglers=3), "workers": 2}, r"stragglers \(3\) exceeds workers \(2\)"),
    ({"algorithm": "gem", "params": {"kappa": 0}}, r"kappa must be a finite number > 0, got 0"),
    ({"algorithm": "gem", "params": {"momentum": 1.0}}, r"momentum must lie in \[0, 1\)"),
    ({"algorithm": "gem", "params": {"placement": "both"}}, r"unknown placement 'both'"),
    ({"algorithm": "diloco", "params": {"outer_lr": -1.0}}, r"outer_lr must be a finite number"),
    ({"algorithm": "diloco-async", "params": {"adag_gamma": 0.0}},
     r"adag_gamma must be a finite number > 0, got 0.0"),
    ({"algorithm": "dcasgd", "window": 2}, r"dcasgd commits every gradient; window must be 1"),
    ({"algorithm": "dcasgd", "params": {"mode": "auto"}}, r"unknown mode 'auto'"),
    ({"algorithm": "localsgd", "params": {"warmup_steps": -1}},
     r"warmup_steps must be an integer >= 0, got -1"),
    ({"algorithm": "slowmo", "params": {"slow_momentum": 1.0}}, r"slow_momentum must lie in"),
    ({"algorithm": "ssp", "params": {"bound": -1}}, r"bound must be an integer >= 0, got -1"),
    ({"algorithm": "hogwild", "window": 3}, r"hogwild adds every step; window must be 1, got 3"),
    ({"algorithm": "hogwild", "params": {"read_fraction": 1.0}}, r"read_fraction must lie in"),
    ({"algorithm": "staleness-lr", "params": {"softsync": 0}}, r"softsync must be an integer >= 1"),
])
def test_job_rejects(kwargs, match):
    if kwargs.get("model") == "resnet":
        from distgrad import train

        with pytest.raises(ConfigError,
                           match=r"unknown model 'resnet'; choose from: cnn, gpt, mlp"):
            train(**kwargs, epochs=1)
        return
    with pytest.raises(ConfigError, match=match):
        Job(**kwargs)


def test_timing_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown timing model 'gauss'"):
        Timing(model="gauss")
    with pytest.raises(ConfigError, match="step_time must be a finite number > 0"):
        Timing(step_time=0)


def test_config_coerces_set_strings():
    cfg = get_algorithm("easgd").make_config({"rho": "2.5", "early_commit": "true", "window": "4",
                                              "early_commit_threshold": "none"})
    assert cfg.rho == 2.5 and cfg.early_commit is True and cfg.window == 4
    assert cfg.early_commit_threshold is None
    with pytest.raises(ConfigError, match="rho must be a number, got 'abc'"):
        get_algorithm("easgd").make_config({"rho": "abc"})


def test_more_workers_than_samples(mnist_small):
    from distgrad import train

    x, y = mnist_small["data"]
    with pytest.raises(ConfigError, match=r"more workers \(5\) than training samples \(4\)"):
        train(algorithm="agn", workers=5, data=(x[:4], y[:4]), test_data=mnist_small["test_data"])


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--algorithm", "nope"], "unknown algorithm 'nope'; choose from:"),
    (["train", "--workers", "0"], "workers must be an integer >= 1, got 0"),
    (["train", "--window", "-2"], "window must be an integer >= 1, got -2"),
    (["train", "--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["train", "--set", "gamma=0"], "gamma must be a finite number > 0, got 0.0"),
    (["train", "--set", "gamma"], "--set expects key=value, got 'gamma'"),
    (["train", "--set", "beta=1"], "unknown parameter 'beta' for this algorithm"),
    (["train", "--crash", "x"], "--crash expects WORKER@TIME"),
    (["train", "--workers", "two"], "argument --workers: invalid int value: 'two'"),
])
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err


def test_cli_compare_rejects_a_directory_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path), str(tmp_path)])
    assert exc.value.code == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(blocker), "-q"])
    assert exc.value.code == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_cli_as_a_subprocess_lists_algorithms():
    out = subprocess.run([sys.executable, "-m", "distgrad", "algorithms"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    names = [line.split()[0] for line in out]
    assert names == ["sequential", "sync", "averaging", "ensemble", "downpour", "dynsgd", "easgd",
                     "aeasgd", "eamsgd", "agn", "adag", "gem", "dcasgd", "staleness-lr", "ssp",
                     "hogwild", "diloco-async", "localsgd", "slowmo", "diloco"]
    assert all(len(line.split(None, 1)) == 2 for line in out)


def test_cli_train_and_compare_end_to_end(tmp_path, capsys):
    common = ["--model", "cnn", "--train-samples", "2000", "--epochs", "1", "--workers", "2",
              "--eval-every", "0.25", "-q"]
    assert main(["train", "--algorithm", "agn", "--window", "2", "--out", str(tmp_path / "a"),
                 *common]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["train", "--algorithm", "downpour", "--window", "2", "--set", "window=2",
              "--out", str(tmp_path / "b"), *common])
    assert exc.value.code == 2
    assert "window given twice" in capsys.readouterr().err
    assert main(["train", "--algorithm", "dynsgd", "--set", "window=2", "--out",
                 str(tmp_path / "b"), *common]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "run directory" in out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--te-window", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "E(A,B) center test accuracy vs time:" in out
    assert "notebook" in out


def test_cli_compare_refuses_mixed_clocks(tmp_path, capsys):
    """A sim run's seconds are virtual, a local run's are wall-clock: no E(A,B) across."""
    import json

    for name, engine in (("a", "sim"), ("b", "local")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.jsonl").write_text("")
        (tmp_path / name / "summary.json").write_text(json.dumps({"engine": engine}))
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'sim' (virtual seconds), B on 'local' (wall seconds)" in err
    assert "--mixed-clocks" in err


def test_pipeline_is_checked_when_the_job_is_made():
    from distgrad import Job
    from distgrad.errors import ConfigError

    for engine in ("sim", "local"):
        with pytest.raises(ConfigError, match=f"not {engine!r}"):
            Job(engine=engine, pipeline=True)
    with pytest.raises(ConfigError, match="'sync' cannot be pipelined"):
        Job(engine="net", algorithm="sync", pipeline=True)
    assert Job(engine="net", algorithm="adag", pipeline=True).pipeline
