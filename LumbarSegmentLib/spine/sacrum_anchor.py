"""The caudal anchor of the level names from a drafted sacrum.

A model with a ``sacrum`` class (the default since ``uvd-spine@2``) draws the sacrum itself. Then the
bottom of the count is no longer a guess from the sizes of the lowest disc and body
(:mod:`anchor_checks`): the segment the sacrum begins with is S1, and the lowest disc above the
sacrum's top is L5-S1. What this module decides, on pieces already placed along the spine curve
(``t`` in mm, increasing caudally):

* discs whose centre lies below the sacrum's top are sacral remnants (S1-S2 ...), not lumbar
  discs, and are dropped;
* a drafted body whose lower end reaches the sacrum's top (within :data:`TOUCH_MM`) is S1 drawn as a
  body, in part or whole: it joins S1. A body that ends higher is a vertebra of its own, so an L5
  over a missed L5-S1 disc keeps its name (the ordering check then reports the missing disc). So
  does a full-size body that touches a full-size sacrum: S1 is drawn already, and what sits on it
  is L5 over a disc the draft missed (a thin, dark L5-S1), not a second S1;
* a sacrum drawn as two body-sized pieces, one above the other with a disc-high gap between them
  (:data:`SPLIT_GAP_MM`), is L5 drawn as sacrum over a missed, dark L5-S1 disc: the models draw
  the sacrum as S1 mostly, and S1 is fused to the segments below it, with no such gap. The upper
  piece is read as a body (:func:`split_sacrum`) and the case is flagged for review;
* S1 = those bodies and the sacrum's voxels down to one typical body length below its top (the
  sources outline S1, not the whole sacrum).

One reading stays open and is flagged, not decided (``levels``): a small lowest disc right above
the sacrum may be a thin L5-S1 or the S1-S2 remnant under an S1 the model drew as a body (seen in
3D T2 SPACE drafts); the disc check of :mod:`anchor_checks` still runs for it.

Without a drafted sacrum, or one too small to be a sacrum, nothing changes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from LumbarSegmentLib.spine.level_names import BODY, DISC

TOUCH_MM = 3.0  # a body ending this close above the sacrum's top is part of S1
MIN_SACRUM_FRACTION = 0.3  # of the median body volume: smaller sacrum pieces are stray blobs
FULL_SIZE = 0.75  # of the median body volume: a body and a sacrum this large are a body on a drawn S1
SPLIT_GAP_MM = (3.0, 20.0)  # between two stacked sacrum pieces: a disc's height apart, not a crack or far
UPPER_PIECE = 0.5  # of the median body volume: the upper of two sacrum pieces must be body-sized


def _gap_mm(upper, lower, shape, spacing) -> float:
    """The shortest distance (mm) from ``upper``'s voxels to ``lower``'s, within their bounding box."""
    from scipy import ndimage as ndi

    a = np.stack(np.unravel_index(upper.mask_index, shape), axis=1)
    b = np.stack(np.unravel_index(lower.mask_index, shape), axis=1)
    lo = np.minimum(a.min(0), b.min(0))
    box = np.maximum(a.max(0), b.max(0)) - lo + 1
    m = np.ones(tuple(box), bool)
    m[tuple((b - lo).T)] = False
    dist = ndi.distance_transform_edt(m, sampling=np.asarray(spacing, float))
    return float(dist[tuple((a - lo).T)].min())


def split_sacrum(found: list, median_body: float, shape, spacing):
    """``(sacrum, upper)``: the drafted sacrum's piece, and a piece above it to read as a body (or None).

    ``found``: the drafted sacrum's connected pieces; positions are canonical (row 1 increases caudally).
    The two uppermost large pieces closer than a disc's height are one sacrum with a crack (joined).
    """
    largest = max(found, key=lambda p: p.mask_index.size)
    big = sorted((p for p in found if p.mask_index.size >= MIN_SACRUM_FRACTION * median_body),
                 key=lambda p: p.centroid[1])
    if len(big) < 2:
        return largest, None
    upper, lower = big[0], big[1]
    gap = _gap_mm(upper, lower, shape, spacing)
    if gap < SPLIT_GAP_MM[0]:
        n1, n2 = upper.mask_index.size, lower.mask_index.size
        joined = replace(upper, mask_index=np.concatenate([upper.mask_index, lower.mask_index]),
                         centroid=(upper.centroid * n1 + lower.centroid * n2) / (n1 + n2))
        return max([joined, largest], key=lambda p: p.mask_index.size), None
    if gap > SPLIT_GAP_MM[1] or upper.mask_index.size < UPPER_PIECE * median_body:
        return largest, None
    return lower, upper


def sacrum_top(t_voxels: np.ndarray) -> float:
    """The sacrum's upper end along the curve (a low percentile: robust to a stray voxel above it)."""
    return float(np.percentile(t_voxels, 5))


def anchor_on_sacrum(pieces: list, sacrum, t_sacrum: np.ndarray, ends: dict, typical_mm: float, grid):
    """``(pieces, s1)``: the pieces to name, the S1 piece last, or ``(pieces, None)`` unchanged.

    ``pieces``: body and disc pieces ordered along the curve; ``sacrum``: the drafted sacrum's piece,
    ``t_sacrum`` its voxels' positions along the curve; ``ends``: ``id(piece) -> lower end (mm along
    the curve)`` of every body; ``typical_mm``: a typical body length along the curve; ``grid``:
    ``(shape, spacing)`` of the stack the pieces index.
    """
    top = sacrum_top(t_sacrum)
    full = FULL_SIZE * float(np.median([p.mask_index.size for p in pieces if p.structure == BODY] or [0]))
    on_drawn_s1 = sacrum.mask_index.size >= full
    keep, s1_parts = [], []
    for p in pieces:
        if p.structure == DISC and p.t > top:
            continue  # a sacral disc remnant
        if p.structure == BODY and ends.get(id(p), -np.inf) >= top - TOUCH_MM \
                and not (on_drawn_s1 and p.mask_index.size >= full and p.t < top):
            s1_parts.append(p)  # S1 drawn as a body, or a body inside the sacrum
            continue
        keep.append(p)
    upper = sacrum.mask_index[t_sacrum <= top + max(typical_mm, 10.0)]
    index = np.unique(np.concatenate([upper] + [p.mask_index for p in s1_parts]))
    shape, spacing = grid
    centroid = np.stack(np.unravel_index(index, shape), axis=1).mean(0) * np.asarray(spacing, float)
    height = max(typical_mm, 10.0)
    s1 = replace(sacrum, structure=BODY, mask_index=index, centroid=centroid, t=top + 0.5 * height, length=height)
    return keep + [s1], s1
