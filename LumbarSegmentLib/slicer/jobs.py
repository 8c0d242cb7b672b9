"""Background jobs for the Slicer module: child processes, their command lines, their status. No Qt.

Why child processes rather than threads:

* **Cancel is immediate and complete.** PyTorch kernels cannot be interrupted from
  another thread; killing the child's whole process tree stops work at once and
  returns every byte of CPU/GPU memory to the system.
* **Slicer stays responsive.** Inference and training never hold the application's GIL,
  and a crash inside a native library (a CUDA driver error, out of memory) ends the
  child, not Slicer.
* **One code path.** The children are the command-line tools users script with
  (``lumbarseg segment``, ``lumbarseg-train``), with the same validation and atomic outputs.

How the parent follows a child, without a reader thread: the child's output goes to a
log file and its progress to a JSON-lines file (``LumbarSegmentLib.core.progress``), and the
module's ``QTimer`` calls ``poll()``, which reads whatever is new. Inside Slicer the main
thread holds the GIL while idle in the Qt loop, so a Python thread draining a pipe is
starved (progress stalls, and a full pipe blocks the child); files need no thread, no Qt,
and outlive the panel, so a reloaded module can reattach to a running job.

The process runner is injectable (``runner=``): a callable ``(argv, env, output)``, where
``output`` is the binary file the child's stdout and stderr go to, returning a
``subprocess.Popen``-like object.
"""
from __future__ import annotations

import codecs
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from LumbarSegmentLib.core.progress import PROGRESS_ENV

LIB_DIR = Path(__file__).resolve().parents[1]  # LumbarSegmentLib/
LIB_PARENT = LIB_DIR.parent  # holds LumbarSegmentLib

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
ERROR_LINE = re.compile(r"(?:^|\s|\])(?:lumbarseg(?:-train)?(?: \w+)?: )?error: (.*)$")
WARNING_LINE = re.compile(r"(?:^|\s|\])warning: (.*)$")


class ControllerError(RuntimeError):
    """A background run could not start, failed, or was cancelled."""


@dataclass
class Status:
    state: str = IDLE
    fraction: float | None = None  # 0..1, None = unknown
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    def to_dict(self) -> dict:
        """Plain JSON types, for a page's state (the warnings list is a copy)."""
        return {"state": self.state, "fraction": self.fraction, "message": self.message,
                "warnings": list(self.warnings)}


class JobTimeout(ControllerError):
    """A job waited for did not finish in time (it was cancelled)."""


class Signal:
    """A list of callbacks, each called with the job's :class:`Status`: enough for a panel or a page to
    follow a job without polling it itself, and no Qt (the Lib imports none)."""

    def __init__(self):
        self._slots: list[Callable] = []

    def connect(self, slot: Callable) -> Callable:
        self._slots.append(slot)
        return slot

    def disconnect(self, slot: Callable) -> None:
        with contextlib.suppress(ValueError):
            self._slots.remove(slot)

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            slot(*args)


def wait_for(poll: Callable[[], Status], *, timeout: float | None = None, interval: float = 0.1,
             progress: Callable[[Status], None] | None = None, on_timeout: Callable[[], None] | None = None,
             finished: Callable[[Status], bool] = lambda st: st.finished, what: str = "the job") -> Status:
    """The one blocking poll loop (scripts, tests, the blocking helpers of both front ends): call ``poll``
    every ``interval`` seconds until ``finished``, showing each status to ``progress`` (the last one too);
    past ``timeout`` seconds ``on_timeout`` runs (a cancel) and :class:`JobTimeout` is raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = poll()
        if finished(status):
            break
        if progress:
            progress(status)
        if deadline is not None and time.monotonic() > deadline:
            if on_timeout is not None:
                on_timeout()
            raise JobTimeout(f"{what} did not finish within {timeout:.0f} s")
        time.sleep(interval)
    if progress:
        progress(status)
    return status


class Job:
    """What every background job offers: :attr:`status` (one :class:`Status`), :meth:`poll` (read what
    is new, from the caller's timer), :meth:`cancel`, :meth:`wait` (block until it ends), and two
    :class:`Signal` lists, ``on_progress`` (each change of the status) and ``on_finish`` (its end).

    A job advances only when polled, so callbacks run on the poller's thread (the Qt main thread in
    Slicer, the event loop in the browser app): no locking anywhere. Subclasses implement
    :meth:`_advance` and :meth:`cancel`; :meth:`_announce` tells the callbacks what changed."""

    what = "the job"  # how a timeout message names it

    def __init__(self):
        self.status = Status()
        self.on_progress = Signal()
        self.on_finish = Signal()
        self._said: tuple | None = None

    @property
    def running(self) -> bool:
        return self.status.state == RUNNING

    def poll(self) -> Status:
        """Read the job's new output and events; returns (and keeps) its status."""
        self._advance()
        self._announce()
        return self.status

    def _advance(self) -> None:  # pragma: no cover - every job has its own
        raise NotImplementedError

    def cancel(self) -> None:  # pragma: no cover - every job has its own
        raise NotImplementedError

    def wait(self, timeout: float | None = None, *, interval: float = 0.1,
             progress: Callable[[Status], None] | None = None) -> Status:
        """Block until the job ends; past ``timeout`` it is cancelled and :class:`JobTimeout` raised. An
        interrupt (Ctrl-C in a script) cancels it too: a job nobody follows must not run on."""
        try:
            return wait_for(self.poll, timeout=timeout, interval=interval, progress=progress,
                            on_timeout=self.cancel, what=self.what)
        except BaseException:
            if self.running:
                self.cancel()
            raise

    def _announce(self) -> None:
        status = self.status
        seen = (status.state, status.fraction, status.message, len(status.warnings))
        if seen == self._said:
            return
        self._said = seen
        self.on_progress.emit(status)
        if status.finished:
            self.on_finish.emit(status)


