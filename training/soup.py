"""Average the weights of several fine-tunes of one model into one package (a "model soup").

Why: an ensemble of models is usually better than any one of them, but it costs one forward pass
per member, and the default model has to segment a clinical stack within the speed budget. Fine-tunes
that start from the same weights stay close enough to each other that their *weights* can be
averaged: the result runs at the price of one model. This works only for fine-tunes of one parent
(or a parent and its own fine-tunes); two models trained from different starting points have
unrelated weights, and their average is noise. So the parents are checked, and anything else is
refused with the advice to use an ensemble instead.

The soup is a package like any other. Its provenance lists the ingredients (ref, weights sha256,
weight), and its training cases are the union of theirs, so the publish gate and the validation
report never score it on a patient that any ingredient trained on.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from LumbarSegmentLib.registry.packages import ModelPackage, PackageError, write_package
from .data import entries_sha256


def _family(pkg: ModelPackage) -> set[str]:
    """The weights a package is, or started from: its own sha256 and its parent's."""
    parent = (pkg.parent or {}).get("sha256")
    return {pkg.sha256} | ({parent} if parent else set())


def _same(pkgs: Sequence[ModelPackage], what: str, get) -> None:
    first = get(pkgs[0])
    for p in pkgs[1:]:
        if get(p) != first:
            raise PackageError(f"cannot average {pkgs[0].path} and {p.path}: their {what} differ; only "
                               f"fine-tunes of one model can be averaged")


def _union_manifest(pkgs: Sequence[ModelPackage]) -> tuple[list[dict], list[str]]:
    """Every ingredient's data manifest entries (one per case) and training cases, merged; a case id
    recorded with different file hashes by two ingredients is refused (two data sets under one name)."""
    entries: dict[str, dict] = {}
    trained: set[str] = set()
    for p in pkgs:
        tr = p.manifest.get("training", {})
        trained |= set(tr.get("train_cases") or [])
        for e in tr.get("data_manifest") or []:
            if not isinstance(e, dict) or "case" not in e:
                continue
            old = entries.setdefault(e["case"], e)
            if (old.get("image_sha256"), old.get("label_sha256")) != (e.get("image_sha256"), e.get("label_sha256")):
                raise PackageError(f"cannot average: case {e['case']} was trained with different files by "
                                   f"two ingredients ({p.path}); they did not learn from the same data")
    return [entries[k] for k in sorted(entries)], sorted(trained)


def soup(packages: Sequence[ModelPackage], out: str | Path, *, name: str, weights: Sequence[float] | None = None,
         command: str | None = None, half: bool = True) -> ModelPackage:
    """Write the weighted average of ``packages`` (fine-tunes of one parent) as a new package in ``out``.

    ``weights`` default to equal shares and are normalised to sum to one. Batch-norm running
    statistics are averaged like the other tensors; integer counters are taken from the first
    ingredient.
    """
    pkgs = list(packages)
    if len(pkgs) < 2:
        raise PackageError("a soup needs at least two packages")
    weights = [1.0] * len(pkgs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(pkgs):
        raise PackageError(f"{len(weights)} weights for {len(pkgs)} packages; give one weight per package")
    if any(not (0 < w < math.inf) for w in weights):  # also refuses nan
        raise PackageError(f"weights must be positive finite numbers, got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]
    _same(pkgs, "architectures", lambda p: p.manifest["architecture"])
    _same(pkgs, "classes", lambda p: [c.id for c in p.schema.classes])
    _same(pkgs, "input contracts", lambda p: p.input)
    common = set.intersection(*(_family(p) for p in pkgs))
    if not common:
        raise PackageError("cannot average: " + ", ".join(f"{p.ref} started from "
                           f"{((p.parent or {}).get('ref')) or 'scratch'}" for p in pkgs)
                           + ". Only fine-tunes of one parent (or a parent and its fine-tunes) can be averaged; "
                           "combine unrelated models as an ensemble instead")
    models = [p.load_model() for p in pkgs]  # checksums verified, weights fit the (shared) architecture
    states = [m.state_dict() for m in models]
    model = models[0]
    model.load_state_dict({key: sum(s[key] * w for s, w in zip(states, weights)) if first.is_floating_point()
                           else first for key, first in states[0].items()})
    data, trained = _union_manifest(pkgs)
    # the shared weights: an ingredient's parent rather than an ingredient itself (a package given twice
    # must not become its own parent)
    parents = {(p.parent or {}).get("sha256") for p in pkgs}
    anchor = min(common, key=lambda sha: (sha not in parents, sha))
    parent_pkg = next((p for p in pkgs if p.sha256 == anchor), None)
    parent = ({"ref": parent_pkg.ref, "sha256": anchor} if parent_pkg is not None else
              next(dict(p.parent) for p in pkgs if (p.parent or {}).get("sha256") == anchor))
    val_cases = sorted(set.intersection(*(set(p.manifest.get("training", {}).get("val_cases") or []) for p in pkgs))
                       - set(trained))
    training = {
        "variant": pkgs[0].manifest["architecture"].get("variant"),
        "soup": [{"ref": p.ref, "sha256": p.sha256, "weight": round(w, 6)}
                 for p, w in zip(pkgs, weights)],
        "train_cases": trained, "val_cases": val_cases,
        "data_manifest": data, "data_manifest_sha256": entries_sha256(data),
        **({"command": command} if command else {}),
    }
    return write_package(out, model, name=name, schema=pkgs[0].schema, input_contract=pkgs[0].input,
                         training=training, half=half, parent=parent)
