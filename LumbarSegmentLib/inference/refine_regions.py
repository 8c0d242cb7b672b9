"""The regions one click edits (see :mod:`refine` for what a click means).

Everything here works on the canonical sagittal stack ``[s, r, c]`` and on a crop around the
click: the reach ellipsoid's bounding box, so a click costs the same in a small or a large volume.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from LumbarSegmentLib.core.schema import LabelSchema

DEFAULT_EXTENT_MM = {"vertebral_body": (42.0, 28.0, 36.0), "intervertebral_disc": (42.0, 11.0, 38.0)}
FALLBACK_EXTENT_MM = (35.0, 25.0, 35.0)


@dataclass
class ClickContext:
    image: np.ndarray  # canonical float32
    work: np.ndarray  # canonical label values, edited in place
    editable: np.ndarray  # canonical bool: voxels a click may change
    spacing: tuple  # mm along s, r, c
    schema: LabelSchema
    params: object  # refine.RefineParams
    probs: object  # engine_slices.SliceProbabilities
    stats: dict = field(default_factory=dict)  # class id -> (typical extent mm, intensity spread)


def _components(mask: np.ndarray) -> np.ndarray:
    """Face-connected components of a 3D bool mask as int32 labels (0: outside)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(img, False)).astype(np.int32, copy=False)


def _piece_at(mask: np.ndarray, point) -> np.ndarray:
    if not mask[point]:
        return np.zeros_like(mask)
    lab = _components(mask)
    return lab == lab[point]


def typical_extent(work: np.ndarray, value: int, class_id: str, spacing) -> np.ndarray:
    """Median (s, r, c) extent in mm of the pieces of ``value`` that hold at least a fifth of the
    largest piece's voxels; the anatomical default when there are none."""
    import SimpleITK as sitk

    mask = work == value
    default = np.array(DEFAULT_EXTENT_MM.get(class_id, FALLBACK_EXTENT_MM))
    if mask.sum() < 50:
        return default
    mask = mask[_bounding_box(mask)]  # the same pieces, less to label
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    sizes = {lab: stats.GetNumberOfPixels(lab) for lab in stats.GetLabels()}
    big = max(sizes.values())
    ext = []
    for lab, n in sizes.items():
        if n >= 0.2 * big:
            bb = stats.GetBoundingBox(lab)  # (x, y, z, sx, sy, sz) = (c, r, s) order
            ext.append((bb[5] * spacing[0], bb[4] * spacing[1], bb[3] * spacing[2]))
    med = np.median(np.array(ext), axis=0)
    # a piece that is really two merged structures, or a sliver, should not set the reach
    return np.clip(med, 0.6 * default, 1.5 * default)


def _bounding_box(mask: np.ndarray) -> tuple:
    """Slices of the smallest box holding every voxel of a non-empty ``mask``."""
    out = []
    for axis in range(mask.ndim):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _crop(ctx: ClickContext, voxel, half_mm):
    """The reach box around ``voxel``: slices for each axis, the voxel inside it, squared ellipsoid radius."""
    shape = ctx.work.shape
    half = [max(1, int(round(h / s))) for h, s in zip(half_mm, ctx.spacing)]
    box = tuple(slice(max(0, v - h), min(n, v + h + 1)) for v, h, n in zip(voxel, half, shape))
    local = tuple(v - b.start for v, b in zip(voxel, box))
    grids = np.ogrid[tuple(slice(0, b.stop - b.start) for b in box)]
    d2 = sum(((g - v) * s / hm) ** 2 for g, v, s, hm in zip(grids, local, ctx.spacing, half_mm))
    return box, local, d2


def class_stats(ctx: ClickContext, class_id: str) -> tuple[np.ndarray, float]:
    """(typical extent in mm, robust intensity spread) of a structure in the labels as they were
    when the refinement started (so the result does not depend on the order of the edits)."""
    if class_id not in ctx.stats:
        value = ctx.schema[class_id].value
        extent = typical_extent(ctx.work, value, class_id, ctx.spacing)
        same = ctx.image[ctx.work == value]
        mad = float(np.median(np.abs(same - np.median(same)))) * 1.4826 if same.size >= 200 else 0.0
        ctx.stats[class_id] = (extent, mad or float(np.std(ctx.image)) * 0.25)
    return ctx.stats[class_id]


