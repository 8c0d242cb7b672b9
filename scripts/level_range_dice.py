#!/usr/bin/env python
"""How much of the error is "which levels the data set labels"? Dice inside the labelled range.

The public data sets label different spine levels: VB3 only L1-L5, VB2 T11-L5, VB1 nine
bodies (including the sacrum's S1 on some), IVD only the five lumbar discs. A model
that (correctly) finds T12 in a VB3 image or the T12/L1 disc in an IVD image is scored
as wrong there. This script reports, per case, the Dice of the case's annotated class
over the whole image and restricted to the superior-inferior rows the label map covers
(+-2 mm), and the share of predicted voxels outside those rows.

    python scripts/level_range_dice.py --registry Resources/Models --model uvd-starter \\
        --cases IVD_25,VB1_08,VB2_05,VB3_04,VB2_06
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.packages import Registry, resolve_model  # noqa: E402
from LumbarSegmentLib.training.data import load_dataset, select_cases  # noqa: E402
from LumbarSegmentLib.training.inference import predict_labels  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--registry", default=str(REPO / "Resources" / "Models"))
    p.add_argument("--model", default="uvd-starter")
    p.add_argument("--cases", default="IVD_25,VB1_08,VB2_05,VB3_04,VB2_06")
    p.add_argument("--margin", type=int, default=2, help="rows (model-plane pixels) added above and below")
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    pkg = resolve_model(a.model, [Registry(a.registry, read_only=True)])
    model = pkg.load_model()
    schema = pkg.schema
    print(f"{pkg.ref}: Dice of each case's annotated class(es)\n")
    print("| case | class | Dice (whole image) | Dice (labelled S-I range) | predicted outside the range |")
    print("|---|---|--:|--:|--:|")
    for c in load_dataset(select_cases(a.data, a.cases.split(",")), schema, pkg.spacing):
        pred = predict_labels(model, c.image).long()
        y = c.label.long()
        for ch, cls in enumerate(schema.classes):
            if ch == 0 or not bool(c.annotated[ch]):
                continue
            t, q = y == ch, pred == ch
            if not bool(t.any()):
                continue
            rows = t.any(0).any(1).nonzero().flatten()
            band = torch.zeros_like(t)
            band[:, max(0, int(rows.min()) - a.margin):int(rows.max()) + a.margin + 1] = True
            whole = 2 * (t & q).sum().item() / max(1, (t.sum() + q.sum()).item())
            inside = 2 * (t & q & band).sum().item() / max(1, ((t & band).sum() + (q & band).sum()).item())
            outside = (q & ~band).sum().item() / max(1, q.sum().item())
            print(f"| {c.case_id} | {cls.name} | {whole:.4f} | {inside:.4f} | {outside:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
