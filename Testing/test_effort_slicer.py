"""The effort ledger of a case edited in Slicer (LumbarSegmentLib/slicer/effort_watch.py), on a real MRML scene.

Hand edits are what Slicer's Segment Editor leaves behind: segment masks written into the segmentation
node, which fire the node's segmentation events. The clock is the click tool's, set by the test.
"""
from __future__ import annotations

import numpy as np
import pytest

from test_refine import background_model, lps, phantom, truth_of

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.slicer import mrml  # noqa: E402
from LumbarSegmentLib.slicer.logic import ModuleLogic  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scene():
    ctx = mrml.MRMLContext.standalone()
    core = ModuleLogic(ctx.scene, ctx.seg_logic, registries=[])
    core.clicks.clock = clock = Clock()
    vol = phantom()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    return core, clock, vol, node


def _edit(core, seg, node, sid, region, value: bool):
    mask = mrml.segment_mask(seg, sid, node)
    mask[region] = value
    mrml.set_segment_mask(core.seg_logic, seg, sid, mask, node)


def test_hand_edits_clicks_and_active_time_are_recorded_exactly(scene, tmp_path):
    core, clock, vol, node = scene
    draft = truth_of(vol)
    draft[11:16] = 0  # the body's last 5 slices are missing from the draft
    seg = mrml.labels_to_segmentation(core.scene, core.seg_logic, vol.with_array(draft), load_schema("starter"), node)
    core.watch(seg, node)  # the untouched draft becomes the reference of the hand edits

    seg.GetSegmentation().AddEmptySegment("intervertebral_disc", "intervertebral_disc")
    _edit(core, seg, node, "intervertebral_disc", np.s_[16:18, 12:20, 12:20], True)  # 128 painted at t=0
    clock.now = 10.0
    _edit(core, seg, node, "vertebral_body", np.s_[4:6, 10:26, 10:30], False)  # 640 erased
    clock.now = 100.0  # a 90 s pause: not active time
    _edit(core, seg, node, "vertebral_body", np.s_[6, 10, 10:30], False)  # 20 erased
    clock.now = 105.0
    core.clicks.start(node, seg, background_model())
    changed = core.clicks.click(lps(vol, 13, 17, 20), "vertebral_body", True)
    assert changed == 5 * 16 * 20
    clock.now = 110.0  # the disc painted over 40 voxels the click added: they count for the click only
    _edit(core, seg, node, "intervertebral_disc", np.s_[13, 10:12, 10:30], True)

    case = core.export(node, seg, tmp_path, "case1")
    assert case.extra["effort"] == {"clicks": 1, "voxels_painted": 128, "voxels_erased": 660,
                                    "voxels_by_clicks": 1600, "active_seconds": 20.0}
    assert core.export(node, seg, tmp_path, "case1").extra["effort"] == case.extra["effort"]  # not added twice


def test_an_untouched_draft_records_zeros_and_a_case_from_scratch_counts_against_an_empty_map(scene, tmp_path):
    core, clock, vol, node = scene
    seg = mrml.labels_to_segmentation(core.scene, core.seg_logic, vol.with_array(truth_of(vol)),
                                      load_schema("starter"), node)
    assert core.export(node, seg, tmp_path, "same").extra["effort"] == {
        "clicks": 0, "voxels_painted": 0, "voxels_erased": 0, "voxels_by_clicks": 0, "active_seconds": 0.0}

    blank = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by hand")
    blank.SetReferenceImageGeometryParameterFromVolumeNode(node)
    core.watch(blank, node)
    blank.GetSegmentation().AddEmptySegment("vertebral_body", "vertebral_body")
    clock.now = 30.0
    _edit(core, blank, node, "vertebral_body", np.s_[4:6, 10:20, 10:20], True)
    effort = core.export(node, blank, tmp_path, "scratch", schema=load_schema("starter")).extra["effort"]
    assert effort["voxels_painted"] == 200 and effort["voxels_erased"] == 0 and effort["active_seconds"] == 30.0
