"""I/O failures are events: a checkpoint that cannot be written (full disk) is reported with
its real cause and training goes on, its temporary file removed; an event log that cannot
be written stops the run cleanly with a summary of what was reached.

The full disk is real: ``/dev/full`` (every write fails with ENOSPC; no privileges needed)
linked where the run writes, and a small tmpfs (root only, else skipped)."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from distgrad import train
from distgrad.run import RunFailed
from distgrad.rundir import (
    CHECKPOINT,
    check_free_space,
    describe_os_error,
    read_checkpoint,
    write_checkpoint,
)

FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="no /dev/full on this system")


def kw(tiny_mlp, mnist_small, **more):
    return dict(algorithm="agn", engine="local", workers=2, window=2, seed=1, model=tiny_mlp,
                epochs=3, batch_size=32, lr=1e-3, eval_every=1.0, **mnist_small, **more)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at ``path`` (root only), unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_describe_os_error_names_the_cause():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == \
        "No space left on device (ENOSPC)"
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied")) == \
        "Permission denied (EACCES)"


@needs_dev_full
def test_checkpoint_write_to_a_full_device_raises_enospc_and_leaves_no_tmp(tmp_path):
    path = tmp_path / CHECKPOINT
    (tmp_path / (CHECKPOINT + ".tmp")).symlink_to(FULL)
    import torch

    with pytest.raises(OSError) as info:
        write_checkpoint(path, {"center": torch.zeros(1000)})
    assert info.value.errno == errno.ENOSPC  # not torch's "iostream error"
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists() and not path.exists()


def test_free_space_is_checked_before_a_large_write(tmp_path):
    with pytest.raises(OSError, match=r"needs about .* MB free") as info:
        check_free_space(tmp_path / CHECKPOINT, 1 << 60)
    assert info.value.errno == errno.ENOSPC


@needs_dev_full
def test_failed_checkpoint_is_an_event_and_training_goes_on(mnist_small, tiny_mlp, tmp_path):
    """The first checkpoint's temporary file is /dev/full: that write fails with ENOSPC,
    the failure is removed and reported, the next checkpoint succeeds, the run completes."""
    (tmp_path / (CHECKPOINT + ".tmp")).symlink_to(FULL)
    res = train(out=tmp_path, checkpoint_every=0.05, **kw(tiny_mlp, mnist_small))
    failed = [e for e in res.events if e["type"] == "checkpoint_failed"]
    assert failed and "No space left on device (ENOSPC)" in failed[0]["error"]
    assert res.summary["status"] == "completed"
    assert sum(e["samples"] for e in res.events if e["type"] == "commit") == 3 * 3000
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()
    assert read_checkpoint(tmp_path / CHECKPOINT)["format"] == 2  # a later one was written


@needs_dev_full
def test_event_log_on_a_full_device_stops_the_run_with_a_summary(mnist_small, tiny_mlp,
                                                                   tmp_path):
    (tmp_path / "events.jsonl").symlink_to(FULL)
    with pytest.raises(RunFailed, match=r"No space left on device \(ENOSPC\)"):
        train(out=tmp_path, overwrite=True, **kw(tiny_mlp, mnist_small))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "event log" in summary["error"]
    assert summary["test_accuracy"] is not None  # what was reached is still evaluated
    # the log failed while the workers started: the ones already started are stopped
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("distgrad")]


def test_full_tmpfs_checkpoint_refused_by_the_free_space_check(mnist_small, tiny_mlp,
                                                                 tmp_path):
    """On a 4 MB filesystem the checkpoint (with its 16 MB margin) is refused before anything
    is written; the run completes and says why."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        res = train(out=disk / "run", checkpoint_every=0.2, record_batches=False,
                    **kw(tiny_mlp, mnist_small))
        failed = [e for e in res.events if e["type"] == "checkpoint_failed"]
        assert failed and "No space left on device" in failed[0]["error"]
        assert "MB free" in failed[0]["error"]
        assert res.summary["status"] == "completed"
        assert not list((disk / "run").glob("*.tmp"))


def test_full_tmpfs_event_log_stops_the_run_and_the_summary_goes_elsewhere(
        mnist_small, tiny_mlp, tmp_path):
    """A 64 KB filesystem fills with the per-batch log: the run stops as failed, and the
    summary, which does not fit either, is written to the temporary directory."""
    before = set(Path(tempfile.gettempdir()).glob("distgrad-run-*-summary.json"))
    with tmpfs(tmp_path / "disk", "64k") as disk, pytest.raises(RunFailed, match="ENOSPC"):
        train(out=disk / "run", epochs=20, **{k: v for k, v in
                                              kw(tiny_mlp, mnist_small).items()
                                              if k != "epochs"})
    written = set(Path(tempfile.gettempdir()).glob("distgrad-run-*-summary.json")) - before
    assert len(written) == 1
    path = written.pop()
    try:
        summary = json.loads(path.read_text())
        assert summary["status"] == "failed" and "ENOSPC" in summary["error"]
        assert summary["commits"] > 0  # what was reached
    finally:
        path.unlink()
