"""The bridge between LumbarSegmentLib and Slicer's MRML scene: the only Lib module that knows MRML.

Every function takes the scene and the Segmentations module logic as arguments,
so the very same code runs in desktop Slicer (the module hands over
``slicer.mrmlScene`` and ``slicer.modules.segmentations.logic()``) and in plain
Python with the ``slicer-core`` wheel (tests and scripts build a
:class:`MRMLContext` with :meth:`MRMLContext.standalone`).

Conventions
-----------
* A :class:`~LumbarSegmentLib.volume.Volume` is LPS with its array indexed
  ``[k, j, i]``; MRML is RAS. Going between them negates the first two rows of the
  direction matrix and the first two origin coordinates; nothing is resampled, so the
  round trip is exact (oblique directions included).
* Transforms: segmentation work happens in the volume node's own frame (its parent
  transform not applied), and a segmentation made here is put under the volume's
  parent transform, so the two stay aligned on screen and an export is the volume as
  loaded. :func:`node_to_volume` applies a linear parent transform unless asked not to.
* A segmentation node made here holds one segment per schema class present in the
  label map. The segment ID is the class id (``"intervertebral_disc"``), the name is
  the display name, the colour and the terminology come from the schema.
* Segments are matched to schema classes **by name (class id or display name, any
  case; the segment ID only for a nameless segment), never by their position** in
  the node: users reorder and add segments freely, and a segment renamed to
  something the schema does not know is refused with its name in the message.
* Draft tracking: every drafted segment carries the tag ``LumbarSegment.DraftSHA1``,
  the SHA-1 of its binary mask on the segmentation's reference grid when the model
  produced it, plus the model reference and weights checksum. A segment whose
  current mask hashes differently was edited; a segment without the tag was added
  by hand. This drives :func:`edited_segments`, :func:`update_unedited_segments`
  and the ``edited_structures`` of an exported case.
* Overlapping segments (possible when the Segment Editor's masking allows overlap)
  are flattened into one label map by painting the classes in schema order: where two
  segments overlap, the class that comes **later in the schema wins**. Pass
  ``overlap="error"`` to refuse overlaps instead. The number of overlapping voxels
  per pair is recorded in the result's ``metadata["overlaps"]``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .schema import BACKGROUND_ID, LabelClass, LabelSchema, SchemaError
from .segfile import CLASS_TAG, DRAFT_HASH_TAG, MODEL_REF_TAG, MODEL_SHA_TAG, mask_sha1, match_segment, tag_value
from .volume import Volume, VolumeError

# Segment tags (DRAFT_HASH_TAG etc.) live in segfile, which writes them too; node attributes:
ATTR_PREFIX = "LumbarSegment."
SCHEMA_ATTR = "LumbarSegment.Schema"
SCHEMA_JSON_ATTR = "LumbarSegment.SchemaJSON"
MODEL_REF_ATTR = "LumbarSegment.ModelRef"
MODEL_SHA_ATTR = "LumbarSegment.ModelSHA256"
DRAFTED_ATTR = "LumbarSegment.DraftedClasses"
REPORT_ATTR = "LumbarSegment.Report"

BINARY_LABELMAP = "Binary labelmap"
OVERLAP_POLICIES = ("last", "error")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class MRMLError(RuntimeError):
    """A node is missing, of the wrong kind, or cannot be converted."""


def _slicer():
    try:
        import slicer  # the desktop application's module or the slicer-core wheel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MRMLError("Slicer's MRML libraries are not available: run inside 3D Slicer or "
                        "`pip install slicer-core`") from exc
    return slicer


# ===================================================================== context
@dataclass
class MRMLContext:
    """The three objects every function here needs, bundled for convenience."""

    scene: Any
    app_logic: Any
    seg_logic: Any

    @classmethod
    def standalone(cls) -> "MRMLContext":
        """A fresh scene with its application and Segmentations logics (plain Python, slicer-core)."""
        slicer = _slicer()
        scene = slicer.vtkMRMLScene()
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        seg_logic.SetMRMLScene(scene)
        seg_logic.SetMRMLApplicationLogic(app_logic)
        return cls(scene=scene, app_logic=app_logic, seg_logic=seg_logic)

    @classmethod
    def from_application(cls, slicer_module=None) -> "MRMLContext":
        """The running desktop application's scene and logics."""
        slicer = slicer_module or _slicer()
        return cls(scene=slicer.mrmlScene, app_logic=slicer.app.applicationLogic(),
                   seg_logic=slicer.modules.segmentations.logic())


