"""Pseudo-labels: a teacher model drafts the structures a case does not annotate.

The data sets are partially labelled: vertebra cases mark only bodies, disc cases only
discs. The marginal loss (``losses``) keeps that honest but leaves the model to guess
where a disc ends on a vertebra case; a model fine-tuned on new vertebra-only cases
drifts there (the annotation loop measured discs falling by 0.09-0.17). A teacher that
already knows discs can say where they are:

* the teacher (one package, or several averaged as an ensemble) segments each training
  case through the engine users run (``engine.segment_volume``, with confidence);
* for every class the case does **not** annotate, voxels the teacher gives that class with
  probability >= ``threshold`` become that class; voxels it gives that class, or background,
  with less confidence become "ignore" (no loss either way);
* the manual label always wins: only voxels that are 0 in the manual label change, and a
  class the case annotates is never touched;
* the pseudo-labelled classes count as annotated for the case from then on, so both the
  cross-entropy and the Dice term learn them there.

What was drafted, by which teacher (weights sha256) and with which threshold, goes into the
run's ``pseudo_labels.json`` and the package's provenance. The drafts are cached per case in
``<run>/pseudo/`` keyed by all of that, so a resumed run does not recompute them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from LumbarSegmentLib.inference import preprocess
from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.formats.io import read_volume
from LumbarSegmentLib.registry.packages import ModelPackage, resolve_model, sha256_file
from LumbarSegmentLib.core.schema import LabelSchema

from .data import IGNORE_INDEX, CaseSlices, DataError

log = logging.getLogger("lumbarseg.train")

CACHE_VERSION = 1


def resolve_teachers(refs: Sequence[str]) -> list[ModelPackage]:
    """Teacher packages from refs or folders; a clear error naming the one that cannot be found."""
    out = []
    for ref in refs:
        try:
            out.append(resolve_model(str(ref)))
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do
            raise DataError(f"pseudo-label teacher {ref!r} cannot be loaded ({exc}); give a model ref "
                            f"(lumbarseg models lists them) or a package folder") from None
    return out


def _value_lut(teacher_schema: LabelSchema, schema: LabelSchema) -> np.ndarray:
    """Teacher label value -> training channel, matched by class id (classes the schema lacks -> 0)."""
    lut = np.zeros(256, dtype=np.uint8)
    ch = schema.channel_of()
    for c in teacher_schema.classes:
        lut[c.value] = ch.get(c.id, 0)
    return lut


def _key(case: Case, teachers: Sequence[ModelPackage], threshold: float, mode: str, spacing, classes) -> str:
    body = json.dumps({"v": CACHE_VERSION, "label": sha256_file(case.label_path),
                       "image": sha256_file(case.image_path), "teachers": [t.sha256 for t in teachers],
                       "threshold": round(float(threshold), 6), "mode": mode,
                       "spacing": [float(s) for s in spacing], "classes": list(classes)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def draft_case(case: Case, teachers: Sequence, schema: LabelSchema, classes: Sequence[int],
               plane: tuple[int, int], *, threshold: float, mode: str, device: str, precision: str) -> np.ndarray:
    """``[S, H, W]`` uint8 on the model grid: a channel of ``classes`` where the teacher is sure,
    ``IGNORE_INDEX`` where it gives that class or background but is not sure, else 0."""
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume

    image = read_volume(case.image_path)  # the label is the trainer's business; only the image is segmented
    res = segment_volume(image, list(teachers), SegmentOptions(mode=mode, device=device, precision=precision,
                                                               confidence=True))
    channels = _value_lut(res.schema, schema)[res.labels.array]
    wanted = np.isin(channels, np.asarray(list(classes), dtype=np.uint8))
    sure = res.confidence.array >= threshold
    # unsure "background" may be an unsure drafted class: ignore it too (the manual label still wins)
    unsure = ~sure & (wanted | (channels == 0))
    out = np.where(wanted & sure, channels, np.where(unsure, IGNORE_INDEX, 0)).astype(np.uint8)
    layout = sagittal_layout(image)
    return preprocess.label_slices(out, layout, plane).to(torch.uint8).numpy()


def add_pseudo_labels(data: Sequence[CaseSlices], cases: Sequence[Case], refs: Sequence[str], schema: LabelSchema,
                      spacing, *, threshold: float = 0.8, mode: str = "auto", device: str = "cpu",
                      precision: str = "auto", cache_dir: str | Path | None = None) -> dict:
    """Merge teacher drafts of each case's unannotated classes into ``data`` (in place); returns a summary."""
    if not 0.5 <= threshold < 1:
        raise DataError(f"the pseudo-label threshold must be in [0.5, 1), got {threshold}")
    teachers = resolve_teachers(refs)
    for t in teachers:
        missing = [cid for cid in t.schema.ids if cid != "background" and cid not in schema]
        if missing:
            log.info("teacher %s: classes %s are not in the training schema and are not drafted", t.ref, missing)
    mode = ("ensemble" if len(teachers) > 1 else "fast") if mode == "auto" else mode
    by_id = {c.case_id: c for c in cases}
    known = {cid for t in teachers for cid in t.schema.ids}
    summary = {"teachers": [{"ref": t.ref, "weights_sha256": t.sha256} for t in teachers], "threshold": threshold,
               "mode": mode, "cases": {}}
    loaded = None  # the teachers' weights, read once and only if some case is not in the cache
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    for c in data:
        classes = [ch for ch, cls in enumerate(schema.classes)
                   if ch != 0 and not bool(c.annotated[ch]) and cls.id in known]
        if not classes:
            continue
        case = by_id[c.case_id]
        key = _key(case, teachers, threshold, mode, spacing, classes)
        hit = cache / f"{c.case_id}.npz" if cache else None
        pseudo = None
        if hit is not None and hit.exists():
            with np.load(hit) as z:
                if str(z["key"]) == key:
                    pseudo = z["pseudo"]
        if pseudo is None:
            if loaded is None:
                from LumbarSegmentLib.inference.engine import LoadedModel

                loaded = [LoadedModel.from_package(t) for t in teachers]
            pseudo = draft_case(case, loaded, schema, classes, tuple(c.label.shape[1:]), threshold=threshold,
                                mode=mode, device=device, precision=precision)
            if hit is not None:
                tmp = hit.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, pseudo=pseudo, key=np.asarray(key))
                tmp.replace(hit)
        p = torch.from_numpy(pseudo)
        free = c.label == 0  # the manual label wins everywhere it says something
        c.label = torch.where(free & (p != 0), p, c.label).contiguous()
        for ch in classes:
            c.annotated[ch] = True
        lab = c.label
        c.fg_slices = ((lab > 0) & (lab != IGNORE_INDEX)).flatten(1).any(1).nonzero().flatten().tolist()
        stats = {"classes": [schema.classes[ch].id for ch in classes],
                 "voxels": {schema.classes[ch].id: int((lab == ch).sum()) for ch in classes},
                 "ignored_voxels": int((lab == IGNORE_INDEX).sum())}
        c.info["pseudo"] = stats
        summary["cases"][c.case_id] = stats
    log.info("pseudo-labels from %s (threshold %.2f, %s): %d of %d training cases drafted",
             ", ".join(t.ref for t in teachers), threshold, mode, len(summary["cases"]), len(data))
    return summary
