#!/usr/bin/env python
"""Two diagnostics behind the fifth round of docs/validation.md (the logit-offset sweep is
``scripts/volume_ratio.py --logit-offsets``):

* ``--per-level``: for cases whose label holds one id per vertebra (the VB sources), the recall of
  every labelled vertebra from top to bottom, so a level the model leaves out (S1 on the mixed
  source) shows as one low number in an otherwise high row (through the engine);
* ``--mask-quantisation``: how far a smooth reading of each manual mask (interpolated between the
  centres of runs of identical slices) is from the mask itself: an upper bound on what a smooth
  prediction loses to masks drawn on thicker slices and copied.

    python scripts/level_diagnostics.py --model uvd-starter@4 --cases VB1_10,VB1_11 --per-level
    python scripts/level_diagnostics.py --cases VB3_04,VB3_10,VB3_15 --mask-quantisation
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
from LumbarSegmentLib.inference.slice_smoothing import smoothing_mm_arg  # noqa: E402
from LumbarSegmentLib.training.data import select_cases  # noqa: E402

SPLIT = REPO / "scripts" / "recipes" / "lumbar-mr-split-v2.json"


def level_recalls(instances: np.ndarray, predicted: np.ndarray) -> list[tuple[int, float]]:
    """``[(label id, recall)]`` of each labelled instance, top to bottom (arrays in canonical
    ``[s, r, c]`` order: rows run superior to inferior)."""
    ids = [int(v) for v in np.unique(instances) if v]
    rows = {v: float(np.nonzero((instances == v).any(axis=(0, 2)))[0].mean()) for v in ids}
    return [(v, float((predicted & (instances == v)).sum() / (instances == v).sum()))
            for v in sorted(ids, key=rows.get)]


def smooth_reading_dice(mask: np.ndarray) -> float:
    """Dice between a binary mask ``[s, ...]`` and its reading interpolated linearly between the
    centres of runs of identical slices (a mask drawn on thick slices and copied has long runs)."""
    runs, s = [], 0
    while s < mask.shape[0]:
        e = s
        while e + 1 < mask.shape[0] and np.array_equal(mask[e + 1], mask[s]):
            e += 1
        runs.append((s, e))
        s = e + 1
    centres = np.array([(a + b) / 2 for a, b in runs])
    planes = [mask[a].astype(np.float32) for a, _ in runs]
    smooth = np.empty(mask.shape, np.float32)
    for k in range(mask.shape[0]):
        j = int(np.searchsorted(centres, k))
        if j == 0 or j == len(centres):
            smooth[k] = planes[min(j, len(planes) - 1)]
        else:
            w = (k - centres[j - 1]) / (centres[j] - centres[j - 1])
            smooth[k] = (1 - w) * planes[j - 1] + w * planes[j]
    q, t = smooth >= 0.5, mask.astype(bool)
    return float(2 * (q & t).sum() / max(1, q.sum() + t.sum()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a registry ref or a package folder (for --per-level)")
    p.add_argument("--registry", default=str(REPO / "Resources" / "Models"))
    p.add_argument("--which", choices=("val", "test"), help="cases of scripts/recipes/lumbar-mr-split-v2.json")
    p.add_argument("--cases", default="", help="comma-separated case ids instead of a split")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--slice-smoothing", type=smoothing_mm_arg, default=None, metavar="MM",
                   help="the engine's across-slice smoothing (default: the engine's own)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--per-level", action="store_true")
    g.add_argument("--mask-quantisation", action="store_true")
    a = p.parse_args(argv)
    ids = [c.strip() for c in a.cases.split(",") if c.strip()] or (
        json.loads(SPLIT.read_text())[a.which] if a.which else [])
    if not ids:
        p.error("name the cases (--cases or --which)")
    cases = select_cases(a.data, ids)
    if a.mask_quantisation:
        for c in cases:
            image, label = c.load()
            print(f"{c.case_id}: Dice(smooth reading, mask) "
                  f"{smooth_reading_dice(sagittal_layout(image).to_canonical(label.array) > 0):.3f}")
        return 0
    if not a.model:
        p.error("--per-level needs --model")
    from LumbarSegmentLib.inference.engine import LoadedModel
    from LumbarSegmentLib.registry.packages import Registry, resolve_model
    from LumbarSegmentLib.training import evaluate as ev

    model = LoadedModel.from_package(resolve_model(a.model, [Registry(a.registry, read_only=True)]))
    vb = model.schema.channel_of()["vertebral_body"]
    options = ev.eval_options(slice_smoothing_mm=a.slice_smoothing)
    for c in cases:
        image, label = c.load()
        layout = sagittal_layout(image)
        pred = model.schema.values_to_channels(ev.predict([model], image, options))
        rec = level_recalls(layout.to_canonical(label.array), layout.to_canonical(pred == vb))
        print(f"{c.case_id}: recall per labelled vertebra, top to bottom: " + " ".join(f"{r:.2f}" for _, r in rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