# ===================================================================== volumes
def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _np_matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume: Volume) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k, 1) to RAS millimetres."""
    m = volume.ijk_to_lps()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ m


def _array_for_vtk(array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64):  # VTK 'long long' volumes do not render: narrow when lossless
        for t in (np.int16, np.int32) if arr.dtype == np.int64 else (np.uint16, np.uint32):
            if arr.size == 0 or (arr.min() >= np.iinfo(t).min and arr.max() <= np.iinfo(t).max):
                return arr.astype(t)
        return arr.astype(np.float64)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


def _set_geometry(node, volume: Volume) -> None:
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*(_LPS_TO_RAS @ np.asarray(volume.origin)))
    node.SetIJKToRASDirectionMatrix(_vtk_matrix(np.block([
        [_LPS_TO_RAS @ volume.direction, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]])))


def volume_to_node(scene, volume: Volume, name: str, *, label: bool = False, node=None):
    """Add ``volume`` to ``scene`` as a new scalar (or label map) volume node named ``name``.

    Geometry is copied exactly (spacing, origin, direction including oblique ones). Pass
    ``node`` to fill an existing volume node instead of creating one.
    """
    slicer = _slicer()
    if node is None:
        cls = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(cls, name)
    elif name:
        node.SetName(name)
    _set_geometry(node, volume)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(_array_for_vtk(volume.array)))
    with contextlib.suppress(Exception):  # display nodes need the colour logic in some setups
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    src = volume.metadata.get("source") if isinstance(volume.metadata, dict) else None
    if src:
        node.SetAttribute(ATTR_PREFIX + "Source", str(src))
    return node


def _parent_transform_matrix(node) -> np.ndarray | None:
    """The node's parent transform to world as 4x4, ``None`` if untransformed; refuses warping transforms."""
    tnode = node.GetParentTransformNode()
    if tnode is None:
        return None
    if not tnode.IsTransformToWorldLinear():
        raise MRMLError(f"{node.GetName()} is under a non-linear transform ({tnode.GetName()}); harden the "
                        f"transform (Transforms module) and try again")
    import vtk

    m = vtk.vtkMatrix4x4()
    tnode.GetMatrixTransformToWorld(m)
    return _np_matrix(m)


def _slicer_direction_matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    return _np_matrix(m)[:3, :3]


def _node_frame(node, apply_transform: bool):
    """(spacing, LPS origin, LPS direction) of a volume node, optionally through its linear parent transform."""
    spacing = np.array(node.GetSpacing(), dtype=float)
    origin_ras = np.array(node.GetOrigin(), dtype=float)
    dm = _slicer_direction_matrix(node)
    tm = _parent_transform_matrix(node) if apply_transform else None
    if tm is not None:
        m = tm @ np.block([[dm @ np.diag(spacing), origin_ras[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        dm = m[:3, :3] / spacing
        origin_ras = m[:3, 3]
    return tuple(spacing), tuple(_LPS_TO_RAS @ origin_ras), _LPS_TO_RAS @ dm


def _check_volume_node(node) -> None:
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise MRMLError(f"expected a scalar volume node, got {node.GetClassName() if node else None}")
    if node.GetImageData() is None:
        raise MRMLError(f"volume {node.GetName()!r} holds no image data")


def node_to_volume(node, *, apply_transform: bool = True) -> Volume:
    """A scalar volume node's voxels and geometry as an LPS :class:`Volume` (a copy).

    A linear parent transform is applied to the geometry (``apply_transform``); a
    non-linear one is refused. Without a transform the round trip with
    :func:`volume_to_node` is exact.
    """
    slicer = _slicer()
    _check_volume_node(node)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    spacing, origin, direction = _node_frame(node, apply_transform)
    try:
        return Volume(array, spacing=spacing, origin=origin, direction=direction,
                      metadata={"source": f"mrml:{node.GetName()}"})
    except VolumeError as exc:
        raise MRMLError(f"volume {node.GetName()!r}: {exc}") from None


def node_geometry(node, *, apply_transform: bool = False) -> Volume:
    """A volume node's grid as a :class:`Volume` whose voxels are a zero-copy placeholder.

    By default in the node's own frame (its parent transform is not applied): the frame
    the segmentation work here happens in (see :func:`labels_to_segmentation`).
    """
    _check_volume_node(node)
    i, j, k = node.GetImageData().GetDimensions()
    spacing, origin, direction = _node_frame(node, apply_transform)
    try:
        return Volume(np.broadcast_to(np.zeros((), np.uint8), (k, j, i)), spacing=spacing, origin=origin,
                      direction=direction, metadata={"source": f"mrml:{node.GetName()}"})
    except VolumeError as exc:
        raise MRMLError(f"volume {node.GetName()!r}: {exc}") from None


def _geometry_of(node_or_volume) -> Volume:
    """The grid of a reference volume node (its own frame) or a Volume."""
    if isinstance(node_or_volume, Volume):
        return node_or_volume
    return node_geometry(node_or_volume)


# ===================================================================== masks and hashes
def _oriented_image(array: np.ndarray, ijk_to_ras_m: np.ndarray):
    """A ``vtkOrientedImageData`` holding ``array`` ([k, j, i]) with the given geometry."""
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(array, dtype=np.uint8)
    img = slicer.vtkOrientedImageData()
    k, j, i = arr.shape
    img.SetDimensions(i, j, k)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    img.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras_m))
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = arr.ravel()
    return img


def _reference_image(seg_node, reference=None):
    """Geometry-only oriented image of the reference grid (a volume node, a Volume or the node's own)."""
    slicer = _slicer()
    ref = slicer.vtkOrientedImageData()
    if reference is not None:
        geo = _geometry_of(reference)
        i, j, k = geo.size_ijk
        ref.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
        ref.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(geo)))
        return ref
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = seg_node.GetSegmentation().GetConversionParameter(name)
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, ref, False):
        raise MRMLError(f"segmentation {seg_node.GetName()!r} has no reference geometry; pass the volume node")
    return ref


