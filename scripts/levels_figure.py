#!/usr/bin/env python
"""The picture of the measurement method in docs/levels.md (docs/img/levels_method.png).

Segments one real T1 mid-sagittal slice with the default model, names its levels and measures
them (the same calls as ``lumbarseg segment --levels --measurements``), then draws: left, the
whole slice with every level's height lines; right, one body and the disc below it enlarged, with
the depth line and the 10 / 50 / 90 % height lines labelled.

    python scripts/levels_figure.py --image ../shared/data/t1-levels/T1L_0051_image.mha --out docs/img/levels_method.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume  # noqa: E402
from LumbarSegmentLib.core.geometry import sagittal_layout  # noqa: E402
from LumbarSegmentLib.formats.io import read_volume  # noqa: E402
from LumbarSegmentLib.spine.level_names import level_color  # noqa: E402
from LumbarSegmentLib.spine.levels import name_levels  # noqa: E402
from LumbarSegmentLib.spine.measurements import measure_levels  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402


def _draw_lines(ax, rows, sr, sc, names=None, labels=False):
    for r in rows:
        if names and r["level"] not in names:
            continue
        colour = "yellow" if r["structure"] == "vertebral_body" else "cyan"
        for ln, what in zip(r["lines"], ("anterior", "middle", "posterior")):
            (r0, c0), (r1, c1) = ln.start, ln.end
            ax.plot([c0 * sc, c1 * sc], [r0 * sr, r1 * sr], color=colour, lw=1.5)
            if labels:
                ax.text(c1 * sc, r1 * sr + (3 if r["structure"] == "vertebral_body" else 6),
                        f"{r['level']} {what}\n{ln.length_mm:.1f} mm", color=colour, fontsize=7, ha="center",
                        va="top")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--level", default="L3", help="the body shown enlarged (with the disc below it)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = read_volume(args.image)
    result = segment_volume(image, [resolve_model(None)], SegmentOptions(device="cpu", mode="fast"))
    named = name_levels(result.labels, result.schema, image=image)
    rows = measure_levels(named.labels, with_lines=True)
    layout = sagittal_layout(image)
    img = layout.to_canonical(np.asarray(image.array, np.float32))
    lab = layout.to_canonical(np.asarray(named.labels.array))
    s = int(np.argmax((lab != 0).reshape(lab.shape[0], -1).sum(1)))
    sr, sc = layout.inplane_spacing
    extent = (0, lab.shape[2] * sc, lab.shape[1] * sr, 0)
    rgb = np.repeat((img[s] / max(np.percentile(img[s], 99), 1e-6)).clip(0, 1)[..., None], 3, axis=2)
    for r in rows:
        m = lab[s] == r["label"]
        rgb[m] = 0.6 * rgb[m] + 0.4 * np.array(level_color(r["level"])) / 255.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 6.2))
    for ax in (a1, a2):
        ax.imshow(rgb, extent=extent)
        ax.axis("off")
    _draw_lines(a1, rows, sr, sc)
    for r in rows:
        if r["lines"]:
            (r0, c0) = r["lines"][0].start
            a1.text(c0 * sc - 4, r0 * sr + 4, r["level"], color="white", fontsize=7, ha="right")
    a1.set_title("every level: heights on its own mid-sagittal slice", fontsize=10)
    body = next(r for r in rows if r["level"] == args.level)
    disc = next((r for r in rows if r["level"].startswith(args.level + "-")), None)
    show = {body["level"]} | ({disc["level"]} if disc else set())
    _draw_lines(a2, rows, sr, sc, show, labels=True)
    pts = np.array([p for r in rows if r["level"] in show for ln in r["lines"] for p in (ln.start, ln.end)])
    rmin, cmin = pts.min(0)
    rmax, cmax = pts.max(0)
    a2.set_xlim(cmin * sc - 22, cmax * sc + 22)
    a2.set_ylim(rmax * sr + 14, rmin * sr - 8)
    a2.set_title(f"{args.level} and the disc below: anterior / middle / posterior height\n"
                 "at 10 / 50 / 90 % of the depth, along the structure's own axes", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
