"""Draw the fixed train / validation / test split of the spider-t2space and t1-levels sources, by patient.

    python scripts/make_source_split.py ../shared/data > scripts/recipes/new-sources-split.json

Each source is split on its own (a seeded shuffle of its patients, then the first ``test`` patients are
the untouched test set, the next ``val`` validate, the rest train), so the numbers per source are
fixed; lumbar-mr keeps its own split (scripts/recipes/lumbar-mr-split.json).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SOURCES = {"spider-t2space": {"test": 7, "val": 4}, "t1-levels": {"test": 50, "val": 20}}
SEED = 26


def split_source(folder: Path, n_test: int, n_val: int, seed: int) -> dict:
    patients: dict[str, list[str]] = {}
    for p in sorted(folder.glob("*.json")):
        d = json.loads(p.read_text())
        patients.setdefault(str(d.get("patient") or d["case"]), []).append(str(d["case"]))
    order = sorted(patients)
    random.Random(f"{seed}:{folder.name}").shuffle(order)
    take = lambda ps: sorted(c for p in ps for c in patients[p])  # noqa: E731
    return {"test": take(order[:n_test]), "val": take(order[n_test:n_test + n_val]),
            "train": take(order[n_test + n_val:])}


def main(root: str) -> int:
    out = {"about": "Fixed split by patient of the spider-t2space and t1-levels sources of ../shared/data (every "
                    "case its own patient), drawn by scripts/make_source_split.py (seeded). 'test' stays untouched "
                    "until the final report; 'val' chooses checkpoints; 'train' trains. lumbar-mr keeps "
                    "scripts/recipes/lumbar-mr-split.json.",
           "seed": SEED, "sources": {}}
    for name, n in SOURCES.items():
        out["sources"][name] = split_source(Path(root) / name, n["test"], n["val"], SEED)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
