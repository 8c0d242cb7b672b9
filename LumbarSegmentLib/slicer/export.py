"""Export: a (corrected) segmentation becomes a label map and a training case.

Overlapping segments (possible when the Segment Editor's masking allows overlap) are
flattened into one label map by painting the classes in schema order: where two segments
overlap, the class that comes **later in the schema wins**. Pass ``overlap="error"`` to
refuse overlaps instead. The number of overlapping voxels per pair is recorded in the
result's ``metadata["overlaps"]``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from LumbarSegmentLib.slicer.bridge import (MODEL_REF_ATTR, MODEL_SHA_ATTR, OVERLAP_POLICIES, MRMLError, get_tag, node_geometry,
                          node_to_volume, segment_ids, segment_mask)
from LumbarSegmentLib.slicer.drafts import edited_segments, segment_classes
from LumbarSegmentLib.core.schema import BACKGROUND_ID, LabelSchema, SchemaError
from LumbarSegmentLib.formats.segfile import MODEL_REF_TAG, MODEL_SHA_TAG
from LumbarSegmentLib.core.volume import Volume

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

    Goes through :func:`LumbarSegmentLib.dataset.cases.write_case`: a new version every time,
    never overwriting an earlier export. ``annotated_structures`` defaults to the schema
    classes present as segments (a present but empty segment still counts: "checked,
    none there"). Records ``drafted_by`` and ``edited_structures``.
    """
    from LumbarSegmentLib.dataset.cases import CaseError, validate_case_id, write_case

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
