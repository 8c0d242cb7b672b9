#!/usr/bin/env python
"""A picture of what each ``--intensity-aug`` mode does to one real training patch.

Rows are the modes (off, strong, domain, remap, tissue, gin), columns independent draws; geometry is held
still so only the intensities differ. The patch comes through the trainer's own path
(``training.data`` slices, ``augment.augment_batch``), so the picture is what a model sees.

    python scripts/augment_gallery.py --data ../shared/data/lumbar-mr --case VB2_02 \\
        --out docs/img/augment/intensity_modes.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/lumbar-mr")
    ap.add_argument("--case", default="VB2_02")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--patch", type=int, default=192)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default="docs/img/augment/intensity_modes.png")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from LumbarSegmentLib.core.schema import load_schema
    from LumbarSegmentLib.training import augment as aug
    from LumbarSegmentLib.training.data import _crop, load_case_slices, select_cases  # the sampler's own crop

    cases = [c for c in select_cases(a.data) if c.case_id == a.case]
    if not cases:
        print(f"error: no case {a.case!r} in {a.data}", file=sys.stderr)
        return 2
    cs = load_case_slices(cases[0], load_schema("starter"))
    mid = cs.fg_slices[len(cs.fg_slices) // 2]
    img, lab = cs.image[mid], cs.label[mid]
    crop = 2 * a.patch
    # the context crop the sampler would cut, centred on the labelled structure
    ys, xs = torch.nonzero(lab > 0, as_tuple=True)
    cy, cx = int(ys.float().mean()), int(xs.float().mean())
    ctx = _crop(img, cy, cx, crop, 0.0).expand(a.draws, 1, crop, crop).contiguous()
    # the label rides along: "tissue" recolours the structure the case annotates
    lab_ctx = _crop(lab.long(), cy, cx, crop, 0).expand(a.draws, crop, crop).contiguous()
    modes = ("off", "strong", "domain", "remap", "tissue", "gin")
    fig, axes = plt.subplots(len(modes), a.draws, figsize=(2.2 * a.draws, 2.3 * len(modes)))
    for r, mode in enumerate(modes):
        cfg = aug.AugmentConfig(True, 0.0, (1.0, 1.0), 0.0, 0.0, mode, 0.0)
        x, _ = aug.augment_batch(ctx, lab_ctx, cfg, a.patch, torch.Generator().manual_seed(a.seed))
        for c in range(a.draws):
            ax = axes[r, c]
            ax.imshow(x[c, 0].numpy(), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(mode, fontsize=12)
    fig.suptitle(f"--intensity-aug modes on one {a.case} patch (columns: independent draws)")
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
