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
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.inference.runners import LoadedModel  # noqa: E402
from LumbarSegmentLib.models.variants import replace_heads  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402
from LumbarSegmentLib.registry.package import PackageInfo, write_package  # noqa: E402


def interpolate(child, parent, alpha: float, schema=None):
    """The child's network with ``alpha * child + (1 - alpha) * parent`` weights, heads by class id, in
    ``schema`` (default: the child's)."""
    cm, pm = LoadedModel.from_package(child).module, LoadedModel.from_package(parent).module
    cs, ps = cm.state_dict(), pm.state_dict()
    cch = {c: i for i, c in enumerate(child.schema.ids)}
    pch = {c: i for i, c in enumerate(parent.schema.ids)}
    mixed = {}
    for k, v in cs.items():
        p = ps[k]
        if not v.is_floating_point():
            mixed[k] = v
        elif v.shape == p.shape:
            mixed[k] = alpha * v + (1 - alpha) * p
        else:  # a class-score layer: rows by class id
            w = v.clone()
            for c, i in cch.items():
                if c in pch:
                    w[i] = alpha * v[i] + (1 - alpha) * p[pch[c]]
            mixed[k] = w
    cm.load_state_dict(mixed)
    schema = schema or child.schema
    if schema.ids != child.schema.ids:
        missing = [c for c in schema.ids if c not in cch]
        if missing:
            raise SystemExit(f"{child.ref} has no classes {missing}")
        keep = [cch[c] for c in schema.ids]
        heads = {n: m for n, m in cm.head_modules().items()}
        old = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for n, m in heads.items()}
        replace_heads(cm, schema.num_classes)
        for n, m in cm.head_modules().items():
            w, b = old[n]
            m.weight.data.copy_(w[keep])
            if b is not None:
                m.bias.data.copy_(b[keep])
    return cm.eval(), schema


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
    model, schema = interpolate(child, parent, a.alpha, load_schema(a.schema) if a.schema else None)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    training = {**child.manifest.get("training", {}),
                "interpolated": {"child": child.ref, "child_sha256": child.sha256, "parent": parent.ref,
                                 "parent_sha256": parent.sha256, "alpha": a.alpha},
                "init_from": {"package": parent.ref, "weights_sha256": parent.sha256}}
    write_package(out, model, PackageInfo(name=a.name or child.name, schema=schema, input_contract=child.manifest["input"],
                                          training=training))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
