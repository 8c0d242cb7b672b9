"""Sliding-window maths of the prediction: where the windows of a slice start, how they are weighted
where they overlap, and the blended probabilities of a chunk of slices.

A slice is cut into windows of the model's patch size (or the whole padded slice, or a fixed tile:
``SegmentOptions.tile``), overlapping by ``SegmentOptions.overlap``; where windows overlap their
probabilities are blended with a Gaussian weight that trusts each window's centre most. Slices
smaller than one window are zero-padded up to it and the padding is cut off again afterwards.

The arithmetic runs on whatever arrays it is handed (PyTorch tensors, or NumPy arrays on the path
without PyTorch: :mod:`arrays`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from LumbarSegmentLib.inference.arrays import TORCH, ops
from LumbarSegmentLib.inference.options import SegmentOptions


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``window`` px covering ``length`` px (length >= window)."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return [int(round(i * (length - window) / (n - 1))) for i in range(n)]


def gaussian_weight(h: int, w: int, sigma_frac: float = 0.125, xp=TORCH):
    """The blending weight of one ``h`` x ``w`` window: 1 at the centre, never below 1e-3 at the edges
    (``xp``: the array operations, :mod:`arrays`)."""
    wmap = xp.gaussian(h, max(1.0, h * sigma_frac))[:, None] * xp.gaussian(w, max(1.0, w * sigma_frac))[None, :]
    return xp.clamp_min(wmap / wmap.max(), 1e-3)


def window_grid(plane: tuple[int, int], patch_size: tuple, options: SegmentOptions):
    """The prediction's windows over a slice of ``plane`` (H, W) (padded up to one tile when smaller):
    ``((tile h, tile w), starts along H, starts along W)``."""
    tile = options.tile
    if tile == "auto":
        tile = "whole" if max(plane) <= 2 * max(patch_size) else "patch"
    if tile == "patch":
        th, tw = patch_size
    elif tile == "whole":
        th, tw = (max(32, -(-n // 32) * 32) for n in plane)
    else:
        th = tw = int(tile)
    return ((th, tw), window_starts(max(plane[0], th), th, options.overlap),
            window_starts(max(plane[1], tw), tw, options.overlap))


def tiling(stack, patch_size: tuple, options: SegmentOptions):
    """``stack [n, C, H, W]`` zero-padded up to at least one tile, and its :func:`window_grid`."""
    (th, tw), ys, xs = window_grid(tuple(stack.shape[2:]), patch_size, options)
    pad_h, pad_w = max(0, th - stack.shape[2]), max(0, tw - stack.shape[3])
    return (ops(stack).pad_hw(stack, pad_h, pad_w) if pad_h or pad_w else stack), (th, tw), ys, xs


def count_batches(n_slices: int, plane: tuple[int, int], runner, flips: Sequence[bool],
                  options: SegmentOptions) -> int:
    """How many forward passes ``runner`` makes over ``n_slices`` slices of ``plane``: the progress total."""
    _, ys, xs = window_grid(plane, runner.spec.patch_size, options)
    per_slice = len(ys) * len(xs)
    total = 0
    for c0 in range(0, n_slices, options.chunk_slices):
        n = min(options.chunk_slices, n_slices - c0)
        total += math.ceil(n * per_slice / runner.group) * len(flips)
    return total


def predict_chunk(runner, stack, flips: Sequence[bool], options: SegmentOptions, tick: Callable[[], None]):
    """Probabilities [n, K, H, W] for a chunk of model-space slices [n, C, H, W] (C = 2k+1 input slices),
    windows batched ``runner.group`` at a time through ``runner.forward`` (a :class:`runners.Runner`),
    averaged over the ``flips`` (flip TTA) and blended; ``tick()`` after every forward pass. The arrays
    are of the library ``stack`` is (:mod:`arrays`); so must ``runner.forward``'s be."""
    xp = ops(stack)
    n, _, H, W = stack.shape
    x, (th, tw), ys, xs = tiling(stack, runner.spec.patch_size, options)
    ph, pw = x.shape[2:]
    single = len(ys) == 1 and len(xs) == 1
    weight = xp.ones((th, tw)) if single else gaussian_weight(th, tw, xp=xp)
    acc = xp.zeros((n, runner.spec.schema.num_classes, ph, pw))
    wsum = xp.zeros((ph, pw))
    for y in ys:
        for x0 in xs:
            wsum[y:y + th, x0:x0 + tw] += weight
    windows = [(s, y, x0) for s in range(n) for y in ys for x0 in xs]
    bs = runner.group
    for b in range(0, len(windows), bs):
        group = windows[b:b + bs]
        batch = xp.stack([x[s, :, y:y + th, x0:x0 + tw] for s, y, x0 in group])
        probs = 0
        for flip in flips:
            inp = xp.flip_w(batch) if flip else batch
            out = runner.forward(inp)
            probs = probs + (xp.flip_w(out) if flip else out)
            tick()
        probs = probs / len(flips)
        for (s, y, x0), p in zip(group, probs):
            if single:  # weight and wsum are all ones: p * 1 / 1 == p
                acc[s] = p
            else:
                acc[s, :, y:y + th, x0:x0 + tw] += p * weight
    if not single:
        acc /= wsum
    return acc[:, :, :H, :W]
