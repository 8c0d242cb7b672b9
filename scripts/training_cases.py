"""The training cases of every source in ../shared/data, as one comma-separated line (for the training scripts).

    python scripts/training_cases.py SHARED LUMBAR_MR_SPLIT [EXTRA_CASES]

lumbar-mr: every case but the test and validation cases of LUMBAR_MR_SPLIT (a file in scripts/recipes);
spider-t2space and t1-levels: the training cases of scripts/recipes/new-sources-split.json; then
EXTRA_CASES (comma-separated, e.g. validation cases the run holds out itself with --val-cases).
"""
import json
import sys
from pathlib import Path

root, split = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
RECIPES = Path(__file__).resolve().parent / "recipes"
new = json.loads((RECIPES / "new-sources-split.json").read_text())["sources"]
held = set(split["test"]) | set(split["val"])
cases = [p.stem for p in sorted((root / "lumbar-mr").glob("*.json")) if p.stem not in held]
cases += new["spider-t2space"]["train"] + new["t1-levels"]["train"]
cases += [c for c in (sys.argv[3] if len(sys.argv) > 3 else "").split(",") if c]
print(",".join(cases))
