"""Click to fix as the Slicer panel drives it (LumbarSegmentLib/slicer/click_tool.py), on a real MRML scene.

What the Qt shell does with a left click in a slice view: the view's XY-to-RAS matrix and the pixel,
the selected segment and the sign go to ``ModuleLogic.clicks.click_in_view``; the export records the
effort ledger. No Qt, no desktop Slicer: a slice node of the scene supplies the matrix.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_refine import background_model, lps, phantom, truth_of

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.slicer import mrml  # noqa: E402
from LumbarSegmentLib.slicer.click_tool import EFFORT_ATTR, ClickToolError, view_xy_to_lps  # noqa: E402
from LumbarSegmentLib.slicer.logic import ModuleLogic  # noqa: E402


@pytest.fixture
def case():
    """The module logic on a phantom whose draft stops 5 slices short of the body, and the click tool on."""
    ctx = mrml.MRMLContext.standalone()
    core = ModuleLogic(ctx.scene, ctx.seg_logic, registries=[])
    vol = phantom()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    draft = truth_of(vol)
    draft[11:16] = 0
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(draft), load_schema("starter"), node)
    assert core.clicks.start(node, seg, background_model()) == ["vertebral_body", "intervertebral_disc"]
    yield core, vol, node, seg, draft


def _slice_matrix_through(point_lps):
    """An XY-to-RAS matrix of a sagittal slice view whose pixel (0, 0) lies on ``point_lps`` (0.5 mm pixels)."""
    r, a, s = -point_lps[0], -point_lps[1], point_lps[2]
    return np.array([[0, 0, 1.0, r], [-0.5, 0, 0, a], [0, 0.5, 0, s], [0, 0, 0, 1.0]])


def test_a_left_click_in_a_view_fixes_the_selected_segments_structure_and_is_counted(case):
    core, vol, node, seg, draft = case
    body = next(sid for sid, c in mrml.segment_classes(seg, load_schema("starter")).items() if c.id == "vertebral_body")
    xy = _slice_matrix_through(lps(vol, 13, 17, 20))
    changed = core.clicks.click_in_view(xy, 0, 0, body, "+", now=10.0)
    assert changed == 5 * 16 * 20
    labels = mrml.segmentation_to_labels(core.scene, core.seg_logic, seg, node, load_schema("starter")).array
    assert np.array_equal(labels, truth_of(vol))
    assert core.clicks.clicks_in_history == 1
    assert json.loads(seg.GetAttribute(EFFORT_ATTR))["clicks"] == 1  # kept on the node: a saved scene has it
    assert core.clicks.undo() and not core.clicks.undo()
    back = mrml.segmentation_to_labels(core.scene, core.seg_logic, seg, node, load_schema("starter")).array
    assert np.array_equal(back, draft)
    assert core.clicks.effort(seg)["clicks"] == 1 and core.clicks.effort(seg)["voxels_by_clicks"] == changed


def test_the_export_records_the_clicks(case, tmp_path):
    core, vol, node, seg, _ = case
    core.clicks.click(lps(vol, 13, 17, 20), "vertebral_body", True, now=0.0)
    core.clicks.click(lps(vol, 17, 17, 20), "vertebral_body", False, now=4.0)  # nothing there to remove
    exported = core.export(node, seg, tmp_path, "case1")
    effort = exported.extra["effort"]
    assert effort == {"clicks": 2, "voxels_painted": 0, "voxels_erased": 0, "voxels_by_clicks": 5 * 16 * 20,
                      "active_seconds": 4.0}
    assert "vertebral_body" in exported.extra["edited_structures"]


def test_a_segmentation_never_clicked_on_exports_a_record_of_zeros(tmp_path):
    ctx = mrml.MRMLContext.standalone()
    core = ModuleLogic(ctx.scene, ctx.seg_logic, registries=[])
    vol = phantom()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(truth_of(vol)),
                                      load_schema("starter"), node)
    assert core.export(node, seg, tmp_path, "case2").extra["effort"] == {
        "clicks": 0, "voxels_painted": 0, "voxels_erased": 0, "voxels_by_clicks": 0, "active_seconds": 0.0}


@pytest.mark.parametrize("call, msg", [
    (lambda t, p: t.click(p, "spinal_canal", True), "not a structure the model labels"),
    (lambda t, p: t.click(p, ["vertebral_body"], True), "not a structure the model labels"),
    (lambda t, p: t.click(p, "vertebral_body", "yes"), r"is not \+ "),
    (lambda t, p: t.click(p, "vertebral_body", 1), r"is not \+ "),
    (lambda t, p: t.click((0.0, float("nan"), 0.0), "vertebral_body", True), "three finite numbers"),
    (lambda t, p: t.click("abc", "vertebral_body", True), "three"),
    (lambda t, p: t.click_in_view(np.eye(4), 0, 0, "no-such-segment", True), "select a segment"),
])
def test_anything_else_is_refused_and_changes_nothing(case, call, msg):
    core, vol, node, seg, draft = case
    with pytest.raises(ClickToolError, match=msg):
        call(core.clicks, lps(vol, 13, 17, 20))
    labels = mrml.segmentation_to_labels(core.scene, core.seg_logic, seg, node, load_schema("starter")).array
    assert np.array_equal(labels, draft) and core.clicks.effort(seg)["clicks"] == 0


def test_a_click_lands_in_the_volumes_own_frame_under_a_transform(case):
    """The view shows the transformed volume; the click must reach the voxel the annotator sees."""
    core, vol, node, seg, _ = case
    tnode = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk

    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 25.0)  # 25 mm to the right
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    target = lps(vol, 13, 17, 20)
    seen = np.array([-target[0] + 25.0, -target[1], target[2]])  # where it shows, in world RAS
    xy = np.eye(4)
    xy[:3, 3] = seen
    assert np.allclose(view_xy_to_lps(xy, 0, 0, node), target)


def test_switching_cases_drops_the_warm_tool_but_not_the_ledger(case):
    core, vol, node, seg, _ = case
    core.clicks.click(lps(vol, 13, 17, 20), "vertebral_body", True, now=0.0)
    core.clicks.stop()
    assert not core.clicks.active
    with pytest.raises(ClickToolError, match="not on"):
        core.clicks.click(lps(vol, 13, 17, 20), "vertebral_body", True)
    assert core.clicks.effort(seg)["clicks"] == 1
