"""LumbarSegmentLib.slicer.mrml against the real MRML and Segmentations logic (slicer-core), no mocks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.dataset.cases import list_cases, read_case
from LumbarSegmentLib.formats.io import read_volume
from LumbarSegmentLib.core.schema import SchemaError, load_schema
from LumbarSegmentLib.core.volume import Volume

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")
import vtk  # noqa: E402  (comes with slicer-core)
import vtk.util.numpy_support  # noqa: E402

from LumbarSegmentLib.slicer import mrml  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPIDER = SHARED / "spider-masks"


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def ctx():
    return mrml.MRMLContext.standalone()


def oblique_direction(deg=23.0):
    t = np.radians(deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return rz @ np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])


def mr_volume(shape=(10, 12, 7), dtype=np.int16, direction=None):
    rng = np.random.default_rng(1)
    return Volume(rng.integers(0, 900, shape).astype(dtype), spacing=(0.6, 0.75, 3.3),
                  origin=(-12.5, 30.25, 101.0), direction=oblique_direction() if direction is None else direction)


def starter_labels(vol, schema):
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:4, 2:8, 1:5] = schema["vertebral_body"].value
    lab[5:7, 1:11, 0:6] = schema["intervertebral_disc"].value
    lab[8:10, 3:9, 2:4] = schema["vertebral_body"].value
    return vol.with_array(lab)


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


def drafted(ctx, vol=None, schema=None, **kw):
    schema = schema or load_schema("starter")
    vol = vol or mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR T2")
    lab = starter_labels(vol, schema)
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, lab, schema, node,
                                      model_ref="uvd-starter@1", model_sha256="ab" * 32, **kw)
    return vol, node, lab, seg, schema


# ------------------------------------------------------------------------------------------------ volumes
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.uint16])
def test_volume_node_round_trip_is_exact_with_oblique_direction(ctx, dtype):
    vol = mr_volume(dtype=dtype)
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    back = mrml.node_to_volume(node)
    assert np.array_equal(back.array, vol.array) and back.array.dtype == vol.array.dtype
    assert np.allclose(back.direction, vol.direction, atol=1e-12)
    assert np.allclose(back.origin, vol.origin, atol=1e-9) and np.allclose(back.spacing, vol.spacing, atol=1e-12)
    # MRML itself sees the RAS geometry: voxel (i, j, k) lands where the LPS geometry says, x/y negated
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = np.array([3.0, 5.0, 2.0, 1.0])
    ras = np.array(m.MultiplyPoint(ijk))[:3]
    lps = (vol.ijk_to_lps() @ ijk)[:3]
    assert np.allclose(ras, lps * [-1, -1, 1], atol=1e-9)


def test_bool_and_int64_arrays_become_vtk_friendly(ctx):
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol.with_array(vol.array > 400), "mask", label=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert mrml.node_to_volume(node).array.dtype == np.uint8
    node64 = mrml.volume_to_node(ctx.scene, vol.with_array(vol.array.astype(np.int64)), "wide")
    back = mrml.node_to_volume(node64)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, vol.array)


def test_linear_parent_transform_is_applied(ctx):
    vol = mr_volume(direction=np.eye(3))
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    tnode = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 10.0)  # +10 mm towards R, i.e. -10 along LPS x
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    moved = mrml.node_to_volume(node)
    assert np.allclose(moved.origin, np.add(vol.origin, (-10.0, 0, 0)))
    assert np.allclose(mrml.node_to_volume(node, apply_transform=False).origin, vol.origin)


def test_segmentation_follows_the_volume_transform(ctx, tmp_path):
    vol, node, lab, _, schema = drafted(ctx)
    tnode = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    m = vtk.vtkMatrix4x4()
    m.SetElement(1, 3, -7.5)
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, lab, schema, node)  # labels in the node's frame
    assert seg.GetParentTransformNode() is tnode
    assert np.array_equal(mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema).array, lab.array)
    case = mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, tmp_path, "moved")
    image, _ = read_case(case.json_path).load()
    assert image.same_geometry(vol, tol=1e-6)  # exported as loaded, not as moved
    seg.SetAndObserveTransformNodeID(None)
    with pytest.raises(mrml.MRMLError, match="different transforms"):
        mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema)


def _rotate_and_shift(ctx, node, deg=30.0, shift=(50.0, -20.0, 10.0)):
    """Put ``node`` under a rotation about S plus a translation (mm, RAS)."""
    t = np.radians(deg)
    tnode = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate([[np.cos(t), -np.sin(t), 0, shift[0]], [np.sin(t), np.cos(t), 0, shift[1]],
                             [0, 0, 1, shift[2]]]):
        for c, v in enumerate(row):
            m.SetElement(r, c, v)
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    return tnode


def test_rotated_and_shifted_volume_draft_edit_export_land_on_the_right_voxels(ctx, tmp_path):
    """Issue 10: the reference geometry was taken before the transform was set, so it was applied twice."""
    from LumbarSegmentLib.slicer.bridge import _reference_image, _vtk_to_np_image_matrix

    schema = load_schema("starter")
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    tnode = _rotate_and_shift(ctx, node)
    lab = starter_labels(vol, schema)
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, lab, schema, node)
    assert seg.GetParentTransformNode() is tnode
    # the stored reference geometry is the volume's own frame (the transform applies once, on screen)
    assert np.allclose(_vtk_to_np_image_matrix(_reference_image(seg)), mrml.ijk_to_ras(vol), atol=1e-6)
    assert mrml.edited_segments(seg) == [], "an untouched draft must not report as edited"
    assert np.array_equal(mrml.segment_mask(seg, "vertebral_body"), lab.array == 1)
    # Slicer's own export (it resolves the transforms itself) puts the draft on the volume's voxels
    out = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "check")
    ids = vtk.vtkStringArray()
    for sid in mrml.segment_ids(seg):
        ids.InsertNextValue(sid)
    assert ctx.seg_logic.ExportSegmentsToLabelmapNode(seg, ids, out, node)
    exported = slicer.util.arrayFromVolume(out)
    assert exported.shape == lab.shape and np.array_equal(exported > 0, lab.array > 0)
    # an edit through the API, then an export: the corrected voxels, on the volume as loaded
    mask = mrml.segment_mask(seg, "vertebral_body", node)
    mask[0, 0, 0] = True
    mrml.set_segment_mask(ctx.seg_logic, seg, "vertebral_body", mask, node)
    assert mrml.edited_segments(seg) == ["vertebral_body"]
    case = mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, tmp_path, "moved")
    image, label = read_case(case.json_path).load()
    expected = lab.array.copy()
    expected[0, 0, 0] = schema["vertebral_body"].value
    assert image.same_geometry(vol, tol=1e-6) and np.array_equal(label.array, expected)
    assert case.extra["edited_structures"] == ["vertebral_body"]


def test_a_confidence_map_follows_the_volume_transform(ctx):
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    tnode = _rotate_and_shift(ctx, node)
    conf = mrml.volume_to_node(ctx.scene, vol.with_array(np.ones(vol.shape, np.float32)), "MR confidence")
    mrml.follow_transform(conf, node)
    assert conf.GetParentTransformNode() is tnode
    assert np.allclose(mrml.node_to_volume(conf).origin, mrml.node_to_volume(node).origin)
    assert np.allclose(mrml.node_to_volume(conf).direction, mrml.node_to_volume(node).direction)


def test_node_geometry_does_not_copy_voxels(ctx):
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    geo = mrml.node_geometry(node)
    assert geo.same_geometry(vol, tol=1e-12) and geo.array.strides == (0, 0, 0)


def test_spider_geometry_survives_the_node(ctx):
    lab, _ = spider_on_midas("166_t2.mha")  # stored slice-axis-last (PIR)
    back = mrml.node_to_volume(mrml.volume_to_node(ctx.scene, lab, "spider", label=True))
    assert np.array_equal(back.array, lab.array) and back.same_geometry(lab, tol=1e-9)


# ------------------------------------------------------------------------------------------------ label map -> segmentation
def test_labels_to_segmentation_names_colours_terminology_tags(ctx):
    vol, node, lab, seg, schema = drafted(ctx)
    assert seg.GetName() == "MR T2 segmentation"
    assert mrml.segment_ids(seg) == ["vertebral_body", "intervertebral_disc"]
    segmentation = seg.GetSegmentation()
    for cls in schema.foreground:
        s = segmentation.GetSegment(cls.id)
        assert s.GetName() == cls.name
        assert np.allclose(s.GetColor(), cls.color_float)
        assert s.GetTerminology() == schema.terminology_string(cls.id)
        assert mrml.get_tag(s, mrml.DRAFT_HASH_TAG) == mrml.mask_sha1(lab.array == cls.value)
        assert mrml.get_tag(s, mrml.MODEL_REF_TAG) == "uvd-starter@1"
        assert np.array_equal(mrml.segment_mask(seg, cls.id, node), lab.array == cls.value)
    # the terminology string is one Slicer's terminology logic understands
    entry = slicer.vtkSlicerTerminologyEntry()
    term = segmentation.GetSegment("intervertebral_disc").GetTerminology()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(term, entry)
    assert entry.GetTypeObject().GetCodeValue() == "360499006"
    assert mrml.drafted_by(seg) == {"model": "uvd-starter@1", "sha256": "ab" * 32}
    assert mrml.schema_of_node(seg).ids == schema.ids


def test_absent_classes_get_no_segment_and_unknown_values_are_refused(ctx):
    schema = load_schema("midas12")
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:4, 2:4, 2:4] = schema["sacrum"].value
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(lab), schema, node)
    assert mrml.segment_ids(seg) == ["sacrum"]
    lab[0, 0, 0] = 77
    with pytest.raises(SchemaError, match="77"):
        mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(lab), schema, node)


def test_a_new_node_every_time_never_overwriting(ctx):
    vol, node, lab, first, schema = drafted(ctx)
    first_hash = mrml.get_tag(first.GetSegmentation().GetSegment("vertebral_body"), mrml.DRAFT_HASH_TAG)
    other = lab.with_array(np.where(lab.array == 1, 0, lab.array).astype(np.uint8))
    second = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, other, schema, node)
    assert second is not first and second.GetName() != first.GetName()
    assert second.GetName().startswith("MR T2 segmentation")
    assert mrml.segment_ids(first) == ["vertebral_body", "intervertebral_disc"]
    assert mrml.get_tag(first.GetSegmentation().GetSegment("vertebral_body"), mrml.DRAFT_HASH_TAG) == first_hash
    named = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, lab, schema, node, name="mine")
    assert named.GetName() == "mine"


def test_label_map_on_another_grid_is_refused(ctx):
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    shifted = Volume(np.zeros(vol.shape, np.uint8), spacing=vol.spacing, origin=(0, 0, 0), direction=vol.direction)
    with pytest.raises(mrml.MRMLError, match="grid"):
        mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, shifted, load_schema("starter"), node)


def test_segmentation_goes_into_the_volume_study(ctx):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ctx.scene)
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR T2")
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient 7")
    study = sh.CreateStudyItem(patient, "lumbar MR")
    sh.CreateItem(study, node)
    schema = load_schema("starter")
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, starter_labels(vol, schema), schema, node)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


# ------------------------------------------------------------------------------------------------ segmentation -> label map
def test_segmentation_to_labels_is_identical_synthetic_oblique(ctx):
    vol, node, lab, seg, schema = drafted(ctx)
    back = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema)
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, lab.array)
    assert back.same_geometry(vol, tol=1e-9)


def test_segmentation_to_labels_is_identical_spider(ctx):
    lab, schema = spider_on_midas("104_t1.mha")
    node = mrml.volume_to_node(ctx.scene, lab.with_array(lab.array.astype(np.int16)), "104 T1")
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, lab, schema, node)
    assert sorted(mrml.segment_ids(seg)) == ["intervertebral_disc", "spinal_cavity", "vertebrae"]
    back = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema)
    assert np.array_equal(back.array, lab.array) and back.same_geometry(lab)


def test_segments_in_another_order_map_by_name(ctx):
    schema = load_schema("midas12")
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    seg = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by hand")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
    expected = np.zeros(vol.shape, np.uint8)
    # reverse schema order, display names and ids mixed, auto-generated segment ids
    for k, (name, cid) in enumerate([("Muscle", "muscle"), ("spinal_cavity", "spinal_cavity"),
                                     ("SACRUM", "sacrum"), ("Vertebrae", "vertebrae")]):
        sid = seg.GetSegmentation().AddEmptySegment("", name)
        mask = np.zeros(vol.shape, bool)
        mask[2 * k:2 * k + 2, 1:9, 1:6] = True
        mrml.set_segment_mask(ctx.seg_logic, seg, sid, mask, node)
        expected[mask] = schema[cid].value
    back = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema)
    assert np.array_equal(back.array, expected)


def test_unknown_segment_is_refused_by_name(ctx, tmp_path):
    vol, node, lab, seg, schema = drafted(ctx)
    sid = seg.GetSegmentation().AddEmptySegment("", "Tumour")
    mrml.set_segment_mask(ctx.seg_logic, seg, sid, lab.array == 1, node)
    with pytest.raises(SchemaError, match="'Tumour'"):
        mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema)
    with pytest.raises(SchemaError, match="'Tumour'"):
        mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, tmp_path / "ds", "case1")
    assert not (tmp_path / "ds").exists() or not list((tmp_path / "ds").glob("*.json"))


def test_overlap_later_schema_class_wins_or_error(ctx):
    vol, node, lab, seg, schema = drafted(ctx)
    disc = mrml.segment_mask(seg, "intervertebral_disc", node)
    disc[1:3, 2:4, 1:3] = True  # 8 voxels of vertebral body
    mrml.set_segment_mask(ctx.seg_logic, seg, "intervertebral_disc", disc, node)
    assert np.array_equal(mrml.segment_mask(seg, "vertebral_body", node), lab.array == 1)  # untouched
    back = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema)
    expected = lab.array.copy()
    expected[1:3, 2:4, 1:3] = 2
    assert np.array_equal(back.array, expected)
    assert back.metadata["overlaps"] == {"vertebral_body/intervertebral_disc": 8}
    with pytest.raises(SchemaError, match="overlap"):
        mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema, overlap="error")
    assert seg.GetSegmentation().GetNumberOfLayers() == 2  # overlapping segments need two layers
    disc[1:3, 2:4, 1:3] = False
    mrml.set_segment_mask(ctx.seg_logic, seg, "intervertebral_disc", disc, node)
    assert seg.GetSegmentation().GetNumberOfLayers() == 1  # ... and share one again once they do not


# ------------------------------------------------------------------------------------------------ files
def test_seg_nrrd_round_trip_through_storage_node(ctx, tmp_path):
    vol, node, lab, seg, schema = drafted(ctx)
    path = mrml.save_seg_nrrd(ctx.scene, seg, tmp_path / "MR.seg.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["MR.seg.nrrd"]
    loaded = mrml.load_seg_nrrd(ctx.scene, path)
    assert loaded is not seg and loaded.GetName() == "MR"
    assert mrml.segment_ids(loaded) == mrml.segment_ids(seg)
    s = loaded.GetSegmentation().GetSegment("intervertebral_disc")
    assert s.GetName() == "Intervertebral disc"
    assert s.GetTerminology() == schema.terminology_string("intervertebral_disc")
    back = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, loaded, node, schema)
    assert np.array_equal(back.array, lab.array)
    assert mrml.edited_segments(loaded, schema, node) == []  # tags survive the file
    assert mrml.drafted_by(loaded)["model"] == "uvd-starter@1"
    with pytest.raises(mrml.MRMLError, match=".seg.nrrd"):
        mrml.save_seg_nrrd(ctx.scene, seg, tmp_path / "MR.nrrd")


def test_color_table(ctx):
    schema = load_schema("midas12")
    table = mrml.make_color_table(ctx.scene, schema)
    assert table.GetNumberOfColors() == 12
    for cls in schema.classes:
        assert table.GetColorName(cls.value) == cls.name
        rgba = [0.0] * 4
        table.GetColor(cls.value, rgba)
        assert np.allclose(rgba[:3], cls.color_float)
    assert mrml.make_color_table(ctx.scene, schema) is table  # reused, not duplicated


# ------------------------------------------------------------------------------------------------ edits
def test_edited_segments_detects_changes_made_through_mrml(ctx):
    vol, node, lab, seg, schema = drafted(ctx)
    assert mrml.edited_segments(seg) == []
    # change the vertebral body through the MRML API: a vtkOrientedImageData set onto the segment
    mask = lab.array == 1
    mask[0, 0, 0] = True
    img = slicer.vtkOrientedImageData()
    img.SetDimensions(*vol.size_ijk)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    img.SetImageToWorldMatrix(m)
    vtk.util.numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = mask.ravel()
    assert ctx.seg_logic.SetBinaryLabelmapToSegment(img, seg, "vertebral_body", ctx.seg_logic.MODE_REPLACE)
    assert mrml.edited_segments(seg) == ["vertebral_body"]
    # a segment added by hand counts as edited; so does a drafted one the user deleted
    sid = seg.GetSegmentation().AddEmptySegment("", "Sacrum")
    seg.GetSegmentation().RemoveSegment("intervertebral_disc")
    assert sid != "Sacrum"
    assert set(mrml.edited_segments(seg)) == {"vertebral_body", "Sacrum", "intervertebral_disc"}


def test_update_unedited_segments_leaves_edited_ones_alone(ctx):
    vol, node, lab, seg, schema = drafted(ctx)
    edited = mrml.segment_mask(seg, "vertebral_body", node)
    edited[1:4, 2:8, 1:5] = False  # the user erased the upper body
    mrml.set_segment_mask(ctx.seg_logic, seg, "vertebral_body", edited, node)
    new = lab.array.copy()
    new[new == 2] = 0
    new[4:8, 0:12, 0:7] = 2  # the new draft has a bigger disc, overlapping the edited body
    new[8:10, 3:9, 2:4] = 1
    result = mrml.update_unedited_segments(ctx.scene, ctx.seg_logic, seg, vol.with_array(new), schema, node,
                                           model_ref="uvd-starter@2")
    assert result == {"updated": ["intervertebral_disc"], "kept": ["vertebral_body"], "added": []}
    assert np.array_equal(mrml.segment_mask(seg, "vertebral_body", node), edited)
    assert np.array_equal(mrml.segment_mask(seg, "intervertebral_disc", node), new == 2)
    assert mrml.edited_segments(seg) == ["vertebral_body"]  # the re-drafted disc counts as a fresh draft
    disc = seg.GetSegmentation().GetSegment("intervertebral_disc")
    assert mrml.get_tag(disc, mrml.MODEL_REF_TAG) == "uvd-starter@2"


def test_update_adds_new_classes_but_respects_deletions(ctx):
    schema = load_schema("midas12")
    vol = mr_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:3, 1:3, 1:3] = schema["vertebrae"].value
    lab[5:7, 1:3, 1:3] = schema["sacrum"].value
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(lab), schema, node)
    seg.GetSegmentation().RemoveSegment("sacrum")
    lab[8:9, 1:3, 1:3] = schema["muscle"].value
    result = mrml.update_unedited_segments(ctx.scene, ctx.seg_logic, seg, vol.with_array(lab), schema, node)
    assert result == {"updated": ["vertebrae"], "kept": [], "added": ["muscle"]}
    assert sorted(mrml.segment_ids(seg)) == ["muscle", "vertebrae"]
    assert np.array_equal(mrml.segment_mask(seg, "muscle", node), lab == schema["muscle"].value)


# ------------------------------------------------------------------------------------------------ export
def test_export_case_reads_back_and_never_overwrites(ctx, tmp_path):
    vol, node, lab, seg, schema = drafted(ctx)
    mask = mrml.segment_mask(seg, "intervertebral_disc", node)
    mask[9, 11, 6] = True
    mrml.set_segment_mask(ctx.seg_logic, seg, "intervertebral_disc", mask, node)
    ds = tmp_path / "dataset"
    case = mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, ds, "VB2_06", sequence="T2w")
    back = read_case(case.json_path)
    assert back.case_id == "VB2_06" and back.version == 1
    assert back.labels == {1: "vertebral_body", 2: "intervertebral_disc"}
    assert back.annotated_structures == ["vertebral_body", "intervertebral_disc"]
    assert back.extra["drafted_by"] == {"model": "uvd-starter@1", "sha256": "ab" * 32}
    assert back.extra["edited_structures"] == ["intervertebral_disc"]
    image, label = back.load()
    expected = lab.array.copy()
    expected[9, 11, 6] = 2
    assert np.array_equal(image.array, vol.array) and image.same_geometry(vol, tol=1e-6)
    assert np.array_equal(label.array, expected)
    first_json = case.json_path.read_text()

    again = mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, ds, "VB2_06",
                             annotated_structures=["vertebral_body", "intervertebral_disc", "background"])
    assert again.version == 2 and again.json_path != case.json_path
    assert case.json_path.read_text() == first_json  # the first export is untouched
    assert [c.version for c in list_cases(ds)] == [2]
    assert json.loads(again.json_path.read_text())["annotated_structures"] == ["vertebral_body",
                                                                               "intervertebral_disc"]


def test_export_refuses_labelled_structures_missing_from_annotated(ctx, tmp_path):
    vol, node, lab, seg, schema = drafted(ctx)
    from LumbarSegmentLib.dataset.cases import CaseError

    with pytest.raises(CaseError, match="intervertebral_disc"):
        mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, tmp_path, "c1",
                         annotated_structures=["vertebral_body"])
    with pytest.raises(SchemaError, match="kidney"):
        mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, schema, tmp_path, "c1",
                         annotated_structures=["vertebral_body", "intervertebral_disc", "kidney"])
