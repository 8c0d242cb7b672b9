"""Scoring models on cases through the engine users run: per class, per case, per source.

Every score in this project - training validation, ``lumbarseg-train evaluate``, the publish
gate, docs/validation.md - is made here, and every prediction here is made by
``engine.segment_volume`` (the one prediction path): same windows, precision, class-id channel
mapping and label values as ``lumbarseg segment``. A model still in memory (a training run's
current weights) goes in as an ``engine.LoadedModel``; an ensemble is the engine's ensemble mode
(probabilities averaged, flip TTA), exactly what ``--mode ensemble`` gives a user.

The scores themselves (strict, level range, surface Dice; overall and per source) are
``training.scoring``; the clinical-looking thick-slab stacks ``training.slab``; the Markdown
tables and files of a result ``training.report``.

    lumbarseg-train evaluate --model uvd-starter,umd-starter,uvd-starter+umd-starter \\
        --registry Resources/Models --data DATA --cases IVD_25,VB1_08 --out reports/val
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions, segment_volume
from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.registry.package import ModelPackage, PackageError
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.registry.catalog import resolve_model
from LumbarSegmentLib.registry.lineage import trained_patients
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume

from . import report
from .data import annotated_mask, case_source, schema_labels, select_cases
from .scoring import SURFACE_TOL_MM, EvalCase, Scorer
from .slab import CLINICAL_INPLANE_MM, spacing_xyz, thick_slab

log = logging.getLogger("lumbarseg.train")


def prepare_cases(case_list: Sequence[Case], schema: LabelSchema, *, slab_mm: float | None = None,
                  inplane_mm: float = CLINICAL_INPLANE_MM) -> list[EvalCase]:
    """Load and map the cases' truth onto ``schema`` (optionally as thick-slab stacks)."""
    out = []
    for case in case_list:
        image, label = case.load()
        values, structures = schema_labels(case, label, schema)
        if not structures:
            log.warning("case %s annotates none of %s's classes; skipped", case.case_id, schema.name)
            continue
        if slab_mm:
            image, lab_vol = thick_slab(image, label.with_array(values), slab_mm, inplane_mm)
            values = lab_vol.array
        out.append(EvalCase(case.case_id, image, schema.values_to_channels(values), annotated_mask(structures, schema),
                            source=case_source(case), structures=tuple(structures)))
    return out


#: direction of a Volume whose stored [k, j, i] axes already run as the canonical [s, r, c] stack
#: (right->left, superior->inferior, anterior->posterior), in LPS: i -> +P, j -> -S, k -> +L.
CANONICAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def eval_case_from_slices(c, spacing_mm=(1.0, 1.0), slice_mm: float = 1.0) -> EvalCase:
    """A cached training case (``training.data.CaseSlices``: model-plane stack, channel labels) as a
    volume the engine can segment, for callers that hold only slices (tests, cross-validation folds)."""
    arr = c.image.numpy() if hasattr(c.image, "numpy") else np.asarray(c.image)
    lab = c.label.numpy() if hasattr(c.label, "numpy") else np.asarray(c.label)
    spacing = (float(spacing_mm[1]), float(spacing_mm[0]), float(slice_mm))  # (i, j, k) = (c, r, s)
    image = Volume(np.ascontiguousarray(arr, dtype=np.float32), spacing=spacing, direction=CANONICAL_DIRECTION)
    return EvalCase(c.case_id, image, lab.astype(np.uint8), c.annotated, source=getattr(c, "source", ""),
                    structures=tuple(getattr(c, "structures", ())))


