#!/usr/bin/env python
"""List cases of a data folder that are probably one patient, as evidence for a patient map.

A split by patient only protects the test cases when the data set says which cases share a patient.
Public sets often do not: the same volume is exported twice under two ids, or two sequences of one
study become two cases. This prints two kinds of candidates:

* **identical**: the same image voxels (and spacing) under two ids: certainly one patient;
* **same study grid**: within a source whose cases come on several different grids, two cases on
  one grid that no other case of the source shares: typically two sequences of one study. Shown
  with the image correlation and the Dice of the two label maps (same anatomy in the same place
  gives a high label Dice); a person decides, and writes the groups into a patient map
  (``lumbarsegment.patients``, read by ``lumbarseg-train --patients``).

    python scripts/find_same_patient.py --data ../shared/data/lumbar-mr [--json candidates.json]
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.dataset.cases import list_cases  # noqa: E402
from LumbarSegmentLib.training.data import case_source  # noqa: E402

MAX_STUDY_GRID_CASES = 3  # a grid shared by more cases than this is the source's common grid, not a study's


def _fingerprint(case):
    image, label = case.load()
    a = np.ascontiguousarray(image.array)
    h = hashlib.sha256(a.tobytes() + repr((a.shape, str(a.dtype), tuple(image.spacing))).encode()).hexdigest()
    small = a[::2, ::2, ::2].astype(np.float64).ravel()
    return h, a.shape, small, np.asarray(label.array) > 0


def candidates(folder) -> list[dict]:
    cases = list_cases(folder)
    info = {c.case_id: (case_source(c), *_fingerprint(c)) for c in cases}
    found = []
    by_hash = defaultdict(list)
    for cid, (_, h, *_rest) in info.items():
        by_hash[h].append(cid)
    for ids in by_hash.values():
        if len(ids) > 1:
            found.append({"cases": sorted(ids), "kind": "identical", "evidence": "identical image voxels and spacing"})
    grids = defaultdict(list)
    for cid, (src, _, shape, *_rest) in info.items():
        grids[(src, shape)].append(cid)
    shapes_per_source = defaultdict(set)
    for src, shape in grids:
        shapes_per_source[src].add(shape)
    for (src, shape), ids in sorted(grids.items()):
        if len(shapes_per_source[src]) < 2 or not 1 < len(ids) <= MAX_STUDY_GRID_CASES:
            continue
        for a, b in itertools.combinations(sorted(ids), 2):
            if info[a][1] == info[b][1]:
                continue  # already listed as identical
            ia, ib = info[a][3], info[b][3]
            la, lb = info[a][4], info[b][4]
            corr = float(np.corrcoef(ia, ib)[0, 1]) if ia.std() and ib.std() else 0.0
            dice = float(2 * (la & lb).sum() / max(1, la.sum() + lb.sum()))
            found.append({"cases": [a, b], "kind": "same study grid",
                          "evidence": f"only these cases of {src} are on the {'x'.join(map(str, shape))} grid; "
                                      f"image correlation {corr:.2f}, label Dice {dice:.2f}",
                          "image_correlation": round(corr, 3), "label_dice": round(dice, 3)})
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--json", help="also write the candidates to this JSON file")
    a = p.parse_args(argv)
    found = candidates(a.data)
    for f in found:
        print(f"{' + '.join(f['cases'])}: {f['kind']} ({f['evidence']})")
    if not found:
        print("no candidates: every case looks like its own patient")
    if a.json:
        Path(a.json).write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
