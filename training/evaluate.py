"""Scoring models on cases through the engine users run: per class, per case, per source.

Every score in this project - training validation, ``lumbarseg-train evaluate``, the publish
gate, docs/validation.md - is made here, and every prediction here is made by
``engine.segment_volume`` (the one prediction path): same windows, precision, class-id channel
mapping and label values as ``lumbarseg segment``. A model still in memory (a training run's
current weights) goes in as an ``engine.LoadedModel``; an ensemble is the engine's ensemble mode
(probabilities averaged, flip TTA), exactly what ``--mode ensemble`` gives a user.

Scores (partial labels handled as in ``training.metrics``):

* **strict**: one confusion matrix per case on the case's own voxel grid, pooled over the set;
* **level range**: the Dice of each annotated class counted only within the superior-inferior
  rows the manual label covers (+- ``margin_mm``): data sets label different spine levels (VB3
  only L1-L5, the disc set only L1/L2-L5/S1), so a model that correctly finds T12 is not
  charged for it there;
* **per source**: both of the above pooled within each source (``training.data.case_source``).

``thick_slab`` turns a 1 mm case into what a clinical 2D sagittal stack looks like (slabs of
``slab_mm`` averaged across slices, resampled in-plane), with nearest-neighbour labels, for the
clinical-robustness rows of the report.

    lumbarseg-train evaluate --model uvd-starter,umd-starter,uvd-starter+umd-starter \\
        --registry Resources/Models --data DATA --cases IVD_25,VB1_08 --out reports/val
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions, segment_volume
from LumbarSegmentLib.core.geometry import resize_planes, sagittal_layout
from LumbarSegmentLib.registry.packages import ModelPackage, PackageError, Registry, resolve_model
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume

from . import report
from .data import annotated_mask, case_source, schema_labels, select_cases
from .metrics import MetricAccumulator, clean

log = logging.getLogger("lumbarseg.train")


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


def spacing_xyz(layout, canonical_spacing) -> tuple[float, float, float]:
    """A Volume's ``spacing`` (i, j, k) from spacings along the canonical stack's (s, r, c) axes."""
    by_array_axis = [0.0, 0.0, 0.0]
    for canon_axis, array_axis in enumerate(layout.perm):
        by_array_axis[array_axis] = float(canonical_spacing[canon_axis])
    return tuple(by_array_axis[::-1])  # the array is stored [k, j, i]


#: in-plane pixel of the clinical-looking stacks unless told otherwise (a typical 2D sagittal TSE)
CLINICAL_INPLANE_MM = 0.6


def thick_slab(image: Volume, label: Volume, slab_mm: float = 4.0,
               inplane_mm: float = CLINICAL_INPLANE_MM) -> tuple[Volume, Volume]:
    """A clinical-looking 2D stack from a thin-slice sagittal case.

    Across slices: consecutive slices are averaged in slabs of ``slab_mm`` (partial volume, as
    a thick excitation integrates); the label of a slab is its centre slice's (nearest). In
    plane: resampled to ``inplane_mm`` pixels (bilinear image, nearest label). The spacing
    follows, so the engine sees a genuine 4 mm stack; origin and direction are kept (the first
    voxel's position is off by under half a slab, which no score on this grid depends on).
    """
    layout = sagittal_layout(image)
    img = np.ascontiguousarray(layout.to_canonical(image.array)).astype(np.float32)
    lab = np.ascontiguousarray(layout.to_canonical(label.array))
    s_sp, r_sp, c_sp = layout.spacing_src
    k = max(1, int(round(slab_mm / s_sp)))
    n = img.shape[0] // k
    if n < 1:
        raise ValueError(f"the volume has {img.shape[0]} slices of {s_sp} mm: too few for {slab_mm} mm slabs")
    img_s = img[:n * k].reshape(n, k, *img.shape[1:]).mean(1)
    lab_s = lab[:n * k][k // 2::k][:n]
    size = (max(8, int(round(img.shape[1] * r_sp / inplane_mm))), max(8, int(round(img.shape[2] * c_sp / inplane_mm))))
    img_t = resize_planes(torch.from_numpy(img_s), size, mode="bilinear").numpy()
    lab_t = resize_planes(torch.from_numpy(lab_s.astype(np.int64)), size, mode="nearest").numpy().astype(lab.dtype)
    # stored order back; spacing along each stored axis from the canonical one it became
    arr_img, arr_lab = layout.from_canonical(img_t), layout.from_canonical(lab_t)
    canon_sp = (k * s_sp, img.shape[1] * r_sp / size[0], img.shape[2] * c_sp / size[1])
    geo = dict(spacing=spacing_xyz(layout, canon_sp), origin=image.origin, direction=image.direction)
    return (Volume(np.ascontiguousarray(arr_img), **geo), Volume(np.ascontiguousarray(arr_lab), **geo))


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
    """Every case id ``pkg`` and its ancestors (``parent`` refs, followed while they resolve) trained on,
    and the ancestors that could not be found (their cases are then unknown).

    A parent is followed only when the package its ref resolves to has the weights the child recorded:
    a run folder's package is often named like a published model (a fine-tune of ``uvd-starter@4``
    writes ``uvd-starter@1`` into its folder), and a child of that folder must not inherit the
    training cases of the unrelated published ``uvd-starter@1``."""
    seen, missing, cur, hops = set(), [], pkg, 0
    while cur is not None and hops < 50:
        seen |= set((cur.manifest.get("training") or {}).get("train_cases") or [])
        parent = cur.manifest.get("parent") or {}
        ref, sha = parent.get("ref"), parent.get("sha256")
        cur, hops = None, hops + 1
        if ref:
            try:
                cur = resolve_model(ref, list(registries) if registries else None)
            except PackageError:  # an ancestor that was never published (a run folder): say so, go on
                missing.append(ref)
                continue
            if sha and cur.sha256 != sha:
                missing.append(f"{ref} (an unpublished model of that name; {ref} in the registry has other weights)")
                cur = None
    return seen, missing


def seen_patients(cases: Sequence[Case], entries: Mapping[str, Sequence[ModelPackage]],
                  patient_of: Mapping[str, str] | None = None, registries: Sequence[Registry] | None = None
                  ) -> tuple[list[str], list[str]]:
    """Why scoring ``cases`` on ``entries`` would not measure new patients: (``"case: its patient
    trained X (as Y)"`` lines, ancestors whose training cases are unknown). ``patient_of`` maps case
    ids to patients (``cases.read_patient_map``); a case missing from it is its own patient."""
    patient_of = patient_of or {}
    lines, missing = set(), set()
    distinct = {id(pkg): pkg for pkgs in entries.values() for pkg in pkgs}  # "A" and "A+B" share A
    for pkg in distinct.values():
        trained, lost = training_lineage(pkg, registries)
        missing |= {f"{pkg.ref} <- {m}" for m in lost}
        trained_by_patient: dict[str, list[str]] = {}
        for t in sorted(trained):
            trained_by_patient.setdefault(patient_of.get(t, t), []).append(t)
        for c in cases:
            via = trained_by_patient.get(patient_of.get(c.case_id, c.patient))
            if via:
                lines.add(f"{c.case_id}: its patient trained {pkg.ref} (as {', '.join(via)})")
    return sorted(lines), sorted(missing)


def source_markdown(results: Mapping[str, dict], class_ids: Sequence[str], schema=None, *,
                    thick: Mapping[str, dict] | None = None, digits: int = 4) -> str:
    """Per-source table: strict and level-range Dice of each foreground class, models as columns;
    with ``thick`` (the same models scored on thick-slab stacks) a third column per model."""
    names = list(results)
    sources = sorted({s for r in results.values() for s in r["per_source"]})
    cls = [c for c in class_ids if c != "background"]
    disp = {c.id: c.name for c in schema.classes} if schema is not None else {c: c.replace("_", " ") for c in cls}
    cols = ["strict", "level range"] + (["thick-slab level range"] if thick else [])
    lines = ["| source | class | " + " | ".join(f"{n}: {c}" for n in names for c in cols) + " |",
             "|---|---|" + "--:|" * (len(cols) * len(names))]
    for src in sources + ["all"]:
        for c in cls:
            cells = []
            for n in names:
                r = results[n]
                strict = (r["metrics"] if src == "all" else r["per_source"].get(src, {})).get("dice", {}).get(c)
                cells += [report.fmt(strict, digits), report.fmt(r["level_range"].get(src, {}).get(c), digits)]
                if thick:
                    cells.append(report.fmt(thick[n]["level_range"].get(src, {}).get(c), digits))
            if all(x == "–" for x in cells):
                continue
            lines.append(f"| {src} | {disp.get(c, c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def surface_markdown(results: Mapping[str, dict], class_ids: Sequence[str], schema=None, digits: int = 3) -> str:
    """Per-source table of the level-range surface Dice (:func:`surface_counts`), models x tolerances
    as columns; empty when no result carries it."""
    names = [n for n, r in results.items() if r.get("surface_dice")]
    if not names:
        return ""
    tols = list(results[names[0]]["surface_dice"])
    sources = sorted({s for n in names for by_src in results[n]["surface_dice"].values() for s in by_src} - {"all"})
    disp = {c.id: c.name for c in schema.classes} if schema is not None else {}
    lines = ["| source | class | " + " | ".join(f"{n}: within {t.replace('mm', ' mm')}" for n in names for t in tols) + " |",
             "|---|---|" + "--:|" * (len(tols) * len(names))]
    for src in sources + ["all"]:
        for c in (c for c in class_ids if c != "background"):
            cells = [report.fmt(results[n]["surface_dice"][t].get(src, {}).get(c), digits) for n in names for t in tols]
            if any(x != "–" for x in cells):
                lines.append(f"| {src} | {disp.get(c, c.replace('_', ' '))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_evaluation(results: dict, out: Path, schema=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    ids = first["class_ids"]
    agg = {n: r["metrics"] for n, r in results.items()}
    md = ["# Evaluation", "", f"Cases: {', '.join(first['metrics']['cases'])}", "",
          "## Per source (Dice: strict, and within the labelled levels)", "", source_markdown(results, ids, schema), "",
          "## Surface Dice within the labelled levels (share of both borders within the tolerance of the other)",
          "", surface_markdown(results, ids, schema), "",
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
    print(source_markdown(results, ids_, schema))
    print()
    print(surface_markdown(results, ids_, schema))
    print()
    print(report.markdown_table(agg, ids_, "dice", schema))
    print()
    print(report.markdown_table(agg, ids_, "iou", schema))
    print()
    print(report.per_case_markdown({n: r["per_case"] for n, r in results.items()}, ids_, schema))
    for n, r in results.items():
        print(f"\n{n}: {r['seconds']:.1f} s of prediction for {len(case_list)} cases")
    if a.out:
        write_evaluation(results, Path(a.out), schema)
        print(f"\nwritten to {a.out}")
    return 0
