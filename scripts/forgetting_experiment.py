#!/usr/bin/env python
"""Does a fine-tune on a team's own cases forget every other source? The experiment, rerunnable.

A team with a new scanner corrects 20 T1 mid-sagittal slices (shared/data/t1-levels, fixed list
below) and runs ``lumbarseg-train finetune --from uvd-starter@5`` (the default when the problem was found: it had never seen a T1 slice) for 3 epochs of 20 steps. Each
candidate guard against forgetting is one set of extra command-line flags. Every model is scored
through the engine (``training.evaluate.evaluate_packages``, what ``lumbarseg-train evaluate`` runs) on

* 40 other t1-levels slices (fixed list below; the sacrum counts as background for the three-class
  schema, as the other sources teach), and
* the SPIDER test split (discs only, as a three-class schema reads them), and
* the untouched test split of every lumbar-mr source (scripts/recipes/lumbar-mr-split-v2.json:
  IVD, VB1 with its lowest instance scored as sacrum, VB2, VB3), the central 15 sagittal slices
  of each volume cropped to the labelled levels + 40 mm (``SCORE_SLICES``; the 2-core machine this
  was measured on was shared),

as level-range Dice per source (Dice within the spine levels the manual label covers, +-2 mm).

    python scripts/forgetting_experiment.py --out runs/forgetting                 # every candidate
    python scripts/forgetting_experiment.py --out runs/forgetting --only plain,default
    python scripts/forgetting_experiment.py --out runs/forgetting --time-only default   # timing

Writes ``<out>/<candidate>/`` (the run, ``scores.json``) and ``<out>/table.md``. The t1 cases are
adapted into ``<out>/data/`` (training.sources: rows above L1, which nobody outlined, cropped away).
Set ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` and ``--precision fp32`` to time it as an
AVX2-only CPU would run it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the team's 20 corrected slices (random.Random(32).sample of the 329 ids, first 20)
T1_TRAIN = ["T1L_0001", "T1L_0021", "T1L_0033", "T1L_0050", "T1L_0068", "T1L_0088", "T1L_0108", "T1L_0128",
            "T1L_0187", "T1L_0207", "T1L_0268", "T1L_0285", "T1L_0291", "T1L_0331", "T1L_0419", "T1L_0441",
            "T1L_0450", "T1L_0460", "T1L_0477", "T1L_0538"]
#: 40 slices of the same source kept back for scoring (the next 40 of that sample)
T1_EVAL = ["T1L_0007", "T1L_0017", "T1L_0027", "T1L_0031", "T1L_0042", "T1L_0061", "T1L_0069", "T1L_0071",
           "T1L_0072", "T1L_0097", "T1L_0104", "T1L_0143", "T1L_0146", "T1L_0149", "T1L_0177", "T1L_0199",
           "T1L_0200", "T1L_0212", "T1L_0252", "T1L_0253", "T1L_0261", "T1L_0272", "T1L_0288", "T1L_0294",
           "T1L_0308", "T1L_0356", "T1L_0382", "T1L_0387", "T1L_0393", "T1L_0400", "T1L_0416", "T1L_0431",
           "T1L_0437", "T1L_0462", "T1L_0464", "T1L_0471", "T1L_0500", "T1L_0510", "T1L_0517", "T1L_0526"]
#: a team with rehearsal data adds cases the parent trained on (as scripts/annotation_loop.py re-exports)
REHEARSAL = ["IVD_11", "VB1_07", "VB2_02", "VB2_04", "VB3_01", "VB3_02", "VB3_05", "VB3_06"]

#: the parent of every fine-tune (``--parent``): the default when the problem was found, which never saw a T1 slice
PARENT = "uvd-starter@5"
BASE = ["--epochs", "3", "--steps-per-epoch", "20", "--patience", "0"]
def _guards(l2sp=0, replay=0, wise=1, keep_bn=False, distill=0, *extra) -> list[str]:
    """Every guard's flag spelt out, so a candidate means the same whatever the defaults become."""
    return ["--keep-bn-stats" if keep_bn else "--no-keep-bn-stats", "--l2sp", str(l2sp), "--distill", str(distill),
            "--replay", str(replay), "--wise", str(wise), *extra]


