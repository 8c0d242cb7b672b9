"""The engine's probabilities for chosen slices of one volume, kept warm between requests.

Interactive correction (:mod:`refine`) needs the model's class probabilities around a click, not
a whole new label map, and it needs them again and again for the same volume. This is the same
prediction path as :func:`engine.segment_volume` (same preprocessing, windows, precision, inference
graph and class-id channel order), cut at the probabilities and computed only for the slices asked
for; slices already computed are served from memory.

The one difference from ``segment_volume``: no across-slice average (a slice's probabilities do
not wait for neighbours that were never asked for), and one model without flip TTA.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from LumbarSegmentLib.inference.devices import pick_device
# through the engine, which chooses the OpenMP wait policy when it is imported before torch (``lumbarseg refine``)
from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions
from LumbarSegmentLib.inference.host_runner import device_name
from LumbarSegmentLib.inference.runners import Runner, check_models
from LumbarSegmentLib.inference.windows import predict_chunk
from LumbarSegmentLib.core.geometry import resize_planes
from LumbarSegmentLib.registry.package import ModelPackage
from LumbarSegmentLib.inference.preprocess import model_slices
from LumbarSegmentLib.inference.slice_smoothing import neighbour_stack
from LumbarSegmentLib.core.volume import Volume


class SliceProbabilities:
    """Class probabilities of canonical sagittal slices of ``volume`` for one model, cached.

    ``get(indices)`` returns ``[n, K, H, W]`` float32 on the volume's own in-plane grid (canonical
    ``[s, r, c]`` order, see ``geometry``), channels in the model schema's order.
    """

    def __init__(self, volume: Volume, model: ModelPackage | LoadedModel, options: SegmentOptions | None = None):
        import torch

        options = options or SegmentOptions()
        (spec,), self.schema = check_models([model], options)
        if options.threads:
            torch.set_num_threads(int(options.threads))
        self.options = options
        self.stack, self.layout, _ = model_slices(volume, spec.spacing, allow_reslice=options.allow_reslice,
                                                  normalisation=spec.normalisation)
        self.warnings: list[str] = []
        self.runner = Runner(spec, pick_device(device_name(options)), options, self.warnings, self.stack, lambda: False)
        self.plane = tuple(self.layout.to_canonical(volume.array).shape[1:])
        self.n_slices = int(self.stack.shape[0])
        self._cache: dict[int, np.ndarray] = {}

    @property
    def cached(self) -> list[int]:
        return sorted(self._cache)

    def get(self, indices: Sequence[int], rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Probabilities of the canonical slices ``indices`` (computed once each, in batches), optionally
        only the ``rows`` x ``cols`` part of each slice."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < self.n_slices]
        if bad:
            raise IndexError(f"slice {bad[0]} is outside the volume's {self.n_slices} slices")
        missing = sorted(set(i for i in idx if i not in self._cache))
        for run in _runs(missing):
            self._compute(run[0], run[-1] + 1)
        if not idx:
            return np.zeros((0, self.schema.num_classes) + self.plane, np.float32)[:, :, rows, cols]
        return np.stack([self._cache[i][:, rows, cols] for i in idx])

    def _compute(self, c0: int, c1: int) -> None:
        step = self.options.chunk_slices
        for a in range(c0, c1, step):
            b = min(c1, a + step)
            stack = neighbour_stack(self.stack, a, b, self.runner.spec.slice_context)
            probs = predict_chunk(self.runner, stack, (False,), self.options, lambda: None)
            probs = resize_planes(probs, self.plane, mode="bilinear").numpy()
            for k in range(b - a):
                self._cache[a + k] = np.ascontiguousarray(probs[k], dtype=np.float32)


def _runs(values: list[int]) -> list[list[int]]:
    """Sorted integers split into runs of consecutive values."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs
