"""Label map -> DICOM Segmentation (SEG) object that a PACS can store next to its source series.

Why a SEG and not only a NIfTI: a hospital archive takes DICOM objects that point at the images
they describe. The SEG written here

* references the source series (``ReferencedSeriesSequence``) and every source instance
  (SOP Instance UIDs) it was derived from, and shares their patient, study and frame of reference;
* has one segment per foreground class of the model's schema, labelled with the schema's name and
  coded with its SNOMED CT category and type (the same codes Slicer shows), coloured as in Slicer;
* stores a frame only where a segment has foreground on a source slice (``omit_empty_frames``),
  so a mostly empty volume gives a small object.

Only a label map read from a DICOM series can be written: the SEG must name real source instances,
and inventing a patient, study and series for a NIfTI file would put a fake patient into a PACS.
:func:`require_dicom_source` refuses other inputs up front, before any inference runs.

highdicom builds the object (it checks the IOD); this module only maps LumbarSegment's Volume,
schema and run report onto it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume


class DicomSegError(ValueError):
    """A DICOM SEG cannot be written for this input (not DICOM, uncoded class, mismatched geometry)."""


def require_dicom_source(volume: Volume, where: str = "input") -> list[str]:
    """The ordered source files of a volume read from a DICOM series; refuses any other volume."""
    files = (volume.metadata.get("dicom") or {}).get("files") or []
    if not files:
        raise DicomSegError(
            f"{where}: --dicom-seg needs a DICOM series folder as input (a SEG must reference the source "
            f"images it segments); this input is a volume file. Drop --dicom-seg, or segment the DICOM series")
    return list(files)


def _segment_descriptions(schema: LabelSchema, model_name: str, model_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], version=model_version[:64], family=codes.cid7162.ArtificialIntelligence)
    out = []
    for number, cls in enumerate(schema.foreground, start=1):
        if not cls.category or not cls.type:
            raise DicomSegError(f"schema {schema.name!r}: class {cls.id!r} has no category/type code; a DICOM SEG "
                                f"segment needs both (add them to the schema)")
        cat, typ = (Code(value=c[1], scheme_designator=c[0], meaning=c[2]) for c in (cls.category, cls.type))
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=cls.name[:64], segmented_property_category=cat,
            segmented_property_type=typ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=cls.id[:64], tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*cls.color)))
    return out


def segment_numbers(labels: np.ndarray, schema: LabelSchema) -> np.ndarray:
    """Label values -> SEG segment numbers (1..N in the schema's foreground order; 0 = nothing)."""
    lut = np.zeros(max(int(labels.max(initial=0)), max(c.value for c in schema.classes)) + 1, dtype=np.uint16)
    for number, cls in enumerate(schema.foreground, start=1):
        lut[cls.value] = number
    return lut[labels]


def write_dicom_seg(labels: Volume, source: Volume, schema: LabelSchema, path: str | os.PathLike, *,
                    model_name: str = "LumbarSegment", model_version: str = "",
                    series_number: int = 901, series_description: str = "LumbarSegment segmentation") -> Path:
    """Write ``labels`` (on ``source``'s grid, read from a DICOM series) as a DICOM SEG file at ``path``.

    ``labels.array`` is indexed like ``source.array`` ([k, j, i]: source slice, row, column), so frame
    ``k`` of the label map belongs to the ``k``-th file of ``source.metadata["dicom"]["files"]``.
    """
    import highdicom as hd
    import pydicom

    from LumbarSegmentLib import __version__

    files = require_dicom_source(source)
    if labels.array.shape != source.array.shape or not labels.same_geometry(source):
        raise DicomSegError("the label map is not on the source series' grid; cannot reference the source images")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) == labels.array.shape[0]:
        pass  # one multi-frame source image: its frames are the slices
    elif len(datasets) != labels.array.shape[0]:
        raise DicomSegError(f"{len(datasets)} source files for {labels.array.shape[0]} slices; cannot map frames")
    # highdicom needs the source datasets' pixel description; stop_before_pixels keeps the attributes
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=segment_numbers(np.asarray(labels.array), schema).astype(np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(schema, model_name, model_version or "unversioned"),
        series_instance_uid=hd.UID(), series_number=int(series_number), sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="LumbarSegment", manufacturer_model_name=model_name[:64],
        software_versions=__version__, device_serial_number="none",
        content_description=series_description[:64], content_label="LUMBARSEG",
        omit_empty_frames=True)
    seg.SeriesDescription = series_description[:64]
    out = Path(path)
    seg.save_as(out, enforce_file_format=True)
    return out
