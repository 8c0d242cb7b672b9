"""Evaluate model packages (or ensembles) on cases: per-class Dice/IoU per case and pooled.

Predictions are made exactly as at inference (``preprocess.model_slices`` at the
model's spacing, softmax, resampled back to the case's own grid, arg-max) and
compared with the case's label map mapped onto the model's schema by class id.
Partial labels are scored as in ``LumbarSegmentLib.training.metrics``.

    lumbarseg-train evaluate --model uvd-starter,umd-starter,uvd-starter+umd-starter \\
        --registry Resources/Models --data DATA --cases IVD_25,VB1_08,VB2_05,VB3_04 --out reports/val
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from LumbarSegmentLib.cases import Case
from LumbarSegmentLib.packages import ModelPackage, PackageError, Registry, resolve_model

from . import report
from .data import annotated_mask, schema_labels, select_cases
from .inference import predict_volume
from .metrics import MetricAccumulator, clean
from .trainer import resolve_device

log = logging.getLogger("lumbarseg.train")


def channel_maps_for(packages: Sequence[ModelPackage]) -> list[list[int]]:
    """For each package, its channel index of every class of the first package's schema (by id)."""
    ref = packages[0].schema
    maps = []
    for p in packages:
        ch = p.schema.channel_of()
        missing = [c for c in ref.ids if c not in ch]
        if missing:
            raise PackageError(f"cannot ensemble {p.ref} with {packages[0].ref}: it lacks classes {missing}")
        if tuple(p.spacing) != tuple(packages[0].spacing):
            log.info("ensemble members use different spacings; each is run at its own and resampled")
        maps.append([ch[c] for c in ref.ids])
    return maps


def _predict(packages, models, volume, device, amp):
    if len(models) == 1 or all(tuple(p.spacing) == tuple(packages[0].spacing) for p in packages):
        return predict_volume(models, volume, packages[0].spacing, device=device, amp=amp,
                              channel_maps=channel_maps_for(packages))
    # different spacings: average probabilities on the volume grid via per-model label votes is lossy;
    # run each at its own spacing and average one-hot predictions instead.
    import numpy as np

    maps = channel_maps_for(packages)
    votes = None
    for p, m, cm in zip(packages, models, maps):
        lab = predict_volume([m], volume, p.spacing, device=device, amp=amp, channel_maps=[cm])
        oh = np.eye(len(maps[0]), dtype=np.float32)[lab]
        votes = oh if votes is None else votes + oh
    return votes.argmax(-1).astype(np.uint8)


def evaluate_packages(entries: Mapping[str, Sequence[ModelPackage]], case_list: Sequence[Case], *,
                      device="cpu", amp: str = "off") -> dict:
    """``entries[name] = [package, ...]`` (several = ensemble) -> ``{name: {"metrics", "per_case", "seconds"}}``."""
    device = torch.device(device)
    loaded = {name: [p.load_model(device) for p in pkgs] for name, pkgs in entries.items()}
    accs = {name: MetricAccumulator(pkgs[0].schema.ids) for name, pkgs in entries.items()}
    secs = {name: 0.0 for name in entries}
    for case in case_list:
        image, label = case.load()
        for name, pkgs in entries.items():
            schema = pkgs[0].schema
            truth, structures = schema_labels(case, label, schema)
            if not structures:
                log.warning("%s: case %s annotates none of its classes; skipped", name, case.case_id)
                continue
            t0 = time.time()
            pred = _predict(pkgs, loaded[name], image, device, amp)
            secs[name] += time.time() - t0
            accs[name].add(case.case_id, torch.from_numpy(pred), torch.from_numpy(truth.astype("int64")),
                           annotated_mask(structures, schema))
    return {name: {"metrics": accs[name].compute(), "per_case": accs[name].per_case(),
                   "seconds": secs[name], "models": [p.ref for p in entries[name]],
                   "class_ids": list(entries[name][0].schema.ids)} for name in entries}


def resolve_entries(spec: str, registry: str | None = None) -> dict[str, list[ModelPackage]]:
    """``"a,b,a+b"`` -> ``{"a": [pkg a], "b": [pkg b], "a+b": [pkg a, pkg b]}``.

    Items are package folders or registry refs (``name[@version]``); a folder is labelled
    by its package name.
    """
    regs = [Registry(registry, read_only=True)] if registry else None
    out = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        members = [r.strip() for r in item.split("+")]
        pkgs = [resolve_model(r, regs) for r in members]
        labels = [p.name if Path(r).is_dir() else r for p, r in zip(pkgs, members)]
        out["+".join(labels)] = pkgs
    return out


def write_evaluation(results: dict, out: Path, schema=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    ids = first["class_ids"]
    agg = {n: r["metrics"] for n, r in results.items()}
    md = ["# Evaluation", "", f"Cases: {', '.join(first['metrics']['cases'])}", "",
          "## Pooled over the cases (classes as rows, models as columns)", "",
          report.markdown_table(agg, ids, "dice", schema), "", report.markdown_table(agg, ids, "iou", schema), "",
          "## Per case", "", report.per_case_markdown({n: r["per_case"] for n, r in results.items()}, ids, schema),
          ""]
    text = "\n".join(md)
    (out / "metrics.md").write_text(text)
    (out / "metrics.csv").write_text(report.csv_table(agg, ids))
    (out / "metrics.json").write_text(json.dumps(clean(results), indent=1))
    report.plot_per_class(agg, ids, out / "per_class_dice.png", "dice", schema, title="Dice per class")
    report.plot_per_class(agg, ids, out / "per_class_iou.png", "iou", schema, title="IoU per class")
    return {"markdown": text}


def evaluate_cli(a) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    entries = resolve_entries(a.model, a.registry)
    first = next(iter(entries.values()))[0]
    ids = [s.strip() for s in (a.cases or "").split(",") if s.strip()]
    if not ids:
        ids = list(first.manifest.get("training", {}).get("val_cases") or [])
        if ids:
            log.info("evaluating on %s's validation cases: %s", first.ref, ", ".join(ids))
    exclude = [s.strip() for s in (a.exclude or "").split(",") if s.strip()]
    case_list = select_cases(a.data, ids or None, exclude)
    device = resolve_device(a.device)
    results = evaluate_packages(entries, case_list, device=device, amp=a.amp)
    schema = first.schema
    agg = {n: r["metrics"] for n, r in results.items()}
    ids_ = first.schema.ids
    print(report.markdown_table(agg, ids_, "dice", schema))
    print()
    print(report.markdown_table(agg, ids_, "iou", schema))
    print()
    print(report.per_case_markdown({n: r["per_case"] for n, r in results.items()}, ids_, schema))
    for n, r in results.items():
        print(f"\n{n}: {r['seconds']:.1f} s of prediction for {len(case_list)} cases on {device}")
    if a.out:
        write_evaluation(results, Path(a.out), schema)
        print(f"\nwritten to {a.out}")
    return 0
