"""The reference set: a few shipped slices of every source the shipped models were validated on.

A team grading a fine-tune on its own held-out cases sees only its own source; a model that
gained there and forgot every other sequence would pass. The publish gate therefore also runs
the candidate and the model in use on this small set (``Resources/Reference``: a few sagittal
slices around the midline of two cases per source, with their manual masks; PROVENANCE.md
there says where each comes from and under which terms it ships) and refuses a candidate that
loses more than the allowed drop of level-range Dice on any source, unless the team says that
only its own source matters (``--own-source-only``, recorded in the published manifest).

The reference set measures forgetting, not generalisation: a case the candidate trained on
(a team rehearsing with the same public cases) still counts, as a drop on it is forgetting too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from LumbarSegmentLib.dataset.cases import Case, list_cases, write_case
from LumbarSegmentLib.core.volume import Volume

#: the gate refuses a candidate that loses more than this level-range Dice on any reference source
DEFAULT_MAX_REFERENCE_DROP = 0.01
#: environment variable naming another reference folder (a site's own reference cases); "" turns it off
REFERENCE_ENV = "LUMBARSEG_REFERENCE"


def reference_root() -> Path:
    """The shipped reference folder (``LumbarSegmentLib/shipped_reference`` in a wheel, else
    ``Resources/Reference`` of a checkout or the Slicer extension), or ``$LUMBARSEG_REFERENCE``."""
    env = os.environ.get(REFERENCE_ENV)
    if env is not None:
        return Path(env)
    from LumbarSegmentLib.core.files import shipped_folder

    return shipped_folder("shipped_reference", "Reference")


def reference_cases(root: str | Path | None = None) -> list[Case]:
    """The reference cases (``[]`` when the folder is absent or turned off with an empty variable)."""
    if root is None and os.environ.get(REFERENCE_ENV) == "":
        return []
    folder = Path(root) if root is not None else reference_root()
    if not folder.is_dir() or not any(folder.glob("*.json")):
        return []
    return list_cases(folder)


def midline_slab(image: Volume, label: Volume, slices: int = 5, margin_mm: float = 40.0, offset: int = 0
                 ) -> tuple[Volume, Volume]:
    """``slices`` contiguous sagittal slices around the one with the most labelled voxels (moved by
    ``offset`` slices: a slab beside the midline one), cropped in plane to the label's box plus
    ``margin_mm``; every voxel keeps its physical position. Assumes the lumbar-mr layout (array
    ``[z, y, x]``, x the sagittal slice axis)."""
    lab = np.asarray(label.array)
    per_x = (lab > 0).sum(axis=(0, 1))
    cx = int(np.argmax(per_x)) + int(offset)
    x0 = max(0, min(lab.shape[2] - slices, cx - slices // 2))
    zs, ys = np.nonzero((lab > 0).any(axis=2))
    sx, sy, sz = image.spacing
    mz, my = int(round(margin_mm / sz)), int(round(margin_mm / sy))
    z0, z1 = max(0, zs.min() - mz), min(lab.shape[0], zs.max() + mz + 1)
    y0, y1 = max(0, ys.min() - my), min(lab.shape[1], ys.max() + my + 1)
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x0 + slices))
    shift = np.asarray(image.direction) @ np.array([x0 * sx, y0 * sy, z0 * sz])
    geo = dict(spacing=image.spacing, origin=tuple(np.asarray(image.origin) + shift), direction=image.direction)
    return (Volume(np.ascontiguousarray(image.array[box]), **geo),
            Volume(np.ascontiguousarray(lab[box]).astype(np.uint8), **geo))


def write_reference_case(case: Case, out_dir: str | Path, source: str, slices: int = 5, offset: int = 0) -> Case:
    """One reference case (a midline slab of ``case``, ``offset`` slices beside it) in ``out_dir``."""
    image, label = case.load()
    img, lab = midline_slab(image, label, slices, offset=offset)
    where = "around the midline" if not offset else f"centred {offset:+d} slices from the midline"
    return write_case(out_dir, case.case_id, img, lab, labels=case.labels,
                      annotated_structures=case.annotated_structures, patient=case.patient,
                      extra={"source": source, "sequence": case.extra.get("sequence"),
                             "dataset": case.extra.get("dataset"),
                             "reference": f"{slices} sagittal slices {where} of {case.case_id}, "
                                          f"cropped to the labelled levels + 40 mm"})


def sources_of(cases: Sequence[Case]) -> list[str]:
    from .data import case_source

    return sorted({case_source(c) for c in cases})
