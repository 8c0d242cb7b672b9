"""Level naming (``levels.py``, ``level_names.py``) and ``lumbarseg segment --levels``.

Synthetic spines: bodies and discs drawn as tilted boxes along a lordotic curve in a sagittal
stack (LPS identity: array [k=z, j=y, i=x], z up), plus one real T1 slice through the default model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from LumbarSegmentLib.spine.level_names import (disc_name, level_name, level_value, levels_schema, shift_name,
                                          structure_of)
from LumbarSegmentLib.spine.levels import name_levels
from LumbarSegmentLib.core.schema import SchemaError, load_schema
from LumbarSegmentLib.core.volume import Volume

STARTER = load_schema("starter")
BODY_V, DISC_V = STARTER["vertebral_body"].value, STARTER["intervertebral_disc"].value


def spine(n_bodies=7, *, slices=9, body_mm=26.0, disc_mm=9.0, spacing=(1.0, 1.0, 1.0), bottom_s1=True,
          skip_disc=None, stray=False, s1_fraction=0.45, low_disc_fraction=1.0):
    """A label volume: ``n_bodies`` bodies (the lowest is S1 drafted in part when ``bottom_s1``: its height
    ``s1_fraction`` of a body's) with discs between them (the lowest ``low_disc_fraction`` as thick as the
    others), cranial to caudal along a gently curved column. Returns (volume, names top to bottom)."""
    sx, sy, sz = spacing  # i (x, left-right), j (y, A->P), k (z, I->S)
    nz = int(round((n_bodies * (body_mm + disc_mm) + 40) / sz))
    ny = int(round(90 / sy))
    arr = np.zeros((nz, ny, slices), np.uint8)
    zz = (np.arange(nz) + 0.5) * sz
    yy = (np.arange(ny) + 0.5) * sy
    top = zz.max() - 20.0
    pos = top
    items = []
    for b in range(n_bodies):
        h = body_mm * (s1_fraction if (bottom_s1 and b == n_bodies - 1) else 1.0)
        items.append((BODY_V, pos, pos - h, 15.0 + 0.8 * b))  # bodies deepen caudally, as in a real spine
        pos -= h
        if b < n_bodies - 1:
            t = disc_mm * (low_disc_fraction if b == n_bodies - 2 else 1.0)
            items.append((DISC_V, pos, pos - t, 16.0 + 0.8 * b))
            pos -= t
    for n, (value, hi, lo, half_depth) in enumerate(items):
        if value == DISC_V and skip_disc is not None and n == 2 * skip_disc + 1:
            continue
        mid = (hi + lo) / 2
        centre_y = 35.0 + 8.0 * ((mid - pos) / (top - pos) - 0.5) ** 2  # lordosis-like bend
        rows = (zz <= hi) & (zz > lo)
        cols = np.abs(yy - centre_y) <= half_depth
        arr[np.ix_(rows, cols, np.arange(1, slices - 1))] = value
    if stray:
        arr[5:12, ny - 12:ny - 4, 2:4] = BODY_V
    names_bottom_up = []
    v = level_value("S1") if bottom_s1 else level_value("L5")
    for k in range(n_bodies):
        names_bottom_up.append(level_name(v - k))
        if k < n_bodies - 1:
            names_bottom_up.append(disc_name(level_name(v - k - 1)))
    return Volume(arr, spacing=spacing), names_bottom_up[::-1]


def _names(result):
    return [lv.name for lv in result.levels]


def test_value_scheme_and_shift():
    assert level_value("L1") == 20 and level_value("L5") == 24 and level_value("S1") == 25
    assert level_value("L4-L5") == 123 and level_value("L5-S1") == 124 and level_value("T12-L1") == 119
    for v in (19, 20, 24, 25, 119, 124):
        assert level_value(level_name(v)) == v
    assert structure_of(123) == "intervertebral_disc" and structure_of(23) == "vertebral_body"
    assert shift_name("L4", 1) == "L5" and shift_name("L5", 1) == "S1" and shift_name("L1", -1) == "T12"
    assert shift_name("L4-L5", 1) == "L5-S1" and shift_name("T12-L1", 1) == "L1-L2"
    with pytest.raises(SchemaError):
        shift_name("L5-S1", 1)  # no disc below S1 in the scheme
    with pytest.raises(SchemaError):
        level_value("L4-L6")
    schema = levels_schema(["L4", "L4-L5", "L5"])
    assert schema.find_by_name("L4-L5").value == 123
    assert "66794005" not in schema.terminology_string("l4") and "11994002" in schema.terminology_string("l4")


def test_names_a_normal_spine_from_the_bottom():
    vol, expected = spine()
    result = name_levels(vol, STARTER)
    assert _names(result) == expected
    assert expected[-1] == "S1" and expected[-2] == "L5-S1" and expected[0] == "T12"
    assert result.confidence == 1.0 and result.flags == []
    out = np.asarray(result.labels.array)
    src = np.asarray(vol.array)
    assert ((out != 0) == (src != 0)).all()  # every drafted voxel named, nothing added
    for lv in result.levels:
        assert (out == lv.label).sum() == lv.voxels
        assert lv.structure == ("intervertebral_disc" if "-" in lv.name else "vertebral_body")
    report = result.to_report()
    assert [x["name"] for x in report["levels"]] == expected and report["ordering"]["confidence"] == 1.0


def test_anisotropic_and_single_slice():
    vol, expected = spine(spacing=(4.0, 0.6, 0.6))
    assert _names(name_levels(vol, STARTER)) == expected
    one, expected1 = spine(slices=3, spacing=(1.0, 1.1, 1.1))
    single = Volume(np.asarray(one.array)[:, :, 1:2].copy(), spacing=(1.0, 1.1, 1.1))
    assert _names(name_levels(single, STARTER)) == expected1


def test_missing_disc_keeps_the_count_and_is_flagged():
    vol, expected = spine(skip_disc=3)  # the disc below the fourth body is not drafted
    result = name_levels(vol, STARTER)
    missing = expected[7]
    assert missing == "L3-L4" and _names(result) == [n for n in expected if n != missing]
    assert [f["code"] for f in result.flags] == ["missing_disc"] and result.flags[0]["level"] == missing
    assert result.confidence < 1.0


def test_two_bodies_joined_across_a_missed_disc_are_split():
    vol, expected = spine()
    arr = np.asarray(vol.array).copy()
    disc = level_value("L2-L3")
    named = np.asarray(name_levels(vol, STARTER).labels.array)
    arr[named == disc] = BODY_V  # the disc drafted as body: L2 and L3 are one piece
    result = name_levels(Volume(arr, spacing=vol.spacing), STARTER)
    assert _names(result) == [n for n in expected if n != "L2-L3"]
    codes = [f["code"] for f in result.flags]
    assert "body_split" in codes and "missing_disc" in codes


def test_stray_blob_dropped_and_full_size_bottom_read_as_l5():
    vol, expected = spine(stray=True)
    assert _names(name_levels(vol, STARTER)) == expected  # the blob far from the column is not a level
    vol, _ = spine(bottom_s1=False)  # the lowest body is full size: L5 over a missed L5-S1 disc
    result = name_levels(vol, STARTER)
    assert _names(result)[-1] == "L5" and "anchor" in [f["code"] for f in result.flags]


def _anchor_flags(result):
    return [f for f in result.flags if f["code"] == "anchor"]


def test_small_lowest_disc_is_flagged_as_a_possible_s1_s2_remnant():
    vol, expected = spine(low_disc_fraction=0.42)  # L5-S1 about 45 % of L4-L5: thin L5-S1 or S1-S2?
    result = name_levels(vol, STARTER)
    assert _names(result) == expected  # the evidence is ambiguous: names kept, a person decides
    flags = _anchor_flags(result)
    assert len(flags) == 1 and flags[0]["level"] == "L5-S1" and "S1-S2" in flags[0]["message"]
    assert result.confidence == pytest.approx(0.5)
    lowest = {lv.name: lv for lv in result.levels}["L5-S1"]
    assert "anchor" in lowest.flags
    vol, _ = spine(low_disc_fraction=0.6)  # a thinner L5-S1 alone is common: not flagged
    assert name_levels(vol, STARTER).flags == []


def test_large_drafted_s1_is_flagged_as_a_possible_l5():
    vol, expected = spine(s1_fraction=0.75)  # S1 about three quarters of L5: S1, or L5 over a missed disc?
    result = name_levels(vol, STARTER)
    assert _names(result) == expected
    flags = _anchor_flags(result)
    assert len(flags) == 1 and flags[0]["level"] == "S1" and "missed L5-S1" in flags[0]["message"]
    vol, _ = spine(s1_fraction=0.5)  # S1 drafted in part, as usual: no doubt raised
    assert name_levels(vol, STARTER).flags == []


def test_empty_draft_gives_no_levels():
    result = name_levels(Volume(np.zeros((20, 20, 3), np.uint8)), STARTER)
    assert result.levels == [] and result.confidence < 1.0


def test_real_t1_slice_named_like_its_manual_levels(shared_data, tmp_path):
    """One real T1 mid-sagittal slice (never trained on) through the CLI: L1..L5 named as outlined."""
    case = shared_data / "t1-levels" / "T1L_0051"
    if not case.with_name("T1L_0051_image.mha").exists():
        pytest.skip("t1-levels/ is not in the shared data")
    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import read_volume

    seg, rep, csv = tmp_path / "seg.nii.gz", tmp_path / "r.json", tmp_path / "m.csv"
    assert main(["segment", str(case.with_name("T1L_0051_image.mha")), "-o", str(seg), "--levels", "--report",
                 str(rep), "--measurements", str(csv), "--no-progress"]) == 0
    report = json.loads(rep.read_text())
    labels = np.asarray(read_volume(seg).array)
    manual = np.asarray(read_volume(case.with_name("T1L_0051_label.mha")).array)
    meta = json.loads(case.with_name("T1L_0051.json").read_text())
    by_name = {lv["name"]: lv["label"] for lv in report["levels"]}
    assert set(np.unique(labels)) - {0} == set(by_name.values())
    for value, name in meta["levels"].items():
        if name == "S1":
            continue
        m = manual == int(value)
        seg_mask = labels == by_name[name]
        assert 2 * (m & seg_mask).sum() / (m.sum() + seg_mask.sum()) > 0.8, name
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("level,structure,label") and len(rows) == 1 + len(report["levels"])
    assert "confidence" in report["ordering"] and isinstance(report["ordering"]["flags"], list)


def test_level_list_flags_and_shift_on_real_mrml():
    """The review list and the shift-names action on a real segmentation node (slicer-core)."""
    pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")
    from LumbarSegmentLib.slicer import mrml
    from LumbarSegmentLib.slicer.drafts import labels_to_segmentation
    from LumbarSegmentLib.slicer.levels import level_list, rename_level, shift_level_names, tag_flags

    ctx = mrml.MRMLContext.standalone()
    vol, expected = spine(skip_disc=3)
    result = name_levels(vol, STARTER)
    image = mrml.volume_to_node(ctx.scene, Volume(np.zeros(vol.array.shape, np.int16), spacing=vol.spacing), "MR")
    seg = labels_to_segmentation(ctx.scene, ctx.seg_logic, result.labels, result.schema, image)
    tag_flags(seg, result.to_report()["levels"])
    rows = level_list(seg)
    assert [r["name"] for r in rows] == [lv.name for lv in result.levels]
    assert {r["name"]: r["flags"] for r in rows}["L3"] == []
    segmentation = seg.GetSegmentation()
    l5 = next(r for r in rows if r["name"] == "L5")
    assert np.array_equal(mrml.segment_mask(seg, l5["segment_id"], image), np.asarray(result.labels.array) == 24)
    with pytest.raises(SchemaError):
        shift_level_names(seg, 1)  # S1 cannot move down: nothing is renamed
    assert [r["name"] for r in level_list(seg)] == [r["name"] for r in rows]
    assert shift_level_names(seg, -1)[-1] == "L5"  # S1 -> L5, L5-S1 -> L4-L5, ...
    after = level_list(seg)
    assert [r["name"] for r in after] == [shift_name(r["name"], -1) for r in rows]
    moved = segmentation.GetSegment(l5["segment_id"])
    assert moved.GetName() == "L4" and "11994002" in moved.GetTerminology()  # L4 vertebra code
    with pytest.raises(SchemaError):
        rename_level(seg, l5["segment_id"], "L3")  # another segment is L3
    rename_level(seg, after[-1]["segment_id"], "S1")
    assert level_list(seg)[-1]["name"] == "S1"


def test_slicer_job_asks_for_levels_and_reads_their_schema(tmp_path):
    """The Slicer/browser segment job passes --levels and reads the label map with the level schema."""
    from pathlib import Path

    from LumbarSegmentLib.cli.main import build_parser
    from LumbarSegmentLib.slicer.segment_job import SegmentRequest, schema_for_report, segment_command

    argv = segment_command("py", Path("in.nrrd"), Path("out.nrrd"), Path("r.json"), SegmentRequest(levels=True))
    assert build_parser().parse_args(argv[3:]).levels is True
    assert "--levels" not in segment_command("py", Path("i"), Path("o"), Path("r"), SegmentRequest())
    vol, _ = spine()
    result = name_levels(vol, STARTER)
    report = {**result.to_report(), "label_values": "levels"}
    schema = schema_for_report(report, STARTER)
    assert {c.value for c in schema.foreground} == {lv.label for lv in result.levels}
    assert schema_for_report({**report, "label_values": "classes"}, STARTER) is STARTER  # --measurements only


def test_slicer_status_line_lists_levels_and_checks():
    from LumbarSegmentLib.slicer.logic import _levels_summary

    vol, _ = spine(skip_disc=3)
    report = {**name_levels(vol, STARTER).to_report(), "label_values": "levels"}
    line = _levels_summary(report)
    assert "L5-S1" in line and "check L3-L4: missing_disc" in line and "0.60" in line
    assert _levels_summary({**report, "label_values": "classes"}) == ""


def test_browser_session_lists_and_shifts_levels(tmp_path):
    """The browser page's session: the level list and the shift action on a real scene (trame-slicer)."""
    pytest.importorskip("trame_slicer", reason="trame-slicer (the browser front end) is not installed")
    import asyncio

    from LumbarSegmentLib.formats.io import write_volume
    from LumbarSegmentLib.slicer.drafts import labels_to_segmentation
    from LumbarSegmentWeb.session import AnnotationSession
    from LumbarSegmentWeb.worklist import Worklist

    asyncio.set_event_loop(asyncio.new_event_loop())
    vol, expected = spine(n_bodies=4, slices=5)
    data = tmp_path / "data"
    data.mkdir()
    write_volume(Volume(np.zeros(vol.array.shape, np.int16), spacing=vol.spacing), data / "caseA_image.nrrd")
    session = AnnotationSession(Worklist(tmp_path / "work", data), device="cpu", threads=1)
    try:
        session.load_case("caseA")
        assert session.levels() == [] or all(r["name"] for r in session.levels())
        result = name_levels(vol, STARTER)
        seg = labels_to_segmentation(session.app.scene, session.app.segmentations_logic, result.labels,
                                     result.schema, session.volume_node)
        session._activate(seg)
        assert [r["name"] for r in session.levels()] == expected
        assert session.shift_levels(-1) == [shift_name(n, -1) for n in expected]
        assert session.worklist.draft_path("caseA").exists()  # the renamed draft was saved
    finally:
        session.close()


