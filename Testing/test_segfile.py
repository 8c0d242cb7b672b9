"""LumbarSegmentLib.formats.segfile: .seg.nrrd files written without Slicer, checked with Slicer's own reader.

The writer is pure SimpleITK; slicer-core (a test-only dependency) proves that
Slicer's vtkMRMLSegmentationStorageNode loads the files with the right segments.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.formats.io import read_volume
from LumbarSegmentLib.core.schema import SchemaError, load_schema
from LumbarSegmentLib.formats.segfile import (DRAFT_HASH_TAG, SegFileError, mask_sha1, read_seg_nrrd,
                                      read_segments_info, write_seg_nrrd)
from LumbarSegmentLib.core.volume import Volume

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPIDER = SHARED / "spider-masks"

slicer = pytest.importorskip("slicer", reason="slicer-core is needed to check files against Slicer's reader")
mrml = pytest.importorskip("LumbarSegmentLib.slicer.mrml")


def oblique_direction(deg=17.0):
    t = np.radians(deg)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    return rot @ np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])  # a PIR-like stack, tilted


def synthetic_labels(schema, shape=(9, 12, 14)):
    lab = np.zeros(shape, np.uint8)
    vb, disc = schema["vertebral_body"].value, schema["intervertebral_disc"].value
    lab[1:4, 2:7, 3:9] = vb
    lab[5:7, 1:10, 2:12] = disc
    lab[8, 0, 0] = vb
    return Volume(lab, spacing=(0.55, 0.7, 3.3), origin=(12.5, -40.25, 7.0), direction=oblique_direction())


def spider_on_midas(name="104_t1.mha"):
    path = SPIDER / name
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (the SPIDER masks live in ../shared/data)")
    vol = read_volume(path)
    a = vol.array
    schema = load_schema("midas12")
    out = np.zeros(a.shape, np.uint8)
    out[((a >= 1) & (a <= 9)) | ((a >= 17) & (a <= 24))] = schema["vertebrae"].value
    out[((a >= 201) & (a <= 209)) | ((a >= 217) & (a <= 224))] = schema["intervertebral_disc"].value
    out[a == 100] = schema["spinal_cavity"].value
    return vol.with_array(out), schema


def load_with_slicer(path):
    ctx = mrml.MRMLContext.standalone()
    seg = mrml.load_seg_nrrd(ctx.scene, path)
    return ctx, seg


# ------------------------------------------------------------------------------------------------
def test_round_trip_keeps_voxels_and_oblique_geometry(tmp_path):
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    path = write_seg_nrrd(lab, schema, tmp_path / "case.seg.nrrd", model_ref="uvd-starter@1")
    back = read_seg_nrrd(path, schema)
    assert np.array_equal(back.array, lab.array) and back.array.dtype == np.uint8
    assert back.same_geometry(lab, tol=1e-6)
    info = {s["id"]: s for s in read_segments_info(__import__("SimpleITK").ReadImage(str(path)))}
    assert set(info) == {"vertebral_body", "intervertebral_disc"}
    assert info["vertebral_body"]["tags"]["LumbarSegment.ModelRef"] == "uvd-starter@1"
    assert not list(tmp_path.glob(".*partial*")), "temporary files must not be left behind"


def test_slicer_reads_names_colours_terminology_and_voxels(tmp_path):
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    path = write_seg_nrrd(lab, schema, tmp_path / "case.seg.nrrd")
    ctx, seg = load_with_slicer(path)
    segmentation = seg.GetSegmentation()
    assert mrml.segment_ids(seg) == ["vertebral_body", "intervertebral_disc"]
    ref = mrml.volume_to_node(ctx.scene, lab.with_array(np.zeros(lab.shape, np.int16)), "ref")
    for cls in schema.foreground:
        segment = segmentation.GetSegment(cls.id)
        assert segment.GetName() == cls.name
        assert np.allclose(segment.GetColor(), cls.color_float, atol=1e-5)
        assert segment.GetTerminology() == schema.terminology_string(cls.id)
        assert np.array_equal(mrml.segment_mask(seg, cls.id, ref), lab.array == cls.value)
        # the draft hash written without Slicer is the one Slicer-side edit tracking computes
        assert mrml.get_tag(segment, DRAFT_HASH_TAG) == mask_sha1(lab.array == cls.value)
    assert mrml.edited_segments(seg, schema) == []
    assert np.array_equal(mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, ref, schema).array,
                          lab.array)


def test_spider_mask_through_file_and_slicer(tmp_path):
    lab, schema = spider_on_midas("104_t1.mha")
    path = write_seg_nrrd(lab, schema, tmp_path / "104.seg.nrrd")
    back = read_seg_nrrd(path, schema)
    assert np.array_equal(back.array, lab.array) and back.same_geometry(lab)
    ctx, seg = load_with_slicer(path)
    names = {seg.GetSegmentation().GetSegment(s).GetName() for s in mrml.segment_ids(seg)}
    assert names == {"Vertebrae", "Intervertebral discs", "Spinal cavity"}
    ref = mrml.volume_to_node(ctx.scene, lab, "ref", label=True)
    assert np.array_equal(mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, ref, schema).array, lab.array)


def test_pir_spider_mask_round_trip(tmp_path):
    lab, schema = spider_on_midas("166_t2.mha")
    path = write_seg_nrrd(lab, schema, tmp_path / "166.seg.nrrd")
    back = read_seg_nrrd(path, schema)
    assert np.array_equal(back.array, lab.array) and back.same_geometry(lab)


def test_reads_slicer_file_by_name_not_order_and_layers(tmp_path):
    """A Slicer-written file whose segments are in reverse order, with other label values, overlapping."""
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    ctx = mrml.MRMLContext.standalone()
    ref = mrml.volume_to_node(ctx.scene, lab.with_array(np.zeros(lab.shape, np.int16)), "ref")
    seg = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "hand made")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
    segmentation = seg.GetSegmentation()
    disc_id = segmentation.AddEmptySegment("", "Intervertebral disc")  # first, unlike the schema
    vb_id = segmentation.AddEmptySegment("", "vertebral body")  # matched case-insensitively
    disc_mask = lab.array == 2
    disc_mask[1, 2, 3] = True  # overlaps one vertebral-body voxel
    mrml.set_segment_mask(ctx.seg_logic, seg, disc_id, disc_mask, ref)
    mrml.set_segment_mask(ctx.seg_logic, seg, vb_id, lab.array == 1, ref)
    path = mrml.save_seg_nrrd(ctx.scene, seg, tmp_path / "hand.seg.nrrd")
    back = read_seg_nrrd(path, schema, reference=lab)
    expected = lab.array.copy()
    expected[1, 2, 3] = 2  # the disc comes later in the schema: it wins the overlap
    assert np.array_equal(back.array, expected)
    assert back.metadata["overlaps"] == {"vertebral_body/intervertebral_disc": 1}
    with pytest.raises(SchemaError, match="overlap"):
        read_seg_nrrd(path, schema, reference=lab, overlap="error")


def test_unknown_segment_name_is_a_clear_error(tmp_path):
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    path = write_seg_nrrd(lab, schema, tmp_path / "x.seg.nrrd")
    ctx, seg = load_with_slicer(path)
    seg.GetSegmentation().GetSegment("vertebral_body").SetName("Tumour")
    renamed = mrml.save_seg_nrrd(ctx.scene, seg, tmp_path / "renamed.seg.nrrd")
    with pytest.raises(SchemaError, match="'Tumour'.*drafted as 'Vertebral body'"):
        read_seg_nrrd(renamed, schema)


def test_write_refuses_values_outside_the_schema(tmp_path):
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    bad = lab.array.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(SchemaError, match=r"\[7\]"):
        write_seg_nrrd(lab.with_array(bad), schema, tmp_path / "bad.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_cropped_file_is_placed_back_on_the_reference_grid(tmp_path):
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    crop = lab.array[1:8, 0:11, 2:13]
    origin = lab.origin + lab.direction @ (np.array(lab.spacing) * [2, 0, 1])
    cropped = Volume(crop, spacing=lab.spacing, origin=tuple(origin), direction=lab.direction)
    path = write_seg_nrrd(cropped, schema, tmp_path / "crop.seg.nrrd")
    back = read_seg_nrrd(path, schema, reference=lab)
    expected = np.zeros_like(lab.array)
    expected[1:8, 0:11, 2:13] = crop
    assert np.array_equal(back.array, expected) and back.same_geometry(lab)
    shifted = Volume(crop, spacing=lab.spacing, origin=tuple(origin + 0.3), direction=lab.direction)
    path2 = write_seg_nrrd(shifted, schema, tmp_path / "shift.seg.nrrd")
    with pytest.raises(SegFileError, match="fraction of a voxel"):
        read_seg_nrrd(path2, schema, reference=lab)


def test_empty_label_map_gives_a_file_without_segments(tmp_path):
    schema = load_schema("starter")
    lab = synthetic_labels(schema)
    path = write_seg_nrrd(lab.with_array(np.zeros(lab.shape, np.uint8)), schema, tmp_path / "empty.seg.nrrd")
    assert not read_seg_nrrd(path, schema).array.any()
    _, seg = load_with_slicer(path)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0
