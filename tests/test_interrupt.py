"""Every interrupt is resumable: SIGINT (Ctrl-C) and SIGTERM (SLURM, Kubernetes), to the
process or its whole group, at several moments, with or without ``--checkpoint-every``,
write a final checkpoint and print a resume command that completes the run as printed.
An evaluation in flight at the checkpoint is present after the resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distgrad import train
from distgrad.rundir import CHECKPOINT, read_checkpoint

SAMPLES, EPOCHS = 2000, 3
CMD = [sys.executable, "-m", "distgrad", "train", "--algorithm", "agn", "--engine", "local",
       "--workers", "2", "--window", "2", "--epochs", str(EPOCHS), "--train-samples",
       str(SAMPLES), "--model", "cnn", "--eval-every", "0.5"]


def events_of(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(out: Path, moment: str, deadline: float) -> None:
    """Until the run in ``out`` reaches ``moment``: its first worker process started, its
    first commit, or its first periodic checkpoint (bounded by ``deadline``)."""
    kind = {"start": "worker_start", "commit": "commit", "checkpoint": "checkpoint"}[moment]
    while time.monotonic() < deadline:
        if any(e["type"] == kind for e in events_of(out)):
            return
        time.sleep(0.05)
    pytest.fail(f"the run never reached {moment!r}")


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] != "Z":
                    alive.append(pid)
        except OSError:
            continue
    return alive


# SIGTERM to the process alone (Kubernetes), a worker killed before: test_readme_recovery;
# SIGINT with --checkpoint-every after periodic checkpoints: test_local
@pytest.mark.parametrize(("sig", "target", "moment", "every"), [
    (signal.SIGINT, "group", "start", None),          # Ctrl-C while the workers start
    pytest.param(signal.SIGTERM, "group", "commit", None,  # SLURM: the whole step, mid-run
                 marks=pytest.mark.slow),
], ids=["sigint-at-start", "sigterm-group-mid-run"])
def test_interrupt_writes_a_checkpoint_and_the_printed_resume_command_completes(
        tmp_path, sig, target, moment, every):
    out = tmp_path / "run"
    cmd = CMD + ["--out", str(out), "-q"] + (["--checkpoint-every", str(every)] if every else [])
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(out, moment, time.monotonic() + 120)
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    pids = [e["pid"] for e in events_of(out) if e["type"] == "worker_start"]
    time.sleep(0.2)
    assert pids and pids_alive(pids) == []  # no worker outlives the run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    snap = read_checkpoint(out / CHECKPOINT)
    assert snap["format"] == 2
    assert not list(out.glob("*.tmp"))
    # the command exactly as printed, run by a shell in the same directory
    printed = stderr.strip().splitlines()[-1].strip()
    assert "train --resume" in printed
    done = subprocess.run(printed + " -q", shell=True, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    lines = events_of(out)
    assert sum(e["samples"] for e in lines if e["type"] == "commit") == EPOCHS * SAMPLES
    assert [e["type"] for e in lines].count("resume") == 1


def test_evaluation_in_flight_at_the_checkpoint_is_present_after_resume(
        mnist_small, tiny_mlp, tmp_path):
    """With deferred evaluation every snapshot of the center taken before the final
    checkpoint is evaluated after it (as a background evaluation still running would be):
    the resume keeps those evaluations, so the curve has no gap."""
    sent = {"done": False}

    def interrupt(done: int, total: int) -> None:
        if not sent["done"] and done >= 0.5 * total:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGINT)  # the engine's handler: final checkpoint

    kw = dict(algorithm="agn", engine="local", workers=2, window=2, seed=2, epochs=4,
              batch_size=32, lr=1e-3, eval_every=0.25, deferred_eval=True)
    with pytest.raises(KeyboardInterrupt):
        train(model=tiny_mlp, out=tmp_path, progress=interrupt, **kw, **mnist_small)
    snap = read_checkpoint(tmp_path / CHECKPOINT)
    before = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    covered = [(e["samples"], e["version"]) for e in before[snap["events"]:]
               if e["type"] == "eval" and e["samples"] <= snap["samples_committed"]]
    assert covered, "no evaluation of a center from before the checkpoint came after it"

    res = train(model=tiny_mlp, resume=tmp_path, **mnist_small)
    evals = [(e["samples"], e["version"]) for e in res.events if e["type"] == "eval"]
    assert set(covered) <= set(evals)
    every = int(0.25 * 3000)
    points = sorted({s for s, _ in evals})
    assert points[-1] == 4 * 3000
    assert all(b - a <= 2 * every for a, b in itertools.pairwise(points)), points  # no gap


def test_sim_interrupt_checkpoints_and_resumes_bit_identically(mnist_small, tiny_mlp, tmp_path):
    """On ``sim`` a signal stops the run at the next quiescent instant after a checkpoint
    (no --checkpoint-every needed); the resumed run ends exactly as the uninterrupted one."""
    kw = dict(algorithm="adag", engine="sim", workers=3, window=2, seed=5, epochs=2,
              batch_size=32, lr=1e-3, eval_every=0.5, threads=1)
    whole = train(model=tiny_mlp, **kw, **mnist_small)
    sent = {"done": False}

    def interrupt(done: int, total: int) -> None:
        if not sent["done"] and done >= 0.4 * total:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(model=tiny_mlp, out=tmp_path, progress=interrupt, **kw, **mnist_small)
    assert read_checkpoint(tmp_path / CHECKPOINT)["server"]["version"] > 0
    res = train(model=tiny_mlp, resume=tmp_path, **mnist_small)
    assert res.summary["status"] == "completed"
    assert res.params_sha256 == whole.params_sha256
