"""Simulated annotator clicks and the scores of the click protocol.

The standard protocol of interactive segmentation (DeepEdit, RITM): the next click goes to the
deepest point (largest distance to the region's border, in millimetres) of the largest remaining
error region of the case's labelled structure, counted inside the structure's labelled levels
(the superior-inferior rows its truth covers +- ``margin_mm``, as :func:`evaluate.level_range_counts`
counts them). A missed region gets a positive click, a false one a negative click.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.core.volume import Volume


@dataclass(frozen=True)
class SimulatedClick:
    point_lps: tuple[float, float, float]
    positive: bool
    error_voxels: int  # size of the error region clicked
    depth_mm: float


def level_mask(truth_c: np.ndarray, row_mm: float, margin_mm: float = 2.0) -> np.ndarray:
    """Canonical bool mask of the rows the canonical truth mask covers, +- ``margin_mm``."""
    rows = np.nonzero(truth_c.any(axis=(0, 2)))[0]
    out = np.zeros(truth_c.shape, bool)
    if rows.size:
        m = int(round(margin_mm / row_mm))
        out[:, max(0, rows.min() - m):rows.max() + m + 1] = True
    return out


def level_dice(pred_values: np.ndarray, truth_ch: np.ndarray, image: Volume, value: int, channel: int,
               margin_mm: float = 2.0) -> float:
    """Dice of one structure within its labelled levels (the level-range Dice of the reports)."""
    layout = sagittal_layout(image)
    t = layout.to_canonical(truth_ch == channel)
    rows = level_mask(t, layout.spacing_src[1], margin_mm)
    q = layout.to_canonical(pred_values == value) & rows
    t = t & rows
    denom = int(t.sum()) + int(q.sum())
    return 2.0 * int((t & q).sum()) / denom if denom else 1.0


def next_click(pred_values: np.ndarray, truth_ch: np.ndarray, image: Volume, value: int, channel: int,
               margin_mm: float = 2.0) -> SimulatedClick | None:
    """The protocol's next click for one structure, or None when nothing is wrong."""
    import SimpleITK as sitk

    layout = sagittal_layout(image)
    t = np.ascontiguousarray(layout.to_canonical(truth_ch == channel))
    q = np.ascontiguousarray(layout.to_canonical(pred_values == value))
    rows = level_mask(t, layout.spacing_src[1], margin_mm)
    best = None
    for positive, err in ((True, t & ~q & rows), (False, q & ~t & rows)):
        if not err.any():
            continue
        comp = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(err.astype(np.uint8)), False))
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        lab = int(sizes.argmax())
        if best is None or sizes[lab] > best[0]:
            best = (int(sizes[lab]), positive, comp == lab)
    if best is None:
        return None
    size, positive, region = best
    point, depth = _deepest(region, layout.spacing_src)
    return SimulatedClick(_canonical_to_lps(image, layout, point), positive, size, depth)


def _deepest(region: np.ndarray, spacing) -> tuple[tuple[int, int, int], float]:
    """The voxel of ``region`` farthest (mm) from its outside, and that distance."""
    import SimpleITK as sitk

    padded = np.pad(region, 1).astype(np.uint8)  # the volume's edge counts as outside
    img = sitk.GetImageFromArray(padded)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False,
                                                               useImageSpacing=True))[1:-1, 1:-1, 1:-1]
    dist = np.where(region, dist, -np.inf)
    flat = int(np.argmax(dist))
    return tuple(int(v) for v in np.unravel_index(flat, region.shape)), float(dist.ravel()[flat])


def _canonical_to_lps(image: Volume, layout, point) -> tuple[float, float, float]:
    shape = image.array.shape
    stored = [0, 0, 0]
    for canon_axis, v in enumerate(point):
        a = layout.perm[canon_axis]
        stored[a] = shape[a] - 1 - v if layout.flip[canon_axis] else v
    k, j, i = stored
    lps = image.ijk_to_lps() @ np.array([i, j, k, 1.0])
    return tuple(float(x) for x in lps[:3])