def _distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of ``mask`` (0 on it; large when empty)."""
    import SimpleITK as sitk

    if not mask.any():
        return np.full(mask.shape, 1e9, np.float32)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0)


@dataclass
class Local:
    """What one click sees inside its reach box."""

    box: tuple
    voxel: tuple
    reach: np.ndarray  # bool: inside the reach ellipsoid
    ball: np.ndarray  # bool: the always-edited ball around the click
    image: np.ndarray
    work: np.ndarray
    allowed: np.ndarray  # bool: editable voxels inside the reach
    pk: np.ndarray  # probability of the clicked structure
    po: np.ndarray  # highest probability of another structure
    probs: np.ndarray
    channel: int
    value: int
    volume_vox: float  # typical voxels of one such structure
    spread: float


def _local(ctx: ClickContext, voxel, class_id: str) -> Local:
    extent, spread = class_stats(ctx, class_id)
    half_mm = ctx.params.reach * extent
    box, local, d2 = _crop(ctx, voxel, half_mm)
    probs = ctx.probs.get(range(box[0].start, box[0].stop), box[1], box[2])
    channel = ctx.schema.channel_of()[class_id]
    others = [i for i, c in enumerate(ctx.schema.classes) if i != channel and c.value != 0]
    pk = probs[:, channel]
    po = probs[:, others].max(axis=1) if others else np.zeros_like(pk)
    ball = d2 <= float(np.max(ctx.params.min_radius_mm / np.array(half_mm))) ** 2
    reach = d2 <= 1.0
    vol = float(np.pi / 6 * np.prod(extent) / np.prod(ctx.spacing))
    return Local(box, local, reach, ball, ctx.image[box], ctx.work[box], ctx.editable[box] & reach, pk, po, probs,
                 channel, ctx.schema[class_id].value, vol, spread)


def apply_click(ctx: ClickContext, voxel, class_id: str, positive: bool) -> tuple[int, str]:
    """Edit ``ctx.work`` for one click; returns (voxels changed, why nothing changed or '')."""
    value = ctx.schema[class_id].value
    if positive and ctx.work[voxel] == value:
        return 0, f"already {class_id}"
    if not positive and ctx.work[voxel] != value:
        return 0, f"not {class_id}"
    if not ctx.editable[voxel]:
        return 0, "protected voxel"
    lc = _local(ctx, voxel, class_id)
    if positive:
        new = np.where(_positive_region(ctx, lc), lc.value, lc.work)
    else:
        new = np.where(_negative_region(ctx, lc), _next_choice(ctx.schema, lc.probs, lc.channel), lc.work)
    changed = int((new != lc.work).sum())
    ctx.work[lc.box] = new
    return changed, "" if changed else "no region found"


def _largest_below(mask_at, levels, cap: float, voxel) -> np.ndarray:
    """The piece holding ``voxel`` of the first mask in ``levels`` (loosest first) whose piece stays
    within ``cap`` voxels; the last level's piece when none does."""
    piece = None
    for level in levels:
        piece = _piece_at(mask_at(level), voxel)
        if piece.sum() <= cap:
            break
    return piece


def _positive_region(ctx: ClickContext, lc: Local) -> np.ndarray:
    p = ctx.params
    block = max(p.block_other, float(lc.po[lc.voxel]) + 0.15)
    allowed = lc.allowed & (lc.work != lc.value) & (lc.po < block)
    structure = lc.work == lc.value
    s0, r0, c0 = lc.voxel
    sp = ctx.spacing
    near = _nearest_in_plane(structure[s0], (r0, c0), sp[1:])
    if near is not None and near[0] <= p.near_mm:  # cut short in this slice: move its border out
        d0, q = near
        offsets = _steps((r0 - q[0], c0 - q[1]), d0, sp[1:])
        grown = np.zeros_like(structure)
        for s in range(structure.shape[0]):
            grown[s] = _union_of_shifts(structure[s], offsets) & ~structure[s]
        tau = float(np.clip(lc.pk[lc.voxel] - p.prob_margin, 0.0, 0.5))
        region = _propagate(grown & allowed & _cylinder(lc, sp, p.local_mm) & (lc.pk >= tau), lc.voxel)
    else:
        region = _lateral_fill(ctx, lc, structure, allowed)
    return region if region.any() else lc.ball & allowed  # a click always changes something


