"""The effort ledger of a case edited in the browser front end's session (no browser): the brush and the
eraser on an offscreen slice view, a click to fix, the draft file, and the numbers the export records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from LumbarSegmentWeb import missing_dependency

why = missing_dependency()
if why:
    pytest.skip(f"browser front end not installed: {why}", allow_module_level=True)

from test_refine import background_model  # noqa: E402
from test_web_session import VIEW_H, VIEW_W, _click, _labels, session  # noqa: E402,F401

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.slicer import mrml  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_brush_eraser_and_click_are_recorded_exactly_and_survive_the_draft_file(session):
    clock = session.logic.clicks.clock = Clock()
    session.load_case("caseA")
    vol = mrml.node_to_volume(session.volume_node, apply_transform=False)
    draft = np.zeros(vol.shape, np.uint8)
    draft[:8, :8, :] = 1  # a body in a corner
    draft[14:34, 22:42, :] = 2  # a disc under the view's centre
    seg = mrml.labels_to_segmentation(session.app.scene, session.app.segmentations_logic, vol.with_array(draft),
                                      load_schema("starter"), session.volume_node)
    session._activate(seg)

    session.set_brush_mm(4.0)
    session.select_segment("intervertebral_disc")
    session.set_effect("erase")
    _click(session)  # t=0: a hole in the drafted disc
    clock.now = 5.0
    session.select_segment("vertebral_body")
    session.set_effect("paint")
    _click(session)  # the body painted into the hole
    body, disc = _labels(session, "vertebral_body"), _labels(session, "intervertebral_disc")
    painted = int((body & (draft != 1)).sum())
    erased = int(((draft == 2) & ~disc).sum())
    assert painted > 0 and erased > 0

    clock.now = 100.0  # a pause longer than a minute is not active time
    session.start_clicks(background_model())
    clock.now = 103.0
    session.test_view.render()
    changed = session.click_in_view(session.test_view, VIEW_W // 2 + 120, VIEW_H // 2, "+")  # beside the disc
    assert changed > 0
    clock.now = 110.0
    assert session.undo_click()  # the click's voxels go back to the draft; its effort stays spent
    clock.now = 115.0
    again = session.click_in_view(session.test_view, VIEW_W // 2 + 120, VIEW_H // 2, "+")  # these stay
    session.load_case("caseB")  # caseA's draft is saved with what its hand edits count from
    session.load_case("caseA")

    case = json.loads(open(session.export(force=True)["json"]).read())
    assert case["effort"] == {"clicks": 2, "voxels_painted": painted, "voxels_erased": erased,
                              "voxels_by_clicks": changed + again, "active_seconds": 17.0}


def test_an_untouched_draft_records_zeros(session):
    session.load_case("caseA")
    vol = mrml.node_to_volume(session.volume_node, apply_transform=False)
    draft = np.zeros(vol.shape, np.uint8)
    draft[:8, :8, :] = 1
    session._activate(mrml.labels_to_segmentation(session.app.scene, session.app.segmentations_logic,
                                                  vol.with_array(draft), load_schema("starter"), session.volume_node))
    case = json.loads(open(session.export(force=True)["json"]).read())
    assert case["effort"] == {"clicks": 0, "voxels_painted": 0, "voxels_erased": 0, "voxels_by_clicks": 0,
                              "active_seconds": 0.0}
