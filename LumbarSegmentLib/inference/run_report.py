"""The report of one prediction: what ran where, on what input, what came out (voxels per class,
uncertainty), how long each step took and what went differently from the request (warnings)."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field

import numpy as np

from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.inference.arrays import ops
from LumbarSegmentLib.inference.options import SegmentOptions


@dataclass
class LabelTally:
    """Voxels per label value and the foreground's summed entropy, added up block by block (bounded memory)."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    entropy_sum: float = 0.0
    fg_voxels: int = 0

    def add(self, labels: np.ndarray, probabilities) -> None:
        """Count a block's ``labels`` (schema values); ``probabilities`` [n, K, H, W] (a tensor or a NumPy
        array) may be clamped in place."""
        self.counts += np.bincount(labels.ravel(), minlength=256)
        fg = labels != 0  # background by value, wherever its channel is
        n_fg = int(np.count_nonzero(fg))
        if n_fg:  # mean entropy over the foreground voxels
            self.entropy_sum += ops(probabilities).entropy_sum(probabilities, fg)
        self.fg_voxels += n_fg

    def recount(self, labels: np.ndarray) -> None:
        """Voxels per value again, after post-processing changed ``labels`` (entropy stays as predicted)."""
        self.counts = np.bincount(labels.ravel(), minlength=256)


@dataclass
class RunRecord:
    """Everything the report states about one run of :func:`engine.segment_volume`."""

    volume: Volume
    schema: LabelSchema
    runners: list  # runners.Runner, one per model
    options: SegmentOptions
    layout: object  # geometry.Layout of the input
    normalisation: dict  # preprocessing info of model_slices
    n_slices: int
    tally: LabelTally
    timings: dict
    warnings: list


def run_report(run: RunRecord) -> dict:
    """The run report as a JSON-ready dict (written next to the label map by the callers).

    ``torch``, ``cuda`` and ``gpu`` are None when PyTorch took no part in the prediction (the path
    without it: :mod:`host_runner`)."""
    r0, tally, schema = run.runners[0], run.tally, run.schema
    torch = None
    if any(r.uses_torch for r in run.runners):
        import torch
    return {
        "labels": {str(c.value): c.id for c in schema.classes},
        "schema": schema.name,
        "models": [{"ref": r.spec.ref, "variant": r.spec.variant, "runtime": r.runtime,
                    "sha256": r.spec.sha256, "path": r.spec.path} for r in run.runners],
        "runtime": r0.onnx.version() if r0.onnx is not None else f"torch {torch.__version__}",
        "mode": run.options.mode,
        "slice_smoothing_mm": run.options.slice_smoothing_mm,
        "bn_adapt": run.options.bn_adapt,
        "device": str(r0.device),
        "precision": ("int8" if getattr(r0.onnx, "precision", None) == "int8"
                      else str(r0.dtype).replace("torch.", "") if r0.dtype else "float32"),
        "torch": torch.__version__ if torch else None,
        "cuda": torch.version.cuda if torch else None,
        "gpu": torch.cuda.get_device_name(0) if r0.device.type == "cuda" else None,
        "python": platform.python_version(),
        "input": {**run.volume.geometry_dict(), "layout": run.layout.to_dict(), "normalisation": {
            k: v for k, v in run.normalisation.items() if k not in ("layout",)}},
        "slices": run.n_slices,
        "voxels_per_class": {c.id: int(tally.counts[c.value]) for c in schema.classes},
        "uncertainty": {"mean_entropy_foreground": tally.entropy_sum / tally.fg_voxels if tally.fg_voxels else 0.0,
                        "foreground_voxels": tally.fg_voxels},
        "timings_s": {k: round(v, 4) for k, v in run.timings.items()},
        "warnings": run.warnings,
    }
