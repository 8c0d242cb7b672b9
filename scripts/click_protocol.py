"""The click protocol of interactive correction, on the untouched test split (and its 4 mm stacks).

For each case: the default model's draft, then up to N simulated clicks (the deepest point of the
largest remaining error of the case's labelled structure inside its labelled levels:
``LumbarSegmentLib.training.clicks``), each time refining the last result with all clicks so far,
as ``lumbarseg refine IMAGE --labels LAST --click ...`` does (same library call, one warm session per
case: the model's probabilities are computed once per slice). Prints level-range Dice after 0/1/3/5/10/20 clicks per source, NoC@90 / NoC@95 (clicks to
reach 0.90 / 0.95; N+1 when never reached, counted as such in the mean) and how many cases end
better than their draft; writes the per-case curves as JSON.

    python scripts/click_protocol.py --data ../shared/data/lumbar-mr --out runs/clicks.json [--slab 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402
from LumbarSegmentLib.inference.refine import Click, RefineSession  # noqa: E402
from LumbarSegmentLib.training.clicks import level_dice, next_click  # noqa: E402
from LumbarSegmentLib.training.data import select_cases  # noqa: E402
from LumbarSegmentLib.training.evaluate import prepare_cases  # noqa: E402

REPORT_AT = (0, 1, 3, 5, 10, 20)


def run_case(case, pkg, options, n_clicks: int, draft_pkg=None, guided=None) -> dict:
    draft = segment_volume(case.image, [draft_pkg or pkg], options).labels.array
    schema = pkg.schema
    structure = next(s for s in case.structures if s != "background")
    value, channel = schema[structure].value, schema.channel_of()[structure]
    session = RefineSession(case.image, pkg, options, guided=guided)
    clicks, curve, times = [], [level_dice(draft, case.truth, case.image, value, channel)], []
    labels = draft
    for _ in range(n_clicks):
        sim = next_click(labels, case.truth, case.image, value, channel)
        if sim is None:
            curve.append(curve[-1])
            continue
        clicks.append(Click(sim.point_lps, structure, sim.positive))
        t = time.perf_counter()
        labels = session.refine(labels, clicks).labels
        times.append(time.perf_counter() - t)
        curve.append(level_dice(labels, case.truth, case.image, value, channel))
    return {"case": case.case_id, "source": case.source, "structure": structure, "dice": curve,
            "clicks": [str(c) for c in clicks], "refine_s": times}


def noc(curve, target, n):
    return next((i for i, d in enumerate(curve) if d >= target), n + 1)


def summarise(rows, n) -> str:
    lines = ["| source | cases | " + " | ".join(f"{k} clicks" for k in REPORT_AT if k <= n)
             + " | NoC@90 | NoC@95 | improved |", "|---" * (len([k for k in REPORT_AT if k <= n]) + 5) + "|"]
    groups = {}
    for r in rows:
        groups.setdefault(r["source"], []).append(r)
    groups["all"] = rows
    for src, rs in groups.items():
        at = [np.mean([r["dice"][k] for r in rs]) for k in REPORT_AT if k <= n]
        improved = sum(r["dice"][n] > r["dice"][0] for r in rs)  # after the last click, against the draft
        lines.append(f"| {src} | {len(rs)} | " + " | ".join(f"{v:.3f}" for v in at)
                     + f" | {np.mean([noc(r['dice'], 0.90, n) for r in rs]):.1f}"
                     + f" | {np.mean([noc(r['dice'], 0.95, n) for r in rs]):.1f} | {improved}/{len(rs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--split", default=str(ROOT / "scripts" / "recipes" / "lumbar-mr-split-v2.json"))
    p.add_argument("--cases", default=None, help="comma-separated case ids (default: the split's test cases)")
    p.add_argument("--model", default=None, help="model that refines (default: the registry's default)")
    p.add_argument("--draft-model", default=None, help="model that drafts (default: --model; a guidance model "
                   "is given the default's drafts this way)")
    p.add_argument("--clicks", type=int, default=20)
    p.add_argument("--edit-mm", type=float, default=None, help="a click-guided model: in-plane edit radius (mm)")
    p.add_argument("--reach-mm", type=float, default=None, help="a click-guided model: reach across slices (mm)")
    p.add_argument("--slab", type=float, default=None, help="make clinical stacks of this slab (mm), e.g. 4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the per-case curves")
    a = p.parse_args(argv)
    ids = a.cases.split(",") if a.cases else json.loads(Path(a.split).read_text())["test"]
    pkg = resolve_model(a.model)
    draft_pkg = resolve_model(a.draft_model) if a.draft_model else None
    guided = None
    if a.edit_mm is not None or a.reach_mm is not None:
        from LumbarSegmentLib.inference.guided import GuidedParams

        guided = GuidedParams(**({"edit_mm": a.edit_mm} if a.edit_mm is not None else {}), reach_mm=a.reach_mm)
    options = SegmentOptions(device="cpu", threads=a.threads)
    rows = []
    for case in select_cases(a.data, ids):
        (ec,) = prepare_cases([case], pkg.schema, slab_mm=a.slab)
        row = run_case(ec, pkg, options, a.clicks, draft_pkg, guided)
        rows.append(row)
        print(f"{row['case']:>8} {row['structure'][:4]}: " + " ".join(f"{d:.3f}" for d in row["dice"])
              + f"  ({np.median(row['refine_s'] or [0]):.3f} s/refine)", flush=True)
    table = summarise(rows, a.clicks)
    print(f"model {pkg.ref}" + (f" on drafts of {draft_pkg.ref}" if draft_pkg else "") + f", {'%g mm stacks' % a.slab if a.slab else 'as stored'}\n{table}")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": pkg.ref, "draft_model": draft_pkg.ref if draft_pkg else pkg.ref, "slab_mm": a.slab, "cases": rows,
                                           "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
