"""``--roi``: segment only a box around the spine, found on three scout slices first.

Why: a sagittal MR field of view is mostly abdomen, back muscle and air. On the 1 mm sample volume the
vertebral bodies and discs fill 67 of 381 columns and 286 of 381 rows, yet the network computes every
pixel of every 384 x 384 window; on a CPU that arithmetic is nearly the whole run (docs/benchmarks.md).

How: the first model segments three slices on the whole plane (the *scout*: at 30, 50 and 70 % of the
stack, so that a level the middle slice misses, as in a scoliotic spine, is still seen).
The box is the in-plane extent of everything it labels, widened by :data:`MARGIN_MM` on every side and
set on the grid of 32-pixel blocks (the networks' stride); every slice is then segmented inside
that box only, and outside it the probabilities are background's. The box is never used when it would
save little (over :data:`MAX_AREA` of the plane), when the scout finds nothing (the whole plane is then
segmented, as without the option), or on stacks of fewer than :data:`MIN_SLICES` slices (single slices:
the scout would be the whole job). What it can miss: a structure more than the margin away, in the
sagittal plane, from everything the scout slices show; the spine's course across sagittal slices
changes its left-right position much more than its place in the sagittal plane. It is a
lossy step (the network sees less context near the box's edges), offered as an option with its
measured effect on the validation split (docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from LumbarSegmentLib.inference.arrays import ops
from LumbarSegmentLib.inference.slice_smoothing import slice_inputs
from LumbarSegmentLib.inference.windows import predict_chunk

MARGIN_MM = 48.0  # around everything the scout labels, in the plane
MIN_SLICES = 8
SCOUT_AT = (0.3, 0.5, 0.7)  # the scout slices, as fractions of the stack: spread, so that a level seen only
# off the middle (a scoliotic spine leaves the mid-sagittal slice) still widens the box
MAX_AREA = 0.8  # a box over this share of the plane is not worth the scout
BLOCK = 32


@dataclass(frozen=True)
class Box:
    """Rows ``y0:y1`` and columns ``x0:x1`` of the model-space plane ``plane``."""

    y0: int
    y1: int
    x0: int
    x1: int
    plane: tuple

    @property
    def size(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def cut(self, stack):
        """``stack [..., H, W]`` inside the box."""
        return stack[..., self.y0:self.y1, self.x0:self.x1]

    def paste(self, probs, background: int):
        """Probabilities ``[n, K, h, w]`` inside the box -> ``[n, K, H, W]`` on the whole plane, background's
        (channel ``background``) outside."""
        xp = ops(probs)
        full = xp.zeros(tuple(probs.shape[:2]) + tuple(self.plane))
        full[:, background] = 1.0
        full[:, :, self.y0:self.y1, self.x0:self.x1] = probs
        return full

    def to_dict(self) -> dict:
        return {"rows": [self.y0, self.y1], "columns": [self.x0, self.x1], "plane": list(self.plane)}


def _span(lo: int, hi: int, margin: int, length: int) -> tuple[int, int]:
    """``lo:hi`` widened by ``margin``, starting on a multiple of :data:`BLOCK` and whole blocks long (cut
    at ``length``: the last block is then zero-padded, as the whole plane's is). On the block grid the
    network's pooling sees the pixels in the same phase as on the whole plane, so inside the box its
    answer changes only where the missing context matters (off the grid, a one-pixel shift of the box
    moved single validation cases by several thousandths of Dice: docs/lab/speed-int8-roi.md)."""
    lo, hi = max(0, lo - margin) // BLOCK * BLOCK, min(length, hi + margin)
    return lo, min(length, lo + -(-(hi - lo) // BLOCK) * BLOCK)


def background_channel(runner) -> int:
    return runner.spec.schema.channel_of()["background"]


def find_box(runner, slices, options, tick: Callable[[], None]) -> Box | None:
    """The box for model-space ``slices [S, H, W]`` from ``runner``'s scout slices, or None
    (see the module doc for when)."""
    n, height, width = (int(d) for d in slices.shape)
    if n < MIN_SLICES:
        return None
    picks = sorted({int(round(q * (n - 1))) for q in SCOUT_AT})
    probs = predict_chunk(runner, slice_inputs(slices, picks, runner.spec.slice_context), (False,), options, tick)
    found = np.asarray(probs.argmax(1)) != background_channel(runner)
    if not found.any():
        return None
    rows, cols = np.flatnonzero(found.any(axis=(0, 2))), np.flatnonzero(found.any(axis=(0, 1)))
    my, mx = (int(round(MARGIN_MM / float(s))) for s in runner.spec.spacing)
    y0, y1 = _span(int(rows[0]), int(rows[-1]) + 1, my, height)
    x0, x1 = _span(int(cols[0]), int(cols[-1]) + 1, mx, width)
    if (y1 - y0) * (x1 - x0) > MAX_AREA * height * width:
        return None
    return Box(y0, y1, x0, x1, (height, width))
