"""API-level tests of the browser front end's session (no browser, no web server).

Deterministic: a synthetic sagittal volume, a tiny random-weight model package, effects
driven by interactor events on an offscreen slice view (what trame-slicer's remote view
does with the browser's mouse), exact voxel counts from the Lib's MRML bridge.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from LumbarSegmentWeb import missing_dependency

why = missing_dependency()
if why:
    pytest.skip(f"browser front end not installed: {why}", allow_module_level=True)

from LumbarSegmentWeb.session import AnnotationSession  # noqa: E402
from LumbarSegmentWeb.session_core import SessionError  # noqa: E402
from LumbarSegmentWeb.training_panel import NOTHING_CORRECTED  # noqa: E402
from LumbarSegmentWeb.worklist import CORRECTED, DRAFTED, EXPORTED, NEW, Worklist  # noqa: E402

VIEW_W, VIEW_H = 400, 300


def _write_volume(folder, name, seed=0):
    from LumbarSegmentLib.formats.io import write_volume
    from LumbarSegmentLib.core.volume import Volume

    rng = np.random.default_rng(seed)
    arr = (rng.random((48, 64, 9)) * 50).astype(np.int16)  # [k, j, i]: 9 sagittal slices, 1 mm in-plane
    arr[10:30, 20:40, :] += 400  # a bright block: something for Threshold to find
    # i runs along L-R (3 mm sagittal slices), j along P, k along S (1 mm): a sagittal stack
    vol = Volume(arr, spacing=(3.0, 1.0, 1.0), direction=np.eye(3))
    path = folder / f"{name}_image.nrrd"
    write_volume(vol, path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import make_package

    return make_package(tmp_path_factory.mktemp("web-pkg") / "uvd-tiny")


@pytest.fixture
def session(tmp_path):
    """An annotation session with one offscreen sagittal view.

    Some trame-slicer effects (Threshold's preview blinker) ask asyncio for the current event loop;
    under the trame server there always is one. Here a test that ran before (any ``asyncio.run``)
    may have left none, so each session gets a fresh loop of its own.
    """
    import asyncio

    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    asyncio.set_event_loop(asyncio.new_event_loop())

    data = tmp_path / "data"
    data.mkdir()
    _write_volume(data, "caseA", 0)
    _write_volume(data, "caseB", 1)
    s = AnnotationSession(Worklist(tmp_path / "work", data), device="cpu", threads=1)
    s.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = s.app.view_manager.create_view(ViewLayoutDefinition.sagittal_view())
    view.interactor().UpdateSize(VIEW_W, VIEW_H)
    s.test_view = view
    yield s
    s.close()
    view.finalize()


def _click(session, x=VIEW_W // 2, y=VIEW_H // 2, drag_to=None):
    view = session.test_view
    view.fit_view_to_content()
    view.render()
    it = view.interactor()
    it.SetEventPosition(x, y)
    it.InvokeEvent("MouseMoveEvent")
    it.InvokeEvent("LeftButtonPressEvent")
    for px, py in drag_to or ():
        it.SetEventPosition(px, py)
        it.InvokeEvent("MouseMoveEvent")
    it.InvokeEvent("LeftButtonReleaseEvent")


def _labels(session, sid):
    from LumbarSegmentLib.slicer import mrml

    return mrml.segment_mask(session.seg_node, sid, session.volume_node)


def test_worklist_states_and_next_case(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("b", "a", "c"):
        _write_volume(data, name)
    (data / "a_label.nrrd").write_bytes((data / "a_image.nrrd").read_bytes())  # labels are not cases
    wl = Worklist(tmp_path / "work", data)
    assert [e.case_id for e in wl.entries()] == ["a", "b", "c"]
    assert {e.state for e in wl.entries()} == {NEW}
    assert wl.next_case().case_id == "a"
    for cid, unc, edited in (("a", 0.2, []), ("b", 0.7, []), ("c", 0.9, ["vertebral_body"])):
        wl.draft_path(cid).write_bytes(b"x")
        wl.write_info(cid, {"uncertainty": unc, "edited": edited})
    states = {e.case_id: e.state for e in wl.entries()}
    assert states == {"a": DRAFTED, "b": DRAFTED, "c": CORRECTED}
    assert wl.next_case().case_id == "b"  # the most uncertain draft nobody corrected yet
    assert wl.next_case(exclude="b").case_id == "a"
    with pytest.raises(ValueError):
        wl.save_upload("notes.txt", b"hello")
    up = wl.save_upload("../../evil name_image.nrrd", (data / "a_image.nrrd").read_bytes())
    assert up.parent == wl.uploads and up.name == "evil_name.nrrd"


def test_paint_erase_undo_redo_exact_counts(session):
    session.load_case("caseA")
    sid = session.add_segment("vertebral_body")
    session.set_brush_mm(10.0)
    session.set_effect("paint")
    _click(session)
    painted = _labels(session, sid)
    n = int(painted.sum())
    # A 10 mm disc on one 1 mm x 1 mm sagittal slice: every voxel within 4 mm of the centre is in,
    # none beyond 5 mm + half a voxel diagonal; all on a single slice (i index).
    k, j, i = np.nonzero(painted)
    assert len(set(i.tolist())) == 1
    ck, cj = k.mean(), j.mean()
    r = np.hypot((k - ck) * 1.0, (j - cj) * 1.0)
    assert r.max() <= 5.0 + 0.71
    assert np.pi * 4.0 ** 2 <= n <= np.pi * 5.71 ** 2
    assert session.voxel_count(sid) == n == next(row["voxels"] for row in session.segments() if row["id"] == sid)

    session.set_brush_mm(4.0)
    session.set_effect("erase")
    _click(session)
    after_erase = _labels(session, sid)
    erased = painted & ~after_erase
    assert not (after_erase & ~painted).any()  # erase never adds
    assert 0 < erased.sum() < n and np.hypot(*(np.array(np.nonzero(erased)[:2]) - [[ck], [cj]])).max() <= 2.71

    assert session.undo()
    assert np.array_equal(_labels(session, sid), painted)  # exactly the state before the erase
    assert session.redo()
    assert np.array_equal(_labels(session, sid), after_erase)
    assert session.undo() and session.undo()
    assert _labels(session, sid).sum() == 0
    assert session.undo()  # adding the segment is undoable too
    assert sid not in [r["id"] for r in session.segments()]
    assert not session.undo()  # nothing left to undo: says so instead of raising


def test_threshold_islands_smoothing_visibility_window_level(session):
    session.load_case("caseA")
    sid = session.add_segment("vertebral_body")
    session.apply_threshold(300, 10000)
    mask = _labels(session, sid)
    assert int(mask.sum()) == 20 * 20 * 9  # exactly the bright block
    session.apply_islands("keep_largest")
    assert int(_labels(session, sid).sum()) == 20 * 20 * 9
    session.apply_smoothing(3.0, "opening")
    assert 0 < int(_labels(session, sid).sum()) <= 20 * 20 * 9
    session.set_segment_visible(sid, False)
    assert next(r for r in session.segments() if r["id"] == sid)["visible"] is False
    session.set_window_level(200, 100)
    assert session.window_level() == (200.0, 100.0)
    with pytest.raises(SessionError):
        session.set_effect("lasso")


def test_segment_export_through_lib_and_reload(session, tiny_model):
    from LumbarSegmentLib.dataset.cases import read_case

    session.load_case("caseA")
    session.start_segmentation(model=str(tiny_model.path))
    assert session.segmenting
    job = session.wait_segmentation(timeout=240)
    assert job.state == "done", job.message
    rows = session.segments()
    assert rows and all(r["edited"] is False for r in rows)
    assert {e.case_id: e.state for e in session.worklist.entries()}["caseA"] == DRAFTED
    # Nothing corrected: the export refuses, with the reason, unless forced.
    res = session.export()
    assert res["written"] is False and res["warning"] == NOTHING_CORRECTED
    # Paint into the first drafted segment: it becomes 'edited', and the export records it.
    sid = rows[0]["id"]
    before = session.voxel_count(sid)
    session.select_segment(sid)
    session.set_brush_mm(8.0)
    session.set_effect("paint")
    _click(session)
    assert session.voxel_count(sid) > before
    res = session.export()
    # The stroke may also take voxels from a neighbouring segment (Paint overwrites others by
    # default): that one counts as edited too.
    assert res["written"] and sid in res["edited"] and res["warning"] == ""
    assert res["edited"] == session.edited_segments()
    case = read_case(res["json"])
    assert case.extra["edited_structures"] == res["edited"]
    image, label = case.load()
    values = {v for v, c in case.labels.items() if c == sid}
    assert int(np.isin(label.array, list(values)).sum()) == session.voxel_count(sid)
    assert {e.case_id: e.state for e in session.worklist.entries()}["caseA"] == EXPORTED
    # Switching cases saves the draft; coming back restores the edit.
    n = session.voxel_count(sid)
    session.load_case("caseB")
    assert session.seg_node is None
    session.load_case("caseA")
    assert session.voxel_count(sid) == n
    info = json.loads(session.worklist.draft_info_path("caseA").read_text())
    assert info["edited"] == res["edited"]


def test_cancel_leaves_the_scene_unchanged(session, tiny_model):
    session.load_case("caseB")
    session.start_segmentation(model=str(tiny_model.path))
    session.cancel_segmentation()
    assert session.poll_segmentation().state == "cancelled"
    assert session.seg_node is None and not session.segmenting
    with pytest.raises(SessionError):
        session.export()


def test_the_advanced_settings_reach_the_draft_through_the_options_contract(session, tiny_model):
    """The page's Advanced values (text as typed) are checked like the command line's flags, the device
    and threads stay the server's, and what was asked is what the child ran (its report)."""
    session.load_case("caseB")
    for bad, says in (({"overlap": "0.92"}, "--overlap '0.92': use a fraction from 0 to 0.9"),
                      ({"tile": "8"}, "--tile '8': use auto, patch, whole or a window size of 32-2048 pixels"),
                      ({"roi": "yes"}, "--roi 'yes': on or off"),
                      ({"device": "cuda"}, "not a setting of this page: device")):
        with pytest.raises(SessionError, match=says.replace("(", r"\(").replace(")", r"\)")):
            session.start_segmentation(model=str(tiny_model.path), advanced=bad)
        assert not session.segmenting
    session.start_segmentation(model=str(tiny_model.path), advanced={
        "precision": "fp32", "slice_smoothing_mm": "2", "bn_adapt": "0.5", "postprocess": "spine", "tile": "whole",
        "overlap": "0.5", "roi": True})
    job = session.wait_segmentation(timeout=240)
    assert job.state == "done", job.message
    report = session.logic.segmenter.result().report
    assert (report["slice_smoothing_mm"], report["bn_adapt"], report["precision"], report["device"]) == \
        (2.0, 0.5, "float32", "cpu")
    assert "roi" in report  # asked for: the box, or null where the whole plane was kept
