#!/usr/bin/env python
"""How much does each extra training case buy? A learning curve over the number of training cases.

Fine-tunes ``--from`` with the generalisation recipe on nested, source-stratified fractions of the
training split (the disc cases are always in: only two exist), every run with the same number of
optimiser steps, then tabulates each run's validation Dice per source (level range, through the
engine; read from the packages' manifests). Runs go side by side, one thread each.

    python docs/lab/scripts/learning_curve.py --fractions 0.25,0.5,1 --epochs 10 --out runs/curve
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SPLIT = REPO / "scripts" / "recipes" / "lumbar-mr-split.json"


def subsets(data: Path, fractions):
    split = json.loads(SPLIT.read_text())
    held = set(split["test"]) | set(split["val"])
    train = sorted(p.stem for p in data.glob("*.json") if p.stem not in held)
    by_src: dict[str, list[str]] = {}
    for c in train:
        by_src.setdefault(c.split("_")[0], []).append(c)
    out = {}
    for f in fractions:
        ids = []
        for src, cases in sorted(by_src.items()):
            k = len(cases) if src == "IVD" else max(1, round(f * len(cases)))
            ids += cases[:k]  # nested: a smaller fraction is a prefix of a larger one
        out[f] = ids
    return out, split["val"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--from", dest="source", default="uvd-starter@1")
    p.add_argument("--fractions", default="0.25,0.5,1")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--table-only", action="store_true", help="only tabulate finished runs")
    a = p.parse_args(argv)
    fr = [float(x) for x in a.fractions.split(",")]
    sets, val = subsets(Path(a.data), fr)
    out = Path(a.out)
    if not a.table_only:
        procs = []
        for f, ids in sets.items():
            run = out / f"frac_{f:g}"
            cmd = [sys.executable, "-m", "LumbarSegmentLib.training.cli", "finetune", "--from", a.source,
                   "--data", a.data, "--cases", ",".join(ids + val), "--val-cases", ",".join(val), "--patch", "192",
                   "--batch-size", "8", "--steps-per-epoch", "60", "--epochs", str(a.epochs), "--lr", "3e-4",
                   "--unannotated-bg-weight", "0.05", "--precision", "bf16", "--threads", "1", "--patience", "0",
                   "--val-every", str(a.epochs), "--intensity-aug", "domain", "--resolution-aug", "0.3",
                   "--slab-aug", "0.25", "--balance", "sources", "--name", f"curve-{int(f * 100)}", "--out", str(run)]
            run.parent.mkdir(parents=True, exist_ok=True)
            procs.append(subprocess.Popen(cmd, stdout=open(f"{run}.log", "w"), stderr=subprocess.STDOUT))
        if any(pr.wait() for pr in procs):
            raise SystemExit("a run failed; see the .log files beside the run folders")
    rows = ["| training cases | VB1 | VB2 | VB3 | pooled | mean over sources |", "|--:|--:|--:|--:|--:|--:|"]
    for f, ids in sets.items():
        m = json.loads((out / f"frac_{f:g}" / "package" / "manifest.json").read_text())
        lvl = m["metrics"]["validation"]["level_range"]
        vb = {s: lvl.get(s, {}).get("vertebral_body") for s in ("VB1", "VB2", "VB3")}
        mean = sum(vb.values()) / 3
        rows.append(f"| {len(ids)} ({int(f * 100)} %) | " + " | ".join(f"{vb[s]:.3f}" for s in vb)
                    + f" | {lvl['all']['vertebral_body']:.3f} | {mean:.3f} |")
    table = "\n".join(rows)
    (out / "curve.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
