"""Is this input worth segmenting? Checked before any inference (the options check themselves: inference/options.py).

The engine segments whatever array it is given. A 1 x 1 x 2 volume, pure noise, pixels
of a millionth of a millimetre, a label map passed as the image, or a header whose
spacing would blow a slice up to 6000 x 6000 pixels at the model's spacing all "work"
and give a meaningless result, or run for minutes and gigabytes first. These checks
turn each into a clear refusal that says what looks wrong.
"""
from __future__ import annotations

import math

import numpy as np

from LumbarSegmentLib.core.geometry import model_plane_size, sagittal_layout
from LumbarSegmentLib.core.volume import Volume, VolumeError

MIN_INPLANE_PIXELS = 16  # per in-plane axis; a real MR slice has hundreds
MIN_FOV_MM = 10.0  # per in-plane axis; a lumbar spine is over 100 mm tall
MAX_FOV_MM = 1500.0  # a whole body is under 2 m; a larger field of view means a wrong spacing
MAX_PLANE_PIXELS = 2048 * 2048  # one slice at the model's spacing
MAX_MODEL_VOXELS = 1 << 28  # all slices at the model's spacing (about 1 GiB as float32)
MIN_NEIGHBOUR_CORRELATION = 0.15  # MR voxels resemble their neighbours; noise does not
LABEL_MAP_MAX_VALUES = 8


class ImplausibleInput(VolumeError):
    """The volume can be read, but segmenting it would give nonsense or take unbounded resources."""


def number_arg(lo: float, hi: float = math.inf, *, kind=float, below_hi: bool = False, what: str = "a number",
               use: str = ""):
    """An argparse ``type`` for a bounded number: a value that does not parse, or lies outside ``lo`` ..
    ``hi`` (``hi`` itself excluded with ``below_hi``), becomes a usage message that names the value and
    says what to give (``use``), never a traceback from deep inside a run. The training command's
    number options go through this one shape; ``lumbarseg segment``'s come from ``inference.options``."""
    import argparse

    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}" + (f"; {use}" if use else "")) from None
        if not (math.isfinite(v) and lo <= v and (v < hi if below_hi else v <= hi)):
            raise argparse.ArgumentTypeError(f"{value!r}: {use or f'use {lo:g} to {hi:g}'}")
        return v

    return parse


def check_segmentable(volume: Volume, packages, *, allow_reslice: bool = False) -> None:
    """Refuse a volume that is too small, too large at the model's spacing, noise, or a label map."""
    layout = sagittal_layout(volume, allow_reslice=allow_reslice)  # raises the usual orientation errors
    stack_shape = tuple(volume.array.shape[a] for a in layout.perm)
    rows, cols = stack_shape[1], stack_shape[2]
    row_mm, col_mm = layout.inplane_spacing
    fov = (rows * row_mm, cols * col_mm)
    shown = f"{rows} x {cols} pixels of {row_mm:g} x {col_mm:g} mm"
    if min(rows, cols) < MIN_INPLANE_PIXELS:
        raise ImplausibleInput(f"each slice is only {rows} x {cols} pixels (the image is {' x '.join(map(str, volume.size_ijk))} "
                               f"voxels): too small to be an MR slice; open the whole MR series")
    if min(fov) < MIN_FOV_MM or max(fov) > MAX_FOV_MM:
        raise ImplausibleInput(f"the slices cover {fov[0]:.3g} x {fov[1]:.3g} mm ({shown}), which no spine MR does; "
                               f"the pixel spacing in the file's header is wrong. Fix the spacing and try again")
    for pkg in packages:
        plane = model_plane_size((rows, cols), (row_mm, col_mm), pkg.spacing)
        total = plane[0] * plane[1] * stack_shape[0]
        if plane[0] * plane[1] > MAX_PLANE_PIXELS or total > MAX_MODEL_VOXELS:
            raise ImplausibleInput(f"at the model's {pkg.spacing[0]:g} mm spacing each slice would be {plane[0]} x "
                                   f"{plane[1]} pixels ({stack_shape[0]} slices), far beyond a spine MR; check the "
                                   f"pixel spacing in the file's header, or crop the image")
    _refuse_label_map(volume)
    _refuse_noise(layout.to_canonical(volume.array))


def _sample(array: np.ndarray) -> np.ndarray:
    step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    return array[::step, ::step, ::step]


def _refuse_label_map(volume: Volume) -> None:
    a = volume.array
    if a.dtype.kind not in "iu":
        return
    values = np.unique(_sample(a))
    if 2 <= len(values) <= LABEL_MAP_MAX_VALUES and np.count_nonzero(a) > 1 and values.min() >= 0:
        raise ImplausibleInput(f"the image holds only the values {values.tolist()}: it looks like a label map "
                               f"(a segmentation), not an MR image; segment the MR image instead")


def _refuse_noise(stack: np.ndarray) -> None:
    """Refuse when neighbouring voxels within a slice are uncorrelated (random noise, scrambled data)."""
    centre = stack.shape[0] // 2
    # a few central slices, at most ~half a million voxels: the verdict needs no more, and on a
    # 512 x 512 stack eight float64 slices cost a quarter of a second of a 3 s command
    per_slice = max(1, stack.shape[1] * stack.shape[2])
    half = max(1, min(4, 500_000 // per_slice // 2))
    slab = stack[max(0, centre - half): centre + half].astype(np.float64)
    if slab.shape[1] < 2 or slab.shape[2] < 2:
        return
    corr = []
    for a, b in ((slab[:, 1:, :], slab[:, :-1, :]), (slab[:, :, 1:], slab[:, :, :-1])):
        a, b = a.ravel(), b.ravel()
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        if a.size < 16 or a.std() == 0 or b.std() == 0:
            return  # constant slices: the engine says so with its own message
        corr.append(float(np.corrcoef(a, b)[0, 1]))
    if max(corr) < MIN_NEIGHBOUR_CORRELATION:
        raise ImplausibleInput(f"the image looks like random noise (neighbouring voxels are uncorrelated: "
                               f"{max(corr):.2f}); check that this is the right file or series")


def empty_result_warning(labels: Volume) -> str | None:
    """A warning for a label map without any structure (a wrong image, or a model that found nothing)."""
    if not np.any(labels.array):
        return ("no structure was found: the label map is empty. Check that the image is a sagittal lumbar MR "
                "of the kind the model was trained on")
    return None
