"""The warm segmentation worker: drafts in one long-lived process, the command's own results, cancel by kill."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from LumbarSegmentLib.slicer.jobs import DONE, FAILED, alive
from LumbarSegmentLib.slicer.segment_job import SegmentController, SegmentRequest
from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.slicer.worker_client import WarmWorker

SAGITTAL = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])  # i -> P, j -> I, k -> L


def smooth_volume(shift: int = 0) -> Volume:
    k, j, i = np.meshgrid(np.arange(5), np.arange(40), np.arange(32), indexing="ij")  # smooth: not "noise"
    a = (50 + 45 * np.sin((j + shift) / 5.0) * np.cos(i / 7.0) + k).astype(np.int16)
    return Volume(a, spacing=(1.0, 1.0, 3.0), origin=(5.0, -2.0, 40.0), direction=SAGITTAL)


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def worker(tmp_path):
    w = WarmWorker(preload=None, threads=1, workdir_parent=str(tmp_path))
    yield w
    w.close()


def test_drafts_share_one_warm_process_and_match_the_engine(worker, tiny_package, tmp_path):
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume

    ctl = SegmentController(worker=worker, workdir_parent=str(tmp_path))
    request = SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1)
    runs = []
    for shift in (0, 3):
        runs.append(ctl.run(smooth_volume(shift), request, timeout=300, interval=0.02))
        assert ctl.status.state == DONE and ctl.status.fraction == 1.0
    assert worker.starts == 1 and worker.alive, "the second draft must reuse the first draft's process"
    from LumbarSegmentLib.cli.worker import draft_runtime

    opts = SegmentOptions(device="cpu", threads=1, runtime=draft_runtime("auto"))  # the worker's, for this machine
    for shift, run in zip((0, 3), runs):  # the worker runs the command's own path: the engine's labels
        direct = segment_volume(smooth_volume(shift), [tiny_package], opts)
        np.testing.assert_array_equal(run.labels.array, direct.labels.array)
        assert run.report["models"][0]["sha256"] == tiny_package.sha256
    assert not list(tmp_path.glob("lumbarseg-run-*")), "each draft's temporary folder is removed"


def test_a_bad_request_fails_that_draft_only(worker, tiny_package, tmp_path):
    ctl = SegmentController(worker=worker, workdir_parent=str(tmp_path))
    bad = SegmentRequest.of(models=[str(tmp_path / "no-such-model")], device="cpu", threads=1)
    ctl.start(smooth_volume(), bad)
    wait_until(lambda: ctl.poll().finished)
    assert ctl.status.state == FAILED and "no-such-model" in ctl.status.message
    assert "Traceback" not in ctl.status.message
    good = SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1)
    ctl.run(smooth_volume(), good, timeout=300, interval=0.02)
    assert ctl.status.state == DONE and worker.starts == 1


def test_cancel_kills_the_worker_and_the_next_draft_starts_another(worker, tiny_package, tmp_path):
    ctl = SegmentController(worker=worker, workdir_parent=str(tmp_path))
    request = SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1)
    ctl.start(smooth_volume(), request)
    pid = worker.pid
    ctl.cancel()
    assert ctl.status.state == "cancelled" and not worker.alive
    wait_until(lambda: not alive(pid), timeout=10)
    ctl.run(smooth_volume(), request, timeout=300, interval=0.02)
    assert ctl.status.state == DONE and worker.starts == 2


def test_the_worker_retires_at_its_memory_bound(tiny_package, tmp_path):
    """--max-rss-mb: after a job over the bound the worker exits cleanly; the client starts a new one."""
    w = WarmWorker(preload=None, threads=1, max_rss_mb=1, workdir_parent=str(tmp_path))  # every job is over 1 MB
    try:
        ctl = SegmentController(worker=w, workdir_parent=str(tmp_path))
        request = SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1)
        ctl.run(smooth_volume(), request, timeout=300, interval=0.02)
        wait_until(lambda: not w.alive, timeout=30)
        ctl.run(smooth_volume(1), request, timeout=300, interval=0.02)
        assert ctl.status.state == DONE and w.starts == 2
    finally:
        w.close()


def test_worker_protocol_events(tiny_package, tmp_path):
    """The request/answer contract on its own: JSON lines in, done/error events in the progress file."""
    import subprocess

    from LumbarSegmentLib.formats.io import write_volume
    from LumbarSegmentLib.slicer.jobs import child_environment
    from LumbarSegmentLib.core.progress import JsonLinesTail

    src = write_volume(smooth_volume(), tmp_path / "in.nrrd")
    progress = tmp_path / "p.jsonl"
    reqs = [{"job": "a", "argv": ["segment", str(src), "-o", str(tmp_path / "out.nrrd"), "--report",
                                  str(tmp_path / "r.json"), "--model", str(tiny_package.path), "--device", "cpu",
                                  "--no-progress"], "progress": str(progress)},
            {"job": "b", "argv": ["models"], "progress": str(progress)},
            {"op": "quit"}]
    stdin = "".join(json.dumps(r) + "\n" for r in reqs)
    proc = subprocess.run([sys.executable, "-m", "LumbarSegmentLib.cli.worker", "serve", "--threads", "1"], input=stdin,
                          capture_output=True, text=True, env=child_environment(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = JsonLinesTail(progress).flush()
    ends = [e for e in events if e["event"] in ("done", "error")]
    assert [(e["event"], e["job"]) for e in ends] == [("done", "a"), ("error", "b")]
    assert any(e["event"] == "batch" for e in events)
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["sha256"] == tiny_package.sha256
    assert (tmp_path / "out.nrrd").is_file() and ends[0]["rss_mb"] > 0 and ends[0]["retiring"] is False
