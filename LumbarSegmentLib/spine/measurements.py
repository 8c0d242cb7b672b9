"""Per-level measurements of a level label map: body and disc heights (mm) and volumes (mm3).

The same code measures a draft named by ``levels.name_levels`` and a manual label in the same
value scheme, so the two can be compared. Method (docs/levels.md has a picture):

1. the structure's **mid-sagittal slice** is the slice through its centre (mean slice index of its
   voxels, rounded);
2. on that slice its **own axes** are those of the smallest rectangle enclosing its outline
   (searched within +-45 degrees of the image axes, 2nd-98th percentile extents): the height axis
   is the one nearer the cranio-caudal image direction, the depth axis runs anterior to posterior;
3. the depth ``D`` is the extent of the outline along the depth axis through its centre;
   **anterior, middle and posterior height** are the extents of the outline along the height axis
   on the lines at 10 %, 50 % and 90 % of ``D`` from the anterior margin (inset from the corners,
   where outlines are rounded), each the median over the lines within +-10 % of ``D`` around that
   position (11 lines; a ragged border, where a few pixel columns stick out or fall short,
   does not decide a height);
4. the **volume** is the number of voxels times the voxel volume (all slices).

Heights are measured the same way for discs (anterior/middle/posterior disc height).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.spine.level_names import level_name, sort_key, structure_of
from LumbarSegmentLib.core.volume import Volume

HEIGHTS = ("anterior_height_mm", "middle_height_mm", "posterior_height_mm")
POSITIONS = (0.10, 0.50, 0.90)  # fraction of the depth from the anterior margin
BAND = 0.10  # each height is the median over lines within +-10 % of the depth around its position
STEP_MM = 0.1
COLUMNS = ("level", "structure", "label", "slice", *HEIGHTS, "depth_mm", "volume_mm3")


@dataclass
class Line:
    """One height line on a slice, in canonical (row, col) pixel coordinates."""

    start: tuple
    end: tuple
    length_mm: float


def structure_axes(pts_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(height axis, depth axis)``: unit vectors in (row, col) mm, pointing caudal and posterior.

    The outline's orientation is that of its smallest enclosing rectangle (the 2nd-98th percentile
    box, searched in 1 degree steps within +-45 degrees of the image axes): bodies and discs are
    near-rectangular, so this follows their endplates; moments (PCA) do not for a near-square body.
    """
    if len(pts_mm) < 3:
        return np.array([1.0, 0.0]), np.array([0.0, 1.0])
    centred = pts_mm - pts_mm.mean(0)
    best, best_area = 0.0, np.inf
    for deg in np.arange(-45.0, 45.5, 1.0):
        th = np.radians(deg)
        h, d = np.array([np.cos(th), np.sin(th)]), np.array([-np.sin(th), np.cos(th)])
        ph, pd = centred @ h, centred @ d
        area = np.ptp(np.percentile(ph, [2, 98])) * np.ptp(np.percentile(pd, [2, 98]))
        if area < best_area - 1e-9:
            best, best_area = th, area
    height = np.array([np.cos(best), np.sin(best)])
    depth = np.array([-np.sin(best), np.cos(best)])
    return height, (depth if depth[1] >= 0 else -depth)


def _extent_on_line(mask: np.ndarray, spacing, origin, direction, span) -> tuple[float, float] | None:
    """First and last position (mm from ``origin`` along ``direction``) where the line is inside ``mask``."""
    ts = np.arange(span[0], span[1] + STEP_MM, STEP_MM)
    pts = origin[None] + ts[:, None] * direction[None]
    rc = np.round(pts / np.asarray(spacing)[None]).astype(int)
    ok = (rc[:, 0] >= 0) & (rc[:, 0] < mask.shape[0]) & (rc[:, 1] >= 0) & (rc[:, 1] < mask.shape[1])
    inside = np.zeros(len(ts), bool)
    inside[ok] = mask[rc[ok, 0], rc[ok, 1]]
    if not inside.any():
        return None
    idx = np.flatnonzero(inside)
    return float(ts[idx[0]]), float(ts[idx[-1]])


