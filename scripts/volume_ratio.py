#!/usr/bin/env python
"""Where a model's errors are: per case, level-range Dice and predicted / true volume of each
annotated structure, optionally with the model run at other in-plane spacings than it was trained at,
or with its vertebral-body logit shifted (a global calibration: does the model over-paint by a
source's convention or by error?).

A ratio near 1 with a low Dice means border errors that cancel out; a ratio well above or below 1
means the model paints systematically more or less than the annotator (another convention, or a
structure confused with its neighbour). Prediction goes through the engine (``evaluate.predict``).

    python scripts/volume_ratio.py --model uvd-starter@4 --which val --spacings 1.0,0.8
    python scripts/volume_ratio.py --model uvd-starter@4 --which val --logit-offsets 0,-0.5,-1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from LumbarSegmentLib.inference.engine import LoadedModel  # noqa: E402
from LumbarSegmentLib.registry.packages import Registry, resolve_model  # noqa: E402
from LumbarSegmentLib.inference.slice_smoothing import smoothing_mm_arg  # noqa: E402
from LumbarSegmentLib.training import evaluate as ev  # noqa: E402
from LumbarSegmentLib.training.data import select_cases  # noqa: E402

SPLIT = REPO / "scripts" / "recipes" / "lumbar-mr-split-v2.json"  # patient-grouped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a registry ref or a package folder")
    p.add_argument("--registry", default=str(REPO / "Resources" / "Models"))
    p.add_argument("--which", choices=("val", "test"), default="val", help="split of scripts/recipes/lumbar-mr-split-v2.json")
    p.add_argument("--cases", default="", help="comma-separated case ids instead of a split")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--spacings", default="", help="comma-separated in-plane spacings in mm (default: the model's)")
    p.add_argument("--logit-offsets", default="0", metavar="X[,Y...]",
                   help="added to the vertebral-body logit of the model's main head (default 0: as shipped)")
    p.add_argument("--slice-smoothing", type=smoothing_mm_arg, default=None, metavar="MM",
                   help="the engine's across-slice smoothing (default: the engine's own)")
    a = p.parse_args(argv)
    pkg = resolve_model(a.model, [Registry(a.registry)])
    base = LoadedModel.from_package(pkg)
    ids = [c.strip() for c in a.cases.split(",") if c.strip()] or json.loads(SPLIT.read_text())[a.which]
    cases = ev.prepare_cases(select_cases(a.data, ids), base.schema)
    spacings = [float(s) for s in a.spacings.split(",") if s.strip()] or [base.spacing[0]]
    offsets = [float(x) for x in a.logit_offsets.split(",") if x.strip()] or [0.0]
    vb = base.schema.channel_of()["vertebral_body"]
    options = ev.eval_options(slice_smoothing_mm=a.slice_smoothing)
    for sp, x in [(sp, x) for sp in spacings for x in offsets]:
        model = dataclasses.replace(LoadedModel.from_package(pkg), spacing=(sp, sp))
        with torch.no_grad():
            model.module.head.bias[vb] += x  # the main head: the deep-supervision heads are not used to predict
        pooled: dict[tuple[int, str, str], list[int]] = {}
        shift = f", vertebral-body logit {x:+g}" if x else ""
        print(f"\n{pkg.ref} at {sp:g} mm{shift}\n\n| case | structure | level-range Dice | predicted / true |\n"
              "|---|---|--:|--:|")
        for c in cases:
            pred = base.schema.values_to_channels(ev.predict([model], c.image, options))
            for ch, cid in enumerate(base.schema.ids):
                if ch == 0 or not bool(c.annotated[ch]):
                    continue
                i, q, t = ev.level_range_counts(pred, c.truth, c.image, ch)
                if t:
                    print(f"| {c.case_id} | {cid} | {2 * i / (q + t):.3f} | {q / t:.3f} |", flush=True)
                    for key in ((0, c.source, cid), (1, "all", cid)):  # per source, then pooled
                        pooled[key] = [s + v for s, v in zip(pooled.get(key, (0, 0, 0)), (i, q, t))]
        for (_, src, cid), (i, q, t) in sorted(pooled.items()):
            print(f"| **{src}** | {cid} | {2 * i / (q + t):.3f} | {q / t:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