def _image_array(img) -> np.ndarray:
    from vtk.util import numpy_support

    x0, x1, y0, y1, z0, z1 = img.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0 or img.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), np.uint8)
    return numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1,
                                                                               x1 - x0 + 1)


def _same_grid(a, b) -> bool:
    ma, mb = _vtk_to_np_image_matrix(a), _vtk_to_np_image_matrix(b)
    return np.allclose(ma, mb, atol=1e-6)


def _vtk_to_np_image_matrix(img) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    img.GetImageToWorldMatrix(m)
    return _np_matrix(m)


def segment_mask(seg_node, segment_id: str, reference=None) -> np.ndarray:
    """Boolean mask ``[k, j, i]`` of one segment on the reference grid.

    ``reference`` is a volume node or a :class:`Volume`; by default the segmentation's own
    reference geometry. Works whether the segment has its own labelmap layer or shares one.
    """
    slicer = _slicer()
    seg_logic_cls = slicer.vtkSlicerSegmentationsModuleLogic
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise MRMLError(f"segmentation {seg_node.GetName()!r} has no segment {segment_id!r}")
    ref = _reference_image(seg_node, reference)
    x0, x1, y0, y1, z0, z1 = ref.GetExtent()
    shape = (z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    img = slicer.vtkOrientedImageData()
    if not seg_logic_cls.GetSegmentBinaryLabelmapRepresentation(seg_node, segment_id, img, False):
        raise MRMLError(f"segment {segment_id!r} has no binary labelmap representation")
    src = _image_array(img)
    if src.size == 0:
        return np.zeros(shape, dtype=bool)
    value = segment.GetLabelValue() or 1
    if _same_grid(img, ref):  # usual case: only the extent differs, copy the overlap exactly
        out = np.zeros(shape, dtype=bool)
        sx0, sx1, sy0, sy1, sz0, sz1 = img.GetExtent()
        lo = np.maximum([sz0, sy0, sx0], [z0, y0, x0])
        hi = np.minimum([sz1, sy1, sx1], [z1, y1, x1])
        if np.all(hi >= lo):
            s_src = tuple(slice(a - b, c - b + 1) for a, b, c in zip(lo, (sz0, sy0, sx0), hi))
            s_dst = tuple(slice(a - b, c - b + 1) for a, b, c in zip(lo, (z0, y0, x0), hi))
            out[s_dst] = src[s_src] == value
        return out
    resampled = slicer.vtkOrientedImageData()
    ref_alloc = slicer.vtkOrientedImageData()
    ref_alloc.DeepCopy(ref)
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            img, ref_alloc, resampled, False, False):
        raise MRMLError(f"cannot resample segment {segment_id!r} onto the reference grid")
    arr = _image_array(resampled)
    if arr.shape != shape:
        raise MRMLError(f"resampled segment {segment_id!r} has shape {arr.shape}, expected {shape}")
    return arr == value


