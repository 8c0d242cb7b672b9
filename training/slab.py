"""Thin-slice case -> a clinical-looking thick-slab 2D sagittal stack, for the clinical-robustness rows.

``thick_slab`` averages slices in slabs of ``slab_mm`` (as a thick excitation integrates), keeps the
centre slice's label, and resamples in-plane to ``inplane_mm`` pixels (nearest-neighbour labels).
"""
from __future__ import annotations

import numpy as np
import torch

from LumbarSegmentLib.core.geometry import resize_planes, sagittal_layout
from LumbarSegmentLib.core.volume import Volume


def spacing_xyz(layout, canonical_spacing) -> tuple[float, float, float]:
    """A Volume's ``spacing`` (i, j, k) from spacings along the canonical stack's (s, r, c) axes."""
    by_array_axis = [0.0, 0.0, 0.0]
    for canon_axis, array_axis in enumerate(layout.perm):
        by_array_axis[array_axis] = float(canonical_spacing[canon_axis])
    return tuple(by_array_axis[::-1])  # the array is stored [k, j, i]


#: in-plane pixel of the clinical-looking stacks unless told otherwise (a typical 2D sagittal TSE)
CLINICAL_INPLANE_MM = 0.6


def thick_slab(image: Volume, label: Volume, slab_mm: float = 4.0,
               inplane_mm: float = CLINICAL_INPLANE_MM) -> tuple[Volume, Volume]:
    """A clinical-looking 2D stack from a thin-slice sagittal case.

    Across slices: consecutive slices are averaged in slabs of ``slab_mm`` (partial volume, as
    a thick excitation integrates); the label of a slab is its centre slice's (nearest). In
    plane: resampled to ``inplane_mm`` pixels (bilinear image, nearest label). The spacing
    follows, so the engine sees a genuine 4 mm stack; origin and direction are kept (the first
    voxel's position is off by under half a slab, which no score on this grid depends on).
    """
    layout = sagittal_layout(image)
    img = np.ascontiguousarray(layout.to_canonical(image.array)).astype(np.float32)
    lab = np.ascontiguousarray(layout.to_canonical(label.array))
    s_sp, r_sp, c_sp = layout.spacing_src
    k = max(1, int(round(slab_mm / s_sp)))
    n = img.shape[0] // k
    if n < 1:
        raise ValueError(f"the volume has {img.shape[0]} slices of {s_sp} mm: too few for {slab_mm} mm slabs")
    img_s = img[:n * k].reshape(n, k, *img.shape[1:]).mean(1)
    lab_s = lab[:n * k][k // 2::k][:n]
    size = (max(8, int(round(img.shape[1] * r_sp / inplane_mm))), max(8, int(round(img.shape[2] * c_sp / inplane_mm))))
    img_t = resize_planes(torch.from_numpy(img_s), size, mode="bilinear").numpy()
    lab_t = resize_planes(torch.from_numpy(lab_s.astype(np.int64)), size, mode="nearest").numpy().astype(lab.dtype)
    # stored order back; spacing along each stored axis from the canonical one it became
    arr_img, arr_lab = layout.from_canonical(img_t), layout.from_canonical(lab_t)
    canon_sp = (k * s_sp, img.shape[1] * r_sp / size[0], img.shape[2] * c_sp / size[1])
    geo = dict(spacing=spacing_xyz(layout, canon_sp), origin=image.origin, direction=image.direction)
    return (Volume(np.ascontiguousarray(arr_img), **geo), Volume(np.ascontiguousarray(arr_lab), **geo))
