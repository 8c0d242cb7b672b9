"""The levels table of the Slicer module and the browser page (``slicer/level_table.py``, ``levels_panel.py``).

On real MRML scenes (slicer-core): the numbers a segmentation's level segments get are the numbers
``lumbarseg segment --measurements`` writes for the same label map, for a draft and for a segmentation
a person drew and named; the browser session measures an opened level-named draft, saves the CSV in
the work folder only, and refuses a file name that would leave it.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from test_levels import STARTER, spine

from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.spine.level_names import level_value, shift_name
from LumbarSegmentLib.spine.levels import name_levels
from LumbarSegmentLib.spine.measurements import measure_levels, to_csv

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")


def _cli_csv(vol, tmp_path) -> str:
    """What ``lumbarseg segment --measurements`` writes for this two-class draft (its own code path)."""
    from LumbarSegmentLib.spine.level_outputs import LevelRequest, apply_levels

    draft = types.SimpleNamespace(labels=vol, schema=STARTER)
    _, writers = apply_levels(LevelRequest(measurements=True), draft, vol, {}, allow_reslice=True)
    out = tmp_path / "cli.csv"
    writers["measurements"](out)
    return out.read_text()


@pytest.fixture
def scene():
    from LumbarSegmentLib.slicer import mrml

    return mrml.MRMLContext.standalone()


def _image(ctx, vol):
    from LumbarSegmentLib.slicer import mrml

    return mrml.volume_to_node(ctx.scene, Volume(np.zeros(vol.array.shape, np.int16), spacing=vol.spacing), "MR")


def test_draft_segments_measure_as_the_command_line_csv(scene, tmp_path):
    from LumbarSegmentLib.slicer.drafts import labels_to_segmentation
    from LumbarSegmentLib.slicer.level_table import COLUMNS, measure_segmentation, save_csv, table_rows
    from LumbarSegmentLib.slicer.levels import tag_flags

    vol, expected = spine(n_bodies=5, low_disc_fraction=0.42, spacing=(3.0, 1.0, 1.0))
    result = name_levels(vol, STARTER)
    image = _image(scene, vol)
    seg = labels_to_segmentation(scene.scene, scene.seg_logic, result.labels, result.schema, image)
    tag_flags(seg, result.to_report()["levels"])
    rows = measure_segmentation(seg, image)
    assert to_csv(rows) == _cli_csv(vol, tmp_path)  # same label map, same numbers, same columns
    saved = save_csv(rows, tmp_path / "module.csv")
    assert saved.read_text() == _cli_csv(vol, tmp_path)
    table = table_rows(seg, rows)
    assert [r["level"] for r in table] == [lv.name for lv in result.levels]
    assert set(table[0]) >= {key for key, _ in COLUMNS}
    by_name = {r["level"]: r for r in rows}
    for r in table:
        assert r["middle"] == f"{by_name[r['level']]['middle_height_mm']:.1f}"
        assert r["volume"] == f"{by_name[r['level']]['volume_mm3']:.1f}"
    assert {r["level"]: r["flags"] for r in table}["L5-S1"] == "anchor"  # the small lowest disc, for review
    assert {r["level"]: r["flags"] for r in table}["L4"] == ""
    assert all(r["middle"] == "" for r in table_rows(seg))  # listed before anyone measures
    with pytest.raises(ValueError, match=r"\.csv"):
        save_csv(rows, tmp_path / "module.txt")


def test_a_hand_drawn_level_segmentation_is_measured_alike(scene):
    """A person's segmentation: segments named by level (no draft tags, no terminology), one that is not a level."""
    from LumbarSegmentLib.slicer.bridge import MRMLError, set_segment_mask
    from LumbarSegmentLib.slicer.level_table import level_label_map, measure_segmentation

    vol, _ = spine(n_bodies=3, slices=5)
    image = _image(scene, vol)
    arr = np.asarray(vol.array)
    body, disc = STARTER["vertebral_body"].value, STARTER["intervertebral_disc"].value
    rows_z = np.flatnonzero((arr == body).any(axis=(1, 2)))
    top_body = (arr == body) & (np.arange(arr.shape[0]) <= rows_z.min() + 10)[:, None, None]
    manual = {"L4": top_body, "L4-L5": arr == disc, "canal": np.zeros(arr.shape, bool)}
    seg = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(image)
    with pytest.raises(MRMLError, match="no segment named by level"):
        level_label_map(seg, image)
    for name, mask in manual.items():
        sid = seg.GetSegmentation().AddEmptySegment("", name)
        set_segment_mask(scene.seg_logic, seg, sid, mask, image)
    painted = np.zeros(arr.shape, np.uint8)
    painted[manual["L4"]] = level_value("L4")
    painted[manual["L4-L5"]] = level_value("L4-L5")
    assert np.array_equal(np.asarray(level_label_map(seg, image).array), painted)
    assert measure_segmentation(seg, image) == measure_levels(vol.with_array(painted), allow_reslice=True)
    with pytest.raises(MRMLError, match="volume"):
        level_label_map(seg, None)


# ------------------------------------------------------------------------------------------------ browser session
@pytest.fixture
def web_session(tmp_path):
    pytest.importorskip("trame_slicer", reason="trame-slicer (the browser front end) is not installed")
    import asyncio

    from LumbarSegmentLib.formats.io import write_volume
    from LumbarSegmentWeb.session import AnnotationSession
    from LumbarSegmentWeb.worklist import Worklist

    asyncio.set_event_loop(asyncio.new_event_loop())
    vol, _ = spine(n_bodies=4, slices=5)
    data = tmp_path / "data"
    data.mkdir()
    for case in ("caseA", "caseB"):
        write_volume(Volume(np.zeros(vol.array.shape, np.int16), spacing=vol.spacing), data / f"{case}_image.nrrd")
    session = AnnotationSession(Worklist(tmp_path / "work", data), device="cpu", threads=1)
    session.test_volume = vol
    yield session
    session.close()