def set_segment_mask(seg_logic, seg_node, segment_id: str, mask: np.ndarray, reference=None) -> None:
    """Replace one segment's voxels by ``mask`` (on the reference grid); other segments are untouched."""
    slicer = _slicer()
    ref = _reference_image(seg_node, reference)
    img = _oriented_image(np.asarray(mask) != 0, _vtk_to_np_image_matrix(ref))
    x0, _, y0, _, z0, _ = ref.GetExtent()
    if (x0, y0, z0) != (0, 0, 0):
        img.SetExtent(*ref.GetExtent())
    # Give the segment a layer of its own first, so replacing it cannot clip a neighbour it overlaps.
    seg_node.GetSegmentation().SeparateSegmentLabelmap(segment_id)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        img, seg_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    if not ok:
        raise MRMLError(f"could not set the voxels of segment {segment_id!r}")
    seg_node.GetSegmentation().CollapseBinaryLabelmaps(False)  # share layers again where nothing overlaps


# ===================================================================== tags
def get_tag(segment, tag: str) -> str | None:
    import vtk

    ref = vtk.reference("")
    return str(ref) if segment.GetTag(tag, ref) else None


def segment_ids(seg_node) -> list[str]:
    seg = seg_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def class_for_segment(schema: LabelSchema, segment, segment_id: str) -> LabelClass:
    """The schema class a segment stands for: by its name (its ID if nameless), never by position."""
    return match_segment(schema, segment.GetName() or "", segment_id)


# ===================================================================== colour table
def make_color_table(scene, schema: LabelSchema, name: str | None = None):
    """A colour table node with one entry per schema value (name, colour, terminology).

    Reuses an existing table made for the identical schema, so repeated calls do not
    clutter the scene.
    """
    digest = hashlib.sha1(json.dumps(schema.to_dict(), sort_keys=True).encode()).hexdigest()
    name = name or f"{schema.name} (LumbarSegment)"
    existing = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for n in range(existing.GetNumberOfItems()):
        node = existing.GetItemAsObject(n)
        if node.GetAttribute(ATTR_PREFIX + "SchemaSHA1") == digest:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(c.value for c in schema.classes) + 1)
    for v in range(node.GetNumberOfColors()):
        node.SetColor(v, "", 0.0, 0.0, 0.0, 0.0)
        if hasattr(node, "SetColorDefined"):
            node.SetColorDefined(v, False)
    for c in schema.classes:
        alpha = 0.0 if c.id == BACKGROUND_ID else 1.0
        node.SetColor(c.value, c.name, *c.color_float, alpha)
        if hasattr(node, "SetColorDefined"):
            node.SetColorDefined(c.value, True)
        term = schema.terminology_string(c.id)
        if term and hasattr(node, "SetTerminologyFromString"):
            with contextlib.suppress(Exception):
                node.SetTerminologyFromString(c.value, term)
    node.SetAttribute(ATTR_PREFIX + "SchemaSHA1", digest)
    node.SetAttribute(SCHEMA_ATTR, schema.name)
    return node


# ===================================================================== label map -> segmentation
def _unique_name(scene, name: str) -> str:
    return name if scene.GetFirstNodeByName(name) is None else scene.GenerateUniqueName(name)


def _check_on_grid(label_volume: Volume, reference: Volume, what: str) -> None:
    if not label_volume.same_geometry(reference):
        raise MRMLError(
            f"{what} is not on the reference volume's grid ({label_volume.describe_geometry()} origin "
            f"{label_volume.origin} vs {reference.describe_geometry()} origin {reference.origin}); "
            f"resample it onto the volume first"
        )


def _present_classes(labels: np.ndarray, schema: LabelSchema) -> list[LabelClass]:
    values = {int(v) for v in np.unique(labels)}
    unknown = sorted(v for v in values if v not in {c.value for c in schema.classes})
    if unknown:
        raise SchemaError(f"label values {unknown} are not in schema {schema.name!r} "
                          f"(values: {[c.value for c in schema.classes]})")
    return [c for c in schema.foreground if c.value in values]


def _style_segment(segment, schema: LabelSchema, cls: LabelClass) -> None:
    segment.SetName(cls.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*cls.color_float)
    segment.SetColorAutoGenerated(False)
    term = schema.terminology_string(cls.id)
    if term:
        segment.SetTerminology(term)
    segment.SetTag(CLASS_TAG, cls.id)


