#!/usr/bin/env python
"""Issue 9's validation report: per source and per structure, 1 mm cases and 4 mm clinical stacks,
through the engine users run. Writes ``report.md``, ``report.json`` and overlays of the worst cases.

For each model entry (a registry ref, a package folder, or ``A+B`` for the engine's ensemble):

* strict Dice and Dice within the labelled spine levels (+-2 mm), per source and pooled;
* the seed's per-class IoU table (one confusion matrix over the set; means with and without
  background);
* the same on thick-slab versions of the cases (``training.evaluate.thick_slab``: 4 mm slabs
  averaged across slices, 0.6 mm in-plane, nearest-neighbour labels) and the drop;
* PNG overlays (truth vs. prediction, central sagittal slice) of the ``--worst`` lowest cases.

    python scripts/validation_report.py --models uvd-starter@2,uvd-starter@1 --which test \\
        --data ../shared/data/lumbar-mr --out docs/validation/test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.inference.bn_adapt import BN_ADAPT_HELP, bn_adapt_arg  # noqa: E402
from LumbarSegmentLib.dataset.cases import read_patient_map, with_patients  # noqa: E402
from LumbarSegmentLib.registry.packages import Registry  # noqa: E402
from LumbarSegmentLib.inference.slice_smoothing import smoothing_mm_arg  # noqa: E402
from LumbarSegmentLib.training import evaluate as ev  # noqa: E402
from LumbarSegmentLib.training.data import select_cases  # noqa: E402
from LumbarSegmentLib.training.metrics import clean  # noqa: E402
from LumbarSegmentLib.training.report import fmt  # noqa: E402

SPLIT = REPO / "scripts" / "recipes" / "lumbar-mr-split-v2.json"  # patient-grouped (v1 leaked three patients)
PATIENTS = REPO / "scripts" / "recipes" / "lumbar-mr-patients.json"


def table_iou(results: dict, ids: list[str]) -> str:
    names = list(results)
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names)]
    for c in ids:
        lines.append(f"| {c.replace('_', ' ')} | " + " | ".join(fmt(results[n]["metrics"]["iou"].get(c), 4)
                                                            for n in names) + " |")
    for k, label in (("mean_iou", "mean (with background)"), ("mean_iou_fg", "mean (without background)")):
        lines.append(f"| {label} | " + " | ".join(fmt(results[n]["metrics"][k], 4) for n in names) + " |")
    return "\n".join(lines)


def overlay(case: ev.EvalCase, pred_values: np.ndarray, schema, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from LumbarSegmentLib.core.geometry import sagittal_layout

    layout = sagittal_layout(case.image)
    img = layout.to_canonical(case.image.array.astype(np.float32))
    truth = layout.to_canonical(case.truth)
    pred = layout.to_canonical(schema.values_to_channels(pred_values))
    s = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(1)))
    r_sp, c_sp = layout.spacing_src[1], layout.spacing_src[2]
    fig, ax = plt.subplots(1, 2, figsize=(8, 4.2))
    for a, lab, name in ((ax[0], truth, "manual"), (ax[1], pred, "model")):
        a.imshow(img[s], cmap="gray", aspect=r_sp / c_sp)
        for ch, color in ((1, "tab:red"), (2, "tab:cyan")):
            if (lab[s] == ch).any():
                a.contour(lab[s] == ch, levels=[0.5], colors=color, linewidths=0.8)
        a.set_title(name, fontsize=9)
        a.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="comma-separated refs/folders; A+B = ensemble")
    p.add_argument("--registry", default=None, help="registry for refs (default: user, then shipped)")
    p.add_argument("--which", choices=("val", "test"), required=True, help="which cases of --split")
    p.add_argument("--split", default=str(SPLIT), help="split file (default: the patient-grouped v2)")
    p.add_argument("--patients", default=str(PATIENTS), help="patient map of the data (lumbarsegment.patients)")
    p.add_argument("--bn-adapt", type=bn_adapt_arg, default=0.0, metavar="W", help=BN_ADAPT_HELP)
    p.add_argument("--slice-smoothing", type=smoothing_mm_arg, default=None, metavar="MM",
                   help="the engine's across-slice smoothing (default: the engine's own, as users get it)")
    p.add_argument("--allow-seen", action="store_true",
                   help="score cases whose patient trained a model (refused by default: they say nothing "
                        "about new patients); the report lists them")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--out", required=True)
    p.add_argument("--slab-mm", type=float, default=4.0)
    p.add_argument("--worst", type=int, default=3)
    p.add_argument("--precision", default="auto")
    a = p.parse_args(argv)
    out = Path(a.out)
    ids = json.loads(Path(a.split).read_text())[a.which]
    patient_of = read_patient_map(a.patients) if a.patients else {}
    cases = with_patients(select_cases(a.data, ids), patient_of)
    entries = ev.resolve_entries(a.models, a.registry)
    regs = [Registry(a.registry, read_only=True)] if a.registry else None
    seen, unknown = ev.seen_patients(cases, entries, patient_of, regs)
    if seen and not a.allow_seen:
        print("validation_report: error: these cases' patients trained a model, so they cannot measure new "
              "patients:\n  " + "\n  ".join(seen) + "\nuse the patient-grouped split (--split), or "
              "--allow-seen to score them anyway", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    options = ev.eval_options(device="cpu", precision=a.precision, slice_smoothing_mm=a.slice_smoothing,
                              bn_adapt=a.bn_adapt)  # every prediction below, the overlays' too
    res = ev.evaluate_packages(entries, cases, options)
    t1 = time.time()
    thick = ev.evaluate_packages(entries, cases, options, slab_mm=a.slab_mm)
    t2 = time.time()
    first = next(iter(entries.values()))
    schema = (first[0].schema)
    md = [f"# Validation report: {a.which} split ({len(cases)} cases)", "",
          f"Models: {', '.join(entries)}. Precision {a.precision}, CPU, across-slice smoothing "
          f"{'the engine default' if a.slice_smoothing is None else f'{a.slice_smoothing:g} mm'}"
          f"{f', BatchNorm adaptation {a.bn_adapt:g}' if a.bn_adapt else ''}. "
          f"Prediction wall time: {t1 - t0:.0f} s (1 mm), {t2 - t1:.0f} s ({a.slab_mm:g} mm stacks).", "",
          "Patients: " + ("every case's patient is new to every model" if not seen else
                          "**scored although their patient trained a model** (`--allow-seen`): " + "; ".join(seen))
          + (f". Ancestors whose training cases are unknown: {', '.join(unknown)}" if unknown else "") + ".", "",
          "## Dice per source and structure", "", ev.source_markdown(res, schema.ids, schema, thick=thick, digits=3), "",
          "## Surface Dice per source and structure (level range; share of both borders within the tolerance "
          "of the other)", "", "1 mm:", "", ev.surface_markdown(res, schema.ids, schema), "",
          f"{a.slab_mm:g} mm clinical stacks:", "", ev.surface_markdown(thick, schema.ids, schema), "",
          "## The seed's per-class IoU (pooled over the set, 1 mm)", "", table_iou(res, schema.ids), "",
          f"## The same, {a.slab_mm:g} mm clinical stacks", "", table_iou(thick, schema.ids), ""]
    # worst cases of the first entry, by level-range Dice of their annotated structure
    name0 = next(iter(entries))
    per = sorted(res[name0]["level_range_per_case"].items(), key=lambda kv: kv[1])[:a.worst]
    if per:
        md += [f"## Worst cases of {name0} (level-range Dice)", ""]
        prepared = {c.case_id: c for c in ev.prepare_cases([c for c in cases if any(k.startswith(c.case_id + ":")
                                                                                     for k, _ in per)], schema)}
        for key, d in per:
            cid = key.split(":")[0]
            pred = ev.predict(entries[name0], prepared[cid].image, options)
            png = out / f"worst_{cid}.png"
            overlay(prepared[cid], pred, schema, png, f"{cid} ({prepared[cid].source}), {name0}: level-range Dice {d:.3f}")
            md.append(f"![{cid}]({png.name}) {cid}: {d:.3f}")
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(clean({"1mm": res, "thick": thick, "cases": ids,
                                                       "split": a.split, "seen_patients": seen,
                                                       "unknown_ancestors": unknown,
                                                       "seconds": [t1 - t0, t2 - t1]}), indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
