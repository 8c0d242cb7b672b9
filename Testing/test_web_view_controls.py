"""The slice views' readouts, slice stepping, left-drag window/level and the shortcut table (no browser).

On the offscreen sagittal view of test_web_session's session: a synthetic stack of 9
sagittal slices, 3 mm apart.
"""
from __future__ import annotations

import pytest

from LumbarSegmentWeb import missing_dependency

why = missing_dependency()
if why:
    pytest.skip(f"browser front end not installed: {why}", allow_module_level=True)

from test_web_session import VIEW_H, VIEW_W, session  # noqa: E402,F401 - the fixture

from LumbarSegmentWeb.shortcuts import SHORTCUTS, action_for, key_script  # noqa: E402
from LumbarSegmentWeb.view_controls import (WindowLevelDrag, direction_letter, mr_presets,  # noqa: E402
                                            slice_readout, step_slice)


def _drag(view, dx: int, dy: int) -> None:
    it = view.interactor()
    x, y = VIEW_W // 2, VIEW_H // 2
    it.SetEventPosition(x, y)
    it.InvokeEvent("MouseMoveEvent")
    it.InvokeEvent("LeftButtonPressEvent")
    for k in range(1, 6):
        it.SetEventPosition(x + dx * k // 5, y + dy * k // 5)
        it.InvokeEvent("MouseMoveEvent")
    it.InvokeEvent("LeftButtonReleaseEvent")


def test_sagittal_readout_names_slice_position_and_edges(session):
    session.load_case("caseA")
    view = session.test_view
    view.fit_view_to_content()
    r = slice_readout(view)
    assert r["name"] == "Sagittal" and r["count"] == 9 and 1 <= r["index"] <= 9
    # Slicer's sagittal view: anterior on the left, superior at the top
    assert (r["left"], r["right"], r["top"], r["bottom"]) == ("A", "P", "S", "I")
    assert r["position"].endswith(" mm") and r["position"][0] in "RL"


def test_step_slice_moves_whole_slices_and_stops_at_the_ends(session):
    session.load_case("caseA")
    view = session.test_view
    first = slice_readout(view)["index"]
    step_slice(view, 1)
    assert slice_readout(view)["index"] == first + 1
    step_slice(view, -100)
    assert slice_readout(view)["index"] == 1
    step_slice(view, 100)
    assert slice_readout(view)["index"] == 9


def test_left_drag_sets_window_level_only_without_a_tool(session):
    session.load_case("caseA")
    view = session.test_view
    view.fit_view_to_content()
    seen = []
    drag = WindowLevelDrag(view, active=lambda: session.effect == "none", get_wl=session.window_level,
                           set_wl=session.set_window_level, span=lambda: 400.0,
                           on_change=lambda w, lv: seen.append((w, lv)))
    try:
        w0, l0 = session.window_level()
        _drag(view, 100, 50)  # right and up (VTK's y grows upwards): wider window, higher level
        w1, l1 = session.window_level()
        assert w1 > w0 and l1 > l0 and seen[-1] == pytest.approx((w1, l1))
        session.add_segment("vertebral_body")
        session.set_effect("paint")
        _drag(view, 100, 50)
        assert session.window_level() == pytest.approx((w1, l1))  # a paint stroke leaves the display alone
    finally:
        drag.detach()


def test_presets_are_relative_to_the_volume():
    p = mr_presets((400.0, 200.0), (0.0, 1000.0))
    assert p["Auto"] == (400.0, 200.0) and p["Full range"] == (1000.0, 500.0)
    assert p["High contrast"][0] < 400 < p["Low contrast"][0]
    assert p["Brighter"][1] < 200 < p["Darker"][1]


def test_directions_and_shortcuts():
    assert direction_letter((0, -0.9, 0.1)) == "P" and direction_letter((0.1, 0, 1)) == "S"
    assert action_for("Ctrl+z") == ("undo", None) and action_for("P") == ("tool", "paint")
    assert action_for("PageDown") == ("slice", -5) and action_for("x") is None
    script = key_script("trig")
    assert "'trig'" in script and all(k in script for k in SHORTCUTS)