def _tag_draft(segment, mask: np.ndarray, model_ref: str | None, model_sha256: str | None) -> None:
    segment.SetTag(DRAFT_HASH_TAG, mask_sha1(mask))
    if model_ref:
        segment.SetTag(MODEL_REF_TAG, tag_value(model_ref))
    if model_sha256:
        segment.SetTag(MODEL_SHA_TAG, tag_value(model_sha256))


def _place_in_study(scene, seg_node, reference_node) -> bool:
    """Put ``seg_node`` beside ``reference_node`` in the subject hierarchy (same study); False if impossible."""
    slicer = _slicer()
    sh_cls = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    if sh_cls is None:
        return False
    try:
        sh = sh_cls.GetSubjectHierarchyNode(scene)
        if sh is None:
            return False
        vol_item = sh.GetItemByDataNode(reference_node)
        if not vol_item:
            return False
        parent = sh.GetItemParent(vol_item)
        item = sh.GetItemByDataNode(seg_node) or sh.CreateItem(parent, seg_node)
        sh.SetItemParent(item, parent)
        return True
    except Exception:  # the hierarchy is a convenience; never fail a segmentation over it
        return False


def labels_to_segmentation(scene, seg_logic, label_volume: Volume, schema: LabelSchema, reference_node,
                           name: str | None = None, *, model_ref: str | None = None,
                           model_sha256: str | None = None, report: dict | None = None):
    """A new segmentation node from a label map: one segment per schema class present.

    The label map must be on ``reference_node``'s grid in the node's own frame (its parent
    transform not applied: ``node_to_volume(node, apply_transform=False)``; the same thing
    when there is no transform). The segmentation goes under the volume's parent
    transform, so the two stay aligned however the volume is moved. The node is named
    ``"<volume name> segmentation"`` (made unique; an existing node is never reused or
    overwritten), its reference geometry is the volume's, and it is placed in the
    volume's study in the subject hierarchy when there is one.
    """
    slicer = _slicer()
    reference = node_geometry(reference_node)
    _check_on_grid(label_volume, reference, "the label map")
    labels = np.asarray(label_volume.array)
    classes = _present_classes(labels, schema)
    name = _unique_name(scene, name or f"{reference_node.GetName()} segmentation")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    with contextlib.suppress(Exception):
        seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    if reference_node.GetParentTransformNode() is not None:  # stay aligned with the volume as displayed
        seg_node.SetAndObserveTransformNodeID(reference_node.GetParentTransformNode().GetID())
    segmentation = seg_node.GetSegmentation()
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)

    # One shared labelmap layer holding the schema values: segments are its label values.
    shared = _oriented_image(labels.astype(np.uint8), ijk_to_ras(reference))
    for cls in classes:
        segment = slicer.vtkSegment()
        _style_segment(segment, schema, cls)
        segment.SetLabelValue(cls.value)
        segment.AddRepresentation(BINARY_LABELMAP, shared)
        _tag_draft(segment, labels == cls.value, model_ref, model_sha256)
        if not segmentation.AddSegment(segment, cls.id):
            raise MRMLError(f"could not add segment {cls.id!r} to {name!r}")
    seg_node.SetAttribute(SCHEMA_ATTR, schema.name)
    seg_node.SetAttribute(SCHEMA_JSON_ATTR, json.dumps(schema.to_dict()))
    seg_node.SetAttribute(DRAFTED_ATTR, ",".join(c.id for c in classes))
    if model_ref:
        seg_node.SetAttribute(MODEL_REF_ATTR, model_ref)
    if model_sha256:
        seg_node.SetAttribute(MODEL_SHA_ATTR, model_sha256)
    if report is not None:
        text = json.dumps(report, default=str)
        if len(text) > 200_000:  # keep the attribute small (it is saved with the scene)
            text = json.dumps({k: report[k] for k in ("models", "mode", "device", "timings_s", "warnings")
                               if k in report}, default=str)
        seg_node.SetAttribute(REPORT_ATTR, text)
    _place_in_study(scene, seg_node, reference_node)
    return seg_node


# ===================================================================== segmentation -> label map
def schema_of_node(seg_node) -> LabelSchema | None:
    """The schema a segmentation was drafted with (stored as a node attribute), if any."""
    raw = seg_node.GetAttribute(SCHEMA_JSON_ATTR)
    return LabelSchema.from_dict(json.loads(raw), where=f"{seg_node.GetName()} attribute") if raw else None