def _lateral_fill(ctx: ClickContext, lc: Local, structure: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A positive click beside the structure's last slice: its last cross-section carried over the
    slices up to the click and as far again beyond it (the click is in the middle of what is
    missing); with no structure in reach, what the model half-saw or what looks like the click."""
    p = ctx.params
    s0, r0, c0 = lc.voxel
    order = sorted(range(structure.shape[0]), key=lambda s: abs(s - s0))
    for s in order:
        hit = _nearest_in_plane(structure[s], (r0, c0), ctx.spacing[1:])
        if s != s0 and hit is not None and hit[0] <= p.near_mm:
            template = _piece2d(structure[s], hit[1])
            step = 1 if s0 > s else -1
            end = s0 + (s0 - s - 1) * step
            region = np.zeros_like(structure)
            for t in range(s + step, end + step, step):
                if 0 <= t < structure.shape[0]:
                    region[t] = template & allowed[t]
            return region
    centre = float(np.median(lc.image[lc.ball]))

    def mask_at(k):
        like = np.abs(lc.image - centre) <= k * lc.spread
        return allowed & ((lc.pk >= p.prob_low) | like)

    return _fill_slices(_largest_below(mask_at, (1.5, 1.0, 0.7, 0.5, 0.3), 1.3 * lc.volume_vox, lc.voxel))


def _negative_region(ctx: ClickContext, lc: Local) -> np.ndarray:
    p = ctx.params
    piece = _piece_at(lc.allowed & (lc.work == lc.value), lc.voxel)
    s0, r0, c0 = lc.voxel
    sp = ctx.spacing
    p0 = _piece2d(piece[s0], (r0, c0))
    inside = _distance_mm(~p0[None], (1.0,) + tuple(sp[1:]))[0]
    d_out = float(inside[r0, c0])
    if d_out >= p.centre_fraction * float(inside.max()):  # the click is the middle of a wrong cross-section
        slices = np.nonzero(piece.any(axis=(1, 2)))[0]
        counts = piece.sum(axis=(1, 2))
        centre = float((np.arange(piece.shape[0]) * counts).sum() / counts.sum())
        step = 1 if s0 >= centre else -1
        end = slices.max() if step > 0 else slices.min()
        start = int(np.clip(2 * s0 - end, min(s0, round(centre)), max(s0, round(centre))))
        keep = np.zeros(piece.shape[0], bool)
        lo, hi = sorted((start, end))
        keep[lo:hi + 1] = True
        return _propagate(piece & keep[:, None, None], lc.voxel)
    near = _nearest_in_plane(~p0, (r0, c0), sp[1:])
    d, q = near
    offsets = _steps((q[0] - r0, q[1] - c0), d, sp[1:])
    cut = np.zeros_like(piece)
    for s in range(piece.shape[0]):
        if piece[s].any():
            cut[s] = piece[s] & ~_intersection_of_shifts(piece[s], [(-a, -b) for a, b in offsets])
    tau = float(np.clip(lc.pk[lc.voxel] + p.prob_margin, 0.5, 0.97))  # as unsure as the clicked spot, or more
    region = _propagate(cut & _cylinder(lc, sp, p.local_mm) & (lc.pk <= tau), lc.voxel)
    return region if region.any() else lc.ball & piece


def _cylinder(lc: Local, spacing, radius_mm: float) -> np.ndarray:
    """Voxels of the reach box within ``radius_mm`` of the click in the slice plane (any slice)."""
    _, r0, c0 = lc.voxel
    rr, cc = np.ogrid[:lc.work.shape[1], :lc.work.shape[2]]
    inside = ((rr - r0) * spacing[1]) ** 2 + ((cc - c0) * spacing[2]) ** 2 <= radius_mm ** 2
    return np.broadcast_to(inside[None], lc.work.shape)


def _nearest_in_plane(mask2d: np.ndarray, rc, spacing2):
    """(distance mm, (r, c)) of the pixel of ``mask2d`` nearest to ``rc``; None when it is empty."""
    pts = np.argwhere(mask2d)
    if not len(pts):
        return None
    d = np.hypot((pts[:, 0] - rc[0]) * spacing2[0], (pts[:, 1] - rc[1]) * spacing2[1])
    i = int(np.argmin(d))
    return float(d[i]), (int(pts[i, 0]), int(pts[i, 1]))


def _steps(direction, dist_mm: float, spacing2) -> list[tuple[int, int]]:
    """Pixel offsets along ``direction`` (pixels) covering the error's thickness: the click is its
    middle, so about twice the click's distance from the border, less one pixel."""
    v = np.array(direction, float) * np.array(spacing2)
    norm = float(np.hypot(*v)) or 1.0
    unit = v / norm
    thick = max(min(spacing2), 2.0 * dist_mm - min(spacing2))
    n = max(1, int(np.ceil(thick / min(spacing2))))
    out = []
    for t in range(1, n + 1):
        mm = min(t * min(spacing2), thick)
        o = (int(round(unit[0] * mm / spacing2[0])), int(round(unit[1] * mm / spacing2[1])))
        if o != (0, 0) and o not in out:
            out.append(o)
    return out or [(0, 0)]


def _shift(mask2d: np.ndarray, dr: int, dc: int) -> np.ndarray:
    out = np.zeros_like(mask2d)
    h, w = mask2d.shape
    out[max(0, dr):h + min(0, dr), max(0, dc):w + min(0, dc)] = \
        mask2d[max(0, -dr):h - max(0, dr), max(0, -dc):w - max(0, dc)]
    return out


def _union_of_shifts(mask2d, offsets):
    out = mask2d.copy()
    for dr, dc in offsets:
        out |= _shift(mask2d, dr, dc)
    return out


def _intersection_of_shifts(mask2d, offsets):
    out = mask2d.copy()
    for dr, dc in offsets:
        out &= _shift(mask2d, dr, dc)
    return out


def _piece2d(mask2d: np.ndarray, rc) -> np.ndarray:
    return _piece_at(mask2d[None], (0, int(rc[0]), int(rc[1])))[0]


def _propagate(candidate: np.ndarray, voxel) -> np.ndarray:
    """The piece of ``candidate`` in the clicked slice that holds (or is nearest to) the click, carried
    slice by slice to the neighbours through the candidate pieces that overlap it."""
    s0, r0, c0 = voxel
    out = np.zeros_like(candidate)
    if not candidate[s0].any():
        return out
    hit = _nearest_in_plane(candidate[s0], (r0, c0), (1.0, 1.0))
    out[s0] = _piece2d(candidate[s0], hit[1])
    for step in (1, -1):
        prev = out[s0]
        s = s0 + step
        while 0 <= s < candidate.shape[0] and prev.any():
            cur = np.zeros_like(prev)
            if candidate[s].any():
                lab = _components(candidate[s][None])[0]
                keep = np.zeros(int(lab.max()) + 1, bool)
                keep[lab[prev]] = True
                keep[0] = False
                cur = keep[lab]
            out[s] = cur
            prev = cur
            s += step
    return out


def _next_choice(schema: LabelSchema, probs, channel: int) -> np.ndarray:
    """Label values of the most likely class other than ``channel`` (background unless another
    structure is more likely than not)."""
    masked = probs.copy()
    masked[:, channel] = -1.0
    best = masked.argmax(axis=1)
    backgrounds = [i for i, c in enumerate(schema.classes) if c.value == 0]
    if backgrounds:
        best = np.where(masked.max(axis=1) >= 0.5, best, backgrounds[0])
    return schema.channels_to_values(best)


def _fill_slices(region: np.ndarray) -> np.ndarray:
    """Holes of each sagittal slice of ``region`` filled."""
    import SimpleITK as sitk

    out = region.copy()
    for s in range(region.shape[0]):
        if region[s].any():
            img = sitk.GetImageFromArray(region[s].astype(np.uint8))
            out[s] = sitk.GetArrayFromImage(sitk.BinaryFillhole(img)).astype(bool)
    return out
