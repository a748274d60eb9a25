"""The README's recovery example runs as written: a worker killed, the run interrupted with
SIGTERM, then ``distgrad train --resume`` completes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_readme import readme_block, run_block


@pytest.mark.slow  # ~30 s: the README's recovery block as written
def test_readme_recovery_block_kills_interrupts_and_resumes(tmp_path: Path) -> None:
    assert "--resume" in readme_block("local-recovery")
    r = run_block("local-recovery", tmp_path, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs/recovery"
    # the interrupted run told how to continue, the fault was printed when it happened
    assert "interrupted; partial run written to runs/recovery; continue with:" in r.stderr
    assert "train --resume runs/recovery" in r.stderr
    assert "worker 2 died (killed by signal 9" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["faults"] == 1
    assert summary["samples_lost"] == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("resume") == 1
    assert sum(e["samples"] for e in events if e["type"] == "commit") == 4 * 6000
    assert "1 fault, 0 samples lost:" in r.stdout
