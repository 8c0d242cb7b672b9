"""The front end's handle on a warm segmentation worker (``worker.py``): start, send, kill. No Qt.

The worker is a child process like every job (``jobs``): its output goes to a log file, it runs in
its own session and is killed as a process tree. What differs is that it lives on between drafts:
requests are written to its stdin (a write needs no reader thread, so this works from Slicer's
main-thread timer), answers come as events in each request's progress file, which the caller
already reads (``segment_job.SegmentController``). A worker that died, retired (memory or job
limit) or was killed to cancel a draft is started again by the next :meth:`submit`.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from LumbarSegmentLib.slicer.jobs import BackgroundProcess, ControllerError, child_command, child_environment, python_executable

WORKER_MODULE = "LumbarSegmentLib.cli.worker"


def _pipe_runner(argv: Sequence[str], env: dict, output):
    """Like ``jobs.popen_runner``, with a pipe on stdin for the requests."""
    kwargs = {"start_new_session": True} if os.name != "nt" else {
        "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return subprocess.Popen(list(argv), env=env, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                            **kwargs)


class WarmWorker:
    """One worker process, started on demand, kept between drafts; :meth:`kill` cancels whatever it runs."""

    def __init__(self, *, python: str | None = None, env: dict | None = None, preload: str | None = "",
                 max_rss_mb: float | None = None, max_jobs: int | None = None, threads: int | None = None,
                 workdir_parent: str | None = None, runtime: str | None = None):
        """``runtime``: what drafts that leave the runtime automatic run on (``worker.py serve --runtime``;
        None: the worker's own choice for the machine)."""
        from LumbarSegmentLib.inference.options import SegmentOptions

        SegmentOptions.options()["threads"].check(threads)  # refused here, not by a worker that fails to start
        self.python = python or python_executable()
        self.env = env
        self.argv = child_command(self.python, WORKER_MODULE, "serve", preload=preload if preload else None,
                                  max_rss_mb=max_rss_mb, max_jobs=max_jobs, threads=threads, runtime=runtime)
        if preload == "":  # a bare --preload: warm up the default model
            self.argv.append("--preload")
        self.workdir_parent = workdir_parent
        self.starts = 0  # how many processes were started (a test and the benchmark read it)
        self._process: BackgroundProcess | None = None
        self._ids = itertools.count(1)
        self._log_dir: Path | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.proc.pid if self.alive else None

    def start(self) -> None:
        """Start the process now (e.g. when a panel opens), so the first draft finds it warm."""
        if self.alive:
            return
        self._log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="lumbarseg-worker-", dir=self.workdir_parent))
        env = child_environment() if self.env is None else dict(self.env)
        try:
            self._process = BackgroundProcess(self.argv, output=self._log_dir / "worker.log", env=env,
                                              runner=_pipe_runner)
        except OSError as exc:
            raise ControllerError(f"could not start the segmentation worker ({self.argv[0]}): {exc}") from exc
        self.starts += 1

    def submit(self, argv: Sequence[str], progress: str | os.PathLike) -> str:
        """Send one ``segment`` command (``argv`` from ``"segment"`` on); returns the job id its events carry."""
        job = str(next(self._ids))
        line = json.dumps({"job": job, "argv": [str(a) for a in argv], "progress": str(progress)}) + "\n"
        for attempt in (0, 1):  # a worker that retired or died since the last draft: start another once
            self.start()
            try:
                stdin = self._process.proc.stdin
                stdin.write(line.encode("utf-8"))
                stdin.flush()
                return job
            except (BrokenPipeError, OSError, ValueError):
                self.kill()
                if attempt:
                    raise ControllerError("the segmentation worker could not take the request: "
                                          + self.last_output()) from None
        raise AssertionError("unreachable")

    def last_output(self) -> str:
        """The worker's last output line (for an error message when it died)."""
        if self._process is None:
            return "it was not started"
        self._process.remaining_lines() if not self.alive else self._process.new_lines()
        return self._process.tail[-1] if self._process.tail else "it exited without a message"

    def kill(self) -> None:
        """End the worker and anything it runs, at once (a cancel); the next submit starts a new one."""
        if self._process is not None:
            self._process.kill(grace=1.0)
            self._close_stdin()
            self._process = None

    def close(self) -> None:
        """Ask the worker to finish (end of stdin), then make sure it did."""
        if self._process is not None and self.alive:
            self._close_stdin()
            try:
                self._process.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _close_stdin(self) -> None:
        stdin = getattr(self._process.proc, "stdin", None) if self._process else None
        if stdin is not None:
            try:
                stdin.close()
            except OSError:
                pass
