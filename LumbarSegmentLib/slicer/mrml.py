"""Everything the Lib does with Slicer's MRML scene, under one name: ``from LumbarSegmentLib import mrml``.

The work lives in three modules, each importing only the ones before it:

* ``mrml_bridge``: volumes <-> volume nodes (LPS <-> RAS, transforms), segment masks,
  tags, colour tables, ``.seg.nrrd`` files;
* ``mrml_drafts``: a model's label map -> segmentation node, and draft tracking (which
  segments a person edited; re-drafting only the untouched ones);
* ``mrml_export``: segmentation -> label map -> training case.

This module only gathers their public names; it holds no code, so nothing imports it
from below.
"""
from LumbarSegmentLib.slicer.bridge import (ATTR_PREFIX, BINARY_LABELMAP, DRAFTED_ATTR, MODEL_REF_ATTR, MODEL_SHA_ATTR,  # noqa: F401
                          OVERLAP_POLICIES, REPORT_ATTR, SCHEMA_ATTR, SCHEMA_JSON_ATTR, MRMLContext, MRMLError,
                          class_for_segment, follow_transform, get_tag, ijk_to_ras, load_seg_nrrd,
                          make_color_table, node_geometry, node_to_volume, save_seg_nrrd, segment_ids, segment_mask,
                          set_segment_mask, volume_to_node)
from LumbarSegmentLib.slicer.drafts import (edited_segments, labels_to_segmentation, schema_of_node, segment_classes,  # noqa: F401
                          update_unedited_segments)
from LumbarSegmentLib.slicer.export import drafted_by, export_case, segmentation_to_labels  # noqa: F401
from LumbarSegmentLib.formats.segfile import DRAFT_HASH_TAG, MODEL_REF_TAG, MODEL_SHA_TAG, mask_sha1  # noqa: F401

__all__ = [
    "MRMLContext", "MRMLError", "volume_to_node", "node_to_volume", "node_geometry", "follow_transform",
    "labels_to_segmentation", "segmentation_to_labels", "update_unedited_segments", "edited_segments",
    "export_case", "save_seg_nrrd", "load_seg_nrrd", "make_color_table", "segment_mask", "set_segment_mask",
    "mask_sha1", "class_for_segment", "segment_classes", "segment_ids", "drafted_by", "schema_of_node",
    "DRAFT_HASH_TAG", "MODEL_REF_TAG", "MODEL_SHA_TAG",
]
