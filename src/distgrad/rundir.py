"""The run directory on disk: checking ``--out``, atomic JSON, checkpoints, truncation.

A run directory holds ``config.json`` (the job), ``events.jsonl`` (streamed by the
:class:`~distgrad.metrics.events.Recorder`), ``summary.json``, the plots and
``checkpoint.pt`` (written every ``checkpoint_every`` seconds and when a run is
interrupted). Every write here is atomic (a temporary file, then a rename), so a killed
run never leaves half a file behind; a write that fails removes its temporary file and
raises an :class:`OSError` that names the real cause (:func:`describe_os_error`). Large
writes check the free space first (:func:`check_free_space`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distgrad.errors import ConfigError

CONFIG = "config.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
_MB = 1 << 20
_SPARE = 16 * _MB  # left free after a large write (the event log and summary still need room)


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
        raise ConfigError(f"--out {str(path)!r} is not writable: {describe_os_error(exc)}"
                          ) from None
    return path


def describe_os_error(exc: BaseException) -> str:
    """``exc``'s cause in words with its errno name, e.g. ``No space left on device
    (ENOSPC)``; other exceptions as their message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    return str(exc) or type(exc).__name__


def _os_cause(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or the one it was raised from or during)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def check_free_space(path: Path, need: int) -> None:
    """Raise ``OSError(ENOSPC)`` with a clear message unless the filesystem holding
    ``path`` has ``need`` bytes free (plus a margin for the event log and summary)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # cannot tell: let the write itself report
    if free < need + _SPARE:
        raise OSError(errno.ENOSPC,
                      f"No space left on device: writing {path.name} needs about "
                      f"{need / _MB:.1f} MB (+{_SPARE // _MB} MB spare), "
                      f"{free / _MB:.1f} MB free in {path.parent}", str(path))


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:  # the original failure matters more
        pass


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync, rename. On any
    failure the temporary file is removed and the real OSError is raised (torch reports
    a full disk as ``RuntimeError: ... iostream error``; its cause is recovered)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        cause = _os_cause(exc)
        if cause is not None and cause is not exc:
            raise cause from exc
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (no NaN), atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text), binary=False)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``config.json`` of a run directory (a ConfigError names a directory without one)."""
    path = run_dir / CONFIG
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    return json.loads(path.read_text())


def truncate_lines(path: Path, lines: int,
                   keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Keep the first ``lines`` lines of a JSONL file (the events after a checkpoint are
    undone), and of the later lines those whose event ``keep`` accepts (an evaluation of
    a center from before the checkpoint that finished after it)."""
    with path.open("rb") as f:
        kept = [next(f, b"") for _ in range(lines)]
        if keep is not None:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if keep(event):
                    kept.append(line)
    _atomic_write(path, lambda out: out.write(b"".join(kept)))


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested dict/list/tuple (a checkpoint's size)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_checkpoint(path: Path, snapshot: dict[str, Any]) -> None:
    """Atomically write a snapshot: check the free space, write a temporary file, rename.

    A failure (full disk, no permission) removes the temporary file, leaves the previous
    checkpoint in place and raises the OSError that says why.

    The ``local`` engine's (format 2) holds ``server``, ``core`` (protocol bookkeeping),
    ``workers`` (per worker ``{"worker": Worker.state_dict(), "driver": ...}``, None for
    a finished or dead one), ``schedule`` (what is left of a replay, or None), ``orders``
    (each worker's samples not yet in the center), the recorder's counters, ``t`` and
    ``events`` (the event-log lines it covers)."""
    import torch

    path = Path(path)
    check_free_space(path, tensor_bytes(snapshot))
    _atomic_write(path, lambda f: torch.save(snapshot, f))


def server_snapshot(core: Any, recorder: Any, t: float, fmt: int) -> dict[str, Any]:
    """The server's half of a checkpoint, the same on every engine that takes one: center,
    clock, base versions and rule state (``server``), protocol bookkeeping (``core``), what
    is left of a replay schedule and the recorder's counters. Raises RuntimeError while a
    request waits (at a barrier or the gate): not consistent then."""
    return {
        "format": fmt,
        "t": t,
        "server": core.server.state_dict(),
        "core": core.state_dict(),
        "schedule": None if core.schedule is None else [[op, w] for op, w in core.schedule],
        "samples": recorder.samples,
        "samples_committed": recorder.samples_committed,
        "commits": recorder.commits,
        "bytes_committed": recorder.bytes_committed,
    }


def save_snapshot(path: Path, snapshot: dict[str, Any], recorder: Any, t: float) -> bool:
    """Record a ``checkpoint`` event, mark the event-log lines the snapshot covers (a resume
    drops the later ones) and write it. A failed write (full disk, no permission) becomes a
    ``checkpoint_failed`` event naming the cause and training goes on; True if written."""
    version = snapshot["server"]["version"]
    recorder.note(t, "checkpoint", version=version)
    snapshot["events"] = len(recorder.events)
    try:
        write_checkpoint(path, snapshot)
    except (OSError, RuntimeError) as exc:
        recorder.note(t, "checkpoint_failed", version=version, path=str(path),
                      error=describe_os_error(exc))
        return False
    return True


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a snapshot written by :func:`write_checkpoint` (tensors and plain data only)."""
    import torch

    return torch.load(path, weights_only=True)


def write_json_somewhere(path: Path, obj: Any) -> Path | None:
    """Write ``obj`` to ``path``, or, if that fails (a full disk), to a file of the same
    name in the system's temporary directory; the path written, or None."""
    try:
        write_json(path, obj)
        return path
    except OSError:
        pass
    fd, alt = tempfile.mkstemp(prefix=f"distgrad-{path.parent.name}-", suffix=f"-{path.name}")
    os.close(fd)
    try:
        write_json(Path(alt), obj)
        return Path(alt)
    except OSError:
        _remove(Path(alt))
        return None
