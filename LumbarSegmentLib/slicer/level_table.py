"""The levels table of the Slicer module and the browser page: names, flags and per-level measurements.

The table is measured from the segmentation node as it stands, not from the draft's report: a person
may have shifted the names, corrected an outline, or loaded a manual segmentation whose segments are
named by level (``L1``, ``L4-L5``, ...). The level segments are painted back into one level label map
on the volume's grid and handed to :func:`LumbarSegmentLib.spine.measurements.measure_levels`, the
function behind ``lumbarseg segment --measurements``; so the numbers on screen and in the saved CSV are
the command line's numbers for the same label map, and a draft and a manual label are measured alike.

No Qt and no trame here: the front ends show :func:`table_rows` and write :func:`save_csv`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.slicer.bridge import MRMLError, node_geometry, segment_mask
from LumbarSegmentLib.slicer.levels import level_list
from LumbarSegmentLib.spine.measurements import HEIGHTS, measure_levels, to_csv

# (key of a table row, header) in the order both front ends show them; heights in mm, volume in mm3
COLUMNS = (("level", "Level"), ("flags", "Flags"), ("anterior", "Anterior (mm)"), ("middle", "Middle (mm)"),
           ("posterior", "Posterior (mm)"), ("volume", "Volume (mm3)"))
_SHOWN = dict(zip(("anterior", "middle", "posterior"), HEIGHTS)) | {"volume": "volume_mm3"}


def level_label_map(seg_node, reference_node) -> Volume:
    """The level segments as one label map on ``reference_node``'s grid, in the level value scheme.

    Each voxel takes the value of the level segment covering it (``L1`` = 20, ``L4-L5`` = 123, ...);
    where two level segments overlap, the more caudal one wins, as in a cranial-to-caudal painting.
    Segments not named by level are left out. Refuses a segmentation without level segments.
    """
    if seg_node is None:
        raise MRMLError("choose a segmentation whose segments are named by level (L1, L4-L5, ...)")
    if reference_node is None:
        raise MRMLError("choose the volume the segmentation was drawn on: heights are measured on its grid")
    rows = level_list(seg_node)
    if not rows:
        raise MRMLError(f"{seg_node.GetName()} has no segment named by level (L1 .. L5, S1, L4-L5, ...): "
                        f"name them so, or segment with Levels on")
    grid = node_geometry(reference_node)
    out = np.zeros(grid.shape, np.uint8)
    for row in rows:  # cranial to caudal
        out[segment_mask(seg_node, row["segment_id"], reference_node)] = row["label"]
    return grid.with_array(out, kind="labels")


def measure_segmentation(seg_node, reference_node) -> list[dict]:
    """``measurements.COLUMNS`` rows, one per level segment: what ``--measurements`` writes for that label map."""
    return measure_levels(level_label_map(seg_node, reference_node), allow_reslice=True)


def _one_decimal(value) -> str:
    return "" if value is None else f"{float(value):.1f}"


def table_rows(seg_node, measured: list[dict] | None = None) -> list[dict]:
    """One row per level segment, cranial to caudal, for a table widget: ``COLUMNS`` keys as text.

    ``flags`` are the ordering check's codes on the segment (empty for a manual segmentation);
    without ``measured`` (the rows of :func:`measure_segmentation`) the height and volume cells are empty,
    which is how the list shows before anyone asks for measurements. Numbers carry one decimal.
    """
    by_name = {r["level"]: r for r in measured or []}
    out = []
    for row in level_list(seg_node) if seg_node is not None else []:
        m = by_name.get(row["name"], {})
        out.append({"segment_id": row["segment_id"], "level": row["name"], "structure": row["structure"],
                    "flags": ", ".join(row["flags"]),
                    **{key: _one_decimal(m.get(source)) for key, source in _SHOWN.items()}})
    return out


def save_csv(measured: list[dict], path) -> Path:
    """Write the rows as the ``--measurements`` CSV (same columns, same numbers); atomic, ``.csv`` only."""
    from LumbarSegmentLib.core.files import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path.name}: the measurements are a CSV table; give a name ending in .csv")
    if not measured:
        raise ValueError("nothing measured yet: measure the levels first")
    text = to_csv(measured)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)  # as the command line writes it
    return path
