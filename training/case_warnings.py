"""What a training case holds that would be learnt silently and wrongly: said once, as a warning.

``lumbarseg segment`` reports NaN/infinite voxels; training must too. And a case that lists a
structure as annotated while its label map holds none of it trains as "no such structure here",
all background, which is almost always a failed or empty export rather than a true absence.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("lumbarseg.train")


def case_warnings(case_id: str, image: np.ndarray, label_in_schema: np.ndarray, structures) -> list[str]:
    """The warnings for one case (also logged): non-finite image voxels, an empty label map."""
    out = []
    if np.issubdtype(image.dtype, np.floating):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            out.append(f"case {case_id}: {bad} NaN/infinite image voxel(s) are trained on as 0; check the export "
                       f"of this case's image")
    if structures and not np.any(label_in_schema):
        out.append(f"case {case_id}: it lists {sorted(structures)} as annotated but its label map holds no voxel "
                   f"of them, so it trains as all background; export the label map again, or drop those "
                   f"structures from annotated_structures")
    for w in out:
        log.warning(w)
    return out
