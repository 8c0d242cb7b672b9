"""Small adapters that turn a public data set's files into cases of the training case format.

Two quirks of the shared data need more than reading the files as they are:

* **t1-levels** (one mid-sagittal T1 slice per patient, bodies L1-L5 and the S1 segment of the sacrum
  outlined): the vertebral bodies above L1 (T12, often visible at the top) are not outlined, so they
  are *unknown*, yet a case that annotates ``vertebral_body`` would teach them as background. The case
  format cannot say "unknown" for a region, so :func:`t1_levels_case` crops the rows above the top of
  ``labels_complete_z_range`` (plus a small margin) away: what is left is labelled completely.
  For a schema without a sacrum class (the three-class starter) the rows below L5 are cropped too,
  so S1 is ignored rather than taught as background; ``keep_sacrum`` keeps it as ``sacrum``.
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

from LumbarSegmentLib.dataset.cases import Case, read_case, write_case
from LumbarSegmentLib.core.volume import Volume

#: rows (voxels along z) kept above the top of t1-levels' complete range, so the top of L1 keeps its border
T1_TOP_MARGIN = 2


def _copy_extra(case: Case, **more) -> dict:
    keep = {k: case.extra[k] for k in ("sequence", "dataset", "levels", "spacing_mm", "spacing_estimated")
            if k in case.extra}
    return {**keep, "derived_from": case.case_id, **more}


def t1_levels_case(json_path: str | Path, out_dir: str | Path, *, source: str = "T1L", keep_sacrum: bool = False
                   ) -> Case:
    """A t1-levels slice as a case whose label is complete for the vertebral bodies it keeps.

    The rows above L1 (T12 and higher: unknown) are cropped away. Without ``keep_sacrum`` (a schema
    without a sacrum class, such as the starter's) the rows below L5 go too, so S1, which such a
    schema cannot name, is neither taught as background nor as a body: it is simply not seen. With
    ``keep_sacrum`` the S1 outline stays, as structure ``sacrum``. The image's z axis runs inferior ->
    superior (array axis 0 of the ``[z, y, x]`` array); the origin moves with a bottom crop, so every
    kept voxel keeps its position.
    """
    case = read_case(json_path)
    image, label = case.load()
    rng = case.extra.get("labels_complete_z_range")
    if not (isinstance(rng, list) and len(rng) == 2):
        raise ValueError(f"{json_path}: no labels_complete_z_range; not a t1-levels case")
    arr = np.asarray(label.array)
    top = min(arr.shape[0], int(rng[1]) + 1 + T1_TOP_MARGIN)
    labels, structures = dict(case.labels), list(case.annotated_structures)
    bottom = 0
    sacral = [v for v, name in labels.items() if name == "sacrum"]
    if not keep_sacrum and sacral:
        bodies = np.isin(arr, [v for v, name in labels.items() if name != "sacrum"])
        rows = np.nonzero(bodies.any(axis=(1, 2)))[0]
        bottom = max(0, int(rows.min()) - T1_TOP_MARGIN) if rows.size else 0
        labels = {v: n for v, n in labels.items() if n != "sacrum"}
        structures = [s for s in structures if s != "sacrum"]
    lab_arr = np.ascontiguousarray(arr[bottom:top]).astype(np.uint8)
    lab_arr[np.isin(lab_arr, sacral) & (not keep_sacrum)] = 0
    origin = tuple(np.asarray(image.origin) + np.asarray(image.direction) @ np.array([0.0, 0.0, bottom * image.spacing[2]]))
    geo = dict(spacing=image.spacing, origin=origin, direction=image.direction)
    img = Volume(np.ascontiguousarray(image.array[bottom:top]), **geo)
    lab = Volume(lab_arr, **geo)
    what = "rows above L1 (unknown)" + ("" if keep_sacrum or not sacral else " and below L5 (S1: not a class)")
    return write_case(out_dir, case.case_id, img, lab, labels=labels, annotated_structures=structures,
                      patient=case.patient, extra=_copy_extra(case, source=source, adapted=f"{what} cropped"))


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


def spider_discs_case(json_path: str | Path, out_dir: str | Path) -> Case:
    """A SPIDER case with its discs only (whole-vertebra and canal voxels become 0), so that a schema
    without SPIDER's whole-vertebra label (the three-class starter) can train or be graded on it."""
    case = read_case(json_path)
    image, label = case.load()
    disc = [int(v) for v, n in case.labels.items() if n == "intervertebral_disc"]
    lab = np.where(np.isin(label.array, disc), label.array, 0).astype(np.uint8)
    return write_case(out_dir, case.case_id, image, label.with_array(lab),
                      labels={v: "intervertebral_disc" for v in disc}, annotated_structures=["intervertebral_disc"],
                      patient=case.patient, extra=_copy_extra(case, source="SP",
                                                              adapted="discs only; vertebra and spinal canal not labelled"))


def adapt_cases(folder: str | Path, ids: Sequence[str], out_dir: str | Path, *, vb1_sacrum: bool = True
                ) -> list[Case]:
    """The named cases of a shared data folder as adapted cases in ``out_dir`` (t1-levels cases cropped,
    VB1 cases with their sacrum unless ``vb1_sacrum`` is off, others as they are), ``source`` recorded."""
    folder, out_dir = Path(folder), Path(out_dir)
    out = []
    for cid in ids:
        jp = folder / f"{cid}.json"
        data = json.loads(jp.read_text())
        if "labels_complete_z_range" in data:
            out.append(t1_levels_case(jp, out_dir))
        elif cid.startswith("VB1_") and vb1_sacrum:
            out.append(vb1_sacrum_case(jp, out_dir))
        else:
            case = read_case(jp)
            image, label = case.load()
            out.append(write_case(out_dir, case.case_id, image, label.with_array(label.array.astype(np.uint8)),
                                  labels=case.labels, annotated_structures=case.annotated_structures,
                                  patient=case.patient, extra=_copy_extra(case, source=cid.split("_", 1)[0])))
    return out

