"""Starting scores for classes a fine-tune adds: copied from a related class the parent knows.

A new class-score row starts as its relative's row with its bias lowered by ``offset`` (about
``log 10``: the new class starts ten times less likely than its relative everywhere), so the fine-tune
begins where the parent stands (its arg-max unchanged) and the new class starts from features that
already find similar tissue: the sacrum and the posterior elements are bone like the vertebral body.
Classes without a relative keep the fresh initialisation of ``models.replace_heads``.
"""
from __future__ import annotations

import torch

#: new class id -> the class id whose scores it starts from
RELATED = {"sacrum": "vertebral_body", "posterior_elements": "vertebral_body", "vertebrae": "vertebral_body"}
DEFAULT_OFFSET = 2.3


def init_from_related(model, source_ids, target_ids, offset: float = DEFAULT_OFFSET) -> dict:
    """Copy the relative's row into each new class's row of every head; returns ``{new: relative}``."""
    src, tgt = list(source_ids), list(target_ids)
    done = {}
    with torch.no_grad():
        for cid in tgt:
            rel = RELATED.get(cid)
            if cid in src or rel not in tgt or rel not in src:
                continue
            for m in model.head_modules().values():
                m.weight[tgt.index(cid)].copy_(m.weight[tgt.index(rel)])
                if m.bias is not None:
                    m.bias[tgt.index(cid)].copy_(m.bias[tgt.index(rel)] - offset)
            done[cid] = rel
    return done