def test_module_logic_shift_refuses_a_segmentation_without_levels():
    pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")
    from LumbarSegmentLib.slicer import mrml
    from LumbarSegmentLib.slicer.drafts import labels_to_segmentation
    from LumbarSegmentLib.slicer.logic import ModuleLogic

    ctx = mrml.MRMLContext.standalone()
    logic = ModuleLogic(ctx.scene, ctx.seg_logic)
    vol, expected = spine(n_bodies=3, slices=3)
    image = mrml.volume_to_node(ctx.scene, Volume(np.zeros(vol.array.shape, np.int16), spacing=vol.spacing), "MR")
    plain = labels_to_segmentation(ctx.scene, ctx.seg_logic, vol, STARTER, image)  # body / disc only
    with pytest.raises(ValueError, match="no level segments"):
        logic.shift_level_names(plain, 1)
    with pytest.raises(ValueError, match="choose the level segmentation"):
        logic.shift_level_names(None, 1)
    result = name_levels(vol, STARTER)
    named = labels_to_segmentation(ctx.scene, ctx.seg_logic, result.labels, result.schema, image)
    assert logic.shift_level_names(named, -1) == [shift_name(n, -1) for n in expected]


def test_the_anchor_review_bands_flag_both_one_level_readings_seen_in_real_drafts():
    """The volume ratios at which real drafts were named one level off (a disc under L4-L5 at 50-62 % of it
    that was the S1-S2 remnant; a body named S1 at 63 % of L5 that was L5 over a missed disc) raise the
    anchor doubt; a clearly full L5-S1 and a clearly partial S1 do not."""
    from types import SimpleNamespace

    from LumbarSegmentLib.spine.anchor_checks import anchor_doubts
    from LumbarSegmentLib.spine.level_names import BODY, DISC

    def piece(structure, voxels):
        return SimpleNamespace(structure=structure, mask_index=np.arange(voxels))

    def named(disc_ratio, s1_ratio=None):
        out = [("L4", piece(BODY, 10000)), ("L4-L5", piece(DISC, 4000)), ("L5", piece(BODY, 10000)),
               ("L5-S1", piece(DISC, int(4000 * disc_ratio)))]
        return out + ([("S1", piece(BODY, int(10000 * s1_ratio)))] if s1_ratio else [])

    assert [lv for lv, _ in anchor_doubts(named(0.62))] == ["L5-S1"]
    assert [lv for lv, _ in anchor_doubts(named(0.50))] == ["L5-S1"]
    assert [lv for lv, _ in anchor_doubts(named(1.0, 0.63))] == ["S1"]
    assert anchor_doubts(named(0.9)) == [] and anchor_doubts(named(1.0, 0.4)) == []
    assert anchor_doubts(named(0.30)) == []  # the transitional flag speaks for that one