#: candidate -> (extra finetune flags, rehearsal cases in the team's data?)
CANDIDATES = {
    "plain": (["--plain-finetune", "--replay", "0", "--wise", "1"], False),
    "keep-bn": (_guards(keep_bn=True), False),
    "lower-lr": (["--plain-finetune", "--lr", "1e-4", "--replay", "0", "--wise", "1"], False),
    "l2sp=1": (_guards(l2sp=1), False),
    "l2sp=0.5": (_guards(l2sp=0.5), False),
    "l2sp=0.3": (_guards(l2sp=0.3), False),
    "distill=1": (_guards(distill=1), False),
    "keep-bn+l2sp=1": (_guards(l2sp=1, keep_bn=True), False),
    "keep-bn+l2sp=0.3": (_guards(l2sp=0.3, keep_bn=True), False),
    "keep-bn+distill=1": (_guards(keep_bn=True, distill=1), False),
    "keep-bn+l2sp=1+distill=1": (_guards(l2sp=1, keep_bn=True, distill=1), False),
    "replay=0.5": (_guards(replay=0.5), False),
    "replay=0.5+l2sp=0.3": (_guards(l2sp=0.3, replay=0.5), False),
    "replay=0.5+l2sp=1": (_guards(l2sp=1, replay=0.5), False),
    "replay=0.5+keep-bn": (_guards(replay=0.5, keep_bn=True), False),
    "replay=0.5+b16": (_guards(0, 0.5, 1, False, 0, "--batch-size", "16"), False),
    "replay=0.3+l2sp=0.3": (_guards(l2sp=0.3, replay=0.3), False),
    "replay=0.5+wise=0.5": (_guards(replay=0.5, wise=0.5), False),
    "replay=0.5+wise=0.6": (_guards(replay=0.5, wise=0.6), False),
    "replay=0.5+b16+wise=0.5": (_guards(0, 0.5, 0.5, False, 0, "--batch-size", "16"), False),
    "replay=0.5+b16+wise=0.6": (_guards(0, 0.5, 0.6, False, 0, "--batch-size", "16"), False),
    "default": ([], False),
    "plain+rehearsal": (["--plain-finetune", "--replay", "0", "--wise", "1"], True),
    "default+rehearsal": ([], True),
}
SOURCES = ["T1L", "VB3", "VB2", "VB1", "IVD", "SP"]
#: the lumbar-mr test volumes are scored on their central slices (where the bodies and discs are),
#: cropped to the labelled levels + 40 mm: a quarter of the prediction time of the whole volumes
SCORE_SLICES = 15


def prepare_data(shared: Path, out: Path) -> dict:
    """The adapted case folders (created once): team data, team data + rehearsal, scoring cases."""
    from LumbarSegmentLib.training.reference import write_reference_case
    from LumbarSegmentLib.training.sources import adapt_cases

    split = json.loads((ROOT / "scripts/recipes/lumbar-mr-split-v2.json").read_text())
    folders = {k: out / "data" / k for k in ("team", "team+rehearsal", "score", "score-val", "score-sp")}
    def missing(key):
        return not (folders[key] / "done").exists()

    if missing("team"):
        adapt_cases(shared / "t1-levels", T1_TRAIN, folders["team"])
        (folders["team"] / "done").write_text("")
    if missing("team+rehearsal"):
        adapt_cases(shared / "t1-levels", T1_TRAIN, folders["team+rehearsal"])
        # as the parent trained on them (VB1's S1 as a body): a three-class schema has no sacrum to learn
        adapt_cases(shared / "lumbar-mr", REHEARSAL, folders["team+rehearsal"], vb1_sacrum=False)
        (folders["team+rehearsal"] / "done").write_text("")
    if missing("score"):
        for case in adapt_cases(shared / "lumbar-mr", split["test"], out / "data" / "test-adapted"):
            write_reference_case(case, folders["score"], case.extra["source"], slices=SCORE_SLICES)
        (folders["score"] / "done").write_text("")
    if missing("score-val"):  # held-out patients too: they chose the parent's checkpoint, never trained it
        for case in adapt_cases(shared / "lumbar-mr", split["val"], out / "data" / "val-adapted"):
            write_reference_case(case, folders["score-val"], case.extra["source"], slices=SCORE_SLICES)
        (folders["score-val"] / "done").write_text("")
    sp = json.loads((ROOT / "scripts/recipes/new-sources-split.json").read_text())["sources"]["spider-t2space"]
    if missing("score-sp") and (shared / "spider-t2space").is_dir():  # SPIDER's discs (the parent may know them)
        from LumbarSegmentLib.training.sources import spider_discs_case

        for cid in sp["test"] + sp["val"]:
            spider_discs_case(shared / "spider-t2space" / f"{cid}.json", folders["score-sp"])
        (folders["score-sp"] / "done").write_text("")
    return {**{k: str(v) for k, v in folders.items()}, "lumbar_test": split["test"], "lumbar_val": split["val"],
            "sp_test": sp["test"], "sp_val": sp["val"]}


def finetune(name: str, data: str, out: Path, precision: str, threads: int, patch: int = 256,
             parent: str = PARENT) -> float:
    """Run the fine-tune through the command line; returns its wall time in seconds."""
    flags, _ = CANDIDATES[name]
    run = out / name / "run"
    if (run / "package" / "manifest.json").exists():
        return float(json.loads((out / name / "time.json").read_text())["wall_s"])
    cmd = [sys.executable, "-m", "LumbarSegmentLib.training.cli", "finetune", "--from", parent, *BASE, "--data", data,
           "--out", str(run), "--threads", str(threads), "--precision", precision, "--patch", str(patch), *flags]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.time() - t0
    (out / name / "time.json").write_text(json.dumps({"wall_s": wall, "command": cmd[2:]}))
    return wall


