"""``distgrad serve`` checkpoints and resumes: the server process is killed (SIGKILL) or
stopped (SIGTERM) mid-run, ``serve --resume`` starts it again on the same port, the
``distgrad work`` processes rejoin by themselves from the checkpointed positions, and every
sample is committed exactly once. And a worker whose setup outlasts ``--worker-timeout`` is
not declared dead (it sends heartbeats while it builds its model and shard).

Real processes on 127.0.0.1. The model is this module's :func:`slow_mlp` (imported by the
server and the workers through ``PYTHONPATH``): a tiny MLP whose training forward pass
sleeps, so that a run lasts long enough to be interrupted twice on any machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
TRAIN = 3000  # samples: 1,500 per worker
JOB = ["--algorithm", "agn", "--workers", "2", "--window", "2", "--epochs", "1",
       "--batch-size", "25", "--train-samples", str(TRAIN), "--eval-every", "0.5",
       "--model", "test_serve_resume:slow_mlp"]


class _Slow(nn.Module):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay)
        return self.net(x)


def slow_mlp() -> nn.Module:
    """784-16-10 whose training steps take 40 ms; building it takes
    ``$DISTGRAD_TEST_SETUP_DELAY`` seconds (a worker's slow start)."""
    time.sleep(float(os.environ.get("DISTGRAD_TEST_SETUP_DELAY", "0")))
    return _Slow(0.04)


# --------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Callable[[], bool], timeout: float, what: str,
          procs: list[subprocess.Popen] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"waiting for {what}: {dead[0].args} exited with "
                                 f"{dead[0].returncode}:\n{_log(dead[0])}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:g} s")


def _log(p: subprocess.Popen) -> str:
    return Path(p.log).read_text()[-4000:]  # type: ignore[attr-defined]


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


