"""The segmentation job: ``lumbarseg segment`` on a temporary copy of the volume, in a child process.

The price of a child (see ``jobs``) is writing the input volume to a temporary file and
reading the label map back (a fraction of a second for an MR volume). Progress comes as
``batch`` events in the JSON-lines file named by ``$LUMBARSEG_PROGRESS`` (the schema is in
``LumbarSegmentLib.core.progress``); warnings and errors from the CLI's ``warning:`` /
``lumbarseg: error:`` lines in its output log. No progress-bar text is parsed: a CLI that
writes no events leaves the fraction unknown (an indeterminate bar), never a wrong one.

With a :class:`worker_client.WarmWorker` (``SegmentController(worker=...)``, what the Slicer module
and the browser app use for drafts) the same command runs inside a long-lived worker process that
keeps PyTorch and the models loaded, instead of a new process per draft; its end is a ``done`` or
``error`` event in the same progress file, and cancel kills the worker (the next draft starts another).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from LumbarSegmentLib.slicer.jobs import (CANCELLED, DONE, FAILED, RUNNING, WARNING_LINE, BackgroundProcess, ControllerError, Job,
                   Status, child_command, child_environment, error_in, python_executable)
from LumbarSegmentLib.inference.options import SegmentOptions
from LumbarSegmentLib.core.progress import BATCH, DONE as DONE_EVENT, ERROR as ERROR_EVENT, PROGRESS_ENV, JsonLinesTail, fraction
from LumbarSegmentLib.slicer.worker_client import WarmWorker


@dataclass(frozen=True)
class SegmentRequest:
    """One draft: which models, how (:class:`SegmentOptions`: the same contract as ``lumbarseg segment``'s
    flags), and whether to name the levels. ``options.confidence`` asks for the confidence map too."""

    models: list[str] | None = None  # refs or package folders; None = the default in use
    options: SegmentOptions = field(default_factory=SegmentOptions)
    levels: bool = False  # one segment per level (L1, L4-L5, ...) and the ordering check in the report

    @classmethod
    def of(cls, models: list[str] | None = None, levels: bool = False, **values) -> "SegmentRequest":
        """A request from a form (the Slicer panel, the browser page): ``values`` are option fields, numbers
        or text as typed, read and checked by :meth:`SegmentOptions.from_values` (``OptionError`` if not)."""
        return cls(models=models, options=SegmentOptions.from_values(**values), levels=levels)


@dataclass
class SegmentRun:
    labels: object  # Volume
    schema: object  # LabelSchema
    report: dict
    confidence: object | None = None  # Volume

    @property
    def model_ref(self) -> str | None:
        models = self.report.get("models") or []
        return ",".join(m["ref"] for m in models) if models else None

    @property
    def model_sha256(self) -> str | None:
        models = self.report.get("models") or []
        return ",".join(m["sha256"] for m in models if m.get("sha256")) if models else None


def segment_command(python: str, input_path: Path, output: Path, report: Path, request: SegmentRequest,
                    confidence: Path | None = None) -> list[str]:
    """``lumbarseg segment INPUT -o OUTPUT --report REPORT ...``: the options' own flags (``to_argv``), the
    models, the files and ``--levels`` (checked against the CLI's parser in the tests)."""
    return child_command(python, "LumbarSegmentLib.cli.main", "segment", [input_path], output=output, report=report,
                         options=request.options, model=request.models or None, confidence=confidence,
                         levels=request.levels)


def schema_for_report(report: dict, model_schema):
    """The schema of a run's label map: the model's, or the level schema of a ``--levels`` run."""
    if report.get("label_values") != "levels":
        return model_schema
    from LumbarSegmentLib.spine.level_names import levels_schema

    return levels_schema([lv["name"] for lv in report["levels"]])


class SegmentController(Job):
    """Runs one segmentation at a time in a child process; poll it, cancel it, or block on it (a :class:`Job`)."""

    what = "the segmentation"

    def __init__(self, *, python: str | None = None, runner: Callable | None = None, env: dict | None = None,
                 command: Callable[..., list[str]] = segment_command, workdir_parent: str | None = None,
                 worker: WarmWorker | None = None):
        super().__init__()
        self.worker = worker  # None: a new ``lumbarseg segment`` process per run
        self._job: str | None = None
        self._ended: dict | None = None  # the worker's done/error event for the current job
        self.python = python or python_executable()
        self.runner = runner
        self.env = env
        self.command = command
        self.workdir_parent = workdir_parent
        self._process: BackgroundProcess | None = None
        self._events: JsonLinesTail | None = None
        self._workdir: Path | None = None
        self._paths: dict[str, Path] = {}
        self._request: SegmentRequest | None = None
        self._result: SegmentRun | None = None
        self._error = ""

    def start(self, volume, request: SegmentRequest | None = None) -> None:
        """Write ``volume`` to a private temporary folder and launch the CLI on it."""
        from LumbarSegmentLib.formats.io import write_volume

        if self.running:
            raise ControllerError("a segmentation is already running; cancel it first")
        self._cleanup()
        request = request or SegmentRequest()
        request.options.validate()  # a bad value is refused here, in one line, before any file is written
        self._request = request
        self._result, self._error = None, ""
        self._workdir = Path(tempfile.mkdtemp(prefix="lumbarseg-run-", dir=self.workdir_parent))
        p = self._paths = {name: self._workdir / f for name, f in (
            ("input", "input.nrrd"), ("labels", "labels.nrrd"), ("report", "report.json"),
            ("confidence", "confidence.nrrd"), ("progress", "progress.jsonl"), ("log", "output.log"))}
        write_volume(volume, p["input"], compress=False)
        argv = self.command(self.python, p["input"], p["labels"], p["report"], request,
                            p["confidence"] if request.options.confidence else None)
        env = child_environment(progress_file=p["progress"]) if self.env is None else \
            {**self.env, PROGRESS_ENV: str(p["progress"])}
        self._events = JsonLinesTail(p["progress"])
        if self.worker is not None:
            self._submit(argv)
            return
        try:
            self._process = BackgroundProcess(argv, output=p["log"], env=env, runner=self.runner)
        except OSError as exc:
            self._cleanup()
            raise ControllerError(f"could not start the segmentation process ({argv[0]}): {exc}") from exc
        self.status = Status(RUNNING, None, "starting (loading PyTorch and the model)")

    def _submit(self, argv: list[str]) -> None:
        self._ended = None
        try:
            self._job = self.worker.submit(argv[3:], self._paths["progress"])  # from "segment" on
        except ControllerError:
            self._cleanup()
            raise
        self.status = Status(RUNNING, None, "segmenting (warm worker)")

    def _poll_worker(self) -> None:
        died = not self.worker.alive  # read before the events, so an event written before the exit is seen
        self._take(self._events.read_new())
        if self._ended is None and not died:
            return
        if self._ended is not None and self._ended.get("event") == DONE_EVENT:
            self._finish(0)
        else:
            msg = ((self._ended or {}).get("message")
                   or "the segmentation worker stopped: " + self.worker.last_output())
            self._error = msg.replace(f"{self._paths.get('input')}: ", "")
            self._finish(1)

    def _advance(self) -> None:
        """Read the child's new events and output and update :attr:`status`; collects the result when it ends."""
        if self.worker is not None and not self.status.finished and self._job is not None:
            self._poll_worker()
            return
        proc = self._process
        if proc is None or self.status.finished:
            return
        rc = proc.returncode  # read before the output, so nothing written before the exit is missed
        self._consume(proc.new_lines() if rc is None else proc.remaining_lines())
        self._take(self._events.read_new() if rc is None else self._events.flush())
        if rc is not None:
            self._finish(rc, proc)

    def _finish(self, rc: int, proc: BackgroundProcess | None = None) -> None:
        if rc == 0:
            try:
                self._result = self._collect()
                self.status = Status(DONE, 1.0, "segmentation finished", self.status.warnings)
            except Exception as exc:
                self._error = f"the segmentation finished but its output could not be read: {exc}"
                self.status = Status(FAILED, None, self._error, self.status.warnings)
            finally:
                self._cleanup()
        else:
            msg = self._error or (proc.tail[-1] if proc is not None and proc.tail else
                                  f"the segmentation process exited with code {rc}")
            self._error = msg
            self.status = Status(FAILED, None, msg, self.status.warnings)
            self._cleanup()

    def _take(self, events: list[dict]) -> None:
        for rec in events:
            if self._job is not None and rec.get("event") in (DONE_EVENT, ERROR_EVENT) and rec.get("job") == self._job:
                self._ended = rec
                self.status.warnings.extend(self._report_warnings() if rec["event"] == DONE_EVENT else [])
            if rec.get("event") == BATCH and rec.get("total"):
                self.status.fraction = fraction(rec)
                self.status.message = f"segmenting: batch {rec.get('done', 0)} of {rec['total']}"

    def _consume(self, lines: list[str]) -> None:
        err = error_in(lines)
        if err:  # the child's input is our temporary copy of the volume: its path means nothing to the user
            self._error = err.replace(f"{self._paths.get('input')}: ", "")
        for line in lines:
            w = WARNING_LINE.search(line)
            if w and "error:" not in line:
                self.status.warnings.append(w.group(1).strip())

    def _collect(self) -> SegmentRun:
        from LumbarSegmentLib.formats.io import read_volume
        from LumbarSegmentLib.registry.package import read_package
        from LumbarSegmentLib.registry.catalog import resolve_model

        report = json.loads(self._paths["report"].read_text())
        labels = read_volume(self._paths["labels"])
        confidence = read_volume(self._paths["confidence"]) if self._request.options.confidence else None
        models = report.get("models") or []
        if models and models[0].get("path") and Path(models[0]["path"]).is_dir():
            schema = read_package(models[0]["path"]).schema
        elif models:
            schema = resolve_model(models[0]["ref"]).schema
        else:
            raise ControllerError("the run report names no model")
        schema = schema_for_report(report, schema)
        return SegmentRun(labels=labels, schema=schema, report=report, confidence=confidence)

    def result(self) -> SegmentRun:
        if self.status.state != DONE or self._result is None:
            raise ControllerError(self._error or f"no result: the segmentation is {self.status.state}")
        return self._result

    def _report_warnings(self) -> list[str]:
        """A worker prints no ``warning:`` lines for this run: its warnings are read from the report."""
        try:
            return list(json.loads(self._paths["report"].read_text()).get("warnings") or [])
        except (OSError, ValueError, AttributeError):
            return []

    def cancel(self) -> None:
        """Kill the child and everything it started; leaves no files behind."""
        if self.worker is not None and self.running:
            self.worker.kill()  # the only way to stop a forward pass at once; the next draft starts a new one
            self.status = Status(CANCELLED, None, "segmentation cancelled")
        elif self._process is not None and self.running:
            self._process.kill()
            self.status = Status(CANCELLED, None, "segmentation cancelled")
        self._cleanup()
        self._announce()

    def close(self) -> None:
        """Cancel a running draft and end the warm worker (when the panel or the browser session closes)."""
        self.cancel()
        if self.worker is not None:
            self.worker.close()

    def run(self, volume, request: SegmentRequest | None = None, *,
            progress: Callable[[Status], None] | None = None, timeout: float | None = None,
            interval: float = 0.1) -> SegmentRun:
        """Blocking mode for scripts and tests: start, wait (:meth:`Job.wait`), return the result (or raise)."""
        self.start(volume, request)
        self.wait(timeout, interval=interval, progress=progress)
        return self.result()

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
