"""How much of a draft's error could moving structure borders fix? An upper bound for click rules.

For each case: the default model's draft (through the engine), then level-range Dice (as the click
protocol counts it) of the draft, of every drafted piece of the case's structure eroded or dilated
in-plane by one voxel, and of the best in-plane offset (-2..+2 voxels) for each piece chosen with the
truth (an oracle no click rule can beat by moving borders alone). Also the slices the truth has and the
draft lacks, and the other way round.

    python scripts/border_oracle.py --split val
    python scripts/border_oracle.py --cases VB3_35,VB1_10 --slab 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LumbarSegmentLib.core.geometry import sagittal_layout  # noqa: E402
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402
from LumbarSegmentLib.training.clicks import level_mask  # noqa: E402
from LumbarSegmentLib.training.data import select_cases  # noqa: E402
from LumbarSegmentLib.training.evaluate import prepare_cases  # noqa: E402

OFFSETS = (-2, -1, 0, 1, 2)


def _dice(q: np.ndarray, t: np.ndarray) -> float:
    return 2.0 * float((q & t).sum()) / max(1, int(q.sum()) + int(t.sum()))


def _inplane(mask: np.ndarray, k: int) -> np.ndarray:
    """``mask [s, r, c]`` dilated (k > 0) or eroded (k < 0) by |k| voxels within each sagittal slice."""
    from scipy import ndimage

    if k == 0:
        return mask
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    op = ndimage.binary_dilation if k > 0 else ndimage.binary_erosion
    return op(mask, st, iterations=abs(k))


def case_bounds(q: np.ndarray, t: np.ndarray, rows: np.ndarray) -> dict:
    """Dice of the draft ``q``, of every piece moved by -1 / +1, and of the best offset per piece."""
    from scipy import ndimage

    t = t & rows
    out = {"draft": _dice(q & rows, t), "all -1": _dice(_inplane(q, -1) & rows, t),
           "all +1": _dice(_inplane(q, 1) & rows, t)}
    pieces, n = ndimage.label(q)
    best = q.copy()
    for i in range(1, n + 1):
        piece = pieces == i
        if piece.sum() < 200:
            continue
        trials = {k: (best & ~piece) | _inplane(piece, k) for k in OFFSETS}
        k = max(trials, key=lambda k: _dice(trials[k] & rows, t))
        best = trials[k]
    out["oracle"] = _dice(best & rows, t)
    has_t, has_q = t.any(axis=(1, 2)), (q & rows).any(axis=(1, 2))
    out["slices missing"] = int((has_t & ~has_q).sum())
    out["slices extra"] = int((has_q & ~has_t).sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--cases", default=None, help="comma-separated case ids (default: the split's cases)")
    p.add_argument("--slab", type=float, default=None, help="make clinical stacks of this slab (mm), e.g. 4")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    split = json.loads((ROOT / "scripts" / "recipes" / "lumbar-mr-split-v2.json").read_text())
    ids = a.cases.split(",") if a.cases else split[a.split]
    pkg = resolve_model(None)
    options = SegmentOptions(device="cpu", threads=a.threads)
    print(f"model {pkg.ref}; level-range Dice; pieces moved in-plane\n")
    print("| case | draft | every piece -1 | every piece +1 | best offset per piece (oracle) | slices missing | "
          "slices extra |\n|---|--:|--:|--:|--:|--:|--:|")
    gains = []
    for case in select_cases(a.data, ids):
        (ec,) = prepare_cases([case], pkg.schema, slab_mm=a.slab)
        draft = segment_volume(ec.image, [pkg], options).labels.array
        structure = next(s for s in ec.structures if s != "background")
        layout = sagittal_layout(ec.image)
        t = layout.to_canonical(ec.truth == pkg.schema.channel_of()[structure])
        q = layout.to_canonical(draft == pkg.schema[structure].value)
        b = case_bounds(q, t, level_mask(t, layout.spacing_src[1]))
        gains.append(b["oracle"] - b["draft"])
        print(f"| {case.case_id} | {b['draft']:.3f} | {b['all -1']:.3f} | {b['all +1']:.3f} | {b['oracle']:.3f} | "
              f"{b['slices missing']} | {b['slices extra']} |", flush=True)
    print(f"\nmean gain of the oracle: {np.mean(gains):+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
