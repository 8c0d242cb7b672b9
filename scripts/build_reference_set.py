#!/usr/bin/env python
"""Build the publish gate's reference set (Resources/Reference) from the shared lumbar-mr cases.

Two cases per source the shipped models were validated on (the water-fat, T2w TSE and mixed
sources from the validation split of scripts/recipes/lumbar-mr-split-v2.json; the disc source has
no validation case, so two of its training cases), five sagittal slices around the midline of
each, cropped to the labelled levels + 40 mm. VB1's lowest instance (the S1 segment) is labelled
sacrum. Rerun to rebuild; the folder is replaced.

    python scripts/build_reference_set.py [--shared ../shared/data] [--out Resources/Reference]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: source -> cases (validation split where the source has one)
REFERENCE = {"VB1": ["VB1_10", "VB1_15"], "VB2": ["VB2_05", "VB2_17"], "VB3": ["VB3_04", "VB3_15"],
             "IVD": ["IVD_11", "IVD_20"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "Resources" / "Reference"))
    a = p.parse_args(argv)
    from LumbarSegmentLib.dataset.cases import read_case
    from LumbarSegmentLib.training.reference import write_reference_case
    from LumbarSegmentLib.training.sources import vb1_sacrum_case

    shared, out = Path(a.shared) / "lumbar-mr", Path(a.out)
    if not shared.is_dir():
        print(f"build_reference_set: {shared} does not exist", file=sys.stderr)
        return 2
    keep = (out / "PROVENANCE.md").read_text() if (out / "PROVENANCE.md").exists() else None
    tmp = Path(tempfile.mkdtemp(prefix="reference-"))
    try:
        built = tmp / "set"
        for source, ids in REFERENCE.items():
            for cid in ids:
                case = vb1_sacrum_case(shared / f"{cid}.json", tmp / "adapted") if source == "VB1" \
                    else read_case(shared / f"{cid}.json")
                ref = write_reference_case(case, built, source)
                print(f"{cid}: {ref.image_path.stat().st_size + ref.label_path.stat().st_size} bytes")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(built, out)
        if keep is not None:
            (out / "PROVENANCE.md").write_text(keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
