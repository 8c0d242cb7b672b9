"""What a model sees: canonical sagittal slices, normalised, at the model's in-plane spacing.

Inference (``engine``) and training (``LumbarSegmentLib.training.data``) both call these functions,
so a model is always fed exactly the way it was trained.
"""
from __future__ import annotations

import numpy as np

from LumbarSegmentLib.core.geometry import SagittalLayout, model_plane_size, resize_planes, sagittal_layout
from LumbarSegmentLib.core.volume import Volume, VolumeError

NORMALISATIONS = ("zscore_nonzero",)


def normalise(array: np.ndarray, method: str = "zscore_nonzero") -> tuple[np.ndarray, dict]:
    """Normalise intensities the way the seed's code did: z-score over the non-zero voxels.

    Returns a C-contiguous float32 array (the input's shape; a strided view such as a
    transposed or flipped stack comes back as a compact copy) and a small report (mean,
    std, non-finite voxels replaced). Refuses a constant image: there is nothing to
    segment and the z-score is undefined.

    Memory: one float32 copy of the image; statistics and scaling run a slab at a time
    in float64 (exact enough, and no whole-volume float64 or gathered copy).
    """
    if method not in NORMALISATIONS:
        raise VolumeError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}")
    x = np.asarray(array)
    if x.dtype == np.bool_:
        raise VolumeError("the image is boolean (a mask?), not an MR volume; open the MR image instead")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    flat = x.reshape(-1)
    step = 1 << 22
    slabs = [flat[a:a + step] for a in range(0, flat.size, step)]
    n_bad = n_nz = 0
    total = 0.0
    for part in slabs:  # pass 1: zero the non-finite voxels, count and sum the non-zero ones
        bad = ~np.isfinite(part)
        nb = int(np.count_nonzero(bad))
        if nb:
            part[bad] = 0.0
            n_bad += nb
        vals = part[part != 0]
        n_nz += vals.size
        total += float(vals.sum(dtype=np.float64))
    if n_bad == x.size:
        raise VolumeError("every voxel is NaN or infinite: the image holds no data; check the file or series")
    if n_nz < 2:
        raise VolumeError("the image is all zero (or has a single non-zero voxel): nothing to segment; "
                          "check that this is the right file or series")
    mean = total / n_nz
    sq = 0.0
    for part in slabs:  # pass 2: spread around the mean (two passes: no cancellation)
        vals = part[part != 0].astype(np.float64)
        vals -= mean
        vals *= vals  # (not np.dot: a BLAS call, whose worker threads were seen spinning forever once
        sq += float(vals.sum())  # OpenVINO's own threads had run in the process, e.g. int8 calibration)
    std = float(np.sqrt(sq / n_nz))
    if not np.isfinite(std) or std <= 1e-8 * max(1.0, abs(mean)):
        raise VolumeError(f"the image is constant (every non-zero voxel is {mean:g}): nothing to segment; "
                          f"check that this is the right file or series")
    # Subtract and divide in float64, a slab at a time: float32 could overflow for extreme inputs,
    # and a whole-volume float64 copy would double the memory.
    for part in slabs:
        nz = part != 0
        part[nz] = np.clip((part[nz].astype(np.float64) - mean) / std, -1e6, 1e6)
    return x, {"method": method, "mean": mean, "std": std, "nonfinite_voxels_zeroed": n_bad}


def model_slices(volume: Volume, spacing_mm: tuple[float, float], *, allow_reslice: bool = False,
                 normalisation: str = "zscore_nonzero", arrays: str = "torch"):
    """Volume → ``(stack, layout, info)``: a float32 stack ``[S, H, W]`` at ``spacing_mm``, a torch tensor
    (``arrays="torch"``) or a NumPy array (``"numpy"``: the prediction path without PyTorch).

    ``layout`` maps the stack back to the volume's grid (see ``geometry``).
    """
    layout = sagittal_layout(volume, allow_reslice=allow_reslice)
    # Normalise the canonical view directly: its float32 copy is the stack (one copy of the volume, not two).
    stack, info = normalise(layout.to_canonical(volume.array), normalisation)
    size = model_plane_size(stack.shape[1:], layout.inplane_spacing, spacing_mm)
    if arrays != "numpy":
        import torch

        stack = torch.from_numpy(stack)
    t = resize_planes(stack, size, mode="bilinear")
    return t, layout, {**info, "model_plane_size": list(size), "layout": layout.to_dict()}


def label_slices(label: np.ndarray, layout: SagittalLayout, size: tuple[int, int]):
    """A label array on the volume grid → ``[S, H, W]`` int64 tensor at the model's plane size (nearest)."""
    import torch

    stack = np.ascontiguousarray(layout.to_canonical(np.asarray(label)))
    t = torch.from_numpy(stack.astype(np.int64))
    return resize_planes(t, size, mode="nearest").long()
