"""Train/validation splits by patient: a patient's cases are never on both sides."""
from __future__ import annotations

import random
from typing import Sequence

from LumbarSegmentLib.dataset.cases import Case


class SplitError(ValueError):
    pass


def kfold_by_patient(case_list: Sequence[Case], k: int = 5, seed: int = 0) -> list[tuple[list[Case], list[Case]]]:
    """``k`` folds ``(train, val)``; every case is in exactly one val set, patients never straddle.

    Patients are stratified by the structures their cases annotate (so each fold gets,
    where possible, some disc cases and some vertebra cases), shuffled with ``seed``, and
    dealt greedily to the fold with the fewest cases so far.
    """
    if k < 2:
        raise SplitError("k-fold cross-validation needs k >= 2")
    by_patient: dict[str, list[Case]] = {}
    for c in case_list:
        by_patient.setdefault(c.patient, []).append(c)
    if len(by_patient) < k:
        raise SplitError(f"{len(by_patient)} patients cannot be split into {k} folds; use a smaller --folds")
    strata: dict[tuple, list[str]] = {}
    for p, cs in by_patient.items():
        key = tuple(sorted({s for c in cs for s in c.annotated_structures}))
        strata.setdefault(key, []).append(p)
    rng = random.Random(seed)
    order: list[str] = []
    for key in sorted(strata):
        ps = sorted(strata[key])
        rng.shuffle(ps)
        order.extend(ps)
    folds: list[list[str]] = [[] for _ in range(k)]
    sizes = [0] * k
    start = 0
    for p in order:
        # fewest cases first; ties broken round-robin so strata spread over folds
        f = min(range(k), key=lambda i: (sizes[i], (i - start) % k))
        folds[f].append(p)
        sizes[f] += len(by_patient[p])
        start = (f + 1) % k
    out = []
    for f in range(k):
        val_p = set(folds[f])
        val = sorted((c for c in case_list if c.patient in val_p), key=lambda c: c.case_id)
        train = sorted((c for c in case_list if c.patient not in val_p), key=lambda c: c.case_id)
        out.append((train, val))
    return out


def fixed_split(case_list: Sequence[Case], val_ids: Sequence[str]) -> tuple[list[Case], list[Case], list[str]]:
    """``(train, val, dropped)``: val = the named cases; training cases of the same patients are dropped."""
    ids = {c.case_id for c in case_list}
    missing = [v for v in val_ids if v not in ids]
    if missing:
        raise SplitError(f"validation case(s) {missing} are not among the cases ({', '.join(sorted(ids))})")
    val = [c for c in case_list if c.case_id in set(val_ids)]
    val_patients = {c.patient for c in val}
    train = [c for c in case_list if c.case_id not in set(val_ids) and c.patient not in val_patients]
    dropped = sorted(c.case_id for c in case_list if c.case_id not in set(val_ids) and c.patient in val_patients)
    return train, val, dropped
