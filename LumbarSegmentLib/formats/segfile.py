"""Slicer segmentation files (``.seg.nrrd``) without Slicer: SimpleITK and a few header keys.

A ``.seg.nrrd`` is an ordinary NRRD image plus ``key:=value`` header fields that
describe the segments (see Slicer's developer guide, "Segmentation labelmap file
format")::

    Segment<N>_ID / _Name / _Color ("r g b", 0..1) / _LabelValue / _Layer / _Extent
    Segment<N>_Tags          "key:value|key:value|", including TerminologyEntry:<...>
    Segmentation_MasterRepresentation, Segmentation_ContainedRepresentationNames,
    Segmentation_ReferenceImageExtentOffset, Segmentation_ConversionParameters

This module writes a label map in that form (one layer: a label map cannot overlap)
so the command line can hand Slicer a ready-made segmentation with names, colours
and terminology, and reads such files back, layered ones included, mapping every
segment to the schema **by its name (its ID only when it has none), never by its
position**.

Each written segment also carries ``LumbarSegment.DraftSHA1``, the hash of its mask
(see :mod:`LumbarSegmentLib.slicer.mrml`), so edits made in Slicer to a segmentation
drafted on the command line are still recognised.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from LumbarSegmentLib.formats.io import atomic_path
from LumbarSegmentLib.core.schema import BACKGROUND_ID, LabelClass, LabelSchema, SchemaError
from LumbarSegmentLib.core.volume import Volume, VolumeError

BINARY_LABELMAP = "Binary labelmap"
DRAFT_HASH_TAG = "LumbarSegment.DraftSHA1"
MODEL_REF_TAG = "LumbarSegment.ModelRef"
MODEL_SHA_TAG = "LumbarSegment.ModelSHA256"
CLASS_TAG = "LumbarSegment.ClassId"
_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(\w+)$")
_GEOMETRY_DESCRIPTION = ("Image geometry description string determining the geometry of the labelmap that is "
                         "created in course of conversion. Can be copied from a volume, using the button.")


class SegFileError(VolumeError):
    """A .seg.nrrd file cannot be written or read as asked."""


def mask_sha1(mask: np.ndarray) -> str:
    """SHA-1 of a binary mask (shape + packed bits); identical to ``mrml.mask_sha1``."""
    m = np.ascontiguousarray(np.asarray(mask) != 0)
    h = hashlib.sha1(("mask" + "x".join(str(s) for s in m.shape)).encode())
    h.update(np.packbits(m, axis=None).tobytes())
    return h.hexdigest()


def match_segment(schema: LabelSchema, name: str, segment_id: str) -> LabelClass:
    """The schema class a segment stands for, from its name (class id or display name, any case).

    The name decides because it is what the user sees and edits: a drafted segment
    renamed to something the schema does not know is refused rather than silently
    exported under its old class. The segment ID is used only for a nameless segment.
    """
    key = name.strip() if name else ""
    cls = schema.find_by_name(key) if key else (schema.find_by_name(segment_id) if segment_id else None)
    if cls is None:
        hint = ""
        if key and segment_id and schema.find_by_name(segment_id) is not None:
            hint = f" (it was drafted as {schema.find_by_name(segment_id).name!r})"
        raise SchemaError(
            f"segment {name!r} (ID {segment_id!r}){hint} does not match any structure of schema "
            f"{schema.name!r} ({', '.join(c.name for c in schema.foreground)}); rename the segment to one "
            f"of these or remove it"
        )
    return cls


def tag_value(value: str) -> str:
    """A segment tag value that survives Slicer's ``key:value|`` serialisation ('|' separates tags)."""
    return str(value).replace("|", "/")