def measure_slice(mask: np.ndarray, spacing) -> dict:
    """Heights, depth and the three height lines of one 2D outline ``mask[row, col]`` (spacing in mm)."""
    sp = np.asarray(spacing, float)
    pts = np.argwhere(mask) * sp[None]
    if len(pts) == 0:
        return {k: None for k in HEIGHTS} | {"depth_mm": None, "lines": []}
    centre = pts.mean(0)
    height_ax, depth_ax = structure_axes(pts)
    along_d = (pts - centre) @ depth_ax
    along_h = (pts - centre) @ height_ax
    pixel = float(np.hypot(*sp))
    d0, d1 = along_d.min() - 0.5 * pixel, along_d.max() + 0.5 * pixel
    depth_span = _extent_on_line(mask, sp, centre, depth_ax, (d0, d1))
    if depth_span is None:
        depth_span = (along_d.min(), along_d.max())
    a, p = depth_span
    # samples every 0.1 mm, each reading its nearest pixel: a run of n pixels spans n pixel widths
    out = {"depth_mm": round(p - a, 2), "lines": []}
    h_span = (along_h.min() - pixel, along_h.max() + pixel)
    for key, frac in zip(HEIGHTS, POSITIONS):
        found = []
        for f in np.linspace(frac - BAND, frac + BAND, 11):
            origin = centre + (a + f * (p - a)) * depth_ax
            ext = _extent_on_line(mask, sp, origin, height_ax, h_span)
            if ext is not None:
                found.append((ext[1] - ext[0], f, origin, ext))
        if not found:
            out[key] = None
            continue
        found.sort(key=lambda x: x[0])
        span, _, origin, ext = found[len(found) // 2]  # the median line (drawn in the overlay)
        length = span
        out[key] = round(length, 2)
        out["lines"].append(Line(tuple((origin + ext[0] * height_ax) / sp), tuple((origin + ext[1] * height_ax) / sp),
                                 length))
    return out


def mid_slice(m: np.ndarray) -> int:
    """The structure's mid-sagittal slice: through its centre (mean slice index of its voxels), or
    the nearest slice holding it when the centre falls between two pieces."""
    per_slice = m.reshape(m.shape[0], -1).sum(1)
    s = int(round(float((np.arange(len(per_slice)) * per_slice).sum() / per_slice.sum())))
    if not m[s].any():
        s = int(np.flatnonzero(per_slice)[np.argmin(np.abs(np.flatnonzero(per_slice) - s))])
    return s


def measure_levels(levels: Volume, *, allow_reslice: bool = True, with_lines: bool = False) -> list[dict]:
    """One row per level present in a level label map, cranial to caudal (see :data:`COLUMNS`)."""
    layout = sagittal_layout(levels, allow_reslice=allow_reslice)
    stack = layout.to_canonical(np.asarray(levels.array))
    ss, sr, sc = layout.spacing_src
    voxel = float(ss * sr * sc)
    values = [int(v) for v in np.unique(stack) if v]
    rows = []
    for v in sorted(values, key=lambda x: sort_key(level_name(x))):
        m = stack == v
        s = mid_slice(m)
        res = measure_slice(m[s], (sr, sc))
        row = {"level": level_name(v), "structure": structure_of(v), "label": v, "slice": s,
               **{k: res[k] for k in HEIGHTS}, "depth_mm": res["depth_mm"],
               "volume_mm3": round(float(m.sum()) * voxel, 1)}
        if with_lines:
            row["lines"] = res["lines"]
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    """The measurements as CSV text: one row per level, the columns of :data:`COLUMNS` (mm, mm3).

    ``slice`` is the index of the mid-sagittal slice in the canonical stack (right to left).
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    return buf.getvalue()