def every_nth_slice(case: EvalCase, n: int) -> EvalCase:
    """The case reduced to every ``n``-th sagittal slice (cheaper per-epoch validation)."""
    if n <= 1:
        return case
    layout = sagittal_layout(case.image)
    axis = layout.perm[0]  # stored array axis that runs across the slices
    idx = np.arange(0, case.image.array.shape[axis], n)
    s_sp, r_sp, c_sp = layout.spacing_src
    img = Volume(np.ascontiguousarray(np.take(case.image.array, idx, axis=axis)),
                 spacing=spacing_xyz(layout, (s_sp * n, r_sp, c_sp)),
                 origin=case.image.origin, direction=case.image.direction)
    return EvalCase(case.case_id, img, np.ascontiguousarray(np.take(case.truth, idx, axis=axis)), case.annotated,
                    case.source, case.structures, case.info)


def eval_options(*, slice_smoothing_mm: float | None = None, **fields) -> SegmentOptions:
    """The engine options of a scoring run, built once by the command that scores and handed down
    whole (so a new engine option is one more field here, not one more argument on every function
    below). ``fields`` are :class:`engine.SegmentOptions` fields; a smoothing of ``None`` (a command
    line that did not set it) keeps the engine's default."""
    if slice_smoothing_mm is not None:
        fields["slice_smoothing_mm"] = float(slice_smoothing_mm)
    return SegmentOptions(**fields)


def predict(models: Sequence[ModelPackage | LoadedModel], image: Volume,
            options: SegmentOptions | None = None) -> np.ndarray:
    """The engine's label map (schema values of the first model) for ``image``: the one prediction path.

    Several models with the default ``fast`` mode run as the engine's ensemble, as ``--mode
    ensemble`` would; any other mode goes to the engine as given (which refuses a mismatch)."""
    options = options or SegmentOptions()
    if len(models) > 1 and options.mode == "fast":
        options = replace(options, mode="ensemble")
    return segment_volume(image, list(models), options).labels.array


def score_models(models: Sequence[ModelPackage | LoadedModel], cases: Sequence[EvalCase], schema: LabelSchema,
                 options: SegmentOptions | None = None, *, margin_mm: float = 2.0,
                 surface: Sequence[float] = SURFACE_TOL_MM) -> dict:
    """Predict every case with the engine (``options`` as in :func:`predict`) and score it; returns
    :meth:`Scorer.results` + seconds."""
    scorer = Scorer(schema, margin_mm, surface)
    t0 = time.time()
    for c in cases:
        scorer.add(c, predict(models, c.image, options))
    return {**scorer.results(), "seconds": time.time() - t0}


def evaluate_packages(entries: Mapping[str, Sequence[ModelPackage | LoadedModel]], case_list: Sequence[Case],
                      options: SegmentOptions | None = None, *, slab_mm: float | None = None,
                      inplane_mm: float = CLINICAL_INPLANE_MM, surface: Sequence[float] = SURFACE_TOL_MM) -> dict:
    """``entries[name] = [model, ...]`` (several = ensemble) -> ``{name: results}`` (see :func:`score_models`);
    every entry is predicted with the same engine ``options`` (:func:`eval_options`). ``surface=()`` skips
    the surface Dice (about a second per case and class) where only the volume scores are read."""
    loaded = {name: [m if isinstance(m, LoadedModel) else LoadedModel.from_package(m) for m in ms]
              for name, ms in entries.items()}
    prepared: dict[str, list[EvalCase]] = {}
    out = {}
    for name, models in loaded.items():
        schema = models[0].schema
        key = schema.name + ":" + ",".join(schema.ids)
        if key not in prepared:
            prepared[key] = prepare_cases(case_list, schema, slab_mm=slab_mm, inplane_mm=inplane_mm)
        r = score_models(models, prepared[key], schema, options, surface=surface)
        out[name] = {**r, "models": [m.ref for m in models], "class_ids": list(schema.ids)}
    return out