SPINE6 = load_schema("spine6")


def _with_sacrum(vol, drop_s1=True, extend_mm=30.0):
    """The synthetic spine with the sacrum drafted as the spine6 class below the lowest disc: the lowest
    body becomes sacrum (``drop_s1``; else it stays a body drawn above the sacrum it touches), and the
    sacrum goes on ``extend_mm`` caudally."""
    arr = np.asarray(vol.array).copy()
    sacrum = SPINE6["sacrum"].value
    low_disc = int(np.where((arr == DISC_V).any(axis=(1, 2)))[0].min())  # z index grows superiorly
    s1 = np.zeros_like(arr, bool)
    s1[:low_disc] = arr[:low_disc] == BODY_V
    rows = np.where(s1.any(axis=(1, 2)))[0]
    section = s1[rows.min()]
    below = max(0, rows.min() - int(round(extend_mm / vol.spacing[2])))
    arr[below:rows.min()][:, section] = sacrum
    if drop_s1:
        arr[s1] = sacrum
    return Volume(arr, spacing=vol.spacing)


def test_a_drafted_sacrum_anchors_the_names():
    """With the model's sacrum class the bottom of the count is read, not guessed: S1 is where the
    sacrum begins, a full-size S1 is no longer taken for L5 (the two-class draft flags it), and an L5
    over a missed L5-S1 disc keeps its name, the missing disc reported."""
    vol, expected = spine()
    for drop_s1 in (True, False):  # S1 drafted as sacrum, or as a body sitting on the sacrum
        result = name_levels(_with_sacrum(vol, drop_s1), SPINE6)
        assert _names(result) == expected, drop_s1
        assert [f["code"] for f in result.flags] == ["sacrum_anchor"]
        assert result.to_report()["ordering"]["anchor"] == "drafted sacrum = S1"
        s1 = {lv.name: lv for lv in result.levels}["S1"]
        l5 = {lv.name: lv for lv in result.levels}["L5"]
        assert s1.voxels < 2.0 * l5.voxels  # S1, not the whole sacrum
    full, _ = spine(bottom_s1=False)  # the lowest body full size: read as L5 without a sacrum class
    assert _names(name_levels(full, STARTER))[-1] == "L5"
    result = name_levels(_with_sacrum(full), SPINE6)
    assert _names(result)[-3:] == ["L5", "L5-S1", "S1"] and not _anchor_flags(result)
    missed = np.asarray(_with_sacrum(vol).array).copy()  # L5-S1 not drafted: L5 ends a disc's height above
    missed[np.asarray(name_levels(vol, STARTER).labels.array) == level_value("L5-S1")] = 0
    result = name_levels(Volume(missed, spacing=vol.spacing), SPINE6)
    assert _names(result)[-2:] == ["L5", "S1"]
    assert [f["code"] for f in result.flags] == ["sacrum_anchor", "missing_disc"]
    thin, expected = spine(low_disc_fraction=0.42)  # a thin L5-S1 right above the sacrum: or the S1-S2 remnant?
    result = name_levels(_with_sacrum(thin), SPINE6)
    assert _names(result) == expected and [f["level"] for f in _anchor_flags(result)] == ["L5-S1"]
    tiny = np.asarray(_with_sacrum(vol).array).copy()
    tiny[tiny == SPINE6["sacrum"].value] = 0
    tiny[2:4, 30:33, 3:5] = SPINE6["sacrum"].value  # a stray speck of sacrum: ignored
    assert "sacrum_anchor" not in [f["code"] for f in name_levels(Volume(tiny, spacing=vol.spacing), SPINE6).flags]


