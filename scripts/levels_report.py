#!/usr/bin/env python
"""How well ``lumbarseg segment --levels`` names levels and measures them, per source.

For each case: the default model's draft (through the engine, as users get it; cached in
``--drafts``), named by ``levels.name_levels``; the manual label turned into the same level label
map (names from position or from the data set's own level ids, below); then

* levels named right: each manual level instance is matched to the draft level that covers most
  of it; right when that level carries the manual name;
* per-level Dice: the manual instance against the draft segment of the same name (0 when absent);
* heights and volumes from ``measurements.measure_levels`` on both maps, paired by name:
  bias, 95 % limits of agreement, Bland-Altman plots (``--plots``).

Manual level names: lumbar-mr VB3 values 1..5 = L1..L5 (1 is the top); IVD five discs, the lowest
L5-S1; VB2 unordered bodies, the lowest L5; VB1 unordered bodies, the lowest S1 (the sacrum);
t1-levels the JSON's ``levels`` (L1..L5, S1); spider-t2space the discs (semantic label 2) as
connected pieces (stray fragments dropped), the lowest L5-S1 (its whole-vertebra label is not a body:
not scored).

    python scripts/levels_report.py --data ../shared/data --drafts runs/levels-drafts --out runs/levels
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.core.geometry import sagittal_layout  # noqa: E402
from LumbarSegmentLib.formats.io import read_volume  # noqa: E402
from LumbarSegmentLib.spine.level_names import BODY, DISC, VERTEBRAE, disc_name, level_value, structure_of  # noqa: E402
from LumbarSegmentLib.spine.levels import name_levels  # noqa: E402
from LumbarSegmentLib.spine.measurements import HEIGHTS, measure_levels  # noqa: E402

SPLIT = REPO / "scripts" / "recipes" / "lumbar-mr-split-v2.json"
PATIENTS = REPO / "scripts" / "recipes" / "lumbar-mr-patients.json"
T1_EVERY = 5  # t1-levels: every fifth case in name order (no shipped model saw any of them)
T1_TUNE_FROM, T1_TUNE_EVERY = 2, 10  # the tuning sample: every tenth from the third (disjoint from the above)
#: spider-t2space: disc pieces below this share of the largest are stray fragments, not discs. A thin,
#: tilted L5-S1 covers as little as a fifth of the largest disc's voxels in the stored slices (SP_11,
#: SP_18), so a higher bar would drop the real lowest disc and name every manual disc one level off.
MIN_DISC_PIECE = 0.05


def cases(data: Path, which: str, subset: str = "report") -> list[tuple[str, str, Path]]:
    """``(source, case id, folder)``: lumbar-mr test + validation, a t1-levels sample, spider-t2space.

    ``subset="tune"``: the cases the naming constants were chosen on instead: t1-levels every
    tenth case from the third (none of them in the reported sample) and spider-t2space at odd
    positions in name order (which the report also lists, marked ``tuning``).
    """
    t1 = sorted(p.name[:-len("_image.mha")] for p in (data / "t1-levels").glob("*_image.mha"))
    spider = [p.name[:-len("_image.mha")] for p in sorted((data / "spider-t2space").glob("*_image.mha"))]
    if subset == "tune":
        return ([("T1L", c, data / "t1-levels") for c in t1[T1_TUNE_FROM::T1_TUNE_EVERY]]
                + [("SP", c, data / "spider-t2space") for c in spider[1::2]])
    split = json.loads(SPLIT.read_text())
    out = []
    for role in which.split(","):
        for c in split[role]:
            out.append((c.split("_")[0], c, data / "lumbar-mr"))
    out += [("T1L", c, data / "t1-levels") for c in t1[::T1_EVERY]]
    out += [("SP", c, data / "spider-t2space") for c in spider]
    return out


def spider_tuning(data: Path) -> set[str]:
    """The spider-t2space cases used for tuning (odd positions in name order)."""
    spider = [p.name[:-len("_image.mha")] for p in sorted((data / "spider-t2space").glob("*_image.mha"))]
    return set(spider[1::2])


def _instances_by_height(arr: np.ndarray, layout, values) -> list[int]:
    """Label values ordered top (cranial) to bottom by their mean canonical row."""
    can = layout.to_canonical(arr)
    rows = {v: float(np.nonzero(can == v)[1].mean()) for v in values}
    return sorted(values, key=rows.get)


def _names_from_bottom(n: int, lowest: str, structure: str) -> list[str]:
    """``n`` names top to bottom ending at ``lowest``."""
    v = level_value(lowest) - (100 if structure == DISC else 0)
    names = [VERTEBRAE[v - 1 - k] for k in range(n)][::-1]
    return [disc_name(x) for x in names] if structure == DISC else names


def reference(source: str, case: str, folder: Path):
    """The manual label as a level label map (same scheme as the draft) on the input grid."""
    lab = read_volume(folder / f"{case}_label.mha")
    meta = json.loads((folder / f"{case}.json").read_text())
    arr = np.asarray(lab.array)
    layout = sagittal_layout(lab, allow_reslice=True)
    out = np.zeros(arr.shape, np.uint8)
    if source == "T1L":
        for v, name in meta["levels"].items():
            out[arr == int(v)] = level_value(name)
        return lab.with_array(out)
    if source == "SP":
        import SimpleITK as sitk

        cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((arr == 2).astype(np.uint8))))
        sizes = np.bincount(cc.ravel())
        vals = [int(v) for v in range(1, len(sizes)) if sizes[v] >= MIN_DISC_PIECE * sizes[1:].max()]
        arr = cc
        lowest, structure = "L5-S1", DISC
    else:
        vals = [int(v) for v in np.unique(arr) if v]
        lowest, structure = {"IVD": ("L5-S1", DISC), "VB1": ("S1", BODY)}.get(source, ("L5", BODY))
    order = _instances_by_height(arr, layout, vals)
    for v, name in zip(order, _names_from_bottom(len(order), lowest, structure)):
        out[arr == v] = level_value(name)
    return lab.with_array(out)


def draft(image_path: Path, cache: Path, model: str | None):
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / (image_path.name.replace("_image.mha", ".nii.gz"))
    if target.exists():
        return read_volume(target)
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.registry.catalog import resolve_model

    vol = read_volume(image_path)
    result = segment_volume(vol, [resolve_model(model)], SegmentOptions(device="cpu", mode="fast"))
    from LumbarSegmentLib.formats.io import write_volume

    write_volume(result.labels, target)
    return result.labels


def score_case(ref, named, scored_structures) -> dict:
    """Names right, per-level Dice, for the manual levels of the scored structures."""
    r, d = np.asarray(ref.array), np.asarray(named.labels.array)
    rows = []
    for v in [int(x) for x in np.unique(r) if x]:
        if structure_of(v) not in scored_structures:
            continue
        m = r == v
        hit = d[m]
        hit = hit[(hit > 0) & (np.vectorize(structure_of)(hit) == structure_of(v))] if hit.size else hit
        best = int(np.bincount(hit).argmax()) if hit.size else 0
        seg = d == v
        dice = 2.0 * float((m & seg).sum()) / float(m.sum() + seg.sum())
        rows.append({"level": _name(v), "right": best == v, "named_as": _name(best) if best else None,
                     "dice": round(dice, 4)})
    return {"levels": rows}


def _name(v):
    from LumbarSegmentLib.spine.level_names import level_name

    return level_name(v)


def _seen_cases(model) -> set[str]:
    """Cases (and patients) the model or any of its ancestors trained on, from their training records."""
    from LumbarSegmentLib.registry.catalog import resolve_model
    from LumbarSegmentLib.registry.lineage import trained_patients

    lineage = trained_patients(resolve_model(model))
    seen = set(lineage.cases) | set(lineage.by_patient)
    groups = json.loads(PATIENTS.read_text())["patients"].values()  # lumbar-mr cases of one patient
    for group in groups:
        if seen & set(group["cases"]):
            seen |= set(group["cases"])
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--which", default="test,val", help="lumbar-mr split roles (default test,val)")
    ap.add_argument("--drafts", type=Path, default=None, help="folder caching the drafts (made when missing)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, required=True, help="folder for report.json, table.md, plots")
    ap.add_argument("--only", default=None, help="comma-separated sources to run (IVD,VB1,VB2,VB3,T1L,SP)")
    ap.add_argument("--tables-only", action="store_true", help="only rewrite the tables from OUT/report.json")
    ap.add_argument("--subset", choices=("report", "tune"), default="report",
                    help="the reported cases (default) or the tuning subset the naming constants were chosen on")
    ap.add_argument("--unseen-only", action="store_true", help="leave out cases the model or its ancestors trained on "
                    "(their training records), e.g. for a model trained on some t1-levels and spider-t2space cases")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        from levels_tables import write_tables  # noqa: E402  (scripts/levels_tables.py)

        write_tables(json.loads((args.out / "report.json").read_text()), args.out)
        return 0
    if args.drafts is None:
        ap.error("--drafts FOLDER is needed (the drafts are cached there)")
    from LumbarSegmentLib.registry.catalog import resolve_model

    schema = resolve_model(args.model).schema  # the model's own classes: a drafted sacrum anchors the names
    results = []
    tuning = spider_tuning(args.data)
    seen = _seen_cases(args.model) if args.unseen_only else set()
    for source, case, folder in cases(args.data, args.which, args.subset):
        if args.only and source not in args.only.split(","):
            continue
        if case in seen:
            print(f"{case}: left out (the model trained on it)", flush=True)
            continue
        ref = reference(source, case, folder)
        labels = draft(folder / f"{case}_image.mha", args.drafts, args.model)
        image = read_volume(folder / f"{case}_image.mha")  # as the CLI: S1 outlined from it where not drafted
        named = name_levels(labels, schema, allow_reslice=True, image=image)
        scored = {DISC} if source in ("IVD", "SP") else {BODY}
        row = {"source": source, "case": case, "tuning": case in tuning, **score_case(ref, named, scored),
               "confidence": named.confidence, "flags": [f["code"] for f in named.flags],
               "draft_levels": [lv.name for lv in named.levels],
               "draft_volumes_mm3": {lv.name: round(lv.volume_mm3) for lv in named.levels}}
        row["measures"] = _paired_measures(ref, named.labels, source)
        results.append(row)
        wrong = [x["level"] + "->" + str(x["named_as"]) for x in row["levels"] if not x["right"]]
        print(f"{case}: {sum(x['right'] for x in row['levels'])}/{len(row['levels'])} right "
              f"{' '.join(wrong)} conf {named.confidence:.2f} {row['flags']}", flush=True)
    (args.out / "report.json").write_text(json.dumps(results, indent=1))
    from levels_tables import write_tables  # noqa: E402  (scripts/levels_tables.py)

    write_tables(results, args.out)
    return 0


def _paired_measures(ref, draft_levels, source) -> list[dict]:
    m_ref = {r["level"]: r for r in measure_levels(ref)}
    m_draft = {r["level"]: r for r in measure_levels(draft_levels)}
    out = []
    for name, r in m_ref.items():
        d = m_draft.get(name)
        if d is None:
            continue
        for key in HEIGHTS + ("volume_mm3",):
            if r.get(key) is not None and d.get(key) is not None:
                out.append({"level": name, "what": key, "manual": r[key], "draft": d[key]})
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
