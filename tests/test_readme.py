"""The README's engine commands run as written (blocks marked ``<!-- readme-test: NAME -->``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {re.escape(name)} -->\s*```bash\n(.*?)```", text,
                      re.S)
    assert match, f"no README block marked readme-test: {name}"
    return match.group(1)


def run_block(name: str, cwd: Path, timeout: float = 480, extra_env: dict | None = None
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **(extra_env or {})}
    env.pop("DISTGRAD_SECRET", None)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block(name)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_serve_and_work_on_a_laptop(tmp_path: Path) -> None:
    r = run_block("serve-laptop", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/serve-demo/summary.json").read_text())
    assert summary["engine"] == "net" and summary["samples"] == 4000
    assert summary["test_accuracy"] > 0.8
    assert (tmp_path / "distgrad.secret").stat().st_mode & 0o077 == 0


@pytest.mark.slow
@pytest.mark.ray
def test_ray_on_a_laptop(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    r = run_block("ray-laptop", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/ray-demo/summary.json").read_text())
    assert summary["engine"] == "ray" and summary["samples"] == 4000
    assert summary["test_accuracy"] > 0.8


@pytest.mark.slow
@pytest.mark.spark
def test_spark_on_a_laptop(tmp_path: Path) -> None:
    pytest.importorskip("pyspark", reason="the spark extra is not installed")
    r = run_block("spark-laptop", tmp_path, extra_env={"PYSPARK_PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/spark-demo/summary.json").read_text())
    assert summary["engine"] == "spark" and summary["samples"] == 4000
    assert summary["test_accuracy"] > 0.8


@pytest.mark.parametrize("name", ["serve-laptop", "ray-laptop", "spark-laptop"])
def test_marked_blocks_exist(name: str) -> None:
    assert readme_block(name).strip()