class Procs:
    """The processes of one test, each logging to a file; all killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.all = tmp, []

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}-{len(self.all)}.log"
        with open(log, "w") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=_env(**env),
                                 cwd=self.tmp)
        p.log = log  # type: ignore[attr-defined]
        self.all.append(p)
        return p

    def serve(self, *args: str) -> subprocess.Popen:
        return self.start("serve", [sys.executable, "-m", "distgrad", "serve", *args])

    def work(self, port: int, secret: Path, k: int, **env: str) -> subprocess.Popen:
        return self.start(f"work{k}", [sys.executable, "-m", "distgrad", "work", "--connect",
                                       f"127.0.0.1:{port}", "--secret-file", str(secret),
                                       "--worker", str(k), "--timeout", "5"], **env)

    def kill_all(self) -> None:
        for p in self.all:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


@contextlib.contextmanager
def processes(tmp: Path) -> Iterator[Procs]:
    procs = Procs(tmp)
    try:
        yield procs
    finally:
        procs.kill_all()


def _check_exactly_once(run: Path) -> dict:
    """Every sample of both shards committed exactly once (the core accepts a commit only
    at the worker's next position and a DONE only at its total, so equal sums mean no
    window twice), and the run completed."""
    summary = json.loads((run / "summary.json").read_text())
    commits = [e for e in _events(run) if e["type"] == "commit"]
    per_worker = {k: sum(c["samples"] for c in commits if c["worker"] == k) for k in (0, 1)}
    assert per_worker == {0: TRAIN // 2, 1: TRAIN // 2}
    assert summary["status"] == "completed"
    assert summary["samples_committed"] == TRAIN and summary["samples_lost"] == 0
    return summary


# --------------------------------------------------------------------------- tests


def test_killed_and_terminated_server_resumes_and_workers_rejoin(tmp_path: Path) -> None:
    secret, run, port = tmp_path / "secret", tmp_path / "run", _free_port()
    net = ["--port", str(port), "--secret-file", str(secret)]
    with processes(tmp_path) as procs:
        server = procs.serve(*JOB, *net, "--checkpoint-every", "1", "--worker-timeout", "20",
                             "--rejoin-timeout", "60", "--out", str(run), "-q")
        _wait(lambda: secret.exists() and (run / "events.jsonl").exists(), 120,
              "a listening server", [server])
        workers = [procs.work(port, secret, k) for k in (0, 1)]

        # 1. SIGKILL once a checkpoint holds commits: nothing of the server survives
        def checkpointed() -> bool:
            ev = _events(run)
            last = max((i for i, e in enumerate(ev) if e["type"] == "checkpoint"), default=-1)
            return last >= 0 and any(e["type"] == "commit" for e in ev[:last]) and \
                sum(e["type"] == "commit" for e in ev) > 10
        _wait(checkpointed, 120, "a checkpoint after some commits", [server, *workers])
        server.kill()
        server.wait(10)
        assert not (run / "summary.json").exists()
        before = _events(run)
        ckpt = [e for e in before if e["type"] == "checkpoint"][-1]

        # 2. resumed on the same port: the workers rejoin by themselves
        server = procs.serve("--resume", str(run), *net, "--worker-timeout", "20",
                             "--rejoin-timeout", "60", "-q")
        _wait(lambda: any(e["type"] == "resume" for e in _events(run)), 120, "the resume",
              [server])
        resumed = next(e for e in _events(run) if e["type"] == "resume")
        assert resumed["version"] == ckpt["version"]  # the center of the last checkpoint
        committed_at_resume = sum(e["samples"] for e in _events(run) if e["type"] == "commit")
        _wait(lambda: sum(e["samples"] for e in _events(run) if e["type"] == "commit")
              > committed_at_resume + 200, 120, "commits after the resume", [server, *workers])

        # 3. SIGTERM: a final checkpoint and a resume command that works as printed
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 130
        text = _log(server)
        m = re.search(r"continue with:\n  (.+)\n", text)
        assert m, text
        command = shlex.split(m.group(1))
        assert command[command.index("--resume") + 1] == str(run)
        assert command[command.index("--port") + 1] == str(port)
        assert [e["type"] for e in _events(run)][-1] != "commit"
        status = json.loads((run / "summary.json").read_text())["status"]
        assert status == "interrupted"
        server = procs.start("serve", command)
        assert server.wait(180) == 0, _log(server)
        for w in workers:
            assert w.wait(60) == 0, _log(w)
        assert "rejoining" in _log(workers[0]) and "rejoining" in _log(workers[1])
    summary = _check_exactly_once(run)
    assert [e["type"] for e in _events(run)].count("resume") == 2
    assert not [e for e in _events(run) if e["type"] == "fault"]
    assert summary["test_accuracy"] > 0.5


@pytest.mark.slow  # ~15 s of deliberate slowness
def test_a_worker_slower_to_start_than_the_worker_timeout_is_not_declared_dead(
        tmp_path: Path) -> None:
    secret, run, port = tmp_path / "secret", tmp_path / "run", _free_port()
    with processes(tmp_path) as procs:
        # (--rejoin-timeout: a slot not joined within 2 s is declared dead, "never_joined",
        # while the worker processes start; it waits for them)
        server = procs.serve(*JOB, "--train-samples", "600", "--port", str(port),
                             "--secret-file", str(secret), "--worker-timeout", "2",
                             "--rejoin-timeout", "60", "--out", str(run), "-q")
        _wait(lambda: secret.exists() and (run / "events.jsonl").exists(), 120,
              "a listening server", [server])
        # each worker takes 4 s to build its model, after its handshake
        workers = [procs.work(port, secret, k, DISTGRAD_TEST_SETUP_DELAY="4") for k in (0, 1)]
        for p in (server, *workers):
            assert p.wait(180) == 0, _log(p)
    faults = [e for e in _events(run) if e["type"] == "fault"]
    assert not [f for f in faults if f["kind"] == "timeout"], faults
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["samples_committed"] == 600