def score(package, shared: Path, data: dict, with_val: bool = False) -> dict:
    """``{source: level-range Dice of the vertebral body (discs for IVD)}`` through the engine; ``with_val``
    adds the validation split's held-out patients to the lumbar-mr sources (three VB1 cases, not one)."""
    from LumbarSegmentLib.inference.engine import SegmentOptions
    from LumbarSegmentLib.training.data import select_cases
    from LumbarSegmentLib.training.evaluate import evaluate_packages

    cases = select_cases(shared / "t1-levels", T1_EVAL) + select_cases(data["score"], data["lumbar_test"])
    if with_val:
        cases += select_cases(data["score-val"], data["lumbar_val"])
    if (Path(data["score-sp"]) / "done").exists():
        cases += select_cases(data["score-sp"], data["sp_test"] + (data["sp_val"] if with_val else []))
    res = evaluate_packages({"m": [package]}, cases, SegmentOptions(device="cpu"), surface=())["m"]
    lr = res["level_range"]
    out = {src: lr.get(src, {}).get("intervertebral_disc" if src in ("IVD", "SP") else "vertebral_body")
           for src in SOURCES}
    worst = [v for k, v in res["level_range_per_case"].items() if k.startswith("T1L") and k.endswith("vertebral_body")]
    out["T1L_worst"] = min(worst) if worst else None
    return out


def table(rows: dict) -> str:
    """Level-range Dice per source; the fine-tune's wall seconds and its training loop's CPU seconds (on a
    machine shared with other jobs the CPU seconds / threads is what an idle machine would take)."""
    head = "| model | wall s | CPU s | " + " | ".join(SOURCES) + " | T1L worst | worst drop elsewhere |"
    lines = [head, "|---|--:|--:|" + "--:|" * (len(SOURCES) + 2)]
    parent = rows.get("parent (uvd-starter)", {}).get("scores", {})
    for name, r in rows.items():
        s = r["scores"]
        drops = [s[k] - parent[k] for k in SOURCES[1:] if parent.get(k) is not None and s.get(k) is not None]
        worst = f"{min(drops):+.3f}" if drops and name != "parent (uvd-starter)" else "-"
        secs = f"{r['wall_s']:.0f}" if r.get("wall_s") else "-"
        cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") else "-"
        lines.append(f"| {name} | {secs} | {cpu} | " + " | ".join(f"{s[k]:.3f}" if s.get(k) is not None else "-"
                                                           for k in SOURCES)
                     + f" | {s['T1L_worst']:.3f} | {worst} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--only", help="candidates to run, comma-separated (default: all)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patch", type=int, default=256,
                   help="training patch (default 256, the issue's; 128 costs a quarter per step)")
    p.add_argument("--with-val", action="store_true",
                   help="also score the lumbar-mr validation split (held-out patients: 3 VB1 cases instead of 1)")
    p.add_argument("--parent", default=PARENT,
                   help=f"the model every candidate fine-tunes (default {PARENT}; use a separate --out per parent)")
    p.add_argument("--time-only", help="fine-tune these candidates again into <out>/timing/, no scoring")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    shared, out = Path(a.shared), Path(a.out)
    if not (shared / "t1-levels").is_dir() or not (shared / "lumbar-mr").is_dir():
        print(f"forgetting_experiment: {shared} lacks t1-levels/ or lumbar-mr/", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(shared, out)
    if a.time_only:
        for name in a.time_only.split(","):
            wall = finetune(name, data["team"], out / "timing" / a.precision, a.precision, a.threads, a.patch,
                            a.parent)
            print(f"{name}: fine-tune {wall:.0f} s (precision {a.precision}, {a.threads} threads)")
        return 0
    from LumbarSegmentLib.registry.package import read_package
    from LumbarSegmentLib.registry.catalog import resolve_model

    rows = {}
    tag = "+val" if a.with_val else ""
    parent_file = out / f"parent_scores{tag}.json"
    if not parent_file.exists():
        parent_file.write_text(json.dumps(score(resolve_model(a.parent), shared, data, a.with_val)))
    rows["parent (uvd-starter)"] = {"scores": json.loads(parent_file.read_text())}
    names = a.only.split(",") if a.only else list(CANDIDATES)
    for name in names:
        if name not in CANDIDATES:
            print(f"forgetting_experiment: unknown candidate {name!r} ({', '.join(CANDIDATES)})", file=sys.stderr)
            return 2
    for name in names:
        folder = data["team+rehearsal" if CANDIDATES[name][1] else "team"]
        wall = finetune(name, folder, out, a.precision, a.threads, a.patch, a.parent)
        sfile = out / name / f"scores{tag}.json"
        if not sfile.exists():
            sfile.write_text(json.dumps(score(read_package(out / name / "run" / "package"), shared, data, a.with_val)))
        training = read_package(out / name / "run" / "package").manifest["training"]
        rows[name] = {"scores": json.loads(sfile.read_text()), "wall_s": wall, "cpu_s": training.get("train_cpu_s"),
                      "retention": (training.get("init_from") or {}).get("retention")}
        print(table(rows), flush=True)
    text = table(rows) + "\n\n" + "\n".join(f"* {n}: {r['retention']}" for n, r in rows.items() if r.get("retention"))
    (out / f"table{tag}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
