"""Score models per source and class through the engine, on the fixed splits of every source in ../shared/data.

    python scripts/score_sources.py --models uvd-starter@5,runs/spine6/package --split test --out reports/spine
    python scripts/score_sources.py --models uvd-starter@5 --sources t1-levels --split test --worst 10
    python scripts/score_sources.py --models uvd-starter@6 --split val --runtime openvino --precision bf16

Truth is what training is taught (``training.targets.case_target`` in the spine6 schema): VB1's lowest
instance is the sacrum (S1), t1-levels rows outside ``labels_complete_z_range`` are not scored, SPIDER's
"vertebra" is scored as the union of vertebral body and posterior elements (``vertebra`` column).
Every class is scored where its case annotates it, in level range (the superior-inferior rows its
truth covers +- 2 mm, as ``lumbarseg-train evaluate``); the sacrum only where an S1 is outlined, so
its Dice there counts the lower segments a model paints as errors (read it as "S1 found", not more).
A model with fewer classes (uvd-starter: background, body, disc) is scored on the classes it has.
``--thick-slab 4`` scores the lumbar-mr cases as 4 mm clinical-looking stacks (``evaluate.thick_slab``).
Single slices (t1-levels) go through the engine as one-slice volumes, as a user's 2D image would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LumbarSegmentLib.core.geometry import sagittal_layout  # noqa: E402
from LumbarSegmentLib.registry.registry import Registry  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402
from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.training.data import case_source, select_cases  # noqa: E402
from LumbarSegmentLib.training.evaluate import eval_options, predict, thick_slab  # noqa: E402
from LumbarSegmentLib.training.targets import IGNORE_INDEX, case_target, decode_set_codes  # noqa: E402

SPINE = load_schema("spine6")
CH = SPINE.channel_of()
VERTEBRA = ("vertebral_body", "posterior_elements")
COLUMNS = ["vertebral_body", "intervertebral_disc", "vertebra", "posterior_elements", "spinal_canal", "sacrum"]
SPLITS = {"lumbar-mr": "scripts/recipes/lumbar-mr-split.json", "spider-t2space": "scripts/recipes/new-sources-split.json",
          "t1-levels": "scripts/recipes/new-sources-split.json"}


def split_ids(source: str, which: str) -> list[str]:
    d = json.loads((ROOT / SPLITS[source]).read_text())
    d = d["sources"][source] if "sources" in d else d
    return list(d[which])


def truth_masks(codes: np.ndarray, structures) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (truth mask, scored region)}`` on the volume grid for the columns this case can score."""
    t = torch.from_numpy(codes.reshape(1, -1, 1).astype(np.int64))
    is_set, members = decode_set_codes(t, SPINE.num_classes)
    is_set = is_set.numpy().reshape(codes.shape)
    members = members[0].numpy().reshape(SPINE.num_classes, *codes.shape)
    known = codes != IGNORE_INDEX
    out = {}
    for cid in COLUMNS:
        if cid == "vertebra":
            if not ("vertebral_body" in structures and "posterior_elements" in structures):
                continue
            truth = is_set & members[CH["vertebral_body"]] & members[CH["posterior_elements"]]
            truth |= (codes == CH["vertebral_body"]) | (codes == CH["posterior_elements"])
            out[cid] = (truth, known)
            continue
        ch = CH[cid]
        truth = (codes == ch) | (is_set & members[ch] & (members.sum(0) == 1))
        ambiguous = is_set & members[ch] & (members.sum(0) > 1)
        if cid in structures or (cid == "sacrum" and truth.any()):
            out[cid] = (truth, known & ~ambiguous)
    return out


def level_counts(pred: np.ndarray, truth: np.ndarray, region: np.ndarray, image, margin_mm: float = 2.0):
    layout = sagittal_layout(image)
    t, q, r = (np.ascontiguousarray(layout.to_canonical(a)) for a in (truth, pred, region))
    rows = np.nonzero(t.any(axis=(0, 2)))[0]
    if not len(rows):
        return None
    m = int(round(margin_mm / layout.spacing_src[1]))
    lo, hi = max(0, rows.min() - m), rows.max() + m + 1
    t, q, r = t[:, lo:hi] & r[:, lo:hi], q[:, lo:hi] & r[:, lo:hi], r
    return int((t & q).sum()), int(q.sum()), int(t.sum())


def pred_mask(pred_ch: np.ndarray, cid: str, model_ids) -> np.ndarray | None:
    if cid == "vertebra":
        if not all(c in model_ids for c in VERTEBRA):
            return None
        return (pred_ch == CH["vertebral_body"]) | (pred_ch == CH["posterior_elements"])
    return pred_ch == CH[cid] if cid in model_ids else None