def _fmt(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


def reference_geometry_string(volume: Volume) -> str:
    """Slicer's serialised image geometry (IJK-to-RAS matrix row by row, then the extent)."""
    m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.ijk_to_lps()
    i, j, k = volume.size_ijk
    values = [_fmt(v) for v in m.ravel()] + [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(v + ";" for v in values)


def _extent(mask: np.ndarray) -> str:
    ks, js, is_ = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    return f"{is_[0]} {is_[-1]} {js[0]} {js[-1]} {ks[0]} {ks[-1]}"


def write_seg_nrrd(label_volume: Volume, schema: LabelSchema, path: str | os.PathLike, *,
                   model_ref: str | None = None, model_sha256: str | None = None,
                   compress: bool = True) -> Path:
    """Write a label map (values of ``schema``) as a Slicer segmentation file, atomically.

    One segment per class present: ID = class id, name, colour and terminology from the
    schema, label value = the class value, all in layer 0. The reference geometry is the
    label map's own grid, so Slicer shows it aligned with the image it was made from.
    """
    import SimpleITK as sitk

    from LumbarSegmentLib.formats.io import to_sitk

    path = Path(path)
    if not path.name.lower().endswith(".nrrd"):
        raise SegFileError(f"{path}: a segmentation file name must end in .seg.nrrd")
    labels = np.asarray(label_volume.array)
    if labels.dtype.kind not in "uib":
        raise SegFileError(f"a label map must hold integers, got {labels.dtype}")
    values = {int(v) for v in np.unique(labels)}
    known = {c.value for c in schema.classes}
    if values - known:
        raise SchemaError(f"label values {sorted(values - known)} are not in schema {schema.name!r} "
                          f"(values: {sorted(known)})")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise SegFileError("label values must be within 0..255")
    image = to_sitk(label_volume, labels.astype(np.uint8))
    meta = {
        "Segmentation_MasterRepresentation": BINARY_LABELMAP,
        "Segmentation_ContainedRepresentationNames": BINARY_LABELMAP + "|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters":
            # every entry ends with '&': Slicer's parser drops an unterminated last entry
            f"Reference image geometry|{reference_geometry_string(label_volume)}|{_GEOMETRY_DESCRIPTION}&",
    }
    n = 0
    for cls in schema.foreground:
        if cls.value not in values:
            continue
        mask = labels == cls.value
        tags = {}
        term = schema.terminology_string(cls.id)
        if term:
            tags["TerminologyEntry"] = term
        tags[CLASS_TAG] = cls.id
        tags[DRAFT_HASH_TAG] = mask_sha1(mask)
        if model_ref:
            tags[MODEL_REF_TAG] = model_ref
        if model_sha256:
            tags[MODEL_SHA_TAG] = model_sha256
        r, g, b = cls.color_float
        meta.update({
            f"Segment{n}_ID": cls.id,
            f"Segment{n}_Name": cls.name,
            f"Segment{n}_NameAutoGenerated": "0",
            f"Segment{n}_Color": f"{r:.6g} {g:.6g} {b:.6g}",
            f"Segment{n}_ColorAutoGenerated": "0",
            f"Segment{n}_LabelValue": str(cls.value),
            f"Segment{n}_Layer": "0",
            f"Segment{n}_Extent": _extent(mask),
            f"Segment{n}_Tags": "".join(f"{k}:{tag_value(v)}|" for k, v in tags.items()),
        })
        n += 1
    for key, value in meta.items():
        image.SetMetaData(key, value)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise OSError(f"could not write {path}: {str(exc).strip().splitlines()[-1]}") from None
    return path


# ------------------------------------------------------------------------------------ reading
def parse_tags(raw: str) -> dict[str, str]:
    out = {}
    for item in (raw or "").split("|"):
        if not item:
            continue
        key, _, value = item.partition(":")
        out[key] = value
    return out


def read_segments_info(image) -> list[dict]:
    """The ``Segment<N>_*`` fields of a SimpleITK image, as one dict per segment in file order."""
    found: dict[int, dict] = {}
    for key in image.GetMetaDataKeys():
        m = _SEGMENT_KEY.match(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = image.GetMetaData(key)
    out = []
    for n in sorted(found):
        f = found[n]
        out.append({
            "index": n, "id": f.get("ID", f"Segment_{n}"), "name": f.get("Name", ""),
            "label_value": int(f.get("LabelValue", 1)), "layer": int(f.get("Layer", 0)),
            "color": tuple(float(c) for c in f.get("Color", "0.5 0.5 0.5").split()),
            "tags": parse_tags(f.get("Tags", "")),
        })
    return out


def read_seg_nrrd(path: str | os.PathLike, schema: LabelSchema, *, reference: Volume | None = None,
                  overlap: str = "last") -> Volume:
    """A ``.seg.nrrd`` as a uint8 label map in ``schema``'s values (mapped by segment name/ID).

    Overlapping segments (layered files) are flattened like ``mrml.segmentation_to_labels``:
    the class later in the schema wins (``overlap="last"``) or an error is raised
    (``overlap="error"``). With ``reference`` the result is placed on that grid; the file
    must then share its spacing and axes (a cropped file is padded back).
    """
    import SimpleITK as sitk

    from LumbarSegmentLib.formats.io import _volume_from_sitk

    if overlap not in ("last", "error"):
        raise ValueError(f"overlap must be 'last' or 'error', got {overlap!r}")
    p = Path(path)
    if not p.is_file():
        raise SegFileError(f"{p}: no such file")
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise SegFileError(f"{p}: cannot read the segmentation: {str(exc).strip().splitlines()[-1]}") from None
    segments = read_segments_info(image)
    data = sitk.GetArrayFromImage(image)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise SegFileError(f"{p}: unexpected image shape {data.shape}")
    geometry_image = sitk.VectorIndexSelectionCast(image, 0) if image.GetNumberOfComponentsPerPixel() > 1 else image
    grid = _volume_from_sitk(geometry_image, data[..., 0], source=str(p))
    single_voxel = data.shape[:3] == (1, 1, 1) and not segments
    masks: dict[str, np.ndarray] = {}
    for seg in segments:
        cls = match_segment(schema, seg["name"], seg["id"])
        if cls.id == BACKGROUND_ID:
            continue
        if not 0 <= seg["layer"] < data.shape[3]:
            raise SegFileError(f"{p}: segment {seg['name']!r} is in layer {seg['layer']}, the file has "
                               f"{data.shape[3]}")
        m = data[..., seg["layer"]] == seg["label_value"]
        masks[cls.id] = masks[cls.id] | m if cls.id in masks else m
    out = np.zeros(data.shape[:3], dtype=np.uint8)
    owner = np.full(data.shape[:3], -1, dtype=np.int16)
    order = [c for c in schema.classes if c.id in masks]
    overlaps: dict[str, int] = {}
    for idx, cls in enumerate(order):
        m = masks[cls.id]
        clash = m & (owner >= 0)
        for prev in np.unique(owner[clash]):
            overlaps[f"{order[prev].id}/{cls.id}"] = int((clash & (owner == prev)).sum())
        out[m] = cls.value
        owner[m] = idx
    if overlaps and overlap == "error":
        raise SchemaError(f"{p}: segments overlap ({', '.join(f'{k}: {v} voxels' for k, v in overlaps.items())})")
    result = grid.with_array(out, kind="labels", overlaps=overlaps, schema=schema.name,
                             segments=[{k: s[k] for k in ("id", "name", "tags")} for s in segments])
    if reference is not None:
        if single_voxel:  # Slicer's marker for "no segments": an empty map on the reference grid
            return reference.with_array(np.zeros(reference.shape, np.uint8), kind="labels", overlaps={})
        result = _place_on(result, reference, p)
    return result


def _place_on(vol: Volume, reference: Volume, where) -> Volume:
    if vol.same_geometry(reference):
        return reference.with_array(vol.array, **vol.metadata)
    if not (np.allclose(vol.spacing, reference.spacing, rtol=1e-4, atol=1e-5)
            and np.allclose(vol.direction, reference.direction, atol=1e-4)):
        raise SegFileError(f"{where}: the segmentation's grid ({vol.describe_geometry()}) differs from the "
                           f"reference volume's ({reference.describe_geometry()}); resample it first")
    offset = np.linalg.solve(reference.direction @ np.diag(reference.spacing),
                             np.subtract(vol.origin, reference.origin))
    shift = np.round(offset).astype(int)
    if not np.allclose(offset, shift, atol=1e-3):
        raise SegFileError(f"{where}: the segmentation's voxels are offset by a fraction of a voxel "
                           f"({offset}) from the reference grid; resample it first")
    out = np.zeros(reference.shape, dtype=np.uint8)
    i0, j0, k0 = shift
    src = vol.array
    ks, js, is_ = src.shape
    dst_lo = np.array([k0, j0, i0])
    lo = np.maximum(dst_lo, 0)
    hi = np.minimum(dst_lo + [ks, js, is_], reference.shape)
    if np.any(hi <= lo):
        raise SegFileError(f"{where}: the segmentation lies entirely outside the reference volume")
    src_sl = tuple(slice(a - d, b - d) for a, b, d in zip(lo, hi, dst_lo))
    dropped = int(np.count_nonzero(src)) - int(np.count_nonzero(src[src_sl]))
    if dropped:
        raise SegFileError(f"{where}: {dropped} labelled voxels lie outside the reference volume")
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = src[src_sl]
    return reference.with_array(out, **vol.metadata)


__all__ = ["write_seg_nrrd", "read_seg_nrrd", "read_segments_info", "match_segment", "mask_sha1",
           "reference_geometry_string", "SegFileError"]