# =========================================================================== command lines
def child_command(python: str, module: str, subcommand: str, positional: Sequence = (), **options) -> list[str]:
    """The one way a command line for a child is built: ``python -m MODULE SUBCOMMAND POS... --opt value``.

    ``options`` map to ``--option-name``: ``None``/``False`` are left out, ``True`` is a bare
    flag, a list or tuple is joined with commas (the CLIs' list syntax), a value with a
    ``to_argv()`` (``SegmentOptions``) gives its own flags, anything else is ``str()``-ed. The
    tests parse every command built here with the target CLI's own ``argparse`` parser, so a
    renamed option fails a test rather than a user's run.
    """
    argv = [python, "-m", module, subcommand, *map(str, positional)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        if hasattr(value, "to_argv"):
            argv += value.to_argv()
            continue
        flag = "--" + key.rstrip("_").replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


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


def child_environment(extra: dict | None = None, progress_file: str | os.PathLike | None = None) -> dict:
    """This process's environment plus: the Lib importable, unbuffered output, the progress file to write."""
    env = dict(os.environ)
    paths = [str(LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env.pop(PROGRESS_ENV, None)
    if progress_file is not None:
        env[PROGRESS_ENV] = str(progress_file)
    env.update(extra or {})
    return env


def popen_runner(argv: Sequence[str], env: dict, output):
    """Start ``argv`` in a new session (it survives the panel; killed as a tree), output into ``output``."""
    kwargs = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=output,
                            stderr=subprocess.STDOUT, **kwargs)


def descendants(pid: int) -> list[int]:
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


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def kill_process_tree(proc, *, grace: float = 3.0) -> None:
    """End ``proc`` and every process it started: SIGTERM to the group, SIGKILL after ``grace`` seconds.

    Children that left the process group (a daemon, say) are found by parentage and
    killed too. On Windows ``taskkill /T /F`` does the same. ``proc`` may be a
    :class:`PidHandle` (a job reattached after a module reload).
    """
    pid = proc.pid
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True)
        with contextlib.suppress(Exception):
            proc.wait(timeout=grace)
        return
    family = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    for p in [pid] + family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in [pid] + family + descendants(pid):
        if alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


class PidHandle:
    """A ``Popen``-like view of a process this one did not start (a reattached job): poll by pid."""

    def __init__(self, pid: int):
        self.pid = int(pid)

    def poll(self) -> int | None:
        return None if alive(self.pid) else 0  # its exit code is not ours to read: the progress log tells

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return 0


class BackgroundProcess:
    """A child process whose output goes to a log file that :meth:`new_lines` reads from a timer.

    Output is split into lines at ``\\n`` and at ``\\r`` (a progress bar redraws its line
    with ``\\r``); the text after the last break, still being written, is in ``partial``.
    """

    def __init__(self, argv: Sequence[str], *, output: str | os.PathLike, env: dict | None = None,
                 runner: Callable | None = None, proc=None):
        self.argv = list(argv)
        self.output = Path(output)
        self.tail: list[str] = []  # last lines, for error messages
        self.partial = ""
        self._pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if proc is not None:  # reattach to a running process
            self.proc = proc
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab") as out:  # the child keeps its own handle; ours closes now
            self.proc = (runner or popen_runner)(self.argv, env if env is not None else child_environment(), out)

    def new_lines(self) -> list[str]:
        try:
            with open(self.output, "rb") as f:
                f.seek(self._pos)
                data = f.read()
                self._pos = f.tell()
        except FileNotFoundError:
            return []
        text = self.partial + self._decoder.decode(data)
        *complete, self.partial = re.split(r"\r\n|\r|\n", text)
        for line in complete:
            if line.strip():
                self.tail = (self.tail + [line])[-40:]
        return complete

    def remaining_lines(self) -> list[str]:
        """After the child ended: everything still unread, the unterminated last line included."""
        out = self.new_lines()
        if self.partial:
            out.append(self.partial)
            if self.partial.strip():
                self.tail = (self.tail + [self.partial])[-40:]
            self.partial = ""
        return out

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def kill(self, grace: float = 3.0) -> None:
        if self.proc.poll() is None:
            kill_process_tree(self.proc, grace=grace)


def error_in(lines: Sequence[str]) -> str | None:
    """The message of the last ``... error: MESSAGE`` line the CLIs print, if any."""
    for line in reversed(lines):
        m = ERROR_LINE.search(line)
        if m:
            return m.group(1).strip()
    return None
