"""What a model sees: canonical sagittal slices, normalised, at the model's in-plane spacing.

Inference (``engine``) and training (``training.data``) both call these functions,
so a model is always fed exactly the way it was trained.
"""
from __future__ import annotations

import numpy as np

from .geometry import SagittalLayout, model_plane_size, resize_planes, sagittal_layout
from .volume import Volume, VolumeError

NORMALISATIONS = ("zscore_nonzero",)


def normalise(array: np.ndarray, method: str = "zscore_nonzero") -> tuple[np.ndarray, dict]:
    """Normalise intensities the way the seed's code did: z-score over the non-zero voxels.

    Returns the float32 array and a small report (mean, std, non-finite voxels replaced).
    Refuses a constant image: there is nothing to segment and the z-score is undefined.
    """
    if method not in NORMALISATIONS:
        raise VolumeError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}")
    x = np.asarray(array)
    if x.dtype == np.bool_:
        raise VolumeError("the image is boolean (a mask?), not an MR volume")
    x = x.astype(np.float32, copy=True)
    bad = ~np.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad:
        if n_bad == x.size:
            raise VolumeError("every voxel is NaN or infinite: the image holds no data")
        x[bad] = 0.0
    nz = x[x != 0]
    if nz.size < 2:
        raise VolumeError("the image is all zero (or has a single non-zero voxel): nothing to segment")
    mean = float(nz.mean(dtype=np.float64))
    std = float(nz.std(dtype=np.float64))
    if not np.isfinite(std) or std <= 1e-8 * max(1.0, abs(mean)):
        raise VolumeError(f"the image is constant (every non-zero voxel is {mean:g}): nothing to segment")
    # Subtract and divide in float64, a slab at a time: float32 could overflow for extreme inputs,
    # and a whole-volume float64 copy would double the memory.
    flat = x.reshape(-1)
    step = 1 << 22
    for a in range(0, flat.size, step):
        part = flat[a:a + step]
        nz = part != 0
        part[nz] = np.clip((part[nz].astype(np.float64) - mean) / std, -1e6, 1e6)
    return x, {"method": method, "mean": mean, "std": std, "nonfinite_voxels_zeroed": n_bad}


def model_slices(volume: Volume, spacing_mm: tuple[float, float], *, allow_reslice: bool = False,
                 normalisation: str = "zscore_nonzero"):
    """Volume → ``(stack, layout, info)``: a float32 torch tensor ``[S, H, W]`` at ``spacing_mm``.

    ``layout`` maps the stack back to the volume's grid (see ``geometry``).
    """
    import torch

    layout = sagittal_layout(volume, allow_reslice=allow_reslice)
    norm, info = normalise(volume.array, normalisation)
    stack = np.ascontiguousarray(layout.to_canonical(norm))
    size = model_plane_size(stack.shape[1:], layout.inplane_spacing, spacing_mm)
    t = resize_planes(torch.from_numpy(stack), size, mode="bilinear")
    return t, layout, {**info, "model_plane_size": list(size), "layout": layout.to_dict()}


def label_slices(label: np.ndarray, layout: SagittalLayout, size: tuple[int, int]):
    """A label array on the volume grid → ``[S, H, W]`` int64 tensor at the model's plane size (nearest)."""
    import torch

    stack = np.ascontiguousarray(layout.to_canonical(np.asarray(label)))
    t = torch.from_numpy(stack.astype(np.int64))
    return resize_planes(t, size, mode="nearest").long()
