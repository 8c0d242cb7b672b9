"""Blend a fine-tune's weights with its parent's (WiSE-FT, Wortsman et al., CVPR 2022).

Why: a fine-tune gains a lot where its data is new and loses some of what the parent knew; both sets
of weights start from the same point, so the straight line between them stays in one basin, and a
point on it keeps most of the gain and most of what the parent knew (docs/lab/forgetting.md and
docs/lab/spine6-sources.md measure it). ``alpha`` is the share of the fine-tune's change that is kept:
``parent + alpha x (fine-tune - parent)``; 1 is the fine-tune, 0 the parent.

Class-score rows are matched by class id: a class both models have is blended, a class only the
fine-tune has keeps the fine-tune's row (the parent has nothing to pull it towards). BatchNorm running
statistics are blended like weights; integer counters are the fine-tune's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.models.variants import replace_heads
from LumbarSegmentLib.registry.package import ModelPackage, PackageInfo, write_package


def blend_state(child: dict, parent: dict, class_ids: tuple, alpha: float, heads: set = frozenset()) -> dict:
    """The blended state dict (module doc). ``class_ids`` = (the child's, the parent's) class ids in channel
    order; ``heads`` the keys of the class-score layers, whose rows are matched by class id."""
    cch = {c: i for i, c in enumerate(class_ids[0])}
    pch = {c: i for i, c in enumerate(class_ids[1])}
    out = {}
    for k, v in child.items():
        p = parent.get(k)
        if p is None or not v.is_floating_point():
            out[k] = v
        elif k in heads:
            w = v.clone()  # rows by class id; a class the parent lacks keeps the fine-tune's row
            for c, i in cch.items():
                if c in pch:
                    w[i] = alpha * v[i] + (1 - alpha) * p[pch[c]].to(v.dtype)
            out[k] = w
        elif v.shape == p.shape:
            out[k] = alpha * v + (1 - alpha) * p.to(v.dtype)
        else:
            raise ValueError(f"{k}: the fine-tune's tensor {tuple(v.shape)} does not match the parent's "
                             f"{tuple(p.shape)}; only a fine-tune can be blended with its own parent")
    return out


def _keep_classes(model, ids: list, schema: LabelSchema):
    """Cut the class-score layers of ``model`` (classes ``ids``) down to ``schema``'s classes."""
    missing = [c for c in schema.ids if c not in ids]
    if missing:
        raise ValueError(f"the fine-tune has no classes {missing}")
    keep = [ids.index(c) for c in schema.ids]
    old = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
           for n, m in model.head_modules().items()}
    replace_heads(model, schema.num_classes)
    for n, m in model.head_modules().items():
        w, b = old[n]
        m.weight.data.copy_(w[keep])
        if b is not None:
            m.bias.data.copy_(b[keep])


def blend(child: ModelPackage, parent: ModelPackage, alpha: float, schema: LabelSchema | None = None,
          start: dict | None = None):
    """``(model, schema)``: the child's network with blended weights, in ``schema`` (default the child's).

    ``start``: the state the fine-tune began from, when it is not the parent's package as it stands (a
    fine-tune that widened the parent's input to neighbour slices, or replaced its class-score layers):
    the line then runs from that start, in the child's own classes."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha is the share of the fine-tune kept, from 0 to 1; got {alpha}")
    cm = child.load_model("cpu")
    base, ids = (start, child.schema.ids) if start is not None else (parent.load_model("cpu").state_dict(),
                                                                     parent.schema.ids)
    heads = {f"{n}.{t}" for n in cm.head_modules() for t in ("weight", "bias")}
    cm.load_state_dict(blend_state(cm.state_dict(), base, (child.schema.ids, ids), alpha, heads))
    schema = schema or child.schema
    if schema.ids != child.schema.ids:
        _keep_classes(cm, list(child.schema.ids), schema)
    return cm.eval(), schema


def write_blend(child: ModelPackage, parent: ModelPackage, alpha: float, out: str | Path, *,
                schema: LabelSchema | None = None, name: str | None = None, start: dict | None = None) -> ModelPackage:
    """Write the blend as a package in ``out`` (replaced): the child's training record, plus what was
    blended with what (``training.interpolated``); its parent is the child's parent. ``start``: see :func:`blend`."""
    model, schema = blend(child, parent, alpha, schema, start)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    training = {**child.manifest.get("training", {}),
                "interpolated": {"child": child.ref, "child_sha256": child.sha256, "parent": parent.ref,
                                 "parent_sha256": parent.sha256, "alpha": alpha}}
    training.setdefault("init_from", {"package": parent.ref, "weights_sha256": parent.sha256})
    return write_package(out, model, PackageInfo(name=name or child.name, schema=schema,
                                                 input_contract=child.manifest["input"], training=training,
                                                 parent=child.parent or {"ref": parent.ref, "sha256": parent.sha256}))
