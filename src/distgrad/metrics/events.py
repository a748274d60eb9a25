"""Typed events of a run, kept in memory and streamed to ``events.jsonl``.

One JSON object per line, each with ``type`` and ``t`` (the engine's clock:
virtual seconds in the simulator, elapsed wall seconds in real engines):

* ``batch``   worker, loss, acc — one local mini-batch (the thesis' per-batch log)
* ``commit``  worker, version, base_version, staleness, distance, steps, samples, bytes
              [, scale, held] — ``bytes``: what the commit put on the wire (compressed
              payload, plus the stale center if sent); ``held``: the stale-synchronous gate
              made the worker wait after it
* ``round``   version, workers, steps, samples, bytes — a synchronous round (bytes: all
              of its commits)
* ``eval``    version, samples, test_loss, test_acc — the center on the full test set
* ``pull``    worker, version — an explicit pull (each worker's first)
* ``fault``   worker, kind, samples_lost [, detail, reason, uncommitted, wasted,
              reassigned (``[[worker, samples], ...]``), pooled (handed out later as
              ``extra_work`` events: worker, samples, origin), reassigned_to, heirs (``[[worker,
              samples/s measured or null, samples it had left], ...]``: what the split used)]
* ``done``    worker — a worker finished its data
* ``checkpoint`` / ``checkpoint_failed`` (error) / ``resume`` — engine notes

Events hold no wall-clock readings, so a simulator run's log is bit-identical
for a seed. Lines are flushed as they are written: a run that dies keeps its log.
A line that cannot be written (a full disk) raises :class:`EventLogError` — at that
write and every later one, until :meth:`Recorder.detach` — so the run stops instead of
training on with no record; the events stay in memory for the summary.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from distgrad.algorithms.base import StepStats
from distgrad.server import CommitRecord, RoundRecord


class EventLogError(RuntimeError):
    """``events.jsonl`` could not be written; ``cause`` is the OSError (e.g. ENOSPC)."""

    def __init__(self, path: Path, cause: OSError) -> None:
        from distgrad.rundir import describe_os_error

        super().__init__(f"cannot write the event log {path}: {describe_os_error(cause)}")
        self.path, self.cause = path, cause


def _clean(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    return v


class Recorder:
    """Collects events; optionally streams them to a JSONL file."""

    def __init__(
        self,
        path: Path | None = None,
        record_batches: bool = True,
        on_batch: Callable[[int], None] | None = None,
        append: bool = False,
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.record_batches = record_batches
        self.on_batch = on_batch
        self.path = path
        self._file: IO[str] | None = (
            path.open("a" if append else "w", buffering=1) if path is not None else None)
        self._lock = threading.Lock()
        self.write_error: EventLogError | None = None  # set once a line could not be written
        self.on_event: Callable[[dict[str, Any]], None] | None = None  # every non-batch event
        self.samples = 0
        self.samples_committed = 0
        self.commits = 0
        self.bytes_committed = 0
        self.last_batch: dict[int, StepStats] = {}

    def _emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, allow_nan=False, default=_clean) + "\n"
        with self._lock:  # engines may evaluate in a second thread
            self.events.append(event)
            if self.write_error is not None:
                raise self.write_error
            if self._file is not None:
                try:
                    self._file.write(line)
                except OSError as exc:
                    assert self.path is not None
                    self.write_error = EventLogError(self.path, exc)
                    self._close_quietly()
                    raise self.write_error from exc
        if self.on_event is not None and event["type"] != "batch":
            self.on_event(event)

    def _close_quietly(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):  # the buffered rest cannot be written either
                f.close()

    def detach(self) -> None:
        """Stop writing to the file and stop raising a past write failure (events are
        still kept in memory): the run is being finalized."""
        with self._lock:
            self._close_quietly()
            self.write_error = None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                assert self.path is not None
                self.write_error = EventLogError(self.path, exc)
                raise self.write_error from exc
            finally:
                self._file = None

    # ------------------------------------------------------------------ events
    def batch(self, t: float, worker: int, stats: StepStats) -> None:
        self.samples += stats.samples
        self.last_batch[worker] = stats
        if self.record_batches:
            self._emit({
                "type": "batch", "t": t, "worker": worker, "loss": _finite(stats.loss),
                "acc": stats.correct / stats.samples,
            })
        if self.on_batch is not None:
            self.on_batch(stats.samples)

    def commit(self, t: float, rec: CommitRecord, nbytes: int | None = None) -> None:
        self.commits += 1
        self.samples_committed += rec.samples
        self.bytes_committed += nbytes or 0
        event: dict[str, Any] = {
            "type": "commit", "t": t, "worker": rec.worker, "version": rec.version,
            "base_version": rec.base_version, "staleness": rec.staleness,
            "distance": _finite(rec.distance), "steps": rec.steps, "samples": rec.samples,
            "bytes": nbytes,
        }
        if rec.held:
            event["held"] = True
        event.update({k: _finite(v) for k, v in rec.metrics.items()})
        self._emit(event)

    def round(self, t: float, rec: RoundRecord, nbytes: int | None = None) -> None:
        self.commits += len(rec.participants)
        self.samples_committed += rec.samples
        self.bytes_committed += nbytes or 0
        event: dict[str, Any] = {
            "type": "round", "t": t, "version": rec.version, "workers": list(rec.participants),
            "steps": rec.steps, "samples": rec.samples, "bytes": nbytes,
        }
        event.update({k: _finite(v) for k, v in rec.metrics.items()})
        self._emit(event)

    def evaluation(self, t: float, version: int, metrics: dict[str, float | None],
                   samples: int | None = None) -> None:
        """An evaluation of the center as it was at ``t`` (``samples``: the samples committed
        then; default: now, for engines that evaluate before committing anything more)."""
        self._emit({"type": "eval", "t": t, "version": version,
                    "samples": self.samples_committed if samples is None else samples,
                    **{k: _finite(v) for k, v in metrics.items()}})

    def fault(self, t: float, worker: int, kind: str, samples_lost: int, **extra: Any) -> None:
        self._emit({"type": "fault", "t": t, "worker": worker, "kind": kind,
                    "samples_lost": samples_lost, **extra})

    def pull(self, t: float, worker: int, version: int, read: bool = False) -> None:
        """An explicit pull (a worker's first; later pulls ride on commits) or, with
        ``read``, a read of the center that leaves the worker's pull clock alone."""
        event: dict[str, Any] = {"type": "pull", "t": t, "worker": worker, "version": version}
        if read:
            event["read"] = True
        self._emit(event)

    def note(self, t: float, kind: str, **fields: Any) -> None:
        """An engine event (resume, checkpoint, ...)."""
        self._emit({"type": kind, "t": t, **fields})

    def done(self, t: float, worker: int) -> None:
        self._emit({"type": "done", "t": t, "worker": worker})

    # ------------------------------------------------------------------ views
    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


def _finite(v: float | None) -> float | None:
    """JSON has no NaN/Inf: a non-finite value is written as null."""
    if v is None:
        return None
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None


def describe_fault(event: dict[str, Any]) -> str:
    """One line for a ``fault`` event: which worker, why, and what became of its samples."""
    why = event.get("detail") or event.get("kind", "fault")
    reason = event.get("reason")
    if reason:
        last = [ln for ln in str(reason).strip().splitlines() if ln.strip()]
        if last:
            why = f"{why}: {last[-1].strip()}"
    text = f"worker {event['worker']} {_verb(event)} ({why}) at {event['t']:.1f} s"
    uncommitted = event.get("uncommitted")
    reassigned = event.get("reassigned") or []
    lost = int(event.get("samples_lost") or 0)
    pooled = int(event.get("pooled") or 0)
    if reassigned or pooled:
        moved = sum(int(n) for _, n in reassigned) + pooled
        parts = ", ".join(f"{int(n):,} to worker {int(w)}" for w, n in reassigned)
        if pooled:
            parts += f"{', ' if parts else ''}{pooled:,} in pieces to whichever runs low first"
        text += f"; its {moved:,} uncommitted samples were reassigned: {parts}"
    elif lost:
        text += f"; {lost:,} samples lost"
    elif uncommitted == 0:
        text += "; nothing was left to redo"
    return text


def _verb(event: dict[str, Any]) -> str:
    return {"timeout": "timed out", "superseded": "was superseded",
            "abandoned": "was abandoned", "never_joined": "never joined"}.get(
        str(event.get("kind")), "died")


def read_events(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
