"""K-fold cross-validation by patient (``lumbarseg-train cv``).

Each fold trains a model on the other folds' patients and validates on its own; the
summary reports per-fold metrics and metrics pooled over all validation cases (the
confusion matrices of every case are summed, so every case counts exactly once).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from LumbarSegmentLib.dataset.cases import Case

from . import report
from .config import TrainConfig
from .data import as_schema
from .metrics import MetricAccumulator, clean
from .splits import kfold_by_patient
from .run_outputs import RunOutputs
from .trainer import train

log = logging.getLogger("lumbarseg.train")


def cross_validate(cfg: TrainConfig, case_list: Sequence[Case], *, k: int = 5, out_dir, seed: int | None = None,
                   only_folds: Sequence[str | int] | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = as_schema(cfg.schema)
    folds = kfold_by_patient(case_list, k, cfg.seed if seed is None else seed)
    plan = {f"fold{i + 1}": {"train": [c.case_id for c in tr], "val": [c.case_id for c in va]}
            for i, (tr, va) in enumerate(folds)}
    (out_dir / "folds.json").write_text(json.dumps(plan, indent=1))
    wanted = {int(f) for f in only_folds} if only_folds else set(range(1, k + 1))
    pooled = MetricAccumulator(schema.ids)
    per_fold = {}
    for i, (tr, va) in enumerate(folds, start=1):
        if i not in wanted:
            continue
        log.info("fold %d/%d: validating on %s", i, k, ", ".join(c.case_id for c in va))
        r = train(cfg.replace(name=f"{cfg.package_name}-fold{i}"), tr, va, out_dir=out_dir / f"fold{i}",
                  outputs=RunOutputs(provenance={"folds": {"k": k, "fold": i, "seed": cfg.seed, "plan": plan}}))
        if r.val_metrics is None:
            continue
        per_fold[f"fold {i}"] = r.val_metrics
        for case_id, (cm, ann) in (r.val_confusion or {}).items():
            pooled.cases[case_id] = (np.asarray(cm, dtype=np.int64), np.asarray(ann, dtype=bool))
    results = dict(per_fold)
    if pooled.cases:
        results["pooled"] = pooled.compute()
    md = [f"# {k}-fold cross-validation by patient: {cfg.variant}", "",
          report.markdown_table(results, schema.ids, "dice", schema), "",
          report.markdown_table(results, schema.ids, "iou", schema), ""]
    text = "\n".join(md)
    (out_dir / "cv_summary.md").write_text(text)
    (out_dir / "cv_summary.csv").write_text(report.csv_table(results, schema.ids))
    (out_dir / "cv_summary.json").write_text(json.dumps(clean({"folds": plan, "results": results}), indent=1))
    if results:
        report.plot_per_class(results, schema.ids, out_dir / "cv_per_class_dice.png", "dice", schema,
                              title=f"{cfg.variant}: Dice per fold")
    return {"markdown": text, "results": results, "folds": plan}
