"""The run directory on disk: checking ``--out``, atomic JSON, checkpoints, truncation.

A run directory holds ``config.json`` (the job), ``events.jsonl`` (streamed by the
:class:`~distgrad.metrics.events.Recorder`), ``summary.json``, the plots and, with
``checkpoint_every``, ``checkpoint.pt``. Every write here is atomic (a temporary file,
then a rename), so a killed run never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from distgrad.errors import ConfigError

CONFIG = "config.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"


def prepare_out(out: str | Path | None, overwrite: bool) -> Path | None:
    """Check that ``out`` can take a new run (creating it); None stays None (no directory)."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} exists and is not a directory")
    if (path / EVENTS).exists() and not overwrite:
        raise ConfigError(f"--out {str(path)!r} already holds a run; choose another directory "
                          "or pass --overwrite")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {str(path)!r} is not writable: {exc.strerror}") from None
    return path


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (no NaN), atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``config.json`` of a run directory (a ConfigError names a directory without one)."""
    path = run_dir / CONFIG
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    return json.loads(path.read_text())


def truncate_lines(path: Path, lines: int) -> None:
    """Keep the first ``lines`` lines of a file (events after a checkpoint are undone)."""
    with path.open("rb") as f:
        kept = [next(f, b"") for _ in range(lines)]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


def write_checkpoint(path: Path, snapshot: dict[str, Any]) -> None:
    """Atomically write a snapshot: a temporary file, then rename.

    The ``local`` engine's (format 2) holds ``server``, ``core`` (protocol bookkeeping),
    ``workers`` (per worker ``{"worker": Worker.state_dict(), "driver": ...}``, None for
    a finished or dead one), ``schedule`` (what is left of a replay, or None), ``orders``
    (each worker's samples not yet in the center), the recorder's counters, ``t`` and
    ``events`` (the event-log lines it covers)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(snapshot, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a snapshot written by :func:`write_checkpoint` (tensors and plain data only)."""
    return torch.load(path, weights_only=True)
