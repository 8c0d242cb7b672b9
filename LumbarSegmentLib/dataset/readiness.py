"""Before a retrain: can the new model replace the one in use, and if not, what would make it so.

The publish gate (training/publish.py) lets a retrained model replace the model in use only
after grading both on at least ``holdout.MIN_HOLDOUT_CASES`` exported cases the new model never
trained on. The dataset's frozen split holds out every ``every``-th patient (4th, 8th, ...), so a
team that exported a handful of cases has none held out yet, and a retrain on them can only add
the new model as an option. :func:`readiness` says which case the team is in, in one sentence for
the browser page, the Slicer panel and the command line, and names the cases they could hold
out by hand (``lumbarseg-train holdout --cases``) to be graded sooner. Nothing is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from LumbarSegmentLib.dataset.holdout import MIN_HOLDOUT_CASES, frozen_split


@dataclass
class Readiness:
    """The exported cases as a retrain would split them (read only; the split file is not touched)."""

    train: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)
    every: int = 4
    needed: int = MIN_HOLDOUT_CASES
    patients: dict[str, str] = field(default_factory=dict)  # case id -> patient

    @property
    def cases(self) -> int:
        return len(self.train) + len(self.holdout)

    @property
    def can_start(self) -> bool:
        return bool(self.train)

    @property
    def can_replace(self) -> bool:
        return len(self.holdout) >= self.needed

    def suggested_holdout(self) -> list[str]:
        """Patients to hold out by hand so that ``needed`` cases grade and at least one case still trains.

        The held-out patients stay; the last patients in name order are added. ``[]`` when the
        split is already enough or too few cases exist.
        """
        if self.can_replace:
            return []
        held = {self.patients.get(c, c) for c in self.holdout}
        others = sorted({self.patients.get(c, c) for c in self.train} - held)
        chosen = set(held)
        for patient in reversed(others):
            if sum(1 for c in [*self.train, *self.holdout] if self.patients.get(c, c) in chosen) >= self.needed:
                break
            chosen.add(patient)
        graded = [c for c in [*self.train, *self.holdout] if self.patients.get(c, c) in chosen]
        still_train = [c for c in self.train if self.patients.get(c, c) not in chosen]
        return sorted(chosen) if len(graded) >= self.needed and still_train else []

    def message(self) -> str:
        """One paragraph: where the team stands and what to do."""
        n, h = self.cases, len(self.holdout)
        if n == 0:
            return "No exported case yet: correct and export at least one case before retraining."
        if not self.can_start:
            return (f"All {n} exported case(s) are held out for grading, so none is left to train on: "
                    f"export cases of more patients first.")
        if self.can_replace:
            return (f"{n} exported cases: {len(self.train)} train, {h} held out for grading. The retrained model "
                    f"replaces the model in use only if it is at least as good on the held-out cases.")
        head = (f"{n} exported case(s), {h} held out for grading. A retrained model replaces the model in use only "
                f"after it is graded on at least {self.needed} held-out cases it never trained on (every "
                f"{self.every}th patient is held out: about {self.needed * self.every} patients).")
        pick = self.suggested_holdout()
        if pick:
            return (f"{head} You can hold out {', '.join(pick)} now and train on the other cases, so the gate "
                    f"can grade the new model; or train on all of them, and the new model is added as an option "
                    f"to choose, not made the default.")
        return (f"{head} Training on {n} case(s) now adds the new model as an option to choose, not as the "
                f"default; export at least {self.needed + 1} cases to hold {self.needed} out for grading.")


def readiness(dataset: str | os.PathLike) -> Readiness:
    """The split a retrain of ``dataset`` would use now, without writing the split file."""
    from LumbarSegmentLib.dataset.cases import CaseError

    try:
        split = frozen_split(dataset, update=False)
    except (CaseError, OSError, ValueError):
        return Readiness()
    patients = {c.case_id: (c.patient or c.case_id) for c in [*split.train, *split.holdout]}
    return Readiness(train=split.train_ids, holdout=split.holdout_ids, every=split.every, patients=patients)


__all__ = ["Readiness", "readiness"]
