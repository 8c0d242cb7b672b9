"""``--slice-step N``: on a stack of thin slices, the network computes every Nth slice; the slices between
take their class probabilities from the two computed slices around them, unless those two disagree.

Why: a 1 mm 3D volume (a SPACE or VIBE series resliced sagittally) has three to four times as many
slices as a clinical 4 mm stack, and on a CPU the network is most of the run. Neighbouring thin
slices look nearly the same, and the engine already averages every slice's probabilities with its
neighbours' under a 4 mm Gaussian (:mod:`slice_smoothing`), so a slice between two computed ones adds
little the average does not already hold.

How: the *anchors* are slices 0, N, 2N, ... and the last slice. A slice between anchors ``a < s < b``
gets the linear blend of their probabilities (weights by distance). Where the anchors' labels disagree
on more than :data:`REDO_FRACTION` of the pixels either of them calls a structure (the lateral edge of
a body, where a structure starts or ends) and on at least :data:`REDO_MIN_MM2`, every slice between them is
computed after all. The step is
used only where slices are at most :data:`MAX_SLICE_MM` apart and the stack has at least
:data:`MIN_SLICES` slices; elsewhere (clinical 4 mm stacks, single slices) every slice is computed and
the report says so. It is a lossy step, an option with its measured effect (docs/benchmarks.md).

The anchors are fed chunk by chunk as the engine walks the stack; only the last one or two computed
slices are kept between chunks, so memory stays that of the chunked engine.
"""
from __future__ import annotations

from typing import Callable

from LumbarSegmentLib.inference.arrays import ops

MAX_SLICE_MM = 1.5  # thicker slices differ too much from their neighbours to be blended
MIN_SLICES = 8
REDO_FRACTION = 0.5  # anchors disagreeing on more than this share of their structure pixels ...
REDO_MIN_MM2 = 150.0  # ... and on at least this area (a lateral cap of a body): compute the slices between
MAX_STEP = 4


def step_applies(step: int, n_slices: int, slice_mm: float) -> bool:
    """Whether ``--slice-step step`` changes anything on a stack of ``n_slices`` slices ``slice_mm`` apart."""
    return step > 1 and n_slices >= MIN_SLICES and float(slice_mm) <= MAX_SLICE_MM


class SliceStepper:
    """The probabilities of a stack's slices, chunk by chunk, computing only the anchors (and the slices
    between anchors that disagree).

    ``predict(indices)`` returns the probabilities ``[len(indices), K, H, W]`` of those slices (sorted,
    unique); ``background`` is the background channel; ``pixel_mm2`` the area of one of their pixels.
    """

    def __init__(self, n_slices: int, step: int, predict: Callable, background: int, pixel_mm2: float = 1.0):
        self.n, self.step, self.predict, self.background = n_slices, int(step), predict, background
        self.min_pixels = REDO_MIN_MM2 / max(float(pixel_mm2), 1e-6)
        self.known: dict[int, object] = {}  # computed slices still needed by a later chunk
        self.computed = 0
        self.redone = 0

    def _anchor(self, s: int) -> bool:
        return s % self.step == 0 or s == self.n - 1

    def _prev_anchor(self, s: int) -> int:
        return (s // self.step) * self.step

    def _next_anchor(self, s: int) -> int:
        return min(self.n - 1, (s // self.step + 1) * self.step)

    def anchor_count(self) -> int:
        """How many slices the network computes when no pair of anchors disagrees."""
        return len(range(0, self.n, self.step)) + (0 if (self.n - 1) % self.step == 0 else 1)

    def _compute(self, indices: list[int]) -> None:
        indices = sorted(set(i for i in indices if i not in self.known))
        if not indices:
            return
        probs = self.predict(indices)
        self.computed += len(indices)
        for k, s in enumerate(indices):
            self.known[s] = probs[k]

    def _disagree(self, a, b) -> bool:
        xp = ops(a)
        _, (la, lb) = xp.channel_max(xp.stack([a, b]))
        structure = (la != self.background) | (lb != self.background)
        differ = int((la != lb).sum())
        return differ >= self.min_pixels and differ > REDO_FRACTION * int(structure.sum())

    def chunk(self, c0: int, c1: int):
        """Probabilities ``[c1 - c0, K, H, W]`` of slices ``c0 .. c1 - 1`` (called for consecutive chunks)."""
        first_a = self._prev_anchor(c0)
        last_b = c1 - 1 if self._anchor(c1 - 1) else self._next_anchor(c1 - 1)
        self._compute([s for s in range(first_a, last_b + 1) if self._anchor(s)])
        pairs = {}  # (anchor below, anchor above) -> whether they disagree: decided once per pair
        redo = []
        for s in (s for s in range(c0, c1) if s not in self.known):
            pair = (self._prev_anchor(s), self._next_anchor(s))
            if pair not in pairs:
                pairs[pair] = self._disagree(self.known[pair[0]], self.known[pair[1]])
            if pairs[pair]:
                redo.append(s)
        if redo:
            self._compute(redo)
            self.redone += len(redo)
        sample = self.known[c0] if c0 in self.known else self.known[first_a]
        xp = ops(sample)
        out = xp.empty((c1 - c0, *sample.shape))
        for s in range(c0, c1):
            if s in self.known:
                xp.assign(out[s - c0], self.known[s])
                continue
            a, b = self._prev_anchor(s), self._next_anchor(s)
            w = (s - a) / (b - a)
            xp.assign(out[s - c0], self.known[a])
            out[s - c0] *= 1.0 - w
            xp.add_scaled(out[s - c0], self.known[b], w)
        keep_from = self._prev_anchor(c1)  # the anchor at or below the next chunk's first slice
        self.known = {s: p for s, p in self.known.items() if s >= keep_from}
        return out

    def report(self) -> dict:
        return {"step": self.step, "computed_slices": self.computed, "redone_slices": self.redone,
                "blended_slices": self.n - self.computed}
