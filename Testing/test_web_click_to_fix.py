"""Click to fix in the browser front end's session (no browser): a click in an offscreen slice view,
the structure from the selected segment, Undo click, the ledger in the draft and in the export,
and what the page may not send. Same synthetic cases and offscreen view as test_web_session.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentWeb import missing_dependency

why = missing_dependency()
if why:
    pytest.skip(f"browser front end not installed: {why}", allow_module_level=True)

from test_refine import background_model  # noqa: E402
from test_web_session import VIEW_H, VIEW_W, session  # noqa: E402,F401

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.slicer import mrml  # noqa: E402
from LumbarSegmentWeb.session_core import SessionError  # noqa: E402


def _open_with_draft(s, case_id="caseA"):
    """Open a case and give it a drafted body in a corner of the slices, away from the view's centre."""
    s.load_case(case_id)
    vol = mrml.node_to_volume(s.volume_node, apply_transform=False)
    labels = np.zeros(vol.shape, np.uint8)
    labels[:8, :8, :] = 1
    seg = mrml.labels_to_segmentation(s.app.scene, s.app.segmentations_logic, vol.with_array(labels),
                                      load_schema("starter"), s.volume_node)
    s._activate(seg)
    s.select_segment("vertebral_body")
    return int(labels.sum())


def _centre_click(s, sign):
    view = s.test_view
    view.fit_view_to_content()
    view.render()
    return s.click_in_view(view, VIEW_W // 2, VIEW_H // 2, sign)


def test_a_click_in_the_view_fixes_the_selected_structure_undo_and_ledger(session):
    drafted = _open_with_draft(session)
    assert session.start_clicks(background_model()) == ["vertebral_body", "intervertebral_disc"]
    changed = _centre_click(session, "+")
    assert changed > 0
    assert session.voxel_count("vertebral_body") == drafted + changed  # a positive click only adds here
    assert session.click_effort() == {"clicks": 1, "voxels_by_clicks": changed, "undoable": 1}
    assert session.undo_click() and not session.undo_click()
    assert session.voxel_count("vertebral_body") == drafted
    assert session.click_effort()["clicks"] == 1  # effort spent stays counted

    _centre_click(session, "+")
    result = session.export()
    import json

    case = json.loads(open(result["json"]).read())
    assert case["effort"]["clicks"] == 2 and case["effort"]["voxels_by_clicks"] == 2 * changed


def test_the_ledger_goes_with_the_draft_and_another_case_drops_the_model(session):
    _open_with_draft(session)
    session.start_clicks(background_model())
    _centre_click(session, "+")
    session.load_case("caseB")  # saves caseA's draft, with its ledger
    assert not session.clicking and session.click_effort()["clicks"] == 0
    session.load_case("caseA")
    assert session.click_effort() == {"clicks": 1, "voxels_by_clicks": session.click_effort()["voxels_by_clicks"],
                                      "undoable": 0}
    assert session.worklist.read_info("caseA")["effort"]["clicks"] == 1


@pytest.mark.parametrize("sign", ["plus", "", None, 1, ["+"], "+ "])
def test_a_forged_sign_is_refused_before_anything_runs(session, sign):
    _open_with_draft(session)
    session.start_clicks(background_model())
    before = session.voxel_count("vertebral_body")
    with pytest.raises(ValueError, match=r"is not \+"):
        _centre_click(session, sign)
    assert session.voxel_count("vertebral_body") == before and session.click_effort()["clicks"] == 0


def test_a_segment_the_model_does_not_label_is_refused(session):
    _open_with_draft(session)
    session.start_clicks(background_model())
    session.select_segment("no-such-segment")  # the page sends any id it likes
    with pytest.raises(ValueError, match="select a segment of one of vertebral_body, intervertebral_disc"):
        _centre_click(session, "+")
    other = session.add_segment("my notes")  # a segment of no structure of the model: named in the refusal
    session.select_segment(other)
    with pytest.raises(ValueError, match="'my notes'.*does not match any structure"):
        _centre_click(session, "+")
    assert session.click_effort()["clicks"] == 0


def test_click_to_fix_needs_a_segmentation(session):
    session.load_case("caseA")
    with pytest.raises(SessionError, match="needs a segmentation"):
        session.start_clicks(background_model())