def test_l5_drawn_as_sacrum_or_sitting_on_a_drawn_s1_keeps_its_name_and_is_flagged():
    """Two ways a draft hides L5-S1 under a drawn sacrum (seen on 3D T2 SPACE drafts): L5 drawn as sacrum
    a dark disc's height above S1, and a full L5 resting on a full drawn S1 with the disc missed. Both
    keep L5's name, the missing disc reported; a crack through the sacrum itself changes nothing."""
    vol, expected = spine()
    base = np.asarray(_with_sacrum(vol).array)
    two_class = np.asarray(name_levels(vol, STARTER).labels.array)
    sacrum = SPINE6["sacrum"].value
    split = base.copy()
    split[two_class == level_value("L5")] = sacrum  # L5 drawn as sacrum ...
    split[two_class == level_value("L5-S1")] = 0  # ... over a dark disc the draft missed
    result = name_levels(Volume(split, spacing=vol.spacing), SPINE6)
    assert _names(result) == [n for n in expected if n != "L5-S1"]
    assert {f["code"] for f in result.flags} == {"sacrum_anchor", "sacrum_split", "missing_disc"}
    assert np.isin(np.asarray(result.labels.array)[two_class == level_value("L5")], level_value("L5")).mean() > 0.9
    resting = base.copy()
    resting[two_class == level_value("L5-S1")] = sacrum  # the sacrum reaches up to L5: no disc between
    result = name_levels(Volume(resting, spacing=vol.spacing), SPINE6)
    assert _names(result) == [n for n in expected if n != "L5-S1"]
    assert [f["code"] for f in result.flags] == ["sacrum_anchor", "missing_disc"]
    cracked = base.copy()
    rows = np.where((cracked == sacrum).any(axis=(1, 2)))[0]
    cracked[rows[len(rows) // 2]][cracked[rows[len(rows) // 2]] == sacrum] = 0  # a 1 mm crack: one sacrum
    result = name_levels(Volume(cracked, spacing=vol.spacing), SPINE6)
    assert _names(result) == expected and [f["code"] for f in result.flags] == ["sacrum_anchor"]
