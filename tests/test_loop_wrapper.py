"""The training-loop wrapper (:mod:`distgrad.loop`) against a real ``distgrad serve``.

A server subprocess on 127.0.0.1 serves a job whose model and data are named by import
path (``examples.user_model``); its two workers are the user's own loop: one runs
``examples/own_loop.py`` in a subprocess, the other a :class:`DistributedLoop` in this
process. The run completes with every sample committed and a trained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from examples.user_model import make_model
from torch.nn import functional as F

from distgrad.errors import ConfigError
from distgrad.loop import DistributedLoop
from distgrad.transport.auth import read_secret_file

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str, bytes]:
    addr_file = tmp_path / "addr"
    secret_file = tmp_path / "secret"
    cmd = [sys.executable, "-m", "distgrad", "serve", "--model",
           "examples.user_model:make_model", "--data", "examples.user_model:make_data",
           "--data-arg", "n=720", "--algorithm", "downpour", "--workers", "2",
           "--window", "3", "--batch-size", "50", "--epochs", "2", "--lr", "0.003",
           "--secret-file", str(secret_file), "--address-file", str(addr_file),
           "--out", str(tmp_path / "run"), "--quiet", "--worker-timeout", "60", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not addr_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.communicate()[1]}")
        time.sleep(0.1)
    address = addr_file.read_text().strip()
    return proc, address, read_secret_file(secret_file)


def test_own_loop_trains_against_distgrad_serve(tmp_path: Path) -> None:
    server, address, secret = _serve(tmp_path)
    script = None
    try:
        script = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "own_loop.py"), "--connect", address,
             "--secret-file", str(tmp_path / "secret")],
            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        steps = 0
        with DistributedLoop(model, opt, address, secret) as dl:
            assert dl.samples_total == 2 * len(dl.shard) == 600
            for x, y in dl.batches():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                dl.step(len(x), loss=loss.item())
                steps += 1
        assert steps == 12 and dl.samples == 600
        out, err = script.communicate(timeout=300)
        assert script.returncode == 0, err
        assert "600 samples trained" in out
        _, err = server.communicate(timeout=300)
        assert server.returncode == 0, err
    finally:
        for p in (script, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["status"] == "completed" and summary["samples"] == 1200
    assert summary["commits"] == 2 * 4  # 12 steps per worker, λ = 3
    assert summary["test_accuracy"] > 0.9  # separable blobs
    assert config["model"] == "examples.user_model:make_model"
    assert config["model_class"] == "torch.nn.modules.container.Sequential"
    assert config["parameters"] == 8 * 32 + 32 + 32 * 3 + 3


def test_a_loop_that_stops_early_or_overruns_is_refused(tmp_path: Path) -> None:
    server, address, secret = _serve(tmp_path, "--on-failure", "drop")
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with (pytest.raises(ConfigError, match="the job gives worker"),
              DistributedLoop(model, opt, address, secret, worker=0) as dl):
            with pytest.raises(ConfigError, match="the job gives it 600"):
                dl.step(601)
            dl.step(50)
        wrong = torch.nn.Linear(8, 3)
        with pytest.raises(ConfigError, match="trainable parameters"):
            DistributedLoop(wrong, torch.optim.SGD(wrong.parameters(), lr=0.1), address,
                            secret, worker=1)
    finally:
        server.kill()
        server.communicate()
