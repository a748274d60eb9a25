"""The user's model and data by import path, on sim, local (CLI) and net (serve + work);
``config.json`` records what was trained, and replay/resume refuse anything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import distgrad
from distgrad.engines.net import NetEngine
from distgrad.errors import ConfigError
from distgrad.job import Job
from distgrad.transport.client import NetClient, run_worker
from distgrad.transport.jobspec import job_from_dict, parts_from_job

ROOT = Path(__file__).resolve().parents[1]
USER = dict(model="examples.user_model:make_model", model_args={"hidden": 16},
            dataset="examples.user_model:make_data", data_args={"n": 600},
            algorithm="downpour", window=2, batch_size=25, epochs=2, lr=0.01)
SECRET = b"0123456789abcdef0123456789abcdef"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_import_paths_on_sim_record_what_was_trained(tmp_path: Path) -> None:
    res = distgrad.train(engine="sim", workers=2, out=tmp_path / "a", **USER)
    assert res.test_accuracy > 0.9 and res.summary["task"] == "classification"
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model"] == USER["model"] and config["model_args"] == {"hidden": 16}
    assert config["data_args"] == {"n": 600} and config["parameters"] == 8 * 16 + 16 + 16 * 3 + 3
    assert config["model_class"] == "torch.nn.modules.container.Sequential"
    assert len(config["data_fingerprint"]) == 16 and config["data_ref"] == USER["dataset"]
    # the same job from its JSON builds the same model and data (a remote worker's view)
    again = parts_from_job(job_from_dict(Job(engine="net", workers=2, **USER).to_dict()))
    assert again.identity["data_fingerprint"] == config["data_fingerprint"]


def test_replay_refuses_other_data_and_a_run_of_python_objects(tmp_path: Path) -> None:
    x = torch.randn(90, 8, generator=torch.Generator().manual_seed(3))
    y = (x[:, 0] > 0).long()
    distgrad.train(engine="sim", workers=2, model=nn.Linear(8, 2), data=(x, y),
                   out=tmp_path / "obj", batch_size=30)
    with pytest.raises(ConfigError, match=r"was trained with model 'torch\.nn\.modules\.linear"):
        distgrad.train(replay=tmp_path / "obj")  # would replay the MLP on MNIST
    with pytest.raises(ConfigError, match="data \\(fingerprint\\)"):
        distgrad.train(replay=tmp_path / "obj", model=nn.Linear(8, 2), data=(x + 1, y))


def test_cli_trains_user_code_on_local_workers(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "distgrad", "train", "--engine", "local", "--workers", "2",
           "--model", USER["model"], "--model-arg", "hidden=16", "--data", USER["dataset"],
           "--data-arg", "n=600", "--algorithm", "adag", "--window", "2", "--batch-size", "25",
           "--epochs", "2", "--lr", "0.01", "--out", str(tmp_path / "run"), "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["samples"] == 1000
    assert summary["test_accuracy"] > 0.9


def test_serve_and_work_train_user_code() -> None:
    """The job travels as JSON (import paths and their arguments) and the worker host
    builds the model and data itself."""
    ready = threading.Event()
    addresses: list[str] = []
    out: dict = {}

    def on_listen(address: str) -> None:
        addresses.append(address)
        ready.set()

    def serve() -> None:
        try:
            out["result"] = distgrad.train(Job(engine="net", workers=1, **USER),
                                           engine=NetEngine(SECRET, on_listen=on_listen))
        except BaseException as exc:
            out["error"] = exc
            ready.set()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert ready.wait(120) and "error" not in out, out.get("error")
        with NetClient(addresses[0], SECRET, timeout=30) as client:
            job = job_from_dict(client.info["job"])
            assert job.model_args == {"hidden": 16}
            run_worker(client, parts_from_job(job).make_worker(client.worker))
    finally:
        thread.join(120)
    assert out["result"].test_accuracy > 0.9 and out["result"].samples == 1000


def test_net_refuses_python_objects_with_a_pointer_to_import_paths() -> None:
    with pytest.raises(ConfigError, match="name them by import path"):
        distgrad.train(Job(engine="net", workers=1, train_samples=100),
                       model=nn.Linear(784, 10), engine=NetEngine(SECRET))


def test_per_worker_streams_train_deterministically_on_sim() -> None:
    job = dict(model="examples.user_model:make_model", dataset="examples.user_model:make_streams",
               algorithm="adag", window=2, batch_size=25, epochs=2, lr=0.01, workers=2,
               engine="sim", seed=3)
    a, b = distgrad.train(**job), distgrad.train(**job)
    assert a.samples == 2 * 2 * 250 and a.test_accuracy > 0.9
    assert a.params_sha256 == b.params_sha256  # the same stream for the same seed
    assert "last mini-batch" in a.summary["train_note"]
