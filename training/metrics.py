"""Segmentation metrics as the seed computed them, made aware of partial labels.

The seed accumulated, over **all pixels of the validation set**, a confusion
matrix ``m`` (rows: truth, columns: prediction) and reported per class::

    IoU_c  = m_cc / (t_c + m_c - m_cc)        t_c = sum_j m_cj (true count), m_c = sum_i m_ic (predicted count)
    Dice_c = 2 m_cc / (t_c + m_c)

plus their means with and without background. Here the matrix is kept per case:

* a foreground class is scored only over the cases that annotate it (a vertebra-only
  case says nothing about discs);
* background is scored over every case, but only where it is known: in a case that
  does not annotate some class ``k``, a pixel labelled 0 may be ``k``, so a prediction
  of ``k`` there is counted as background (the prediction columns of unannotated
  classes are folded into background before counting). For a fully annotated case this
  is the plain confusion matrix.

A class that is neither present nor predicted in any case scoring it has no value
(NaN) and is left out of the means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .data import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes: int, annotated=None, ignore_index: int = IGNORE_INDEX
                     ) -> np.ndarray:
    """``[K, K]`` int64 counts (rows truth, columns prediction); unannotated predictions -> background."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if annotated is not None:
        ann = torch.as_tensor(annotated, dtype=torch.bool).reshape(-1).clone()
        ann[0] = True
        pred = torch.where(ann.to(pred.device)[pred.clamp(0, num_classes - 1)], pred, torch.zeros_like(pred))
    if len(target) and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"label values outside 0..{num_classes - 1}")
    idx = target * num_classes + pred.clamp(0, num_classes - 1)
    cm = torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return cm.numpy().astype(np.int64)


def iou_dice_from_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice from one confusion matrix (NaN where t_c + m_c = 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    t = cm.sum(axis=1)
    m = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(t + m > 0, tp / (t + m - tp), np.nan)
        dice = np.where(t + m > 0, 2 * tp / (t + m), np.nan)
    return iou, dice


def _nanmean(v) -> float:
    v = [x for x in v if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


@dataclass
class MetricAccumulator:
    """Collects per-case confusion matrices; :meth:`compute` applies the partial-label rules."""

    class_ids: Sequence[str]
    cases: dict = field(default_factory=dict)  # case id -> (cm, annotated bool array)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def add(self, case_id: str, pred, target, annotated) -> np.ndarray:
        ann = np.asarray(torch.as_tensor(annotated, dtype=torch.bool).cpu().numpy()).copy()
        ann[0] = True
        cm = confusion_matrix(pred, target, self.num_classes, ann)
        if case_id in self.cases:
            old, _ = self.cases[case_id]
            cm = cm + old
        self.cases[case_id] = (cm, ann)
        return cm

    def pooled_cm(self, c: int) -> np.ndarray:
        """The confusion matrix summed over the cases that score class ``c``."""
        total = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        for cm, ann in self.cases.values():
            if ann[c]:
                total += cm
        return total

    def compute(self) -> dict:
        """``{"iou": {id: v}, "dice": {...}, "mean_iou", "mean_iou_fg", "mean_dice", "mean_dice_fg",
        "cases": {id: [...]}}`` (floats; NaN where undefined)."""
        iou, dice = {}, {}
        for c, cid in enumerate(self.class_ids):
            cm = self.pooled_cm(c)
            i, d = iou_dice_from_cm(cm)
            scored = any(ann[c] for _, ann in self.cases.values())
            iou[cid] = float(i[c]) if scored else float("nan")
            dice[cid] = float(d[c]) if scored else float("nan")
        fg = list(self.class_ids[1:])
        return {
            "iou": iou, "dice": dice,
            "mean_iou": _nanmean(iou.values()), "mean_iou_fg": _nanmean(iou[c] for c in fg),
            "mean_dice": _nanmean(dice.values()), "mean_dice_fg": _nanmean(dice[c] for c in fg),
            "cases": sorted(self.cases),
        }

    def per_case(self) -> dict:
        """``{case: {"iou": {id: v}, "dice": {id: v}}}`` over the classes each case annotates."""
        out = {}
        for case_id, (cm, ann) in sorted(self.cases.items()):
            i, d = iou_dice_from_cm(cm)
            out[case_id] = {"iou": {cid: float(i[c]) for c, cid in enumerate(self.class_ids) if ann[c]},
                            "dice": {cid: float(d[c]) for c, cid in enumerate(self.class_ids) if ann[c]}}
        return out


def clean(obj):
    """NaN -> None, numpy scalars -> Python, so metrics serialise as strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
