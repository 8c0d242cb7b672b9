"""The bridge between LumbarSegmentLib and Slicer's MRML scene: volumes, masks, tags, colour tables, files.

The lowest of the three MRML modules (``mrml_bridge`` <- ``mrml_drafts`` <- ``mrml_export``;
``mrml`` gathers their public names). Every function takes the scene and the Segmentations
logic as arguments, so the very same code runs in desktop Slicer (the module hands over
``slicer.mrmlScene`` and ``slicer.modules.segmentations.logic()``) and in plain Python with
the ``slicer-core`` wheel (tests build a :class:`MRMLContext` with :meth:`MRMLContext.standalone`).

Conventions
-----------
* A :class:`~LumbarSegmentLib.core.volume.Volume` is LPS with its array indexed
  ``[k, j, i]``; MRML is RAS. Going between them negates the first two rows of the
  direction matrix and the first two origin coordinates; nothing is resampled, so the
  round trip is exact (oblique directions included).
* Transforms: segmentation work happens in the volume node's own frame (its parent
  transform not applied). Every node made for a volume (segmentation, confidence map)
  is put under the volume's parent transform (:func:`follow_transform`) *before* any
  geometry is taken from the volume, so the transform is applied once, on screen, and
  an export is the volume as loaded. :func:`node_to_volume` applies a linear parent
  transform unless asked not to.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from LumbarSegmentLib.core.schema import BACKGROUND_ID, LabelClass, LabelSchema
from LumbarSegmentLib.formats.segfile import match_segment
from LumbarSegmentLib.core.volume import Volume, VolumeError

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


def follow_transform(node, reference_node) -> None:
    """Put ``node`` under ``reference_node``'s parent transform (or none), so the two move together.

    Call it before taking any geometry from the reference volume for ``node``: MRML
    expresses such geometry in ``node``'s own frame, so setting the transform afterwards
    applies it a second time (a 50 mm shift left the segmentation 50 mm off).
    """
    tnode = reference_node.GetParentTransformNode() if reference_node is not None else None
    node.SetAndObserveTransformNodeID(tnode.GetID() if tnode is not None else None)


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


def _unique_name(scene, name: str) -> str:
    return name if scene.GetFirstNodeByName(name) is None else scene.GenerateUniqueName(name)



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

    from LumbarSegmentLib.formats.io import _itk_detail

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


