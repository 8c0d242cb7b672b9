#!/usr/bin/env python
"""Where does a spine6 model put the S1 segment? Mean class probabilities at the outlined S1 pixels.

A diagnosis for the sacrum class (docs/lab/spine6-sources.md): each named t1-levels slice goes through
the package's network at its own spacing (one slice, no engine post-processing, so what the network
itself says is seen), and the softmax is averaged over the pixels the manual label calls S1.

    python scripts/sacrum_probe.py PACKAGE [PACKAGE ...] [--cases T1L_0001,T1L_0004] [--shared ../shared/data]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def s1_probabilities(package, case) -> dict:
    """``{class id: mean probability}`` over the case's S1 pixels (the label's ``sacrum`` channel)."""
    import torch

    from LumbarSegmentLib.training.data import load_case_slices

    model = package.load_model("cpu").eval()
    s = load_case_slices(case, package.schema, package.spacing)
    h, w = (n // 32 * 32 for n in s.image.shape[1:])  # the network's strides
    x = s.image[0][None, None, :h, :w].repeat(1, model.in_channels, 1, 1)
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    p = torch.softmax(out.float(), 1)[0]
    s1 = s.label[0][:h, :w] == package.schema.channel_of()["sacrum"]
    return {cid: round(float(p[i][s1].mean()), 3) for i, cid in enumerate(package.schema.ids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("packages", nargs="+", help="package folders or refs of a schema with a sacrum class")
    ap.add_argument("--cases", default="T1L_0001,T1L_0004,T1L_0026")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    a = ap.parse_args(argv)
    from LumbarSegmentLib.dataset.cases import read_case
    from LumbarSegmentLib.registry.catalog import resolve_model

    folder = Path(a.shared) / "t1-levels"
    if not folder.is_dir():
        print(f"sacrum_probe: {folder} does not exist", file=sys.stderr)
        return 2
    for ref in a.packages:
        pkg = resolve_model(ref)
        if "sacrum" not in pkg.schema:
            print(f"sacrum_probe: {ref} has no sacrum class", file=sys.stderr)
            return 2
        for cid in a.cases.split(","):
            print(ref, cid, s1_probabilities(pkg, read_case(folder / f"{cid}.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
