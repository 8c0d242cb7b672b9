"""What the Slicer module does, without Qt: segmentation and retraining run in background processes.

Importable in plain Python (no ``qt``/``slicer`` import at module level), so every
piece is unit-tested outside Slicer. The module's widget only starts controllers,
polls them from a ``QTimer`` and shows what they report.

Why a subprocess rather than a thread (the design choice for :class:`SegmentController`):

* **Cancel is immediate and complete.** PyTorch kernels cannot be interrupted from
  another thread; killing the child's whole process tree stops work at once and
  returns every byte of CPU/GPU memory to the system.
* **Slicer stays responsive.** Inference never holds the application's GIL, and a
  crash inside a native library (a CUDA driver error, out of memory) ends the child,
  not Slicer.
* **One code path.** The child runs ``python -m LumbarSegmentLib.cli segment``: the
  command-line tool users script with, with the same validation and atomic outputs.

The price is writing the input volume to a temporary file and reading the label map
back (a fraction of a second for an MR volume). Progress is parsed from the CLI's
progress bar (``done/total`` batches); errors from its ``lumbarseg: error:`` lines.

The process runner is injectable (``runner=``): a callable taking ``(argv, env)`` and
returning a ``subprocess.Popen``-like object whose output is text lines.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

LIB_DIR = Path(__file__).resolve().parent
LIB_PARENT = LIB_DIR.parent  # holds LumbarSegmentLib (and, in a source tree, training/)

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")
_ERROR = re.compile(r"(?:^|\s|\])(?:lumbarseg(?:-train)?: )?error: (.*)$")
_WARNING = re.compile(r"(?:^|\s|\])warning: (.*)$")


class ControllerError(RuntimeError):
    """A background run could not start, failed, or was cancelled."""


# =========================================================================== processes
def python_executable() -> str:
    """The interpreter for child processes: Slicer's ``PythonSlicer`` launcher if present, else this one."""
    launcher = shutil.which("PythonSlicer")
    if launcher:
        return launcher
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (exe.parent / name).exists():
            return str(exe.parent / name)
    return sys.executable


