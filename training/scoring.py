"""Scores of one predicted label map against its partial truth: strict, level range, surface Dice.

* **strict**: one confusion matrix per case on the case's own voxel grid, pooled over the set
  (``training.metrics``);
* **level range**: the Dice of each annotated class counted only within the superior-inferior
  rows the manual label covers (+- ``margin_mm``);
* **surface Dice**: the share of both borders within a tolerance (mm) of the other, in the same rows.

:class:`Scorer` pools them overall and per source; predictions come from ``training.evaluate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume

from .metrics import MetricAccumulator


@dataclass
class EvalCase:
    """A case ready to score: the image, its truth as channel indices of ``schema``, what it annotates."""

    case_id: str
    image: Volume
    truth: np.ndarray  # channel indices of the schema, on the image grid
    annotated: torch.Tensor  # [K] bool
    source: str = ""
    structures: tuple = ()
    info: dict = field(default_factory=dict)


def _level_rows(truth: np.ndarray, layout, margin_mm: float) -> tuple[int, int]:
    """The superior-inferior rows ``[lo, hi)`` a canonical truth mask covers, +- ``margin_mm``."""
    rows = np.nonzero(truth.any(axis=(0, 2)))[0]
    m = int(round(margin_mm / layout.spacing_src[1]))
    return max(0, rows.min() - m), rows.max() + m + 1


def level_range_counts(pred_ch: np.ndarray, truth_ch: np.ndarray, image: Volume, channel: int,
                       margin_mm: float = 2.0) -> tuple[int, int, int]:
    """(intersection, predicted, true) voxels of ``channel`` within the S-I rows the truth covers +- margin."""
    layout = sagittal_layout(image)
    t = layout.to_canonical(truth_ch == channel)
    if not t.any():
        return 0, 0, 0
    q = layout.to_canonical(pred_ch == channel)
    lo, hi = _level_rows(t, layout, margin_mm)
    t, q = t[:, lo:hi], q[:, lo:hi]
    return int((t & q).sum()), int(q.sum()), int(t.sum())


#: tolerances of the surface Dice (mm): one and two voxels of the 1 mm data
SURFACE_TOL_MM = (1.0, 2.0)


def _border(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (beyond the array counts as outside)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = mask.copy()
    for ax in range(3):
        for cut in (slice(0, -2), slice(2, None)):
            idx = [slice(1, -1)] * 3
            idx[ax] = cut
            inner &= p[tuple(idx)]
    return mask & ~inner


def _distance_to(border: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from every voxel centre to the nearest voxel centre of ``border`` (inf: none)."""
    import SimpleITK as sitk

    if not border.any():
        return np.full(border.shape, np.inf, dtype=np.float32)
    img = sitk.GetImageFromArray(border.astype(np.uint8))
    img.SetSpacing(tuple(float(v) for v in spacing[::-1]))  # the array is [s, r, c]; SimpleITK wants (c, r, s)
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0)


def surface_counts(pred_ch: np.ndarray, truth_ch: np.ndarray, image: Volume, channel: int,
                   tolerances_mm: Sequence[float] = SURFACE_TOL_MM, margin_mm: float = 2.0) -> dict | None:
    """``{tol: (close, total)}`` for the surface Dice of ``channel`` within the level range.

    The surface Dice (normalised surface distance; Nikolov et al. 2021) is the share of both borders,
    the draft's and the manual one, lying within ``tol`` mm of the other: what an annotator has to
    redraw, where volume Dice also charges a faithful outline for being a voxel off all around. This
    is the voxel form: borders are the voxels with a face neighbour outside the structure, distances
    run between voxel centres in millimetres (anisotropic stacks included). Borders are found on the
    whole stack, then counted only in the superior-inferior rows of :func:`level_range_counts`, so
    a cut at the range's edge draws no border. ``None`` when the truth lacks ``channel``.
    """
    layout = sagittal_layout(image)
    t = layout.to_canonical(truth_ch == channel)
    if not t.any():
        return None
    q = layout.to_canonical(pred_ch == channel)
    lo, hi = _level_rows(t, layout, margin_mm)
    bt, bq = _border(np.ascontiguousarray(t)), _border(np.ascontiguousarray(q))
    to_t, to_q = _distance_to(bt, layout.spacing_src), _distance_to(bq, layout.spacing_src)
    for b in (bt, bq):
        b[:, :lo] = False
        b[:, hi:] = False
    total = int(bt.sum() + bq.sum())
    return {float(tol): (int((to_t[bq] <= tol).sum() + (to_q[bt] <= tol).sum()), total) for tol in tolerances_mm}


