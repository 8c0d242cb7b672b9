#!/usr/bin/env python
"""Height agreement (draft vs manual) under variants of the measurement method, on the tuning subset.

Compares the band each height is the median over (+-5, 10, 15 % of the depth) and how the
mid-sagittal slice is chosen (through the level's centre, or the slice of its largest outline),
by bias and 95 % limits of agreement per source. The reported numbers in
docs/levels.md use the chosen method on the held-out cases; this is how it was chosen.

    python scripts/levels_height_variants.py --drafts DRAFTS_FOLDER [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import levels_report as R  # noqa: E402  (adds the repository to sys.path)
from levels_tables import bland_altman  # noqa: E402

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.formats.io import read_volume  # noqa: E402
from LumbarSegmentLib.spine import measurements as M  # noqa: E402
from LumbarSegmentLib.spine.levels import name_levels  # noqa: E402


CENTRE_SLICE = M.mid_slice


def largest_slice(m: np.ndarray) -> int:
    """The slice of the largest outline (within 5 % of it: the one nearest the centre)."""
    per = m.reshape(m.shape[0], -1).sum(1)
    near = np.flatnonzero(per >= 0.95 * per.max())
    return int(near[np.argmin(np.abs(near - CENTRE_SLICE(m)))])


SLICES = {"centre": CENTRE_SLICE, "largest": largest_slice}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=R.REPO.parent / "shared" / "data")
    ap.add_argument("--drafts", type=Path, required=True, help="folder caching the drafts (made when missing)")
    args = ap.parse_args(argv)
    starter = load_schema("starter")
    pairs_in = []
    for source, case, folder in R.cases(args.data, "", "tune"):
        ref = R.reference(source, case, folder)
        image = read_volume(folder / f"{case}_image.mha")
        named = name_levels(R.draft(folder / f"{case}_image.mha", args.drafts, None), starter,
                            allow_reslice=True, image=image)
        scored = {"intervertebral_disc"} if source in ("IVD", "SP") else {"vertebral_body"}
        right = {x["level"] for x in R.score_case(ref, named, scored)["levels"] if x["right"]} - {"S1"}
        pairs_in.append((source, ref, named.labels, right))
    original = (M.BAND, M.mid_slice)
    try:
        for slice_name, chooser in SLICES.items():
            for band in (0.05, 0.10, 0.15):
                M.BAND, M.mid_slice = band, chooser
                _print_variant(f"slice {slice_name}, band +-{100 * band:.0f} %", pairs_in)
    finally:
        M.BAND, M.mid_slice = original
    return 0


def _print_variant(title: str, pairs_in) -> None:
    stats: dict = {}
    for source, ref, draft, right in pairs_in:
        m_ref = {r["level"]: r for r in M.measure_levels(ref)}
        m_draft = {r["level"]: r for r in M.measure_levels(draft)}
        for level in right & set(m_ref) & set(m_draft):
            for key in M.HEIGHTS:
                a, b = m_ref[level][key], m_draft[level][key]
                if a is not None and b is not None:
                    stats.setdefault((source, key), []).append((a, b))
    for (source, key), pairs in sorted(stats.items()):
        ba = bland_altman(pairs)
        print(f"| {title} | {source} | {key.replace('_mm', '').replace('_', ' ')} | {ba['n']} | {ba['bias']:+.2f} | "
              f"{ba['loa_low']:+.2f} .. {ba['loa_high']:+.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
