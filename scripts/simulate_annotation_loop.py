#!/usr/bin/env python
"""Measure the annotation loop: train on k cases, "correct" m more, fine-tune, compare validation Dice.

The loop the Slicer module supports is: a model drafts a segmentation, an expert
corrects it, the corrected case is exported (``cases.write_case``) and the model is
fine-tuned on the grown dataset. Here the expert is simulated by the ground truth:

1. export the k initial cases into a fresh dataset folder (``cases.write_case``) and
   train model M0 on them;
2. for each of the m new cases, let M0 draft it (its Dice against the truth is the
   "editing effort" an annotator would face), then export the ground truth as the
   corrected case (``drafted_by`` = M0, ``edited_structures`` = the case's structures);
3. fine-tune M0 on all k + m cases -> M1; as a control, fine-tune M0 for the same number
   of steps on the k initial cases only -> M0+ (so the gain is not just "more steps");
4. report validation Dice/IoU of M0, M0+ and M1 on the held-out cases.

Defaults are a small, fast configuration (2 mm in-plane spacing, 96 px patches,
UVD with 8 filters), so the whole loop takes minutes on a CPU; see
docs/annotation_loop.md for the measured result.

    python scripts/simulate_annotation_loop.py --data ../shared/data/lumbar-mr --work /tmp/loop
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.cases import list_cases, write_case  # noqa: E402
from LumbarSegmentLib.training.config import TrainConfig  # noqa: E402
from LumbarSegmentLib.training.data import annotated_mask, as_schema, schema_labels, select_cases  # noqa: E402
from LumbarSegmentLib.training.finetune import finetune  # noqa: E402
from LumbarSegmentLib.training.evaluate import predict  # noqa: E402
from LumbarSegmentLib.training.metrics import MetricAccumulator  # noqa: E402
from LumbarSegmentLib.training.report import markdown_table  # noqa: E402
from LumbarSegmentLib.training.trainer import train  # noqa: E402

log = logging.getLogger("annotation_loop")


def export(case, folder: Path, schema, label_array=None, extra=None):
    """Write ``case`` (or a corrected label map for it) in schema values through ``cases.write_case``."""
    image, label = case.load()
    arr, structures = schema_labels(case, label, schema)
    if label_array is not None:
        arr = label_array
    labels = {schema[s].value: s for s in structures}
    return write_case(folder, case.case_id, image, label.with_array(arr.astype(np.uint8)), labels=labels,
                      annotated_structures=list(structures), patient=case.patient, extra=extra)


def draft_dice(pkg, case, schema) -> dict:
    """How close the model's draft is to the truth (per annotated structure)."""
    image, label = case.load()
    truth, structures = schema_labels(case, label, schema)
    pred = predict([pkg], image, device="cpu")  # the engine users run
    acc = MetricAccumulator(schema.ids)
    acc.add(case.case_id, torch.from_numpy(schema.values_to_channels(pred).astype(np.int64)),
            torch.from_numpy(schema.values_to_channels(truth).astype(np.int64)), annotated_mask(structures, schema))
    return acc.per_case()[case.case_id]["dice"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--work", default="/tmp/lumbarseg-annotation-loop")
    p.add_argument("--initial", default="IVD_11,VB3_01", help="the k cases M0 is trained on")
    p.add_argument("--corrected", default="IVD_20,VB1_07,VB2_02,VB3_02", help="the m cases drafted and corrected")
    p.add_argument("--val", default="IVD_25,VB1_08,VB2_05,VB3_04")
    p.add_argument("--variant", default="UVD")
    p.add_argument("--init-filters", type=int, default=8)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--ft-epochs", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--intensity-aug", default="off", choices=("off", "light", "strong"))
    p.add_argument("--unannotated-bg-weight", type=float, default=0.0)
    p.add_argument("--amp", default="fp32", help="precision: fp32 | bf16 | auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result (markdown + json) here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    ids = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    dataset = work / "dataset"
    base = TrainConfig(variant=a.variant, init_filters=a.init_filters, spacing=(a.spacing, a.spacing), patch=a.patch,
                       batch_size=a.batch_size, epochs=a.epochs, steps_per_epoch=a.steps_per_epoch, lr=a.lr,
                       precision=a.amp, seed=a.seed, patience=0, progress_bar=False, val_stride=1, warmup_steps=20,
                       intensity_aug=a.intensity_aug, unannotated_bg_weight=a.unannotated_bg_weight)
    schema = as_schema(base.schema)
    val_cases = select_cases(a.data, ids(a.val))

    # 1. the initial k cases, exported as the module would, and M0
    for c in select_cases(a.data, ids(a.initial)):
        export(c, dataset, schema, extra={"note": "initial annotation (ground truth)"})
    initial = list_cases(dataset)
    r0 = train(base.replace(name="loop-m0"), initial, val_cases, out_dir=work / "m0")
    m0 = r0.package

    # 2. draft + correct the m new cases
    drafts = {}
    for c in select_cases(a.data, ids(a.corrected)):
        drafts[c.case_id] = draft_dice(m0, c, schema)
        export(c, dataset, schema, extra={"drafted_by": m0.ref, "edited_structures": list(c.annotated_structures),
                                          "note": "simulated correction: the ground truth"})
    grown = list_cases(dataset)

    # 3. fine-tune on k + m (M1), and the control on k only (M0+)
    ft = base.replace(epochs=a.ft_epochs, lr=a.ft_lr, warmup_steps=5)
    r1 = finetune(m0, grown, val_cases, out_dir=work / "m1", config=ft.replace(name="loop-m1"))
    rc = finetune(m0, initial, val_cases, out_dir=work / "m0plus", config=ft.replace(name="loop-m0plus"))

    # 4. report
    results = {f"M0 (k={len(initial)})": r0.val_metrics,
               f"M0+ (k={len(initial)}, +{a.ft_epochs} ep)": rc.val_metrics,
               f"M1 (k+m={len(grown)}, +{a.ft_epochs} ep)": r1.val_metrics}
    md = [f"Initial cases: {', '.join(c.case_id for c in initial)}; corrected: {', '.join(drafts)}; "
          f"validation: {', '.join(c.case_id for c in val_cases)}.", "",
          markdown_table(results, schema.ids, "dice", schema), "",
          markdown_table(results, schema.ids, "iou", schema), "",
          "Draft quality of M0 on the cases to correct (Dice of the draft vs. the corrected mask):", "",
          "| case | " + " | ".join(s.name for s in schema.foreground) + " |",
          "|---|" + "---:|" * len(schema.foreground)]
    for cid, d in drafts.items():
        md.append(f"| {cid} | " + " | ".join(f"{d[c.id]:.3f}" if c.id in d else "–" for c in schema.foreground)
                  + " |")
    md += ["", f"Wall time: {time.time() - t0:.0f} s ({torch.get_num_threads()} threads)."]
    text = "\n".join(md)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "annotation_loop.md").write_text(text + "\n")
        (out / "annotation_loop.json").write_text(json.dumps(
            {"results": results, "drafts": drafts, "args": vars(a),
             "packages": {"m0": str(m0.path), "m1": str(r1.package.path), "m0plus": str(rc.package.path)}},
            indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
