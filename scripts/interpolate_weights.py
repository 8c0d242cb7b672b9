"""Interpolate a fine-tune's weights with its parent's (WiSE-FT, Wortsman et al., CVPR 2022), across a
grown label schema, and write the result as a model package in the schema you choose.

Why: a fine-tune on new sources (the spine6 run on SPIDER and the T1 slices) gains a lot where it is new
and loses a little on the sources the parent knew best; the straight line between the two sets of weights
keeps most of the gain and most of what the parent knew (both start from the same weights, so the line
stays in one basin). Class-score rows are matched by class id: a class both models have is interpolated,
a class only the fine-tune has keeps the fine-tune's row.

    python scripts/interpolate_weights.py runs/spine6/package uvd-starter@5 0.5 OUT [--schema starter]

``--schema starter`` keeps only the parent's classes (the rows of the new classes are dropped): a model of
the parent's schema that has learned from the new sources.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402
from LumbarSegmentLib.training.wise import write_blend  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("child", help="the fine-tune (package folder or ref)")
    ap.add_argument("parent", help="the model it was fine-tuned from (package folder or ref)")
    ap.add_argument("alpha", type=float, help="share of the fine-tune (0: the parent, 1: the fine-tune)")
    ap.add_argument("out", help="new folder for the package")
    ap.add_argument("--schema", help="label schema of the result (default: the fine-tune's), e.g. starter")
    ap.add_argument("--name", help="package name (default: the fine-tune's)")
    a = ap.parse_args(argv)
    if not 0 <= a.alpha <= 1:
        raise SystemExit("alpha is a share from 0 to 1")
    child, parent = resolve_model(a.child), resolve_model(a.parent)
    write_blend(child, parent, a.alpha, a.out, schema=load_schema(a.schema) if a.schema else None, name=a.name)
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
