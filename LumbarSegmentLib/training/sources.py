"""Small adapters that turn a public data set's files into cases of the training case format.

Two quirks of the shared data need more than reading the files as they are:

* **t1-levels** (one mid-sagittal T1 slice per patient, bodies L1-L5 and the S1 segment of the sacrum
  outlined): the vertebral bodies above L1 (T12, often visible at the top) are not outlined, so they
  are *unknown*, yet a case that annotates ``vertebral_body`` would teach them as background. The case
  format cannot say "unknown" for a region, so :func:`t1_levels_case` crops the rows above the top of
  ``labels_complete_z_range`` (plus a small margin) away: what is left is labelled completely.
  The sacrum keeps its own structure name (``sacrum``): a schema with a sacrum class learns it, the
  three-class starter schema reads it as background, as the water-fat and T2w sources teach (they
  leave S1 unlabelled).
* **lumbar-mr VB1** (mixed sequences): the lowest labelled instance is the S1 segment, not a lumbar
  vertebral body; :func:`vb1_sacrum_case` renames it ``sacrum``, so a vertebral-body score does not
  reward painting the sacrum.

Both write a new case folder (image, label, ``<case>.json`` with ``annotated_structures`` and
``source``) and never touch the input files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from LumbarSegmentLib.cases import Case, read_case, write_case
from LumbarSegmentLib.volume import Volume

#: rows (voxels along z) kept above the top of t1-levels' complete range, so the top of L1 keeps its border
T1_TOP_MARGIN = 2


def _copy_extra(case: Case, **more) -> dict:
    keep = {k: case.extra[k] for k in ("sequence", "dataset", "levels", "spacing_mm", "spacing_estimated")
            if k in case.extra}
    return {**keep, "derived_from": case.case_id, **more}


def t1_levels_case(json_path: str | Path, out_dir: str | Path, *, source: str = "T1L") -> Case:
    """A t1-levels slice as a case whose label is complete: rows above L1 (unknown there) cropped away.

    The image's z axis runs inferior -> superior (array axis 0 of the ``[z, y, x]`` array); the crop
    keeps rows ``0 .. top + T1_TOP_MARGIN`` and the origin stays, so every kept voxel keeps its position.
    """
    case = read_case(json_path)
    image, label = case.load()
    rng = case.extra.get("labels_complete_z_range")
    if not (isinstance(rng, list) and len(rng) == 2):
        raise ValueError(f"{json_path}: no labels_complete_z_range; not a t1-levels case")
    top = min(image.array.shape[0], int(rng[1]) + 1 + T1_TOP_MARGIN)
    geo = dict(spacing=image.spacing, origin=image.origin, direction=image.direction)
    img = Volume(np.ascontiguousarray(image.array[:top]), **geo)
    lab = Volume(np.ascontiguousarray(label.array[:top]).astype(np.uint8), **geo)
    return write_case(out_dir, case.case_id, img, lab, labels=case.labels,
                      annotated_structures=case.annotated_structures, patient=case.patient,
                      extra=_copy_extra(case, source=source, adapted="rows above the top of L1 cropped (unknown)"))


def vb1_sacrum_case(json_path: str | Path, out_dir: str | Path) -> Case:
    """A lumbar-mr VB1 case with its lowest instance (the S1 segment) relabelled as ``sacrum``."""
    case = read_case(json_path)
    image, label = case.load()
    arr = np.asarray(label.array)
    present = [v for v in sorted(case.labels) if case.labels[v] == "vertebral_body" and (arr == v).any()]
    if not present:
        raise ValueError(f"{json_path}: no vertebral body instance to relabel")
    z = np.arange(arr.shape[0])[:, None, None]
    lowest = min(present, key=lambda v: float((z * (arr == v)).sum() / (arr == v).sum()))
    labels = {**case.labels, lowest: "sacrum"}
    structures = sorted(set(case.annotated_structures) | {"sacrum"})
    return write_case(out_dir, case.case_id, image, label.with_array(arr.astype(np.uint8)), labels=labels,
                      annotated_structures=structures, patient=case.patient,
                      extra=_copy_extra(case, source="VB1", adapted=f"lowest instance {lowest} is S1: sacrum"))


def adapt_cases(folder: str | Path, ids: Sequence[str], out_dir: str | Path) -> list[Case]:
    """The named cases of a shared data folder as adapted cases in ``out_dir`` (t1-levels cases cropped,
    VB1 cases with their sacrum, others as they are but with their ``source`` recorded)."""
    folder, out_dir = Path(folder), Path(out_dir)
    out = []
    for cid in ids:
        jp = folder / f"{cid}.json"
        data = json.loads(jp.read_text())
        if "labels_complete_z_range" in data:
            out.append(t1_levels_case(jp, out_dir))
        elif cid.startswith("VB1_"):
            out.append(vb1_sacrum_case(jp, out_dir))
        else:
            case = read_case(jp)
            image, label = case.load()
            out.append(write_case(out_dir, case.case_id, image, label.with_array(label.array.astype(np.uint8)),
                                  labels=case.labels, annotated_structures=case.annotated_structures,
                                  patient=case.patient, extra=_copy_extra(case, source=cid.split("_", 1)[0])))
    return out

