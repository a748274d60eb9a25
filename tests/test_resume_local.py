"""Whole checkpoints on the local engine: a resumed run continues exactly where it stopped.

A checkpoint is taken while every live worker is paused at a step boundary, so it holds
the server (center, clock, base versions, rule state), the protocol core (positions,
sequence numbers), each worker's replica, inner optimizer, rule and batch position, and
what is left of a replay schedule. The strongest check: a replay of a recorded ``sim``
run, stopped by a real SIGINT (Ctrl-C) and resumed, ends with the uninterrupted sim
run's parameters, bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from dataclasses import replace
from typing import Any

import pytest
import torch

from distgrad import Timing, train
from distgrad.engines.local import LocalEngine, build_worker
from distgrad.parts import build_parts
from distgrad.run import load_replay, load_resume
from distgrad.rundir import CHECKPOINT, read_checkpoint
from test_conformance import records


def ctrl_c_at(fraction: float):
    """A progress callback that sends this process one SIGINT (as a terminal's Ctrl-C)
    once ``fraction`` of the samples were stepped."""
    state = {"sent": False}

    def progress(done: int, total: int) -> None:
        if not state["sent"] and done >= fraction * total:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)

    return progress, state




def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def check_consistent(snap: dict[str, Any], synchronous: bool) -> list[int]:
    """A whole checkpoint: every live worker's state agrees with the server's view of it."""
    assert snap["format"] == 2
    core = snap["core"]["slots"]
    live = [k for k, s in enumerate(core) if s["state"] == "live"]
    assert live
    for k in live:
        w = snap["workers"][k]
        assert w is not None and w["worker"]["worker"] == k
        assert w["driver"]["position"] == core[k]["position"]  # committed samples
        assert w["driver"]["seq"] == core[k]["seq"]
        base = snap["server"]["version"] if synchronous else snap["server"]["base_version"][k]
        assert w["driver"]["base_version"] == base
        # stepped, not yet committed: the worker's batch position is past the core's
        assert w["worker"]["batches"]["position"] == core[k]["position"] + core[k]["uncommitted"]
        assert w["worker"]["pending_step"] is not None  # paused right after a step
        assert w["worker"]["replica"]["optimizer"]["state"]  # Adam's moments, not fresh
    return live


@pytest.mark.parametrize("algorithm,window,params",
                         [("adag", 2, {"gamma": 1e-3}),
                          pytest.param("averaging", 3, {}, marks=pytest.mark.slow)])
def test_replay_checkpointed_and_resumed_ends_as_the_uninterrupted_sim_run(
        algorithm, window, params, mnist_small, tiny_mlp, tmp_path):
    sim = train(algorithm=algorithm, engine="sim", workers=3, window=window, seed=8,
                threads=1, model=tiny_mlp, out=tmp_path / "sim", epochs=1, batch_size=32,
                lr=1e-3, params=params, **mnist_small)
    job, schedule = load_replay(tmp_path / "sim")
    job = replace(job, checkpoint_every=0.05)
    out = tmp_path / "rep"
    engine = LocalEngine(job, replay=schedule, checkpoint_path=out / CHECKPOINT)
    progress, state = ctrl_c_at(0.5)
    with pytest.raises(KeyboardInterrupt):
        train(job, model=tiny_mlp, engine=engine, out=out, progress=progress, **mnist_small)
    assert state["sent"]
    snap = read_checkpoint(out / CHECKPOINT)
    check_consistent(snap, synchronous=algorithm == "averaging")
    assert 0 < len(snap["schedule"]) < len(schedule)  # taken mid-run: the rest is replayed
    assert 0 < snap["samples"] < 3000

    res = train(model=tiny_mlp, resume=out, **mnist_small)
    assert res.summary["status"] == "completed"
    resumed = [e for e in res.events if e["type"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["version"] == snap["server"]["version"]
    assert resumed[0]["center_sha256"] == sha(snap["server"]["center"])
    assert records(res.events) == records(sim.events)
    assert res.params_sha256 == sim.params_sha256
    assert res.samples == sim.samples == 3000  # no sample stepped twice


def test_free_running_resume_continues_clock_positions_and_optimizer(mnist_small, tiny_mlp,
                                                                     tmp_path):
    kw = dict(algorithm="adag", engine="local", workers=2, window=2, seed=3, epochs=2,
              batch_size=32, lr=1e-3, eval_every=0.5, checkpoint_every=0.05)
    progress, _ = ctrl_c_at(0.5)
    with pytest.raises(KeyboardInterrupt):
        train(model=tiny_mlp, out=tmp_path, progress=progress, **kw, **mnist_small)
    snap = read_checkpoint(tmp_path / CHECKPOINT)
    live = check_consistent(snap, synchronous=False)
    version = snap["server"]["version"]

    # a worker built from the checkpoint, as its process builds it, holds the saved state
    job, _ = load_resume(tmp_path)
    parts = build_parts(job, model=tiny_mlp, **mnist_small)
    for k in live:
        saved = snap["workers"][k]
        buf = io.BytesIO()
        torch.save(saved, buf)
        base = torch.zeros_like(saved["worker"]["replica"]["params"])
        worker, driver = build_worker(k, parts, base, torch.zeros_like(base),
                                      state=buf.getvalue())
        assert driver.state_dict() == saved["driver"]
        got = worker.state_dict()
        assert torch.equal(base, saved["worker"]["replica"]["base"])  # the shared buffer
        opt = got["replica"]["optimizer"]["state"]
        want = saved["worker"]["replica"]["optimizer"]["state"]
        assert opt.keys() == want.keys()
        for i in opt:
            for name in want[i]:
                assert torch.equal(torch.as_tensor(opt[i][name]), torch.as_tensor(want[i][name]))
        assert torch.equal(got["replica"]["params"], saved["worker"]["replica"]["params"])
        assert got["batches"]["position"] == saved["worker"]["batches"]["position"]

    res = train(model=tiny_mlp, resume=tmp_path, **mnist_small)
    after = res.events[[e["type"] for e in res.events].index("resume"):]
    commits = [e for e in after if e["type"] == "commit"]
    assert commits[0]["version"] == version + 1
    # each worker's first commit after the resume is built on the version it held
    for k in live:
        first = next(c for c in commits if c["worker"] == k)
        assert first["version"] - first["staleness"] - 1 == snap["server"]["base_version"][k]
    assert sum(e["samples"] for e in res.events if e["type"] == "commit") == 2 * 3000
    assert res.samples == 2 * 3000  # the steps taken before the checkpoint are not redone
    assert res.summary["status"] == "completed" and res.test_accuracy > 0.7


def test_checkpoints_of_a_synchronous_run_with_a_straggler(mnist_small, tiny_mlp, tmp_path):
    """A worker parked at the barrier is not at a step boundary: the paused ones are let
    go until every worker is between steps at once; checkpoints are still taken."""
    res = train(algorithm="averaging", engine="local", workers=3, window=2, seed=1,
                model=tiny_mlp, epochs=2, batch_size=32, eval_every=100.0,
                checkpoint_every=0.02, out=tmp_path,
                timing=Timing(stragglers=1, straggler_factor=3.0), **mnist_small)
    assert sum(e["type"] == "checkpoint" for e in res.events) >= 2
    check_consistent(read_checkpoint(tmp_path / CHECKPOINT), synchronous=True)
    assert res.samples == 2 * 3000