def resolve_entries(spec: str, registry: str | None = None) -> dict[str, list[ModelPackage]]:
    """``"a,b,a+b"`` -> ``{"a": [pkg a], "b": [pkg b], "a+b": [pkg a, pkg b]}``.

    Items are package folders or registry refs (``name[@version]``); a folder is labelled by its
    package name, unless another folder in ``spec`` has the same name (runs exported under the
    name they will be published as often do): then both are labelled by the path as given, so
    no column silently replaces another.
    """
    regs = [Registry(registry, read_only=True)] if registry else None
    items = [[r.strip() for r in item.split("+")] for item in (s.strip() for s in spec.split(",")) if item]
    pkgs = {r: resolve_model(r, regs) for members in items for r in members}
    folder_paths: dict[str, set] = {}
    for r, p in pkgs.items():
        if Path(r).is_dir():
            folder_paths.setdefault(p.name, set()).add(os.path.realpath(p.path))
    label = {r: (p.name if len(folder_paths.get(p.name, ())) == 1 else r) if Path(r).is_dir() else r
             for r, p in pkgs.items()}
    return {"+".join(label[r] for r in members): [pkgs[r] for r in members] for members in items}


def training_lineage(pkg: ModelPackage, registries: Sequence[Registry] | None = None
                     ) -> tuple[set[str], list[str]]:
    """Every case id ``pkg`` and its ancestors trained on, and the ancestors that could not be found
    (``registry.lineage.trained_patients``, the rule the publish gate follows too)."""
    lineage = trained_patients(pkg, registries)
    return set(lineage.cases), list(lineage.missing)


def seen_patients(cases: Sequence[Case], entries: Mapping[str, Sequence[ModelPackage]],
                  patient_of: Mapping[str, str] | None = None, registries: Sequence[Registry] | None = None
                  ) -> tuple[list[str], list[str]]:
    """Why scoring ``cases`` on ``entries`` would not measure new patients: (``"case: its patient
    trained X (as Y)"`` lines, ancestors whose training cases are unknown). ``patient_of`` maps case
    ids to patients (``cases.read_patient_map``); a case missing from it is its own patient. Whether a
    model saw a patient is :func:`registry.lineage.trained_patients`'s answer, as at the publish gate."""
    lines, missing = set(), set()
    distinct = {id(pkg): pkg for pkgs in entries.values() for pkg in pkgs}  # "A" and "A+B" share A
    for pkg in distinct.values():
        lineage = trained_patients(pkg, registries, patient_of)
        missing |= {f"{pkg.ref} <- {m}" for m in lineage.missing}
        for c in cases:
            via = lineage.via(c)
            if via:
                lines.add(f"{c.case_id}: its patient trained {pkg.ref} (as {', '.join(via)})")
    return sorted(lines), sorted(missing)


def evaluate_cli(a) -> int:
    if a.inplane is not None and not a.thick_slab:
        raise ValueError("--inplane sets the pixel size of the --thick-slab stacks; give --thick-slab too")
    inplane = CLINICAL_INPLANE_MM if a.inplane is None else a.inplane
    if not 0.1 <= inplane <= 5:
        raise ValueError(f"--inplane {inplane} mm is outside 0.1-5 mm")
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
    options = eval_options(device=str(a.device), precision=a.precision, mode=a.mode or "fast",
                           postprocess=a.postprocess, slice_smoothing_mm=a.slice_smoothing, bn_adapt=a.bn_adapt)
    results = evaluate_packages(entries, case_list, options, slab_mm=a.thick_slab, inplane_mm=inplane)
    schema = first.schema
    agg = {n: r["metrics"] for n, r in results.items()}
    ids_ = first.schema.ids
    print(report.source_markdown(results, ids_, schema))
    print()
    print(report.surface_markdown(results, ids_, schema))
    print()
    print(report.markdown_table(agg, ids_, "dice", schema))
    print()
    print(report.markdown_table(agg, ids_, "iou", schema))
    print()
    print(report.per_case_markdown({n: r["per_case"] for n, r in results.items()}, ids_, schema))
    for n, r in results.items():
        print(f"\n{n}: {r['seconds']:.1f} s of prediction for {len(case_list)} cases")
    if a.out:
        report.write_evaluation(results, Path(a.out), schema)
        print(f"\nwritten to {a.out}")
    return 0