class Scorer:
    """Accumulates strict and level-range scores, overall and per source; with ``surface`` also the
    level-range surface Dice (off for the per-epoch checks of training, which need only the Dice)."""

    def __init__(self, schema: LabelSchema, margin_mm: float = 2.0, surface: Sequence[float] = ()):
        self.schema = schema
        self.margin_mm = margin_mm
        self.surface_tol = tuple(float(t) for t in surface)
        self.surface: dict[tuple[float, str, str], list[int]] = {}  # (tol, source, class) -> [close, total]
        self.surface_case: dict[tuple[str, str], dict] = {}  # (case, class) -> {tol: surface Dice}
        self.all = MetricAccumulator(schema.ids)
        self.by_source: dict[str, MetricAccumulator] = {}
        self.level: dict[tuple[str, str], list[int]] = {}  # (source, class) -> [inter, pred, true]
        self.level_case: dict[tuple[str, str], float] = {}  # (case, class) -> level-range Dice

    def add(self, case: EvalCase, pred_values: np.ndarray) -> None:
        pred = self.schema.values_to_channels(pred_values)
        pt, tt = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(case.truth.astype(np.int64))
        self.all.add(case.case_id, pt, tt, case.annotated)
        self.by_source.setdefault(case.source, MetricAccumulator(self.schema.ids)).add(
            case.case_id, pt, tt, case.annotated)
        for ch, cid in enumerate(self.schema.ids):
            if ch == 0 or not bool(case.annotated[ch]):
                continue
            i, p, t = level_range_counts(pred, case.truth, case.image, ch, self.margin_mm)
            if t == 0:
                continue
            acc = self.level.setdefault((case.source, cid), [0, 0, 0])
            acc[0] += i
            acc[1] += p
            acc[2] += t
            self.level_case[(case.case_id, cid)] = 2 * i / max(1, p + t)
            if self.surface_tol:
                counts = surface_counts(pred, case.truth, case.image, ch, self.surface_tol, self.margin_mm)
                for tol, (close, total) in counts.items():
                    acc = self.surface.setdefault((tol, case.source, cid), [0, 0])
                    acc[0] += close
                    acc[1] += total
                self.surface_case[(case.case_id, cid)] = {tol: c / max(1, n) for tol, (c, n) in counts.items()}

    def level_range(self) -> dict:
        """``{source: {class: Dice}}`` plus ``"all"`` pooled over the sources."""
        out: dict[str, dict] = {}
        tot: dict[str, list[int]] = {}
        for (src, cid), (i, p, t) in sorted(self.level.items()):
            out.setdefault(src, {})[cid] = 2 * i / max(1, p + t)
            a = tot.setdefault(cid, [0, 0, 0])
            for k, v in enumerate((i, p, t)):
                a[k] += v
        out["all"] = {cid: 2 * i / max(1, p + t) for cid, (i, p, t) in tot.items()}
        return out

    def surface_dice(self) -> dict:
        """``{"<tol>mm": {source: {class: surface Dice}, "all": {...}}}`` (border voxels pooled)."""
        out: dict[str, dict] = {}
        for (tol, src, cid), (close, total) in sorted(self.surface.items()):
            by_tol = out.setdefault(f"{tol:g}mm", {})
            by_tol.setdefault(src, {})[cid] = close / max(1, total)
            pooled = by_tol.setdefault("_pooled", {}).setdefault(cid, [0, 0])
            pooled[0] += close
            pooled[1] += total
        for by_tol in out.values():
            by_tol["all"] = {cid: c / max(1, n) for cid, (c, n) in by_tol.pop("_pooled").items()}
        return out

    def results(self) -> dict:
        surface = {"surface_dice": self.surface_dice(),
                   "surface_dice_per_case": {f"{c}:{k}": {f"{t:g}mm": v for t, v in d.items()}
                                             for (c, k), d in sorted(self.surface_case.items())}
                   } if self.surface_tol else {}
        return {**surface, "metrics": self.all.compute(), "per_case": self.all.per_case(),
                "per_source": {s: a.compute() for s, a in sorted(self.by_source.items())},
                "level_range": self.level_range(),
                "level_range_per_case": {f"{c}:{k}": v for (c, k), v in sorted(self.level_case.items())}}