def child_environment(extra: dict | None = None) -> dict:
    """This process's environment plus: the Lib importable, unbuffered output, a dumb progress bar."""
    env = dict(os.environ)
    paths = [str(LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env.update(extra or {})
    return env


def popen_runner(argv: Sequence[str], env: dict):
    """Start ``argv`` in a new process group (session), output merged into one text pipe."""
    kwargs = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kwargs["start_new_session"] = True
    # binary and unbuffered: BackgroundProcess splits on '\r' as well as '\n' (progress-bar refreshes)
    return subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0, **kwargs)


def _descendants(pid: int) -> list[int]:
    """Child process ids, recursively (psutil when installed, else /proc on Linux)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    out, todo = [], [pid]
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    parents: dict[int, list[int]] = {}
    for d in proc.iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                parents.setdefault(ppid, []).append(int(d.name))
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_process_tree(proc, *, grace: float = 3.0) -> None:
    """End ``proc`` and every process it started: SIGTERM to the group, SIGKILL after ``grace`` seconds.

    Children that left the process group (a daemon, say) are found by parentage and
    killed too. On Windows ``taskkill /T /F`` does the same.
    """
    pid = proc.pid
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True)
        with contextlib.suppress(Exception):
            proc.wait(timeout=grace)
        return
    family = _descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    for p in [pid] + family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in [pid] + family + _descendants(pid):
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError):  # a zombie is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


class BackgroundProcess:
    """A child process whose output is collected by a reader thread, for polling.

    Output is split into lines at ``\n`` and at ``\r`` (a progress bar redraws its line
    with ``\r``); the text after the last break, still being written, is in ``partial``.
    """

    def __init__(self, argv: Sequence[str], *, env: dict | None = None, runner: Callable | None = None):
        self.argv = list(argv)
        self.proc = (runner or popen_runner)(self.argv, env if env is not None else child_environment())
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.tail: list[str] = []  # last lines, for error messages
        self.partial = ""
        self._reader = threading.Thread(target=self._read, name="lumbarseg-output", daemon=True)
        self._reader.start()

    def _emit(self, line: str) -> None:
        self.lines.put(line)
        if line.strip():
            self.tail = (self.tail + [line])[-40:]

    def _read(self) -> None:
        import codecs

        stream = getattr(self.proc, "stdout", None)
        if stream is None:
            return
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # an injected stand-in: iterate its lines
            with contextlib.suppress(ValueError, OSError):
                for line in stream:
                    self._emit(line.decode("utf-8", "replace") if isinstance(line, bytes) else line.rstrip("\r\n"))
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            pending += decoder.decode(data)
            *complete, pending = re.split(r"\r\n|\r|\n", pending)
            for line in complete:
                self._emit(line)
            self.partial = pending
        pending += decoder.decode(b"", final=True)
        if pending:
            self._emit(pending)
        self.partial = ""

    def new_lines(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def finish_reading(self, timeout: float = 5.0) -> None:
        self._reader.join(timeout)

    def kill(self, grace: float = 3.0) -> None:
        if self.proc.poll() is None:
            kill_process_tree(self.proc, grace=grace)
        self.finish_reading(1.0)


# =========================================================================== JSON lines
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


def format_metrics(rec: dict) -> str:
    """One human line for a training progress record."""
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


def format_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


# =========================================================================== status
@dataclass
class Status:
    state: str = IDLE
    fraction: float | None = None  # 0..1, None = unknown
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(done, total)`` from a progress-bar line like ``x.nrrd:  45%|####5 | 9/20 [00:01<00:02]``."""
    m = None
    for m in _PROGRESS.finditer(line):
        pass
    if m is None:
        return None
    done, total = int(m.group(1)), int(m.group(2))
    return (done, total) if total > 0 else None


# =========================================================================== segmentation
@dataclass
class SegmentRequest:
    models: list[str] | None = None  # refs or package folders; None = the registry default
    device: str = "auto"
    mode: str = "fast"
    confidence: bool = False
    allow_reslice: bool = False
    batch_size: int | None = None
    threads: int | None = None


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
    argv = [python, "-m", "LumbarSegmentLib.cli", "segment", str(input_path), "-o", str(output),
            "--report", str(report), "--device", request.device, "--mode", request.mode]
    if request.models:
        argv += ["--model", ",".join(request.models)]
    if confidence is not None:
        argv += ["--confidence", str(confidence)]
    if request.allow_reslice:
        argv.append("--reslice")
    if request.batch_size:
        argv += ["--batch-size", str(request.batch_size)]
    if request.threads:
        argv += ["--threads", str(request.threads)]
    return argv


class SegmentController:
    """Runs one segmentation at a time in a child process; poll it, cancel it, or block on it."""

    def __init__(self, *, python: str | None = None, runner: Callable | None = None, env: dict | None = None,
                 command: Callable[..., list[str]] = segment_command, workdir_parent: str | None = None):
        self.python = python or python_executable()
        self.runner = runner
        self.env = env
        self.command = command
        self.workdir_parent = workdir_parent
        self.status = Status()
        self._process: BackgroundProcess | None = None
        self._workdir: Path | None = None
        self._paths: dict[str, Path] = {}
        self._request: SegmentRequest | None = None
        self._result: SegmentRun | None = None
        self._error = ""

    @property
    def running(self) -> bool:
        return self.status.state == RUNNING

    def start(self, volume, request: SegmentRequest | None = None) -> None:
        """Write ``volume`` to a private temporary folder and launch the CLI on it."""
        from .io import write_volume

        if self.running:
            raise ControllerError("a segmentation is already running; cancel it first")
        self._cleanup()
        request = request or SegmentRequest()
        self._request = request
        self._result, self._error = None, ""
        self._workdir = Path(tempfile.mkdtemp(prefix="lumbarseg-run-", dir=self.workdir_parent))
        p = self._paths = {"input": self._workdir / "input.nrrd", "labels": self._workdir / "labels.nrrd",
                           "report": self._workdir / "report.json",
                           "confidence": self._workdir / "confidence.nrrd"}
        write_volume(volume, p["input"], compress=False)
        argv = self.command(self.python, p["input"], p["labels"], p["report"], request,
                            p["confidence"] if request.confidence else None)
        try:
            self._process = BackgroundProcess(argv, env=self.env if self.env is not None else child_environment(),
                                              runner=self.runner)
        except OSError as exc:
            self._cleanup()
            raise ControllerError(f"could not start the segmentation process ({argv[0]}): {exc}") from exc
        self.status = Status(RUNNING, 0.0, "starting (loading PyTorch and the model)")

    def poll(self) -> Status:
        """Read the child's new output and update :attr:`status`; collects the result when it ends."""
        proc = self._process
        if proc is None or self.status.finished:
            return self.status
        self._consume(proc.new_lines())
        rc = proc.returncode
        if rc is None:
            self._progress_from(proc.partial)  # the bar's current refresh, not yet ended by a newline
            return self.status
        proc.finish_reading()
        self._consume(proc.new_lines())
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
            msg = self._error or (proc.tail[-1] if proc.tail else f"the segmentation process exited with code {rc}")
            self._error = msg
            self.status = Status(FAILED, None, msg, self.status.warnings)
            self._cleanup()
        return self.status

    def _progress_from(self, line: str) -> None:
        pr = parse_progress(line) if line else None
        if pr:
            done, total = pr
            self.status.fraction = done / total
            self.status.message = f"segmenting: batch {done} of {total}"

    def _consume(self, lines: list[str]) -> None:
        # A progress refresh has no newline of its own, so the next message may share its line.
        for line in lines:
            self._progress_from(line)
            m = _ERROR.search(line)
            if m:  # the child's input is our temporary copy of the volume: its path means nothing to the user
                self._error = m.group(1).strip().replace(f"{self._paths.get('input')}: ", "")
                continue
            w = _WARNING.search(line)
            if w:
                self.status.warnings.append(w.group(1).strip())

    def _collect(self) -> SegmentRun:
        from .io import read_volume
        from .packages import read_package, resolve_model

        report = json.loads(self._paths["report"].read_text())
        labels = read_volume(self._paths["labels"])
        confidence = read_volume(self._paths["confidence"]) if self._request.confidence else None
        models = report.get("models") or []
        if models and models[0].get("path") and Path(models[0]["path"]).is_dir():
            schema = read_package(models[0]["path"]).schema
        elif models:
            schema = resolve_model(models[0]["ref"]).schema
        else:
            raise ControllerError("the run report names no model")
        return SegmentRun(labels=labels, schema=schema, report=report, confidence=confidence)

    def result(self) -> SegmentRun:
        if self.status.state != DONE or self._result is None:
            raise ControllerError(self._error or f"no result: the segmentation is {self.status.state}")
        return self._result

    def cancel(self) -> None:
        """Kill the child and everything it started; leaves no files behind."""
        if self._process is not None and self.running:
            self._process.kill()
            self.status = Status(CANCELLED, None, "segmentation cancelled")
        self._cleanup()

    def run(self, volume, request: SegmentRequest | None = None, *,
            progress: Callable[[Status], None] | None = None, timeout: float | None = None,
            interval: float = 0.1) -> SegmentRun:
        """Blocking mode for scripts and tests: start, wait, return the result (or raise)."""
        self.start(volume, request)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.poll().finished:
                if progress:
                    progress(self.status)
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    raise ControllerError(f"the segmentation did not finish within {timeout:.0f} s")
                time.sleep(interval)
        except BaseException:
            if self.running:
                self.cancel()
            raise
        if progress:
            progress(self.status)
        return self.result()

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# =========================================================================== retraining
PROGRESS_LOG = "progress.jsonl"


def train_command(python: str, dataset: Path, output: Path, extra: Sequence[str] = (),
                  base_model: str | None = None) -> list[str]:
    """``lumbarseg-train finetune --from MODEL`` (or ``train`` from scratch) ``--data DATASET --out OUTPUT``.

    Run with the same interpreter as ``python -m LumbarSegmentLib.training.cli``. ``--resume`` lets a
    stopped run continue from its last checkpoint in the same output folder.
    """
    head = ["finetune", "--from", base_model] if base_model else ["train"]
    return [python, "-m", "LumbarSegmentLib.training.cli", *head, "--data", str(dataset), "--out", str(output), *extra]


def publish_command(python: str, package: Path, dataset: Path | None = None,
                    cases: Sequence[str] = ()) -> list[str]:
    """``lumbarseg-train publish PACKAGE``: into the user's registry; it becomes the default only
    when it is shown to be at least as good (the training package's rule, see training/publish.py)."""
    # With the dataset, publishing can evaluate the new model and the current default on the same
    # cases when their recorded validation metrics are not comparable.
    # A run without validation cases (a small export folder) compares on the exported cases.
    return [python, "-m", "LumbarSegmentLib.training.cli", "publish", str(package), *(["--data", str(dataset)] if dataset else []),
            *(["--cases", ",".join(cases)] if dataset and cases else [])]


class RetrainController:
    """Runs ``lumbarseg-train`` in the background, follows its JSON-lines progress log, then publishes.

    Two phases, each a child process: training (``train_command``), then, when it
    produced a model package and ``auto_publish`` is on, ``lumbarseg-train publish``
    (``publish_command``), which adds the package to the user's registry and decides
    whether it becomes the default. :attr:`status` stays ``running`` through both.
    """

    def __init__(self, *, python: str | None = None, runner: Callable | None = None, env: dict | None = None,
                 command: Callable[..., list[str]] = train_command, log_name: str = PROGRESS_LOG,
                 publish: Callable[[str, Path], list[str]] | None = publish_command, auto_publish: bool = True):
        self.python = python or python_executable()
        self.runner = runner
        self.env = env
        self.command = command
        self.publish_command = publish
        self.auto_publish = auto_publish and publish is not None
        self.log_name = log_name
        self.status = Status()
        self.records: list[dict] = []
        self.latest: dict = {}
        self.output: Path | None = None
        self.published: str | None = None  # the publish step's report line
        self._process: BackgroundProcess | None = None
        self._phase = "train"
        self._tail: JsonLinesTail | None = None
        self._error = ""

    @property
    def running(self) -> bool:
        return self.status.state == RUNNING

    def start(self, dataset_folder, output_folder, extra_args: Sequence[str] = (),
              base_model: str | None = None) -> None:
        """Launch training on ``dataset_folder`` into ``output_folder`` (fine-tuning ``base_model`` if given)."""
        from .cases import list_cases

        if self.running:
            raise ControllerError("a training run is already going; stop it first")
        dataset = Path(dataset_folder)
        cases = list_cases(dataset)  # a clear error now rather than from the child
        output = Path(output_folder)
        output.mkdir(parents=True, exist_ok=True)
        self.output = output
        self.dataset, self.case_ids = dataset, [c.case_id for c in cases]
        self.records, self.latest, self._error, self.published = [], {}, "", None
        self._phase = "train"
        log = output / self.log_name
        self._tail = JsonLinesTail(log)
        self._tail.read_new()  # skip what an earlier run left in the log
        argv = self.command(self.python, dataset, output, list(extra_args), base_model)
        try:
            self._process = BackgroundProcess(argv, env=self.env if self.env is not None else child_environment(),
                                              runner=self.runner)
        except OSError as exc:
            raise ControllerError(f"could not start training ({argv[0]}): {exc}") from exc
        self.status = Status(RUNNING, 0.0, f"training on {len(cases)} cases: starting")

    def poll(self) -> Status:
        proc = self._process
        if proc is None or self.status.finished:
            return self.status
        if self._phase == "publish":
            return self._poll_publish(proc)
        for line in proc.new_lines():
            m = _ERROR.search(line)
            if m:
                self._error = m.group(1).strip()
        self._take(self._tail.read_new())
        rc = proc.returncode
        if rc is None:
            return self.status
        proc.finish_reading()
        self._take(self._tail.flush())
        last = self.records[-1] if self.records else {}
        if rc == 0 and last.get("event") != "error":
            summary = "training finished" + (": " + format_metrics(last) if last else "")
            if self.auto_publish and self.package_path is not None:
                argv = self.publish_command(self.python, self.package_path, getattr(self, "dataset", None),
                                            getattr(self, "case_ids", ()))
                try:
                    self._process = BackgroundProcess(argv, runner=self.runner, env=self.env if self.env is not None
                                                      else child_environment())
                    self._phase = "publish"
                    self.status = Status(RUNNING, 1.0, summary + "; publishing the model")
                    return self.status
                except OSError as exc:
                    summary += f"; could not start publishing: {exc}"
            self.status = Status(DONE, 1.0, summary)
        else:
            msg = (last.get("message") if last.get("event") == "error" else None) or self._error or \
                (proc.tail[-1] if proc.tail else f"training exited with code {rc}")
            self.status = Status(FAILED, self.status.fraction, msg)
        return self.status

    def _poll_publish(self, proc: BackgroundProcess) -> Status:
        if proc.returncode is None:
            return self.status
        proc.finish_reading()
        proc.new_lines()
        trained = self.status.message.replace("; publishing the model", "")
        if proc.returncode == 0:
            self.published = next((ln.strip() for ln in reversed(proc.tail) if ln.startswith("published")),
                                  "published")
            self.status = Status(DONE, 1.0, f"{trained}; {self.published}")
        else:  # training worked: report DONE, with why the model is not in the list yet
            why = next((m.group(1).strip() for ln in reversed(proc.tail) if (m := _ERROR.search(ln))),
                       proc.tail[-1] if proc.tail else f"exit code {proc.returncode}")
            self.status = Status(DONE, 1.0, f"{trained}; publishing failed ({why}); the model package is in "
                                            f"{self.package_path}")
        return self.status

    def _take(self, records: list[dict]) -> None:
        for rec in records:
            self.records.append(rec)
            self.latest.update({k: v for k, v in rec.items() if v is not None})
            frac = None
            if rec.get("total_steps") and rec.get("step") is not None:
                frac = rec["step"] / rec["total_steps"]
            elif rec.get("total_epochs") and rec.get("epoch") is not None:
                frac = rec["epoch"] / rec["total_epochs"]
            if frac is not None:
                self.status.fraction = max(0.0, min(1.0, float(frac)))
            self.status.message = format_metrics(rec)

    @property
    def package_path(self) -> Path | None:
        """The model package the finished run wrote, if any."""
        for rec in reversed(self.records):
            if rec.get("event") == "done" and rec.get("package"):
                return Path(rec["package"])
        return None

    def stop(self, grace: float = 10.0) -> None:
        """Stop training (the trainer's checkpoint lets ``--resume`` continue later) or publishing."""
        if self._process is not None and self.running:
            self._process.kill(grace=grace)
            if self._phase == "publish":
                self.status = Status(CANCELLED, 1.0, f"publishing stopped; the model package is in "
                                                     f"{self.package_path}")
                return
            self._take(self._tail.flush())
            self.status = Status(CANCELLED, self.status.fraction,
                                 f"training stopped; `lumbarseg-train ... --out {self.output} --resume` continues it")


# =========================================================================== the module's logic
class ModuleLogic:
    """Everything the Slicer module does, given the scene and the Segmentations logic.

    The module's ``LumbarSegmentLogic`` builds one with ``slicer.mrmlScene`` and
    ``slicer.modules.segmentations.logic()``; tests build one on a standalone scene.
    Controllers and the dependency installer are injectable.
    """

    def __init__(self, scene, seg_logic, *, segmenter: SegmentController | None = None,
                 trainer: RetrainController | None = None, installer=None, registries=None):
        self.scene = scene
        self.seg_logic = seg_logic
        self.segmenter = segmenter or SegmentController()
        self.trainer = trainer or RetrainController()
        self.installer = installer
        self.registries = registries
        self._volume_node = None
        self._update_node = None

    # --- models -------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """``(label, ref)`` for every installed model, the default first; no crash on a broken registry."""
        from .packages import PackageError, default_registries

        rows, default = [], None
        for reg in (self.registries if self.registries is not None else default_registries()):
            try:
                default = default or reg.default_ref()
                for p in reg.packages():
                    label = f"{p.ref} ({p.manifest['architecture'].get('variant', '?')}, {p.schema.name})"
                    rows.append((label, p.ref))
            except (PackageError, OSError, ValueError):
                continue
        rows.sort(key=lambda r: r[1] != default)
        return rows

    def ensure_dependencies(self, confirm: Callable[[str], bool]):
        """Install missing packages after asking (see ``slicer_deps``); returns the InstallResult."""
        from .slicer_deps import DependencyInstaller

        installer = self.installer or DependencyInstaller(confirm=confirm)
        if installer.confirm is None:
            installer.confirm = confirm
        return installer.ensure()

    # --- segmentation ---------------------------------------------------------------------
    def start_segmentation(self, volume_node, request: SegmentRequest, update_node=None) -> list[str]:
        """Check the input and launch the run; returns orientation notes to show the user."""
        from . import mrml
        from .geometry import axis_codes, sagittal_layout

        volume = mrml.node_to_volume(volume_node, apply_transform=False)  # the frame mrml works in
        layout = sagittal_layout(volume, allow_reslice=request.allow_reslice)  # OrientationError: clear message
        notes = []
        if layout.resliced:
            notes.append("not a sagittal stack: sagittal slices are cut from it (coarse in-plane resolution)")
        if layout.obliquity_deg > 5:
            notes.append(f"the stack is tilted {layout.obliquity_deg:.0f} degrees off sagittal "
                         f"(orientation {axis_codes(volume.direction)})")
        self._volume_node, self._update_node = volume_node, update_node
        self.segmenter.start(volume, request)
        return notes

    def poll_segmentation(self) -> Status:
        return self.segmenter.poll()

    def cancel_segmentation(self) -> None:
        self.segmenter.cancel()

    def finish_segmentation(self):
        """Turn the finished run into a segmentation node (new, or the update of an existing one).

        Returns ``(segmentation node, info)`` where ``info`` holds the run report and,
        in update mode, which segments were re-drafted or kept.
        """
        from . import mrml

        run = self.segmenter.result()
        info = {"report": run.report}
        if self._update_node is not None:
            info["update"] = mrml.update_unedited_segments(
                self.scene, self.seg_logic, self._update_node, run.labels, run.schema, self._volume_node,
                model_ref=run.model_ref, model_sha256=run.model_sha256)
            seg_node = self._update_node
        else:
            seg_node = mrml.labels_to_segmentation(self.scene, self.seg_logic, run.labels, run.schema,
                                                   self._volume_node, model_ref=run.model_ref,
                                                   model_sha256=run.model_sha256, report=run.report)
        if run.confidence is not None:
            info["confidence_node"] = mrml.volume_to_node(self.scene, run.confidence,
                                                          f"{self._volume_node.GetName()} confidence")
        kept = info.get("update", {}).get("kept")
        info["summary"] = (f"Done: {seg_node.GetName()} ({len(mrml.segment_ids(seg_node))} segments, "
                           f"{run.report.get('timings_s', {}).get('total', 0):.1f} s on {run.report.get('device')})"
                           + (f"; your edits were kept: {', '.join(kept)}" if kept else ""))
        return seg_node, info

    def segment(self, volume_node, request: SegmentRequest | None = None, *, update_node=None,
                timeout: float | None = None, progress: Callable[[Status], None] | None = None):
        """Blocking: segment ``volume_node`` and return ``(segmentation node, info)``."""
        request = request or SegmentRequest()
        self.start_segmentation(volume_node, request, update_node)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll_segmentation().finished:
            if progress:
                progress(self.segmenter.status)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel_segmentation()
                raise ControllerError(f"the segmentation did not finish within {timeout:.0f} s")
            time.sleep(0.1)
        return self.finish_segmentation()

    # --- export ---------------------------------------------------------------------------
    def export(self, volume_node, seg_node, dataset_folder, case_id: str, *, annotated_structures=None,
               schema=None):
        """Write a training case (see ``mrml.export_case``); the schema is the one the node was drafted with."""
        from . import mrml
        from .packages import resolve_model

        schema = schema or mrml.schema_of_node(seg_node)
        if schema is None:
            schema = resolve_model(None, self.registries).schema
        return mrml.export_case(self.scene, self.seg_logic, volume_node, seg_node, schema, dataset_folder,
                                case_id, annotated_structures=annotated_structures)

    def edited_structures(self, seg_node) -> list[str]:
        from . import mrml

        return mrml.edited_segments(seg_node)

    # --- retraining -----------------------------------------------------------------------
    def start_retrain(self, dataset_folder, output_folder=None, extra_args: Sequence[str] = (),
                      base_model: str | None = None) -> Path:
        """Fine-tune ``base_model`` (or train from scratch) on a dataset folder; returns the run folder."""
        if output_folder is None:
            from .packages import user_registry_root

            stamp = time.strftime("%Y%m%d-%H%M%S")
            output_folder = user_registry_root().parent / "training" / f"run-{stamp}"
        self.trainer.start(dataset_folder, output_folder, extra_args, base_model=base_model)
        return Path(output_folder)

    def poll_retrain(self) -> Status:
        """Poll training (then publishing: see :class:`RetrainController`)."""
        return self.trainer.poll()

    def stop_retrain(self) -> None:
        self.trainer.stop()


def self_test_loop(core: ModuleLogic, folder, *, use_model: bool = True, timeout: float = 600):
    """The whole loop on a synthetic sagittal volume: draft, edit one segment, export, read back.

    Drafts with the default model when one is installed (and it finds something), else
    with a synthetic label map. Used by the module's self-test and by the unit tests.
    """
    import numpy as np

    from . import mrml
    from .cases import read_case
    from .schema import load_schema
    from .volume import Volume

    rng = np.random.default_rng(0)
    volume = Volume((rng.random((64, 64, 12)) * 100).astype(np.int16), spacing=(1.0, 1.0, 3.0),
                    direction=np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]))
    node = mrml.volume_to_node(core.scene, volume, "synthetic sagittal")
    seg = None
    if use_model and core.model_choices():
        seg, _ = core.segment(node, SegmentRequest(device="cpu"), timeout=timeout)
    if seg is None or not mrml.segment_ids(seg):  # no model, or it found nothing in noise
        labels = np.zeros(volume.shape, np.uint8)
        labels[10:30, 10:30, 4:8], labels[35:40, 10:30, 4:8] = 1, 2
        seg = mrml.labels_to_segmentation(core.scene, core.seg_logic, volume.with_array(labels),
                                          load_schema("starter"), node)
    first = mrml.segment_ids(seg)[0]
    mask = mrml.segment_mask(seg, first, node)
    mask[0, 0, 0] = not mask[0, 0, 0]
    mrml.set_segment_mask(core.seg_logic, seg, first, mask, node)
    if mrml.edited_segments(seg) != [first]:
        raise AssertionError(f"edit tracking failed: {mrml.edited_segments(seg)} instead of [{first!r}]")
    case = core.export(node, seg, folder, "selftest")
    back = read_case(case.json_path)
    if back.extra.get("edited_structures") != [first]:
        raise AssertionError(f"the exported case records edits {back.extra.get('edited_structures')}")
    return back


__all__ = ["ModuleLogic", "self_test_loop", "SegmentController", "SegmentRequest", "SegmentRun", "RetrainController", "JsonLinesTail",
           "BackgroundProcess", "kill_process_tree", "parse_progress", "format_metrics", "Status",
           "ControllerError", "popen_runner", "child_environment", "python_executable", "train_command",
           "publish_command", "segment_command"]
