"""One dataset: the exported-case folder(s) a command reads, with the patient map that groups them.

Training, fine-tuning, the publish gate, the retrain job and the browser's worklist all need the
same three answers about a folder of cases: which cases are there (newest export of each), which
of them the frozen split holds out for grading (``holdout.py``), and which cases belong to one
patient (the case files' ``patient``, or a ``lumbarsegment.patients`` map for public data that
names none). Asking one object keeps the three answers consistent: a case held out for the gate
is held out whatever front end started the run, and a patient map given once applies to every
answer.

``folder`` may name several folders separated by commas (sources kept in their own folders, as
``lumbarseg-train --data a,b`` takes them); a case id found in two of them is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from LumbarSegmentLib.dataset.cases import Case, CaseError, list_cases, read_case, read_patient_map, with_patients
from LumbarSegmentLib.dataset.holdout import Split, frozen_split, frozen_split_or_refuse

class SelectionError(CaseError):
    """Cases asked for that the dataset does not hold, or one case id in two of its folders."""


def data_folders(folder: str | os.PathLike) -> list[Path]:
    """``a`` or ``a,b``: the folders of a dataset argument, in the order given."""
    text = str(folder)
    parts = [p.strip() for p in text.split(",") if p.strip()] if "," in text else [text]
    return [Path(p) for p in parts]


@dataclass(frozen=True)
class Dataset:
    """Exported cases in ``folder`` (one folder or ``a,b``), grouped by ``patients`` (a patient map file)."""

    folder: str | os.PathLike
    patients: str | os.PathLike | None = None

    @property
    def folders(self) -> list[Path]:
        return data_folders(self.folder)

    def patient_of(self) -> dict[str, str]:
        """``{case id: patient}`` of the patient map (empty without one): the map wins over the case files."""
        return read_patient_map(self.patients) if self.patients else {}

    def _all(self) -> dict[str, Case]:
        found: dict[str, Case] = {}
        for f in self.folders:
            for c in list_cases(f):
                if c.case_id in found:
                    raise SelectionError(f"case {c.case_id} is in two data folders "
                                         f"({found[c.case_id].image_path.parent} and {f}); give each folder once, "
                                         f"or rename one case")
                found[c.case_id] = c
        return found

    def cases(self, ids: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[Case]:
        """The cases (only ``ids`` when given, in that order), minus ``exclude``, patients from the map.

        An unknown id is refused by name rather than skipped: a typo would otherwise train or grade on
        something else than asked."""
        found = self._all()
        unknown = [i for i in list(ids or []) + list(exclude) if i not in found]
        if unknown:
            raise SelectionError(f"no case(s) {unknown} in {self.folder} (it has: {', '.join(sorted(found))})")
        chosen = [found[i] for i in ids] if ids else list(found.values())
        gone = set(exclude)
        return with_patients([c for c in chosen if c.case_id not in gone], self.patient_of())

    def select(self, ids: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> tuple[list[Case], list[str]]:
        """Like :meth:`cases`, but with a patient map an excluded case takes its whole patient with it
        (another export of that patient would carry what was meant to be left out into the run).
        Returns the cases and the ids dropped only for sharing a patient with an excluded case."""
        if not self.patients:
            return self.cases(ids, exclude), []
        cases = self.cases(ids)
        gone = {c.patient for c in self.cases(exclude)} if exclude else set()
        also = sorted(c.case_id for c in cases if c.patient in gone and c.case_id not in exclude)
        return [c for c in cases if c.patient not in gone], also

    # --- the frozen held-out split --------------------------------------------------------------
    def held_out_ids(self) -> set[str]:
        """Case ids the folders' frozen splits hold out (none for a folder without a split); writes nothing."""
        from LumbarSegmentLib.dataset.holdout import held_out_ids

        return set().union(*(held_out_ids(d) for d in self.folders if d.is_dir()))

    def without_held_out(self, cases: Sequence[Case]) -> tuple[list[Case], list[str]]:
        """``cases`` minus the held-out ones, and the ids left out (sorted)."""
        held = self.held_out_ids()
        return [c for c in cases if c.case_id not in held], sorted(c.case_id for c in cases if c.case_id in held)

    def trainable(self, ids: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[Case]:
        """What a fine-tune may train on: :meth:`select` minus the cases the publish gate grades on."""
        return self.without_held_out(self.select(ids, exclude)[0])[0]

    def held_out(self) -> list[Case]:
        """The cases the publish gate grades on, as the split files say; refuses (never writes) when a
        patient is not assigned yet (``holdout.frozen_split_or_refuse``)."""
        held = [c for f in self.folders for c in frozen_split_or_refuse(f).holdout]
        return with_patients(held, self.patient_of())

    def split(self) -> Split:
        """The frozen split of a single folder, new patients assigned and saved (a retrain's first step)."""
        if len(self.folders) != 1:
            raise SelectionError(f"{self.folder}: a retrain splits one dataset folder, not several")
        return frozen_split(self.folders[0])

    # --- reading a folder that is being written -------------------------------------------------
    def claimed_ids(self, damaged: list | None = None) -> set[str]:
        """Case ids the folders hold or reserve, for a front end listing a folder it also writes into.

        A damaged case file is skipped (its path appended to ``damaged``), never an error; a file named
        ``<id>__v<N>.json`` claims its id even when unreadable, so no new case takes that id."""
        ids: set[str] = set()
        for folder in self.folders:
            for jp in sorted(folder.glob("*.json")) if folder.is_dir() else ():
                if jp.name.startswith("."):  # the split file, temporary files
                    continue
                if "__v" in jp.stem:
                    ids.add(jp.stem.rsplit("__v", 1)[0])
                try:
                    ids.add(read_case(jp).case_id)
                except Exception as exc:  # noqa: BLE001 - any damage: skip this file
                    if damaged is not None:
                        damaged.append((jp, exc))
        return ids
