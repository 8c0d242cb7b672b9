"""The retrain job: ``lumbarseg-train`` on the exported cases, then ``lumbarseg-train publish``.

Two phases, each a child process (see ``jobs``): training (:func:`train_command`), then,
when it produced a model package, publishing (:func:`publish_command`), which adds the
package to the user's registry and lets the gate decide whether it replaces the model in
use (training/publish.py). :attr:`RetrainController.status` stays ``running`` through both.

* **Held-out cases.** Before training, the dataset's frozen validation split is read
  (``LumbarSegmentLib.dataset.holdout``); its cases are excluded from training (``--exclude``) and
  are the cases the gate grades on (``publish --cases``). A model is never graded on
  cases it trained on.
* **Keeping what the model knew.** ``finetune`` keeps the parent's knowledge by default (it replays
  a few shipped slices of the parent's own sources and blends the result with the parent's weights;
  ``training.finetune.RETENTION_DEFAULT``) and the publish gate grades on the shipped reference set
  of every source as well, so a team with only its own cases gets the same protection as one that
  rehearses with other data; :attr:`RetrainController.own_source_only` waives the reference check.
* **Progress** is the run folder's ``progress.jsonl`` (trainer and publish step both
  write it; schema in ``LumbarSegmentLib.core.progress``), read from the caller's timer.
* **Surviving the panel.** The run folder holds ``run.json`` (the child's pid, phase,
  command line, held-out cases), and the children run in their own session, so a
  reloaded module (or a restarted Slicer) calls :meth:`RetrainController.reattach` on
  the folder and carries on following, or publishing; a run that was stopped is
  continued with :meth:`RetrainController.resume` (the trainer's ``--resume``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from LumbarSegmentLib.slicer.jobs import (CANCELLED, DONE, FAILED, RUNNING, BackgroundProcess, ControllerError, Job, PidHandle,
                   Status, alive, child_command, child_environment, error_in, python_executable)
from LumbarSegmentLib.core.progress import DONE as DONE_EVENT
from LumbarSegmentLib.core.progress import ERROR as ERROR_EVENT
from LumbarSegmentLib.core.progress import PROGRESS_FILE, PUBLISH, JsonLinesTail, describe, fraction

RUN_FILE = "run.json"
TRAIN_CLI = "LumbarSegmentLib.training.cli"


@dataclass(frozen=True)
class TrainRequest:
    """One training run of the retrain job: the cases, where the run goes, what it starts from and for how long."""

    dataset: Path
    output: Path
    extra: tuple[str, ...] = ()  # more ``lumbarseg-train`` arguments, passed as they are
    base_model: str | None = None  # fine-tune this model; None: train from scratch
    epochs: int | None = None
    max_minutes: float | None = None
    exclude: tuple[str, ...] = ()  # case ids never trained on (the held-out cases)
    resume: bool = False


def train_command(python: str, request: TrainRequest) -> list[str]:
    """``lumbarseg-train finetune --from MODEL`` (or ``train`` from scratch) ``--data DATASET --out OUTPUT``."""
    r = request
    head = {"from_": r.base_model} if r.base_model else {}
    argv = child_command(python, TRAIN_CLI, "finetune" if r.base_model else "train", **head, data=r.dataset,
                         out=r.output, exclude=list(r.exclude) or None, epochs=r.epochs, max_minutes=r.max_minutes,
                         resume=r.resume)
    return argv + list(r.extra)


def publish_command(python: str, package: Path, dataset: Path | None = None,
                    cases: Sequence[str] = (), *, own_source_only: bool = False,
                    registry: Path | None = None) -> list[str]:
    """``lumbarseg-train publish PACKAGE --data DATASET --cases HELD-OUT``: into the user registry (or
    ``registry``), gated on the held-out cases and on the shipped reference set of every source the
    model in use knows (``--own-source-only``: a loss there does not refuse it; recorded in the manifest)."""
    return child_command(python, TRAIN_CLI, "publish", [package], data=dataset,
                         cases=list(cases) if dataset and cases else None, own_source_only=own_source_only,
                         registry=registry)


class RetrainController(Job):
    """Runs training then publishing in the background, following the run folder's progress log (a :class:`Job`)."""

    what = "the training run"

    def __init__(self, *, python: str | None = None, runner: Callable | None = None, env: dict | None = None,
                 command: Callable[..., list[str]] = train_command, log_name: str = PROGRESS_FILE,
                 publish: Callable[..., list[str]] | None = publish_command, auto_publish: bool = True,
                 publish_registry: Path | None = None):
        super().__init__()
        self.python = python or python_executable()
        self.runner = runner
        self.env = env
        self.command = command
        self.publish_command = publish
        self.publish_registry = publish_registry  # None: the user registry (the browser's --models names another)
        self.auto_publish = auto_publish and publish is not None
        self.own_source_only = False  # the team said only its own source matters (publish --own-source-only)
        self.log_name = log_name
        self.records: list[dict] = []
        self.latest: dict = {}
        self.output: Path | None = None
        self.published: str | None = None  # the publish step's one-line result
        self.publish_event: dict | None = None  # ... and the whole event (per-class table included)
        self.dataset: Path | None = None
        self.holdout: list[str] = []
        self._process: BackgroundProcess | None = None
        self._phase = "train"
        self._tail: JsonLinesTail | None = None
        self._argv: list[str] = []

    # --- starting ------------------------------------------------------------------------------
    def start(self, dataset_folder, output_folder, extra_args: Sequence[str] = (), base_model: str | None = None,
              *, epochs: int | None = None, max_minutes: float | None = None) -> None:
        """Launch training on the dataset's training split into ``output_folder`` (fine-tuning ``base_model``)."""
        from LumbarSegmentLib.dataset.dataset import Dataset

        if self.running:
            raise ControllerError("a training run is already going; stop it first")
        dataset = Path(dataset_folder)
        split = Dataset(dataset).split()  # CaseError for a folder without cases: a clear message now
        if not split.train:
            raise ControllerError(f"all {len(split.holdout)} case(s) in {dataset} are held out for grading; "
                                  f"export cases of more patients first")
        request = TrainRequest(dataset, Path(output_folder), tuple(extra_args), base_model, epochs=epochs,
                               max_minutes=max_minutes, exclude=tuple(split.holdout_ids))
        argv = self.command(self.python, request)
        self._begin(dataset, Path(output_folder), argv, split.holdout_ids, skip_old_log=True)
        self.status.message = (f"training on {len(split.train)} cases ({len(split.holdout)} held out for "
                               f"grading): starting")

    def resume(self) -> None:
        """Continue a stopped run from its last checkpoint (same folder, same command plus ``--resume``)."""
        if self.running or self.output is None or not self._argv:
            raise ControllerError("there is no stopped training run to resume")
        argv = self._argv if "--resume" in self._argv else [*self._argv, "--resume"]
        self._begin(self.dataset, self.output, argv, self.holdout, skip_old_log=False)

    def _begin(self, dataset: Path, output: Path, argv: list[str], holdout: list[str], skip_old_log: bool) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.output, self.dataset, self.holdout, self._argv = output, dataset, list(holdout), list(argv)
        self.published = self.publish_event = None
        if skip_old_log:
            self.records, self.latest = [], {}
            self._tail = JsonLinesTail(output / self.log_name)
            self._tail.read_new()  # skip what an earlier run left in the log
        self._phase = "train"
        self._process = self._launch(argv, "train.log")
        self.status = Status(RUNNING, self.status.fraction if not skip_old_log else 0.0, "training: starting")

    def _launch(self, argv: list[str], log: str) -> BackgroundProcess:
        env = child_environment(progress_file=self.output / self.log_name) if self.env is None else \
            {**self.env, "LUMBARSEG_PROGRESS": str(self.output / self.log_name)}
        try:
            proc = BackgroundProcess(argv, output=self.output / log, env=env, runner=self.runner)
        except OSError as exc:
            raise ControllerError(f"could not start {argv[0]}: {exc}") from exc
        self._save_state(proc.proc.pid)
        return proc

    def _save_state(self, pid: int | None) -> None:
        state = {"pid": pid, "phase": self._phase, "argv": self._argv, "dataset": str(self.dataset),
                 "holdout": self.holdout, "started": time.time()}
        tmp = self.output / f".{RUN_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.output / RUN_FILE)

    # --- reattaching ---------------------------------------------------------------------------
    def reattach(self, output_folder) -> Status:
        """Follow a run started by an earlier panel (or Slicer session) from its run folder."""
        output = Path(output_folder)
        state = json.loads((output / RUN_FILE).read_text())
        self.output, self.dataset = output, Path(state["dataset"])
        self.holdout, self._argv, self._phase = list(state.get("holdout") or []), list(state["argv"]), state["phase"]
        self.records, self.latest, self.published, self.publish_event = [], {}, None, None
        self._tail = JsonLinesTail(output / self.log_name)
        self._take(self._tail.read_new())
        pid = state.get("pid")
        log = output / ("publish.log" if self._phase == "publish" else "train.log")
        handle = PidHandle(pid) if pid and alive(pid) else _Ended()
        self._process = BackgroundProcess(self._argv, output=log, proc=handle)
        self.status = Status(RUNNING, self.status.fraction, self.status.message or f"following the run in {output}")
        return self.poll()

    # --- polling -------------------------------------------------------------------------------
    def _advance(self) -> Status:
        proc = self._process
        if proc is None or self.status.finished:
            return self.status
        rc = proc.returncode
        lines = proc.new_lines() if rc is None else proc.remaining_lines()
        self._take(self._tail.read_new() if rc is None else self._tail.flush())
        if rc is None:
            return self.status
        if self._phase == "publish":
            return self._publish_finished(rc, lines)
        last = next((r for r in reversed(self.records) if r.get("event") in (DONE_EVENT, ERROR_EVENT)), {})
        if last.get("event") == DONE_EVENT and rc == 0:
            return self._training_finished(last)
        if last.get("event") == ERROR_EVENT or rc not in (0, None) and not isinstance(proc.proc, PidHandle):
            msg = last.get("message") or error_in(proc.tail) or \
                (proc.tail[-1] if proc.tail else f"training exited with code {rc}")
            self.status = Status(FAILED, self.status.fraction, msg)
        else:  # ended without saying done: killed, or Slicer closed under it
            self.status = Status(CANCELLED, self.status.fraction, "training stopped before the end; Resume continues "
                                                                  "it from its last checkpoint")
        return self.status

    def _training_finished(self, last: dict) -> Status:
        summary = "training finished: " + describe(last)
        if self.auto_publish and self.package_path is not None:
            self._phase = "publish"
            extra = {"own_source_only": True} if self.own_source_only else {}
            if self.publish_registry is not None:
                extra["registry"] = self.publish_registry
            argv = self.publish_command(self.python, self.package_path, self.dataset, self.holdout, **extra)
            try:
                self._process = self._launch(argv, "publish.log")
            except ControllerError as exc:
                self.status = Status(DONE, 1.0, f"{summary}; {exc}")
                return self.status
            self.status = Status(RUNNING, 1.0, summary + "; grading and publishing the model")
            return self.status
        self.status = Status(DONE, 1.0, summary)
        return self.status

    def _publish_finished(self, rc: int, lines: list[str]) -> Status:
        trained = self.status.message.replace("; grading and publishing the model", "")
        if self.publish_event is not None:
            self.status = Status(DONE, 1.0, f"{trained}; {self.published}")
        else:  # training worked: report DONE, with why the model is not in the list yet
            why = error_in(self._process.tail) or (self._process.tail[-1] if self._process.tail
                                                   else f"exit code {rc}")
            self.status = Status(DONE, 1.0, f"{trained}; publishing failed ({why}); the model package is in "
                                            f"{self.package_path}")
        self._save_state(None)
        return self.status

    def _take(self, records: list[dict]) -> None:
        for rec in records:
            self.records.append(rec)
            if rec.get("event") == PUBLISH:
                self.publish_event, self.published = rec, describe(rec)
                continue
            self.latest.update({k: v for k, v in rec.items() if v is not None})
            frac = fraction(rec)
            if frac is not None:
                self.status.fraction = frac
            self.status.message = describe(rec)

    @property
    def package_path(self) -> Path | None:
        """The model package the finished run wrote, if any."""
        for rec in reversed(self.records):
            if rec.get("event") == DONE_EVENT and rec.get("package"):
                return Path(rec["package"])
        return None

    def stop(self, grace: float = 10.0) -> None:
        """Stop training (the trainer's checkpoint lets :meth:`resume` continue later) or publishing."""
        if self._process is not None and self.running:
            self._process.kill(grace=grace)
            if self._phase == "publish":
                self.status = Status(CANCELLED, 1.0, f"publishing stopped; the model package is in "
                                                     f"{self.package_path}")
            else:
                self._take(self._tail.flush())
                self.status = Status(CANCELLED, self.status.fraction,
                                     f"training stopped; Resume (or `lumbarseg-train ... --out {self.output} "
                                     f"--resume`) continues it")
        self._announce()

    def cancel(self) -> None:
        """:meth:`stop` (the :class:`Job` name): a stopped training run can be resumed."""
        self.stop()


class _Ended:
    """The process handle of a run whose process is gone when the panel reattaches."""

    pid = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout=None) -> int:
        return 0
