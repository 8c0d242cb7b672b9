"""S1 from image evidence, below a named L5-S1 disc, when the draft holds no body there.

The default model has no sacrum class and drafts S1 only now and then. Levels are anchored at
L5-S1 anyway; this module outlines the S1 segment below that disc so the level list can name it:

* the disc's own axes (smallest enclosing rectangle on its mid-sagittal slice, as in
  ``measurements``) give "caudal" and "anterior-posterior";
* candidates: voxels in the disc's slices, within the disc's anterior-posterior extent, from the
  disc's lower surface down by 110 % of the L5 body's height, not drafted as anything else;
* of those, the ones whose intensity is like L5's marrow (within three standard deviations of its
  mean) and that connect to the band just below the disc form S1; too small a result is dropped.
"""
from __future__ import annotations

import numpy as np

from LumbarSegmentLib.spine.measurements import structure_axes

DEPTH_OF_BODY = 1.1  # S1 searched down to this fraction of the L5 body height below the disc
MIN_FRACTION = 0.15  # of the L5 volume; a smaller find is no S1
TOUCH_MM = 4.0
SD_K = 3.0  # intensity within this many standard deviations of the L5 marrow


def _coords(idx, shape, spacing) -> np.ndarray:
    return np.stack(np.unravel_index(idx, shape), axis=1) * np.asarray(spacing, float)


def s1_from_image(image: np.ndarray, labels: np.ndarray, disc_idx: np.ndarray, l5_idx: np.ndarray,
                  spacing) -> np.ndarray | None:
    """Flat indices of an S1 outline in the canonical stack ``[s, r, c]``, or None when there is no evidence."""
    import SimpleITK as sitk

    shape = labels.shape
    disc, body = _coords(disc_idx, shape, spacing), _coords(l5_idx, shape, spacing)
    s_mid = int(round(np.median(disc[:, 0]) / spacing[0]))
    on_mid = disc[np.abs(disc[:, 0] - s_mid * spacing[0]) < 0.5 * spacing[0]][:, 1:]
    height_ax, depth_ax = structure_axes(on_mid if len(on_mid) > 2 else disc[:, 1:])
    centre = disc[:, 1:].mean(0)
    d_disc = (disc[:, 1:] - centre) @ depth_ax
    h_disc = (disc[:, 1:] - centre) @ height_ax
    h_body = (body[:, 1:] - centre) @ height_ax
    reach = DEPTH_OF_BODY * float(np.percentile(h_body, 98) - np.percentile(h_body, 2))
    lo_h = float(np.percentile(h_disc, 98))
    d_lo, d_hi = np.percentile(d_disc, [2, 98])
    s_lo, s_hi = int(disc[:, 0].min() / spacing[0] + 0.5), int(disc[:, 0].max() / spacing[0] + 0.5)
    rr, cc = np.meshgrid(np.arange(shape[1]) * spacing[1], np.arange(shape[2]) * spacing[2], indexing="ij")
    rel = np.stack([rr - centre[0], cc - centre[1]], axis=-1)
    along_h, along_d = rel @ height_ax, rel @ depth_ax
    box2d = (along_h > lo_h) & (along_h <= lo_h + reach) & (along_d >= d_lo) & (along_d <= d_hi)
    touch2d = box2d & (along_h <= lo_h + TOUCH_MM)
    values = image.reshape(-1)[l5_idx].astype(np.float64)
    mean, sd = float(values.mean()), float(values.std()) or 1.0
    cand = np.zeros(shape, bool)
    cand[s_lo:s_hi + 1] = box2d[None]
    cand &= (labels == 0) & (np.abs(image - mean) <= SD_K * sd)
    if not cand.any():
        return None
    cc3 = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(cand.astype(np.uint8)), False))
    touching = np.zeros(shape, bool)
    touching[s_lo:s_hi + 1] = touch2d[None]
    ids = np.unique(cc3[touching & cand])
    ids = ids[ids > 0]
    if ids.size == 0:
        return None
    sizes = np.bincount(cc3.ravel())
    best = int(ids[np.argmax(sizes[ids])])
    if sizes[best] < MIN_FRACTION * l5_idx.size:
        return None
    return np.flatnonzero(cc3.ravel() == best)