def segment_classes(seg_node, schema: LabelSchema) -> dict[str, LabelClass]:
    """Segment ID -> schema class for every segment (SchemaError naming any segment that fits none)."""
    seg = seg_node.GetSegmentation()
    return {sid: class_for_segment(schema, seg.GetSegment(sid), sid) for sid in segment_ids(seg_node)}


def segmentation_to_labels(scene, seg_logic, seg_node, reference_node, schema: LabelSchema, *,
                           overlap: str = "last") -> Volume:
    """The segmentation as a uint8 label map on ``reference_node``'s exact grid, in ``schema``'s values.

    Segments are matched by name/ID (see :func:`class_for_segment`); a segment that
    fits no class raises :class:`SchemaError`. Several segments of one class are merged.
    Overlaps: see the module doc (``overlap="last"`` or ``"error"``).
    """
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {overlap!r}")
    if seg_node is None or not seg_node.IsA("vtkMRMLSegmentationNode"):
        raise MRMLError("expected a segmentation node")
    _check_same_transform(seg_node, reference_node)
    reference = node_geometry(reference_node)
    mapping = segment_classes(seg_node, schema)
    masks: dict[str, np.ndarray] = {}
    for sid, cls in mapping.items():
        if cls.id == BACKGROUND_ID:
            continue  # a "Background" segment paints nothing
        m = segment_mask(seg_node, sid, reference_node)
        masks[cls.id] = masks[cls.id] | m if cls.id in masks else m
    out = np.zeros(reference.shape, dtype=np.uint8)
    painted = np.zeros(reference.shape, dtype=bool)
    owner = np.full(reference.shape, -1, dtype=np.int16)
    overlaps: dict[str, int] = {}
    order = [c for c in schema.classes if c.id in masks]
    for idx, cls in enumerate(order):
        m = masks[cls.id]
        clash = m & painted
        if clash.any():
            for prev_idx in np.unique(owner[clash]):
                n = int((clash & (owner == prev_idx)).sum())
                overlaps[f"{order[prev_idx].id}/{cls.id}"] = n
        out[m] = cls.value
        owner[m] = idx
        painted |= m
    if overlaps and overlap == "error":
        detail = ", ".join(f"{k}: {v} voxels" for k, v in overlaps.items())
        raise SchemaError(f"segments overlap ({detail}); remove the overlap in the Segment Editor "
                          f"or export with overlap='last' (the later schema class wins)")
    return reference.with_array(out, kind="labels", overlaps=overlaps, schema=schema.name)


def _check_same_transform(seg_node, reference_node) -> None:
    a, b = seg_node.GetParentTransformNode(), reference_node.GetParentTransformNode()
    if (a.GetID() if a else None) != (b.GetID() if b else None):
        raise MRMLError(f"segmentation {seg_node.GetName()!r} and volume {reference_node.GetName()!r} are under "
                        f"different transforms; harden the transforms first")


# ===================================================================== edits
def edited_segments(seg_node, schema: LabelSchema | None = None, reference=None) -> list[str]:
    """Class ids whose segment differs from its draft, was added by hand, or was deleted.

    Without ``schema`` the schema stored on the node is used. A segment that fits no
    class is reported by its class tag, name or ID (this is a query: it never raises
    over an unknown segment; exporting does).
    """
    schema = schema or schema_of_node(seg_node)
    seg = seg_node.GetSegmentation()
    out: list[str] = []
    present: set[str] = set()
    for sid in segment_ids(seg_node):
        segment = seg.GetSegment(sid)
        cid = _class_id_or_name(schema, segment, sid)
        present.add(cid)
        draft = get_tag(segment, DRAFT_HASH_TAG)
        if draft is None or mask_sha1(segment_mask(seg_node, sid, reference)) != draft:
            out.append(cid)
    drafted = [c for c in (seg_node.GetAttribute(DRAFTED_ATTR) or "").split(",") if c]
    out += [c for c in drafted if c not in present]  # deleted by the user: an edit too
    return list(dict.fromkeys(out))


def _class_id_or_name(schema: LabelSchema | None, segment, sid: str) -> str:
    """A segment's class id, or (not in the schema) its class tag, name or ID: for reports, never raises."""
    if schema is not None:
        try:
            return class_for_segment(schema, segment, sid).id
        except SchemaError:
            pass
    return get_tag(segment, CLASS_TAG) or segment.GetName() or sid


