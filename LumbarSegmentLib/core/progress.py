"""The progress contract between a background job and whoever shows it: JSON-lines events.

A child process (training, publishing) appends one JSON object per line to a progress
file; a front end (the Slicer module today, a browser front end later) reads the new
lines on its own timer. This module is the one place that says what those lines hold:
the writer (:class:`ProgressLog`, used by ``training.trainer``, ``training.publish`` and
``lumbarseg segment`` in ``cli``)
and the reader (:class:`JsonLinesTail`, :func:`fraction`, :func:`describe`) both import
it, so a renamed field breaks a test here instead of a progress bar in the field.

Why a file read from a timer, and not a pipe drained by a reader thread: inside Slicer
the main thread holds the GIL while it idles in the Qt event loop, so a Python reader
thread is starved and progress stalls (and a full pipe can block the child). Reading a
file from the module's ``QTimer`` runs on the main thread, needs no Qt in the Lib, and
survives a module reload: the run folder still holds the log, so a new panel reattaches
to a run it did not start (``retrain_job.RetrainController.reattach``).

Events (``"event"`` plus ``"time"``, seconds since the epoch, on every line):

=========  =================================================================================
step       ``epoch``, ``step``, ``loss``, ``lr``, ``eta_s``, ``total_epochs``, ``total_steps``
epoch      ``epoch``, ``step``, ``loss``, ``lr``, ``val`` {metric: value}, ``best_epoch``,
           ``best_metric``, ``metric``, ``eta_s``, ``total_epochs``, ``total_steps``
done       ``epoch``, ``step``, ``loss``, ``val``, ``best_epoch``, ``best_metric``, ``package``
           (the model package folder the run wrote)
error      ``message``, ``kind``, ``resume_hint``
publish    ``ref``, ``default`` (bool), ``reason``, ``table`` (per-class comparison, text),
           ``comparison`` (the same as data)
batch      ``done``, ``total`` (prediction batches of one volume), ``input``: segmentation
=========  =================================================================================

A reader must ignore fields (and events) it does not know; a writer only adds fields.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

PROGRESS_FILE = "progress.jsonl"
PROGRESS_ENV = "LUMBARSEG_PROGRESS"  # a child that is handed this variable appends its events there
STEP, EPOCH, DONE, ERROR, PUBLISH, BATCH = "step", "epoch", "done", "error", "publish", "batch"
EVENTS = (STEP, EPOCH, DONE, ERROR, PUBLISH, BATCH)


def json_safe(obj):
    """NaN/inf -> None, numpy/torch scalars -> Python numbers, tuples -> lists: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


class ProgressLog:
    """Appends events to a JSON-lines file (see the module doc); disabled = computes, writes nothing."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_environment(cls) -> "ProgressLog":
        """The log named by ``$LUMBARSEG_PROGRESS`` (set by a front end for its child), else a disabled one."""
        return cls(os.environ.get(PROGRESS_ENV) or None)

    def write(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}; add it to LumbarSegmentLib.core.progress first")
        rec = {"event": event, "time": time.time(), **json_safe(fields)}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:  # one write per line: readers never see half
                f.write(json.dumps(rec, allow_nan=False) + "\n")
                f.flush()
        return rec


class JsonLinesTail:
    """Read a growing JSON-lines file incrementally.

    A last line still being written (no newline yet) is kept until it is complete;
    an unparsable complete line is counted in ``bad_lines`` and skipped; a file that
    shrank (rewritten) is read again from the start.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pos = 0
        self._partial = b""
        self.bad_lines = 0

    def read_new(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._pos:
            self._pos, self._partial = 0, b""
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        return [r for r in (self._parse(line) for line in complete) if r is not None]

    def flush(self) -> list[dict]:
        """At the end of a run: parse a final line that never got its newline (if it is whole)."""
        out = self.read_new()
        if self._partial.strip():
            rec = self._parse(self._partial, count_bad=False)
            if rec is not None:
                out.append(rec)
                self._partial = b""
        return out

    def _parse(self, raw: bytes, count_bad: bool = True) -> dict | None:
        if not raw.strip():
            return None
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.bad_lines += count_bad
            return None
        if not isinstance(rec, dict):
            self.bad_lines += count_bad
            return None
        return rec


def fraction(rec: dict) -> float | None:
    """How far along an event says the run is (0..1), ``None`` if it does not say."""
    frac = None
    if rec.get("event") == BATCH and rec.get("total"):
        frac = rec.get("done", 0) / rec["total"]
    elif rec.get("total_steps") and rec.get("step") is not None:
        frac = rec["step"] / rec["total_steps"]
    elif rec.get("total_epochs") and rec.get("epoch") is not None:
        frac = rec["epoch"] / rec["total_epochs"]
    return None if frac is None else max(0.0, min(1.0, float(frac)))


def eta_seconds(step_times, remaining_steps, val_time, planned_epochs, val_every, epoch) -> float:
    """Seconds a training run still needs: the mean of its last 50 step times per remaining step, plus its
    validations still due (NaN before the first step)."""
    if not step_times:
        return float("nan")
    recent = step_times[-50:]
    per = sum(recent) / len(recent)
    remaining_epochs = max(0, planned_epochs - epoch - 1)
    return per * max(0, remaining_steps) + val_time * remaining_epochs / max(1, val_every)


def format_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def describe(rec: dict) -> str:
    """One human line for an event."""
    if rec.get("event") == PUBLISH:
        return f"published {rec.get('ref')}" + (" (now the default)" if rec.get("default") else
                                                  " (the model in use is unchanged)") + f": {rec.get('reason')}"
    if rec.get("event") == ERROR:
        return f"error: {rec.get('message')}"
    parts = []
    if rec.get("epoch") is not None:
        parts.append(f"epoch {rec['epoch']}" + (f"/{rec['total_epochs']}" if rec.get("total_epochs") else ""))
    if rec.get("step") is not None:
        parts.append(f"step {rec['step']}")
    if isinstance(rec.get("loss"), (int, float)):
        parts.append(f"loss {rec['loss']:.4f}")
    val = rec.get("val")
    if isinstance(val, dict):
        for k, v in val.items():
            if isinstance(v, (int, float)):
                parts.append(f"{k} {v:.3f}")
    for k, v in rec.items():
        if k.startswith("val_") and isinstance(v, (int, float)):
            parts.append(f"{k[4:]} {v:.3f}")
    if isinstance(rec.get("eta_s"), (int, float)):
        parts.append("eta " + format_duration(rec["eta_s"]))
    return ", ".join(parts) or json.dumps(rec)[:200]