def _open_level_draft(session):
    """caseA with a level-named segmentation saved as its draft, then opened from the work folder."""
    from LumbarSegmentLib.slicer.drafts import labels_to_segmentation

    result = name_levels(session.test_volume, STARTER)
    session.load_case("caseA")
    seg = labels_to_segmentation(session.app.scene, session.app.segmentations_logic, result.labels, result.schema,
                                 session.volume_node)
    session._activate(seg)
    session.save_draft()
    session.load_case("caseB")
    session.load_case("caseA")  # the draft comes back from its .seg.nrrd
    return result


def test_browser_session_measures_an_opened_level_draft_and_saves_the_csv(web_session, tmp_path):
    from LumbarSegmentWeb.session_core import SessionError

    s = web_session
    result = _open_level_draft(s)
    names = [lv.name for lv in result.levels]
    assert [r["level"] for r in s.level_table()] == names and s.level_table()[0]["middle"] == ""
    with pytest.raises(SessionError, match="measure the levels first"):
        s.save_measurements()
    table = s.measure_levels()
    cli = _cli_csv(s.test_volume, tmp_path)
    assert s.measurements_csv() == cli
    expected = {r["level"]: r for r in measure_levels(result.labels, allow_reslice=True)}
    assert [r["posterior"] for r in table] == [f"{expected[n]['posterior_height_mm']:.1f}" for n in names]
    path = s.save_measurements()
    assert path == s.worklist.work / "measurements" / "caseA_levels.csv" and path.read_text() == cli
    assert s.save_measurements("my-table.v2.csv").read_text() == cli
    # a shift renames the rows, the numbers stay with their structures
    s.shift_levels(-1)
    shifted = s.level_table()
    assert [r["level"] for r in shifted] == [shift_name(n, -1) for n in names]
    assert [r["posterior"] for r in shifted] == [r["posterior"] for r in table]
    s.load_case("caseB")
    assert s.level_table() == [] and not s.measured()


@pytest.mark.parametrize("name", ["../evil.csv", "/tmp/evil.csv", "sub/evil.csv", "..\\evil.csv", ".hidden.csv",
                                  "evil.txt", "evil.csv.exe", "a..b.csv", "x" * 70 + ".csv", " evil.csv", 7,
                                  ["evil.csv"]])
def test_browser_session_refuses_a_hostile_file_name(web_session, name):
    from LumbarSegmentWeb.session_core import SessionError

    s = web_session
    _open_level_draft(s)
    s.measure_levels()
    before = sorted(p for p in s.worklist.work.parent.rglob("*") if p.is_file())
    with pytest.raises(SessionError, match="not a file name"):
        s.save_measurements(name)
    assert sorted(p for p in s.worklist.work.parent.rglob("*") if p.is_file()) == before


def test_page_levels_handlers_fill_the_state(web_session):
    """The page's Levels panel handlers (no browser): list, measure, save, a refused name, a refused shift."""
    from LumbarSegmentWeb.levels_page import LevelsControls

    class State(types.SimpleNamespace):
        def update(self, values):
            self.__dict__.update(values)

    class Page(LevelsControls):
        def __init__(self, session):
            self.session, self.state = session, State(error="", message="")
            self._init_levels_state()

        def _guard(self, fn, *args):
            self.state.error = ""
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - what the page's error bar would show
                self.state.error = str(exc)

        def refresh_segments(self):
            self.refresh_levels()

    _open_level_draft(web_session)
    page = Page(web_session)
    page.refresh_levels()
    assert page.state.level_rows and page.state.levels_csv is None
    page.measure_levels()
    assert page.state.levels_csv["name"] == "caseA_levels.csv"
    assert page.state.levels_csv["text"] == web_session.measurements_csv()
    assert all(r["volume"] for r in page.state.level_rows)
    page.save_levels_csv("")
    assert page.state.levels_saved.startswith("saved to measurements/caseA_levels.csv")
    page.save_levels_csv("../../x.csv")
    assert "not a file name" in page.state.error
    page.shift_levels(5)
    assert page.state.error and page.state.level_rows[0]["level"] == web_session.level_table()[0]["level"]


def test_slicer_module_levels_section_calls_the_lib():
    """The module's Levels section, read statically (desktop Slicer cannot run here): its widgets in the .ui,
    the Lib's functions behind its buttons."""
    import ast
    import xml.etree.ElementTree as ET
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = (root / "LumbarSegment" / "LumbarSegment.py").read_text()
    methods = {n.name: ast.get_source_segment(source, n) for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.FunctionDef)}
    assert "measure_segmentation(p.segmentation, p.inputVolume)" in methods["onMeasureLevels"]
    assert "save_csv(self._measured" in methods["onSaveMeasurements"] and ".csv" in methods["onSaveMeasurements"]
    assert "table_rows" in methods["refreshLevels"] and "QTableWidgetItem" in methods["refreshLevels"]
    assert "onMeasureLevels" in methods["onShiftLevels"] and "refreshLevels" in methods["onTimer"]
    ui = ET.parse(root / "Resources" / "UI" / "LumbarSegment.ui")
    widgets = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    assert widgets["levelsTableWidget"] == "QTableWidget"
    for name in ("levelsUpButton", "levelsDownButton", "measureLevelsButton", "saveMeasurementsButton"):
        assert widgets[name] == "QPushButton", name
