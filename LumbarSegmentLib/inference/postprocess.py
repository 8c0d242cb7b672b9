"""Label-map clean-up after the network: keep the spinal column, drop what floats apart from it.

A 2D network sees one slice at a time and now and then paints a vertebra-like blob in the
bowel or a disc-like one in the psoas. Vertebral bodies and discs alternate along the spine and
touch each other, so together they form one long connected chain; a false positive sits apart.

``spine_column`` keeps the connected pieces of the foreground (all classes together) that
belong to that chain and sets the rest to background:

* the foreground is first dilated by ``bridge_mm`` (per axis, in voxels of that axis's
  spacing), so a thin gap the network left between a body and its disc does not cut the
  chain in two; the dilation is only used to decide what is connected, never painted;
* pieces are ranked by how many foreground voxels they hold; the largest is the column, and
  any other piece with at least ``keep_fraction`` of its voxels is kept too (a column split
  by a missed disc, a transitional vertebra).

It works on the canonical sagittal stack ``[slice, row, col]`` with that stack's spacing, so
thick clinical slices get a one-slice bridge and 1 mm volumes a three-voxel one.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MODES = ("none", "spine")


def _bridge_radius(spacing: Sequence[float], bridge_mm: float) -> list[int]:
    return [max(0, int(math.ceil(bridge_mm / float(s) - 1e-6))) if s > 0 else 0 for s in spacing]


def spine_column(labels: np.ndarray, spacing: Sequence[float], *, bridge_mm: float = 3.0,
                 keep_fraction: float = 0.2) -> tuple[np.ndarray, dict]:
    """``(cleaned labels, summary)`` for a ``[S, H, W]`` label stack with ``spacing`` (slice, row, col) mm."""
    import SimpleITK as sitk

    fg = labels != 0
    n_fg = int(fg.sum())
    if n_fg == 0:
        return labels, {"pieces": 0, "kept": 0, "removed_voxels": 0}
    img = sitk.GetImageFromArray(fg.astype(np.uint8))  # array [S, H, W] -> image axes (W, H, S)
    radius = _bridge_radius(spacing, bridge_mm)[::-1]
    bridged = sitk.BinaryDilate(img, radius, sitk.sitkBall) if any(radius) else img
    cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(bridged, True))
    sizes = np.bincount(cc[fg], minlength=int(cc.max()) + 1)
    sizes[0] = 0
    keep = sizes >= keep_fraction * sizes.max()
    keep[0] = False
    drop = fg & ~keep[cc]
    out = labels.copy()
    out[drop] = 0
    return out, {"pieces": int((sizes > 0).sum()), "kept": int(keep.sum()), "removed_voxels": int(drop.sum())}


def apply(mode: str, labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, dict]:
    """Run the named clean-up (``none`` returns ``labels`` untouched)."""
    if mode == "none":
        return labels, {}
    if mode == "spine":
        return spine_column(labels, spacing)
    raise ValueError(f"unknown post-processing {mode!r}; choose one of {', '.join(MODES)}")
