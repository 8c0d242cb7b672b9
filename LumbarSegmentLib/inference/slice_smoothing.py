"""The across-slice step of the prediction path: each slice's class probabilities averaged with its
neighbours' under a Gaussian along the slice axis, with sigma in millimetres.

Why: the networks read one sagittal slice at a time, so nothing ties one slice's answer to the
next; averaging with the neighbours mends slices where the network wavers (oblique lateral cuts of
a body, one-slice blobs). Sigma is in millimetres, so thin slices are averaged over more
neighbours than thick ones. Chosen on the validation split (0, 2, 3, 4, 6 mm tried; 4 mm best), it
added 0.009 level-range Dice on the clean test split (docs/validation.md, fifth round).

The other across-slice piece, :func:`neighbour_stack`, is the input of a 2.5D model (one that
reads each slice between its neighbours); measured in the sixth round, it is an option, not the
default.
"""
from __future__ import annotations

import math

import numpy as np

from LumbarSegmentLib.core.checks import number_arg
from LumbarSegmentLib.inference.arrays import ops

#: sigma (mm) of the across-slice probability average: the engine's default
SLICE_SMOOTHING_MM = 4.0
SLICE_SMOOTHING_MAX_MM = 50.0  # beyond this the average spans the whole spine: surely a typo


#: the ``--slice-smoothing MM`` argument of every command line (0 .. SLICE_SMOOTHING_MAX_MM)
smoothing_mm_arg = number_arg(0, SLICE_SMOOTHING_MAX_MM, what="a number of millimetres",
                              use=f"use 0 (off) to {SLICE_SMOOTHING_MAX_MM:g} mm")


class SliceSmoother:
    """Gaussian average of class probabilities over neighbouring slices, fed chunk by chunk.

    ``push`` takes the next slices' probabilities ``[s, C, H, W]`` and returns a list of ``(first
    slice, smoothed probabilities)`` blocks, no larger than the chunk pushed, for every slice whose
    neighbours within ``3 sigma`` are in (none yet: an empty list); the last chunk releases the rest.

    Memory stays bounded like the chunked engine's: the neighbours live in one ring buffer of
    ``2 r + chunk`` slices (``r`` = the kernel's reach in slices: 12 at 1 mm), written in place, so
    there is never a second copy of it; the blocks keep what the engine allocates downstream at the
    chunk's size. At the ends of the stack the outermost slice stands in for the missing neighbours
    (copies of the first are written before it; past the last slice, the last one is read again).
    ``sigma_mm`` 0 (or a single slice) passes chunks through unchanged. The chunks may be PyTorch tensors
    or NumPy arrays (:mod:`arrays`); the blocks are of the same kind.
    """

    def __init__(self, n_slices: int, slice_mm: float, sigma_mm: float, chunk: int = 16):
        sigma = sigma_mm / max(float(slice_mm), 1e-6)
        self.r = int(math.ceil(3 * sigma)) if sigma_mm > 0 and n_slices > 1 else 0
        x = np.arange(-self.r, self.r + 1, dtype=np.float64)
        w = np.exp(-0.5 * (x / sigma) ** 2) if self.r else np.ones(1)
        self.weights = (w / w.sum()).tolist()
        self.n, self.done, self.chunk = n_slices, 0, max(1, int(chunk))
        self.ring, self.filled = None, 0  # padded index p (slice p - r) lives at ring[p % len(ring)]

    def _pieces(self, p0: int, length: int):
        """``(offset, ring view)`` pieces covering padded indices ``p0 .. p0 + length`` (two at a wrap)."""
        cap, i = self.ring.shape[0], 0
        while i < length:
            pos = (p0 + i) % cap
            k = min(length - i, cap - pos)
            yield i, self.ring[pos:pos + k]
            i += k

    def _write(self, p0: int, data) -> None:
        for i, view in self._pieces(p0, data.shape[0]):
            self.xp.assign(view, data[i:i + view.shape[0]])

    def push(self, probs) -> list:
        if not self.r:
            start, self.done = self.done, self.done + probs.shape[0]
            return [(start, probs)]
        r, s = self.r, probs.shape[0]
        xp = self.xp = ops(probs)
        if self.ring is None or s > self.chunk:  # first chunk, or one larger than announced: (re)size
            self.chunk = max(self.chunk, s)
            old, live = self.ring, (self.done, self.filled)
            self.ring = xp.empty((2 * r + self.chunk, *probs.shape[1:]))
            if old is None:
                self._write(0, xp.broadcast(probs[:1], (r, *probs.shape[1:])))
                self.filled = r
            else:
                cap_old = old.shape[0]
                for p in range(*live):
                    xp.assign(self.ring[p % self.ring.shape[0]], old[p % cap_old])
        self._write(self.filled, probs)
        self.filled += s
        received = self.filled - r
        ready = self.n if received >= self.n else received - r
        end = self.n + r  # padded index just past the last slice
        blocks = []
        while self.done < ready:
            a = self.done
            b = min(ready, a + s)
            out = xp.zeros((b - a, *probs.shape[1:]))
            for i, w in enumerate(self.weights):  # tap i of output slice t reads padded index t + i
                stop = min(b + i, end)
                for off, view in self._pieces(a + i, max(0, stop - a - i)):
                    xp.add_scaled(out[off:off + view.shape[0]], view, w)
                if b + i > end:  # past the last slice: the last slice again
                    xp.add_scaled(out[max(0, end - a - i):], self.ring[(end - 1) % self.ring.shape[0]], w)
            blocks.append((a, out))
            self.done = b
        return blocks


def neighbour_stack(stack, c0: int, c1: int, context: int):
    """The network input of slices ``c0 .. c1`` of ``stack [S, H, W]``: ``[n, 2 k + 1, H, W]``, each
    slice between its ``k = context`` neighbours on either side, in slice order (2.5D models; k = 0:
    the slices alone, as a view). Beyond the ends of the stack the edge slice stands in, as it does
    for the probability average above and for the training sampler (``training.data.PatchSampler``).
    ``stack`` may be a PyTorch tensor or a NumPy array; the result is of the same kind."""
    if not context:
        return stack[c0:c1, None]
    return slice_inputs(stack, range(c0, c1), context)


def slice_inputs(stack, indices, context: int):
    """Like :func:`neighbour_stack`, for the slices ``indices`` (any order) instead of a run of them."""
    index = np.asarray(list(indices), dtype=np.int64)
    n = stack.shape[0]
    idx = np.clip(index[:, None] + np.arange(-context, context + 1)[None], 0, n - 1)
    return ops(stack).take_slices(stack, idx.reshape(-1)).reshape(len(index), 2 * context + 1, *stack.shape[1:])
