"""``slicer.jobs.Job``: the one protocol of the background jobs (status, poll, cancel, wait, callbacks)
and ``wait_for``, the one blocking poll loop the segment job, the retrain job, the module logic and the
browser session share."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.slicer import jobs
from LumbarSegmentLib.slicer.jobs import CANCELLED, DONE, RUNNING, Job, JobTimeout, Status, wait_for
from LumbarSegmentLib.slicer.retrain_job import RetrainController
from LumbarSegmentLib.slicer.segment_job import SegmentController


class Steps(Job):
    """A job that advances one step per poll: running 0.5, then done."""

    what = "the steps"

    def __init__(self, steps):
        super().__init__()
        self.steps = list(steps)
        self.cancelled = False

    def _advance(self):
        if self.steps:
            self.status = self.steps.pop(0)

    def cancel(self):
        self.cancelled = True
        self.status = Status(CANCELLED, None, "cancelled")
        self._announce()


def test_callbacks_hear_each_change_once_and_the_end_once():
    job = Steps([Status(RUNNING, 0.5, "half"), Status(RUNNING, 0.5, "half"), Status(DONE, 1.0, "done")])
    heard, ended = [], []
    job.on_progress.connect(lambda st: heard.append(st.message))
    job.on_finish.connect(lambda st: ended.append(st.state))
    seen = []
    assert job.wait(5, interval=0, progress=lambda st: seen.append(st.fraction)).state == DONE
    job.poll()  # nothing new: nobody is told again
    assert heard == ["half", "done"] and ended == [DONE] and seen == [0.5, 0.5, 1.0]
    assert job.status.to_dict() == {"state": DONE, "fraction": 1.0, "message": "done", "warnings": []}


def test_wait_cancels_on_timeout_with_one_message():
    job = Steps([Status(RUNNING, None, "forever")])
    ended = []
    job.on_finish.connect(lambda st: ended.append(st.state))
    with pytest.raises(JobTimeout, match="the steps did not finish within 0 s"):
        job.wait(0, interval=0)
    assert job.cancelled and ended == [CANCELLED]
    assert issubclass(JobTimeout, jobs.ControllerError)  # callers that caught ControllerError still do


def test_wait_for_takes_any_poll_and_end_rule():
    states = iter(["running", "idle"])
    last = wait_for(lambda: Status(next(states)), finished=lambda st: st.state != RUNNING, interval=0)
    assert last.state == "idle"


def test_both_controllers_are_jobs(tmp_path):
    """The segment and retrain jobs answer the protocol: a finished child is heard by ``on_finish``."""
    from LumbarSegmentLib.dataset.cases import write_case

    seg, retrain = SegmentController(), RetrainController()
    assert isinstance(seg, Job) and isinstance(retrain, Job) and seg.status.state == retrain.status.state == "idle"
    vol = Volume(np.zeros((4, 8, 8), np.int16))
    lab = np.zeros(vol.shape, np.uint8)
    lab[1, 2:4, 2:4] = 1
    for i in range(3):
        write_case(tmp_path / "data", f"c{i}", vol, vol.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"])
    ctl = RetrainController(runner=lambda argv, env, out: jobs.popen_runner(["true"], env, out))
    ended = []
    ctl.on_finish.connect(lambda st: ended.append(st.state))
    ctl.start(tmp_path / "data", tmp_path / "run", base_model="x@1")
    assert ctl.wait(30, interval=0.05).state == CANCELLED  # ended without saying done
    assert ended == [CANCELLED] and "Resume" in ctl.status.message