def update_unedited_segments(scene, seg_logic, seg_node, label_volume: Volume, schema: LabelSchema,
                             reference_node=None, *, model_ref: str | None = None,
                             model_sha256: str | None = None) -> dict:
    """Re-draft only the segments nobody has touched since the last draft.

    A segment is replaced only if its current mask still hashes to its draft hash.
    Edited or hand-made segments, and drafted segments the user deleted, are left
    alone. A class the new draft finds that has no segment yet is added. Returns
    ``{"updated": [...], "kept": [...], "added": [...]}`` (class ids).
    """
    slicer = _slicer()
    reference_node = reference_node or seg_node.GetNodeReference(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    reference = node_geometry(reference_node) if reference_node is not None else None
    if reference is None:
        raise MRMLError("update_unedited_segments needs the reference volume node")
    _check_on_grid(label_volume, reference, "the new label map")
    labels = np.asarray(label_volume.array)
    _present_classes(labels, schema)
    segmentation = seg_node.GetSegmentation()
    by_class: dict[str, list[str]] = {}
    for sid, cls in segment_classes(seg_node, schema).items():
        by_class.setdefault(cls.id, []).append(sid)
    drafted = [c for c in (seg_node.GetAttribute(DRAFTED_ATTR) or "").split(",") if c]
    result = {"updated": [], "kept": [], "added": []}
    for cls in schema.foreground:
        new_mask = labels == cls.value
        sids = by_class.get(cls.id, [])
        if not sids:
            if cls.id in drafted or not new_mask.any():
                continue  # deleted by the user (respect it) or nothing to add
            segment = slicer.vtkSegment()
            _style_segment(segment, schema, cls)
            segmentation.AddSegment(segment, _free_segment_id(segmentation, cls.id))
            sid = segment_ids(seg_node)[-1]
            set_segment_mask(seg_logic, seg_node, sid, new_mask, reference_node)
            _tag_draft(segmentation.GetSegment(sid), new_mask, model_ref, model_sha256)
            drafted.append(cls.id)
            result["added"].append(cls.id)
            continue
        if len(sids) > 1:
            result["kept"].append(cls.id)  # split by hand: an edit
            continue
        segment = segmentation.GetSegment(sids[0])
        draft = get_tag(segment, DRAFT_HASH_TAG)
        if draft is None or mask_sha1(segment_mask(seg_node, sids[0], reference_node)) != draft:
            result["kept"].append(cls.id)
            continue
        set_segment_mask(seg_logic, seg_node, sids[0], new_mask, reference_node)
        _tag_draft(segmentation.GetSegment(sids[0]), new_mask, model_ref, model_sha256)
        result["updated"].append(cls.id)
    seg_node.SetAttribute(DRAFTED_ATTR, ",".join(dict.fromkeys(drafted)))
    if model_ref:
        seg_node.SetAttribute(MODEL_REF_ATTR, model_ref)
    if model_sha256:
        seg_node.SetAttribute(MODEL_SHA_ATTR, model_sha256)
    return result


def _free_segment_id(segmentation, wanted: str) -> str:
    if segmentation.GetSegment(wanted) is None:
        return wanted
    return segmentation.GenerateUniqueSegmentID(wanted)


# ===================================================================== export
def drafted_by(seg_node) -> dict | None:
    """``{"model": ref, "sha256": ...}`` of the model that drafted the node (attributes, then segment tags)."""
    ref, sha = seg_node.GetAttribute(MODEL_REF_ATTR), seg_node.GetAttribute(MODEL_SHA_ATTR)
    if not ref:
        seg = seg_node.GetSegmentation()
        for sid in segment_ids(seg_node):
            ref = ref or get_tag(seg.GetSegment(sid), MODEL_REF_TAG)
            sha = sha or get_tag(seg.GetSegment(sid), MODEL_SHA_TAG)
    if not ref:
        return None
    out = {"model": ref}
    if sha:
        out["sha256"] = sha
    return out


def export_case(scene, seg_logic, volume_node, seg_node, schema: LabelSchema, dataset_folder, case_id: str, *,
                annotated_structures: Iterable[str] | None = None, patient: str | None = None,
                sequence: str | None = None, note: str | None = None, overlap: str = "last"):
    """Write the volume and its (corrected) segmentation as a new training case.

    Goes through :func:`LumbarSegmentLib.cases.write_case`: a new version every time,
    never overwriting an earlier export. ``annotated_structures`` defaults to the schema
    classes present as segments (a present but empty segment still counts: "checked,
    none there"). Records ``drafted_by`` and ``edited_structures``.
    """
    from .cases import CaseError, validate_case_id, write_case

    validate_case_id(case_id)
    image = node_to_volume(volume_node, apply_transform=False)  # the volume as loaded, in its own frame
    label = segmentation_to_labels(scene, seg_logic, seg_node, volume_node, schema, overlap=overlap)
    present = list(dict.fromkeys(c.id for c in segment_classes(seg_node, schema).values()
                                 if c.id != BACKGROUND_ID))
    if annotated_structures is None:
        annotated = present
    else:
        annotated = list(dict.fromkeys(annotated_structures))
        for cid in annotated:
            schema[cid]  # SchemaError naming an unknown structure
    annotated = [c for c in annotated if c != BACKGROUND_ID]
    if not annotated:
        raise CaseError(f"case {case_id}: no structure is annotated (the segmentation has no segments of "
                        f"schema {schema.name!r})")
    in_label = {schema.by_value(int(v)).id for v in np.unique(label.array) if int(v) != 0}
    stray = sorted(in_label - set(annotated))
    if stray:
        raise CaseError(f"case {case_id}: segments {stray} hold voxels but are not in annotated_structures "
                        f"{annotated}; list them or remove those segments")
    extra: dict = {"schema": schema.name, "source_volume": volume_node.GetName()}
    by = drafted_by(seg_node)
    if by:
        extra["drafted_by"] = by
    extra["edited_structures"] = [c for c in edited_segments(seg_node, schema, volume_node) if c != BACKGROUND_ID]
    if label.metadata.get("overlaps"):
        extra["overlaps_resolved"] = label.metadata["overlaps"]
    if sequence:
        extra["sequence"] = sequence
    if note:
        extra["note"] = note
    labels = {schema[c].value: c for c in annotated}
    return write_case(dataset_folder, case_id, image, image.with_array(label.array),
                      labels=labels, annotated_structures=annotated, patient=patient, extra=extra)


# ===================================================================== .seg.nrrd files
def save_seg_nrrd(scene, seg_node, path) -> Path:
    """Write ``seg_node`` to a ``.seg.nrrd`` with Slicer's own storage node, atomically."""
    slicer = _slicer()
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise MRMLError(f"{path}: a segmentation file name must end in .seg.nrrd")
    if not path.parent.is_dir():
        raise OSError(f"output folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:-9]}.", suffix=".partial.seg.nrrd", dir=path.parent)
    os.close(fd)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    try:
        storage.SetFileName(tmp)
        storage.SetUseCompression(True)
        if not storage.WriteData(seg_node):
            raise OSError(f"could not write {path}")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _check_readable_nrrd(path: Path) -> None:
    """Read the file with SimpleITK first: a damaged header makes Slicer's storage node abort the process."""
    import SimpleITK as sitk

    from .io import _itk_detail

    try:
        sitk.ReadImage(str(path))
    except (RuntimeError, MemoryError) as exc:
        raise OSError(f"{path}: could not read this segmentation file (damaged or truncated: "
                      f"{_itk_detail(exc).rstrip('.')}); copy or save it again. Nothing was loaded") from None


def load_seg_nrrd(scene, path, name: str | None = None):
    """Read a ``.seg.nrrd`` into a new segmentation node (kept attached to its storage node)."""
    slicer = _slicer()
    path = Path(path)
    if not path.is_file():
        raise OSError(f"{path}: no such file")
    _check_readable_nrrd(path)
    stem = path.name[:-9] if path.name.lower().endswith(".seg.nrrd") else path.stem
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _unique_name(scene, name or stem))
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(seg_node):
        scene.RemoveNode(seg_node)
        scene.RemoveNode(storage)
        raise OSError(f"{path}: Slicer could not read this segmentation file")
    seg_node.SetAndObserveStorageNodeID(storage.GetID())
    with contextlib.suppress(Exception):
        seg_node.CreateDefaultDisplayNodes()
    return seg_node


__all__ = [
    "MRMLContext", "MRMLError", "volume_to_node", "node_to_volume", "node_geometry", "labels_to_segmentation",
    "segmentation_to_labels", "update_unedited_segments", "edited_segments", "export_case",
    "save_seg_nrrd", "load_seg_nrrd", "make_color_table", "segment_mask", "set_segment_mask", "mask_sha1",
    "class_for_segment", "segment_classes", "drafted_by", "schema_of_node", "DRAFT_HASH_TAG",
    "MODEL_REF_TAG", "MODEL_SHA_TAG",
]