def score(models: dict, sources: list[str], split: str, data: Path, options, slab: float | None, limit: int = 0):
    """``{model: {"pooled": {(source, col): [i, p, t]}, "cases": {case: {col: dice}}}}``."""
    res = {name: {"pooled": {}, "cases": {}} for name in models}
    for source in sources:
        ids = split_ids(source, split)[:limit or None]
        for case in select_cases(data / source, ids):
            image, label = case.load()
            src = case_source(case)
            codes, structures = case_target(case, label.array, SPINE, src)
            if slab and image.array.shape[-1] > 1 and source == "lumbar-mr":
                image, lab_v = thick_slab(image, label.with_array(codes), slab)
                codes = lab_v.array
            for name, pkg in models.items():
                model_ids = pkg.schema.ids
                pred = SPINE.values_to_channels(predict([pkg], image, options))
                for col, (truth, region) in truth_masks(codes, structures).items():
                    q = pred_mask(pred, col, model_ids)
                    if q is None:
                        continue
                    c = level_counts(q, truth, region, image)
                    if c is None:
                        continue
                    acc = res[name]["pooled"].setdefault((src, col), [0, 0, 0])
                    for k in range(3):
                        acc[k] += c[k]
                    res[name]["cases"].setdefault(case.case_id, {})[col] = 2 * c[0] / max(1, c[1] + c[2])
    return res


def table(res: dict, metric: str) -> str:
    cols = [c for c in COLUMNS if any(k[1] == c for r in res.values() for k in r["pooled"])]
    lines = [f"| model | source | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in res.items():
        for src in sorted({k[0] for k in r["pooled"]}):
            cells = []
            for c in cols:
                i, p, t = r["pooled"].get((src, c), (0, 0, 0))
                if p + t == 0:
                    cells.append("")
                else:
                    cells.append(f"{(2 * i / (p + t)) if metric == 'dice' else i / max(1, p + t - i):.3f}")
            lines.append(f"| {name} | {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst(res: dict, col: str, n: int) -> str:
    out = []
    for name, r in res.items():
        per = sorted((d[col], c) for c, d in r["cases"].items() if col in d)
        if per:
            out.append(f"{name} {col}: mean of cases {np.mean([v for v, _ in per]):.3f}, worst "
                       + ", ".join(f"{c} {v:.3f}" for v, c in per[:n]))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="comma-separated package folders or registry refs")
    p.add_argument("--registry", default=str(ROOT / "Resources" / "Models"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--sources", default="lumbar-mr,spider-t2space,t1-levels")
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--thick-slab", type=float, help="score lumbar-mr as MM slabs (4: clinical stacks)")
    p.add_argument("--limit", type=int, default=0, help="only the first N cases of each source")
    p.add_argument("--worst", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtime", default="auto", help="what computes the network (as lumbarseg segment --runtime)")
    p.add_argument("--precision", default="auto", help="arithmetic (as lumbarseg segment --precision): score a "
                   "reduced precision against fp32 before offering it")
    p.add_argument("--mode", default="fast", choices=("fast", "tta"), help="as lumbarseg segment --mode (tta: "
                   "also the anterior-posterior flip, twice the network time)")
    p.add_argument("--roi", action="store_true", help="segment inside a box around the spine (as lumbarseg "
                   "segment --roi): score it against the whole plane before offering it")
    p.add_argument("--slice-step", type=int, default=1, help="run the network on every Nth thin slice (as lumbarseg "
                   "segment --slice-step): score it against every slice before offering it")
    p.add_argument("--out", help="folder for scores.json and scores.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    regs = [Registry(a.registry, read_only=True)]
    models = {ref: resolve_model(ref, regs) for ref in a.models.split(",") if ref}
    options = eval_options(device="cpu", mode=a.mode, runtime=a.runtime, precision=a.precision, threads=a.threads,
                           roi=a.roi, slice_step=a.slice_step)
    t0 = time.time()
    res = score(models, a.sources.split(","), a.split, Path(a.data), options, a.thick_slab, a.limit)
    md = "\n\n".join([f"level-range Dice ({a.split} split{', %g mm slabs' % a.thick_slab if a.thick_slab else ''})",
                      table(res, "dice"), "level-range IoU", table(res, "iou"),
                      worst(res, "vertebral_body", a.worst), f"{time.time() - t0:.0f} s"])
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.md").write_text(md + "\n")
        (out / "scores.json").write_text(json.dumps({n: {"pooled": {f"{s}:{c}": v for (s, c), v in r["pooled"].items()},
                                                         "cases": r["cases"]} for n, r in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
