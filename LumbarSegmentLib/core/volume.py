"""The one small value type every step passes along: an image with its full geometry.

Conventions (the same as ITK / SimpleITK, so files round-trip without surprises):

* ``array`` is indexed ``[k, j, i]`` (slowest axis first), like ``sitk.GetArrayFromImage``
  and ``slicer.util.arrayFromVolume``;
* ``spacing``, ``origin`` and the columns of ``direction`` refer to the index axes
  ``(i, j, k)``;
* physical space is **LPS** (DICOM, ITK). The MRML bridge converts to Slicer's RAS.

A physical point of voxel ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


class VolumeError(ValueError):
    """An image cannot be used as given (shape, dtype, values or geometry)."""


class VolumeReadError(VolumeError):
    """A file or folder could not be read as a volume (lives here so io and dicom share it without a cycle)."""


SUPPORTED_DTYPES = (
    np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
    np.float16, np.float32, np.float64, np.bool_,
)


def axis_codes(direction: np.ndarray) -> str:
    """Three letters naming where each index axis (i, j, k) points, e.g. ``'LPS'`` or ``'PIR'``."""
    pos, neg = "LPS", "RAI"
    out = []
    for a in range(3):
        col = np.asarray(direction)[:, a]
        m = int(np.argmax(np.abs(col)))
        out.append(pos[m] if col[m] > 0 else neg[m])
    return "".join(out)


@dataclass(frozen=True, eq=False)
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            hint = " (a 2D image: LumbarSegment needs a 3D stack of sagittal slices)" if arr.ndim == 2 else ""
            hint = hint or (" (a 4D/multi-component image: pick one volume or channel first)" if arr.ndim > 3 else "")
            raise VolumeError(f"expected a 3D image, got {arr.ndim}D with shape {arr.shape}{hint}")
        if arr.dtype.type not in SUPPORTED_DTYPES:
            raise VolumeError(f"unsupported voxel type {arr.dtype}; expected an integer or float image")
        if min(arr.shape) < 1:
            raise VolumeError(f"image has an empty axis: shape {arr.shape}")
        sp = tuple(float(s) for s in self.spacing)
        org = tuple(float(o) for o in self.origin)
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
            raise VolumeError(f"spacing must be three positive numbers, got {self.spacing}")
        if len(org) != 3 or not all(np.isfinite(org)):
            raise VolumeError(f"origin must be three finite numbers, got {self.origin}")
        if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1) > 1e-3 or \
                not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
            raise VolumeError(f"direction must be an orthonormal 3x3 matrix, got {d.tolist()}")
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "spacing", sp)
        object.__setattr__(self, "origin", org)
        object.__setattr__(self, "direction", d)

    # ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    def with_array(self, array: np.ndarray, **meta) -> "Volume":
        """The same geometry with other voxels (for a label map or a probability map)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise VolumeError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return replace(self, array=array, metadata={**self.metadata, **meta})

    def same_geometry(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=tol, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def geometry_dict(self) -> dict:
        return {
            "size_ijk": list(self.size_ijk),
            "spacing": list(self.spacing),
            "origin_lps": list(self.origin),
            "direction": np.round(self.direction, 6).tolist(),
        }

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def describe_geometry(self) -> str:
        return (f"size {self.size_ijk} voxels, spacing {tuple(round(s, 3) for s in self.spacing)} mm, "
                f"orientation {axis_codes(self.direction)}")
