"""The local engine: real worker processes, shared memory, failures, checkpoints, replay."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distgrad import ConfigError, Timing, train
from distgrad.algorithms import get_algorithm, names
from distgrad.rundir import read_checkpoint

SMALL = dict(epochs=2, batch_size=32, lr=2e-3, eval_every=10.0)


def no_workers_left() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("distgrad")]


def kill_worker_when(fraction: float, worker: int):
    """A progress callback that SIGKILLs worker ``worker`` once ``fraction`` of the samples ran."""
    state = {"killed": False}

    def progress(done: int, total: int) -> None:
        if not state["killed"] and done >= fraction * total:
            for p in multiprocessing.active_children():
                if p.name == f"distgrad-worker-{worker}":
                    os.kill(p.pid, signal.SIGKILL)
                    state["killed"] = True

    return progress, state


#: run in the default suite; the others in the slow pass (every algorithm still runs in CI)
_DEFAULT = {"downpour", "adag", "averaging", "ssp", "hogwild", "diloco", "easgd"}


@pytest.mark.parametrize("name", [n if n in _DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in names()])
def test_every_algorithm_runs_on_local_in_the_sim_band(name, mnist_small, tiny_mlp):
    from test_contract import window_for

    n = get_algorithm(name).exact_workers or 2
    kw = dict(algorithm=name, workers=n, window=window_for(name), seed=4, model=tiny_mlp,
              **SMALL, **mnist_small)
    local = train(engine="local", **kw)
    sim = train(engine="sim", **kw)
    assert local.samples == sim.samples == 2 * 3000
    assert local.test_accuracy > 0.7, (name, local.test_accuracy)
    assert abs(local.test_accuracy - sim.test_accuracy) < 0.08, (name, local.test_accuracy,
                                                                 sim.test_accuracy)
    assert no_workers_left()


def test_killed_worker_is_detected_and_its_samples_reassigned(mnist_small, tiny_mlp):
    progress, state = kill_worker_when(0.3, worker=1)
    res = train(algorithm="agn", engine="local", workers=3, window=2, seed=1, model=tiny_mlp,
                epochs=6, batch_size=16, lr=1e-3, eval_every=10.0, progress=progress,
                **mnist_small)
    assert state["killed"]
    faults = [e for e in res.events if e["type"] == "fault"]
    assert len(faults) == 1 and faults[0]["worker"] == 1
    assert "signal 9" in faults[0]["detail"]
    assert set(faults[0]["reassigned_to"]) <= {0, 2} and faults[0]["uncommitted"] > 0
    assert sum(n for _, n in faults[0]["reassigned"]) + (faults[0]["pooled"] or 0) == \
        faults[0]["uncommitted"]
    assert res.samples_lost == 0
    # every one of the 6 x 3000 samples reached the center exactly once
    committed = sum(e["samples"] for e in res.events if e["type"] == "commit")
    assert committed == 6 * 3000
    assert res.test_accuracy > 0.7
    assert no_workers_left()


def test_killed_worker_with_drop_reports_lost_samples(mnist_small, tiny_mlp):
    progress, state = kill_worker_when(0.3, worker=0)
    res = train(algorithm="downpour", engine="local", workers=3, window=2, seed=1,
                model=tiny_mlp, epochs=6, batch_size=16, lr=1e-3, eval_every=10.0,
                on_failure="drop", progress=progress, **mnist_small)
    assert state["killed"]
    committed = sum(e["samples"] for e in res.events if e["type"] == "commit")
    assert res.samples_lost > 0
    assert committed + res.samples_lost == 6 * 3000


def test_synchronous_round_survives_a_dead_worker(mnist_small, tiny_mlp):
    progress, state = kill_worker_when(0.3, worker=2)
    res = train(algorithm="averaging", engine="local", workers=3, window=2, seed=1,
                model=tiny_mlp, epochs=6, batch_size=16, lr=1e-3, eval_every=10.0,
                progress=progress, **mnist_small)
    assert state["killed"]
    assert res.samples_lost == 0
    rounds = [e for e in res.events if e["type"] == "round"]
    assert sorted(rounds[-1]["workers"]) != [0, 1, 2]
    assert res.test_accuracy > 0.7


def test_crash_injection_kills_a_real_process(mnist_small, tiny_mlp):
    res = train(algorithm="agn", engine="local", workers=2, window=2, seed=1, model=tiny_mlp,
                epochs=40, batch_size=16, lr=1e-3, eval_every=100.0,
                timing=Timing(crashes=((1, 0.0),)), **mnist_small)
    faults = [e for e in res.events if e["type"] == "fault"]
    assert len(faults) == 1 and faults[0]["worker"] == 1
    assert res.samples_lost == 0


def test_interrupt_then_resume_continues_clock_and_center_exactly(mnist_small, tiny_mlp,
                                                                  tmp_path):
    def interrupt(done: int, total: int) -> None:
        if done >= 0.5 * total:
            raise KeyboardInterrupt

    kw = dict(algorithm="adag", engine="local", workers=2, window=2, seed=3, epochs=4,
              batch_size=32, lr=1e-3, eval_every=0.5, checkpoint_every=0.05)
    with pytest.raises(KeyboardInterrupt):
        train(model=tiny_mlp, out=tmp_path, progress=interrupt, **kw, **mnist_small)
    assert no_workers_left()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    snap = read_checkpoint(tmp_path / "checkpoint.pt")
    version = snap["server"]["version"]
    assert version > 0
    import hashlib

    center_sha = hashlib.sha256(snap["server"]["center"].numpy().tobytes()).hexdigest()

    res = train(model=tiny_mlp, resume=tmp_path, **mnist_small)
    resumed = [e for e in res.events if e["type"] == "resume"]
    assert len(resumed) == 1
    assert resumed[0]["version"] == version and resumed[0]["center_sha256"] == center_sha
    after = [e for e in res.events[res.events.index(resumed[0]):] if e["type"] == "commit"]
    assert after[0]["version"] == version + 1
    assert after[0]["t"] >= resumed[0]["t"]
    committed = sum(e["samples"] for e in res.events if e["type"] == "commit")
    assert committed == 4 * 3000
    assert res.samples == 4 * 3000  # a whole checkpoint: no step before it is taken again
    assert snap["format"] == 2 and any(w is not None for w in snap["workers"])
    assert res.summary["status"] == "completed" and res.test_accuracy > 0.7


def test_replay_of_a_sim_run_gives_the_same_parameters(mnist_small, tiny_mlp, tmp_path):
    sim = train(algorithm="adag", engine="sim", workers=3, window=2, seed=8, threads=1,
                model=tiny_mlp, out=tmp_path / "sim", epochs=1, batch_size=32, lr=1e-3,
                params={"gamma": 1e-3}, **mnist_small)
    commits = [e for e in sim.events if e["type"] == "commit"]
    assert len({c["staleness"] for c in commits}) > 1  # a genuinely interleaved schedule
    rep = train(model=tiny_mlp, replay=tmp_path / "sim", out=tmp_path / "rep", **mnist_small)
    assert rep.summary["engine"] == "local"
    assert rep.params_sha256 == sim.params_sha256
    rc = [e for e in rep.events if e["type"] == "commit"]
    assert [(c["worker"], c["staleness"]) for c in rc] == \
        [(c["worker"], c["staleness"]) for c in commits]


def test_replay_of_a_synchronous_sim_run(mnist_small, tiny_mlp, tmp_path):
    sim = train(algorithm="averaging", engine="sim", workers=3, window=3, seed=2, threads=1,
                model=tiny_mlp, out=tmp_path / "sim", epochs=1, batch_size=32, **mnist_small)
    rep = train(model=tiny_mlp, replay=tmp_path / "sim", **mnist_small)
    assert rep.params_sha256 == sim.params_sha256


def test_wrong_inputs_fail_clearly_and_leave_no_processes(mnist_small, tmp_path):
    x, y = mnist_small["data"]
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        train(engine="local", workers=0)
    with pytest.raises(ConfigError, match=r"more workers \(5\) than training samples \(3\)"):
        train(engine="local", workers=5, data=(x[:3], y[:3]),
              test_data=mnist_small["test_data"])
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        train(engine="local", workers=2, out=blocker, **mnist_small)
    with pytest.raises(ConfigError, match="is not a run directory"):
        train(resume=tmp_path)
    with pytest.raises(ConfigError, match="device 'cuda' needs the local engine"):
        train(engine="sim", device="cuda")
    assert no_workers_left()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_workers(mnist_small, tiny_mlp):
    res = train(algorithm="agn", engine="local", workers=2, window=4, device="cuda", seed=1,
                model=tiny_mlp, **SMALL, **mnist_small)
    assert res.test_accuracy > 0.7
    starts = [e for e in res.events if e["type"] == "worker_start"]
    assert all(e["device"].startswith("cuda") for e in starts)


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


@pytest.mark.slow  # ~50 s; test_interrupt covers Ctrl-C in the default suite
def test_ctrl_c_stops_every_process_writes_the_run_and_resumes(tmp_path):
    """A real SIGINT to the CLI's process group, as a terminal's Ctrl-C sends."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distgrad", "train", "--algorithm", "agn", "--engine", "local",
           "--workers", "2", "--window", "2", "--epochs", "2", "--train-samples", "6000",
           "--checkpoint-every", "0.2", "--eval-every", "1", "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    events = out / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if events.exists() and events.read_text().count('"checkpoint"') >= 2:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"the run never checkpointed: {proc.communicate()}")
    pids = [json.loads(line)["pid"] for line in events.read_text().splitlines()
            if '"worker_start"' in line]
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    time.sleep(0.2)
    assert len(pids) == 2 and _pids_alive(pids) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert (out / "checkpoint.pt").exists()

    done = subprocess.run([sys.executable, "-m", "distgrad", "train", "--resume", str(out), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    lines = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sum(e["samples"] for e in lines if e["type"] == "commit") == 2 * 6000
    assert Path(out / "accuracy.png").exists()


def test_ssp_gate_holds_the_fast_worker_on_real_processes(mnist_small, tiny_mlp):
    bound = 1
    res = train(algorithm="ssp", engine="local", workers=2, window=2, seed=1, model=tiny_mlp,
                epochs=2, batch_size=32, params={"bound": bound}, eval_every=100.0,
                timing=Timing(stragglers=1, straggler_factor=4.0), **mnist_small)
    clocks = {0: 0, 1: 0}
    lead = []
    for e in res.events:
        if e["type"] == "commit":
            clocks[e["worker"]] += 1
        elif e["type"] == "done":
            break
        lead.append(clocks[1] - clocks[0])
    # worker 1 is 4x faster, yet never more than bound + 1 commits ahead while both run
    assert max(lead) == bound + 1
    assert res.test_accuracy > 0.7


def test_replay_of_a_sim_run_with_reads(mnist_small, tiny_mlp, tmp_path):
    """GEM (worker placement) reads the center before each commit: reads are replayed too."""
    sim = train(algorithm="gem", engine="sim", workers=3, window=2, seed=5, threads=1,
                model=tiny_mlp, out=tmp_path / "sim", epochs=1, batch_size=32, **mnist_small)
    assert any(e["type"] == "pull" and e.get("read") for e in sim.events)
    rep = train(model=tiny_mlp, replay=tmp_path / "sim", **mnist_small)
    assert rep.params_sha256 == sim.params_sha256


def test_hogwild_workers_write_the_shared_center_without_the_server(mnist_small, tiny_mlp):
    res = train(algorithm="hogwild", engine="local", workers=2, window=1, seed=1,
                model=tiny_mlp, **SMALL, **mnist_small)
    commits = [e for e in res.events if e["type"] == "commit"]
    assert len(commits) == 2 * 2 * 47  # 2 workers x 2 epochs x ceil(1500 / 32) steps
    assert all(c["distance"] is None for c in commits)  # not measured without a lock
    assert res.test_accuracy > 0.7


@pytest.mark.parametrize("deferred", [False, True])
def test_evaluations_carry_the_samples_of_their_snapshot(deferred, mnist_small, tiny_mlp):
    """A snapshot evaluated later (in a thread, or after training) reports the samples that
    were committed when it was taken, not those committed when its event is written."""
    res = train(algorithm="agn", engine="local", workers=2, window=2, seed=1, model=tiny_mlp,
                epochs=2, batch_size=32, eval_every=0.5, deferred_eval=deferred,
                **mnist_small)
    evals = [e for e in res.events if e["type"] == "eval"]
    samples = [e["samples"] for e in evals]
    assert len(evals) >= 5 and samples == sorted(samples)
    assert samples[0] == 0 and samples[-1] == res.samples == 2 * 3000
    # the scheduled snapshots are taken at the first commit past every 1,500 samples
    assert all(s < 2 * 3000 for s in samples[1:4])
