#!/usr/bin/env python
"""Build the publish gate's reference set (Resources/Reference) or the fine-tune's replay set (Resources/Replay).

Two cases per source the shipped models were validated on (the water-fat, T2w TSE and mixed
sources from the validation split of scripts/recipes/lumbar-mr-split-v2.json; the disc source has
no validation case, so two of its training cases), five sagittal slices around the midline of
each, cropped to the labelled levels + 40 mm. VB1's lowest instance (the S1 segment) is labelled
sacrum. Rerun to rebuild; the folder is replaced.

The replay set (``--replay``, training.replay) holds training cases of the shipped models only, never a
validation, test or reference case: two per lumbar-mr source (five midline slices; the disc source has
only two training cases, both in the reference set, so its replay slabs lie beside the reference ones),
two SPIDER cases (discs only, so that a schema without SPIDER's whole-vertebra label can replay them)
and four t1-levels slices (S1 cropped, as for the three-class schema).

    python scripts/build_reference_set.py [--shared ../shared/data] [--out Resources/Reference]
    python scripts/build_reference_set.py --replay [--out Resources/Replay]
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
             "IVD": ["IVD_11", "IVD_20"], "SP": ["SP_110", "SP_177"],
             "T1L": ["T1L_0004", "T1L_0026", "T1L_0030", "T1L_0043"]}
#: source -> training cases of the shipped models replayed by a fine-tune (none in a test, validation or
#: reference list, none in the forgetting experiment's t1-levels lists)
REPLAY = {"VB1": ["VB1_07", "VB1_17"], "VB2": ["VB2_02", "VB2_04"], "VB3": ["VB3_01", "VB3_02"],
          "IVD": ["IVD_11", "IVD_20"], "SP": ["SP_127", "SP_129"],
          "T1L": ["T1L_0002", "T1L_0008", "T1L_0010", "T1L_0014"]}
#: the disc cases' replay slabs sit this many slices lateral of their reference slabs
IVD_REPLAY_OFFSET = 7


def _slab_case(source, cid, shared, tmp, built, replay: bool):
    """One case of either set, written into ``built``. SPIDER (discs only) and t1-levels (S1 cropped) are
    adapted alike in both sets; a VB1 reference case has its lowest instance relabelled sacrum, while a
    replayed VB1 case stays as published (training reads its lowest instance as S1 itself)."""
    from LumbarSegmentLib.dataset.cases import read_case
    from LumbarSegmentLib.training.reference import write_reference_case
    from LumbarSegmentLib.training.sources import spider_discs_case, t1_levels_case, vb1_sacrum_case

    if source == "SP":
        case = spider_discs_case(shared / "spider-t2space" / f"{cid}.json", tmp / "adapted")
    elif source == "T1L":
        case = t1_levels_case(shared / "t1-levels" / f"{cid}.json", tmp / "adapted")
    elif source == "VB1" and not replay:
        case = vb1_sacrum_case(shared / "lumbar-mr" / f"{cid}.json", tmp / "adapted")
    else:
        case = read_case(shared / "lumbar-mr" / f"{cid}.json")
    offset = IVD_REPLAY_OFFSET if replay and source == "IVD" else 0
    return write_reference_case(case, built, source, offset=offset)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", help="default Resources/Reference, or Resources/Replay with --replay")
    p.add_argument("--replay", action="store_true", help="build the fine-tune's replay set instead")
    a = p.parse_args(argv)
    a.out = a.out or str(ROOT / "Resources" / ("Replay" if a.replay else "Reference"))
    shared, out = Path(a.shared), Path(a.out)
    if not (shared / "lumbar-mr").is_dir():
        print(f"build_reference_set: {shared / 'lumbar-mr'} does not exist", file=sys.stderr)
        return 2
    keep = (out / "PROVENANCE.md").read_text() if (out / "PROVENANCE.md").exists() else None
    tmp = Path(tempfile.mkdtemp(prefix="reference-"))
    try:
        built = tmp / "set"
        for source, ids in (REPLAY if a.replay else REFERENCE).items():
            for cid in ids:
                ref = _slab_case(source, cid, shared, tmp, built, a.replay)
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
