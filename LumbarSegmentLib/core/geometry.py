"""From any storage order to a canonical stack of sagittal slices, and exactly back.

Scanners store sagittal stacks in several index orders (slice axis first with an
identity LPS direction, or slice axis last, e.g. ``PIR``). The network only ever
sees one layout, the *canonical stack* ``[s, r, c]``:

* ``s`` runs from the patient's right to left (LPS +x),
* ``r`` (rows) from superior to inferior, so the head is at the top of a slice,
* ``c`` (columns) from anterior to posterior.

Going there is a transpose plus flips of the stored array (no interpolation), so
the way back is exact. Which array axis plays which role is read from the
direction cosines, never from the storage order. A stack whose thick (slice)
axis is not left-right is an axial or coronal acquisition: it is refused unless
the caller explicitly asks to reslice it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from LumbarSegmentLib.core.volume import Volume, VolumeError, axis_codes  # noqa: F401 (axis_codes: re-exported)

# An axis within this angle of the left-right axis counts as sagittal.
MAX_OBLIQUE_DEG = 30.0
# Spacing ratio above which a stack is "2D multi-slice" (thick slices) rather than 3D.
THICK_SLICE_RATIO = 1.5


class OrientationError(VolumeError):
    """The image is not a sagittal stack (or is too oblique to treat as one)."""


@dataclass(frozen=True)
class SagittalLayout:
    """How a stored ``[k, j, i]`` array maps onto the canonical ``[s, r, c]`` stack."""

    perm: tuple[int, int, int]  # numpy axes of the stored array that become s, r, c
    flip: tuple[bool, bool, bool]  # whether s, r, c run against the stored index order
    spacing_src: tuple[float, float, float]  # mm along s, r, c
    resliced: bool = False
    obliquity_deg: float = 0.0

    @property
    def inplane_spacing(self) -> tuple[float, float]:
        return (self.spacing_src[1], self.spacing_src[2])

    @property
    def slice_spacing(self) -> float:
        return self.spacing_src[0]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Stored ``[k, j, i]`` array (extra trailing axes allowed) → ``[s, r, c]`` view."""
        out = np.transpose(array, self.perm + tuple(range(3, array.ndim)))
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return out[sl]

    def from_canonical(self, stack: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical`: ``[s, r, c]`` → stored ``[k, j, i]`` order."""
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        stack = stack[sl]
        inv = tuple(int(np.argsort(self.perm)[a]) for a in range(3))
        return np.transpose(stack, inv + tuple(range(3, stack.ndim)))

    def to_dict(self) -> dict:
        return {"perm": list(self.perm), "flip": list(self.flip), "spacing_src_mm": list(self.spacing_src),
                "resliced": self.resliced, "obliquity_deg": round(self.obliquity_deg, 2)}


def sagittal_layout(volume: Volume, *, allow_reslice: bool = False) -> SagittalLayout:
    """Find the left-right, superior-inferior and anterior-posterior axes of ``volume``.

    Raises :class:`OrientationError` for an axial/coronal thick-slice stack (unless
    ``allow_reslice``) and for a stack tilted more than ``MAX_OBLIQUE_DEG`` off sagittal.
    """
    d = volume.direction
    sp = volume.spacing  # along i, j, k
    lr = int(np.argmax(np.abs(d[0, :])))  # index axis closest to LPS x
    cos_lr = abs(d[0, lr])
    tilt = float(np.degrees(np.arccos(min(1.0, cos_lr))))
    if tilt > MAX_OBLIQUE_DEG:
        raise OrientationError(
            f"no image axis is within {MAX_OBLIQUE_DEG:.0f} degrees of left-right (closest is {tilt:.1f} off; "
            f"orientation {axis_codes(d)}): this is not a sagittal stack. Reslice it to sagittal first."
        )
    rest = [a for a in range(3) if a != lr]
    si = max(rest, key=lambda a: abs(d[2, a]))  # closest to superior-inferior
    ap = rest[0] if rest[1] == si else rest[1]

    thick = int(np.argmax(sp))
    resliced = False
    if thick != lr and _is_slice_axis(sp, thick):
        plane = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal"}[axis_codes(d)[thick]]
        if not allow_reslice:
            article = "an" if plane == "axial" else "a"
            raise OrientationError(
                f"this is {article} {plane} stack (thick slices of {sp[thick]:.2f} mm along "
                f"{axis_codes(d)[thick]}, orientation {axis_codes(d)}), not sagittal. The models were "
                f"trained on sagittal slices; segmenting it slice-wise would be wrong. Use a sagittal "
                f"series, or pass reslice=True (--reslice) to cut sagittal slices from it anyway "
                f"(coarse: in-plane resolution becomes {sp[thick]:.2f} mm)."
            )
        resliced = True

    def np_axis(index_axis):  # index axis i, j, k → numpy axis of the [k, j, i] array
        return 2 - index_axis

    flip = (d[0, lr] < 0, d[2, si] > 0, d[1, ap] < 0)  # s toward L, r toward I, c toward P
    return SagittalLayout(
        perm=(np_axis(lr), np_axis(si), np_axis(ap)),
        flip=tuple(bool(f) for f in flip),
        spacing_src=(sp[lr], sp[si], sp[ap]),
        resliced=resliced,
        obliquity_deg=tilt,
    )


def _is_slice_axis(sp, axis: int) -> bool:
    """Whether index axis ``axis`` is the slice axis of a 2D multi-slice stack.

    It is when it is clearly thicker than both other axes *and* those two form a plausible
    image plane (near-square pixels). The largest spacing alone is not enough: a sagittal
    stack with 1 mm slices and 0.5 x 2 mm pixels has its largest spacing in-plane.
    """
    a, b = (sp[i] for i in range(3) if i != axis)
    return sp[axis] > THICK_SLICE_RATIO * max(a, b) and max(a, b) / min(a, b) <= THICK_SLICE_RATIO


def resize_planes(stack, size: tuple[int, int], *, mode: str):
    """Resample the last two axes of a ``[..., H, W]`` torch tensor or NumPy array to ``size``.

    ``mode`` is ``"bilinear"`` for images and probabilities, ``"nearest"`` for labels.
    Pixel centres are mapped proportionally (``align_corners=False``), so the physical
    extent of the slice is kept. A NumPy array is resampled by :func:`_resize_numpy` (the
    prediction path without PyTorch), a tensor by PyTorch.
    """
    if isinstance(stack, np.ndarray):
        return _resize_numpy(stack, size, mode)
    import torch
    import torch.nn.functional as F

    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    lead = stack.shape[:-2]
    x = stack.reshape((-1, 1) + tuple(stack.shape[-2:]))
    if mode == "nearest":  # labels keep their dtype
        y = F.interpolate(x.float(), size=size, mode="nearest-exact").to(stack.dtype)
        return y.reshape(tuple(lead) + tuple(size))
    y = F.interpolate(x if x.is_floating_point() else x.float(), size=size, mode=mode,
                      align_corners=False, antialias=False)
    return y.reshape(tuple(lead) + tuple(size)).to(stack.dtype if stack.is_floating_point() else torch.float32)


def _taps(n_in: int, n_out: int):
    """Source pixels and weights of each output pixel along one axis, computed in float32 as
    PyTorch computes them (``align_corners=False``): the same weights give the same values."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
    return i0, np.minimum(i0 + 1, n_in - 1), f32(1) - lam, lam


def _resize_numpy(stack: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """:func:`resize_planes` in NumPy: along the columns, then along the rows, in float32.

    The arithmetic is that of PyTorch's generic CPU kernel (the one it runs for slice-sized planes),
    so the values agree with its portable build bit for bit; its AVX2 / AVX-512 builds fuse each
    multiply-add, which can move a value by its last bit (about 1e-7 of a probability).
    """
    size = tuple(int(n) for n in size)
    if tuple(stack.shape[-2:]) == size:
        return stack
    h, w = stack.shape[-2:]
    if mode == "nearest":  # PyTorch's "nearest-exact": the source pixel whose centre is nearest
        rows = np.minimum(np.floor((np.arange(size[0]) + 0.5) * np.float32(h / size[0])).astype(np.intp), h - 1)
        cols = np.minimum(np.floor((np.arange(size[1]) + 0.5) * np.float32(w / size[1])).astype(np.intp), w - 1)
        return stack[..., rows[:, None], cols[None, :]]
    if mode != "bilinear":
        raise ValueError(f"unknown resampling mode {mode!r}")
    x = stack if stack.dtype == np.float32 else stack.astype(np.float32)
    c0, c1, b0, b1 = _taps(w, size[1])
    r0, r1, a0, a1 = _taps(h, size[0])
    a0, a1 = a0[:, None], a1[:, None]
    flat = x.reshape((-1, h, w))
    out = np.empty((flat.shape[0],) + size, np.float32)
    for i, plane in enumerate(flat):  # a plane at a time: the intermediate stays in the CPU's cache
        t = np.take(plane, c0, axis=-1)
        t *= b0
        t += np.take(plane, c1, axis=-1) * b1
        np.multiply(np.take(t, r0, axis=-2), a0, out=out[i])
        out[i] += np.take(t, r1, axis=-2) * a1
    return out.reshape(stack.shape[:-2] + size)


def model_plane_size(inplane_shape: tuple[int, int], spacing: tuple[float, float],
                     target_spacing: tuple[float, float]) -> tuple[int, int]:
    """Size of a slice resampled from ``spacing`` to ``target_spacing`` (same physical extent)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(inplane_shape, spacing, target_spacing))
