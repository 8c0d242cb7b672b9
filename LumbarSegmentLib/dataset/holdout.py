"""The dataset's frozen validation split: the exported cases a retrained model is graded on.

A candidate model may only be compared with the model in use on cases it never trained
on, or the publish gate flatters it. So every dataset folder keeps ``.holdout.json``:

    {"format": "lumbarsegment.holdout", "format_version": 1, "every": 4,
     "patients": {"VB3_01": "train", "IVD_25": "holdout", ...}}

The rule: patients (a case's ``patient``, else its id) are assigned once, the first time
the split is asked for after they appear, in sorted order of the new ones, continuing a
count over the whole folder: every ``every``-th patient (the 4th, 8th, ...) is held out,
the others train. An assignment is never changed afterwards, so a held-out patient can
never drift into training (and a training patient never into the grading set) as the
folder grows. A user may also write the file by hand (``set_holdout``) to choose the
patients. All cases of a held-out patient are held out, so no patient is on both sides.

Why per patient and every k-th rather than random: it is reproducible from the file
alone, needs no seed, and keeps the held-out share near 1/k as exports accumulate.
With fewer than ``MIN_HOLDOUT_CASES`` held-out cases the gate says so and does not
promote a candidate unless forced (training/publish.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from LumbarSegmentLib.dataset.cases import Case, list_cases

HOLDOUT_FILE = ".holdout.json"  # hidden: list_cases reads every visible *.json as a case
HOLDOUT_FORMAT = "lumbarsegment.holdout"
HOLDOUT_FORMAT_VERSION = 1
DEFAULT_EVERY = 4
MIN_HOLDOUT_CASES = 2


class HoldoutError(ValueError):
    """The dataset's .holdout.json is unreadable or malformed."""


@dataclass
class Split:
    train: list[Case]
    holdout: list[Case]
    every: int

    @property
    def train_ids(self) -> list[str]:
        return [c.case_id for c in self.train]

    @property
    def holdout_ids(self) -> list[str]:
        return [c.case_id for c in self.holdout]

    @property
    def enough(self) -> bool:
        return len(self.holdout) >= MIN_HOLDOUT_CASES


def _patient(case: Case) -> str:
    return case.patient or case.case_id


def _read(path: Path) -> dict:
    if not path.exists():
        return {"format": HOLDOUT_FORMAT, "format_version": 1, "every": DEFAULT_EVERY, "patients": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HoldoutError(f"{path}: unreadable ({exc}); repair it or move it aside (a new split is then "
                           f"drawn, and models trained on the old one are no longer graded fairly)") from None
    if not isinstance(data, dict) or data.get("format") != HOLDOUT_FORMAT or not isinstance(data.get("patients"), dict):
        raise HoldoutError(f"{path}: not a LumbarSegment holdout file (needs \"format\": \"{HOLDOUT_FORMAT}\" "
                           f"and a \"patients\" object); repair it or move it aside")
    problem = _malformed(data)
    if problem:
        raise HoldoutError(f"{path}: {problem}; repair it, or set the split again with lumbarseg-train holdout "
                           f"(--cases or --every)")
    return data


def _malformed(data: dict) -> str | None:
    """What is wrong with a holdout file's fields (None when nothing is)."""
    version = data.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return f"\"format_version\" must be a whole number >= 1, got {version!r}"
    if version > HOLDOUT_FORMAT_VERSION:
        return (f"holdout format version {version} is newer than this LumbarSegment supports "
                f"({HOLDOUT_FORMAT_VERSION}); update LumbarSegment")
    every = data.get("every")
    if isinstance(every, bool) or not isinstance(every, int) or every < 2:
        return f"\"every\" must be a whole number >= 2 (every k-th patient held out), got {every!r}"
    bad = [f"{k!r}: {v!r}" for k, v in data["patients"].items() if v not in ("train", "holdout")]
    if bad:
        return (f"each patient must be \"train\" or \"holdout\", got {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}")
    return None


def _write(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".holdout-tmp.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def frozen_split(dataset: str | os.PathLike, *, every: int | None = None, update: bool = True) -> Split:
    """The dataset's train / held-out cases by the rule above; assigns new patients (and saves) when ``update``."""
    folder = Path(dataset)
    cases = list_cases(folder)
    path = folder / HOLDOUT_FILE
    data = _read(path)
    if every is not None and not data["patients"]:
        data["every"] = int(every)
    k = int(data["every"])
    assigned: dict[str, str] = data["patients"]
    new = sorted({_patient(c) for c in cases} - set(assigned))
    for p in new:
        assigned[p] = "holdout" if (len(assigned) + 1) % k == 0 else "train"
    if new and update:
        _write(path, data)
    held = [c for c in cases if assigned.get(_patient(c)) == "holdout"]
    return Split(train=[c for c in cases if c not in held], holdout=held, every=k)


def held_out_ids(dataset: str | os.PathLike) -> set[str]:
    """The case ids the dataset's frozen split holds out (empty when it has none); writes nothing.

    Training reads this so that no command trains on the cases the publish gate grades on, whether a
    panel or a person started it; patients the split has not seen yet are not assigned here."""
    folder = Path(dataset)
    if not (folder / HOLDOUT_FILE).is_file():
        return set()
    return {c.case_id for c in frozen_split(folder, update=False).holdout}


def set_holdout(dataset: str | os.PathLike, patients: list[str]) -> Split:
    """Choose the held-out patients by hand (everyone else trains); replaces the drawn split."""
    folder = Path(dataset)
    cases = list_cases(folder)
    data = _read(folder / HOLDOUT_FILE)
    chosen = set(patients)
    data["patients"] = {p: ("holdout" if p in chosen else "train") for p in sorted({_patient(c) for c in cases}
                                                                                   | chosen)}
    _write(folder / HOLDOUT_FILE, data)
    return frozen_split(folder, update=False)


def redraw_holdout(dataset: str | os.PathLike, every: int) -> Split:
    """Forget the split and draw it again by the rule with a new ``every`` (every k-th patient held out).

    ``frozen_split(every=...)`` only applies to a folder with no assignments yet, which is what keeps a
    split frozen; changing k afterwards is a deliberate act (``lumbarseg-train holdout --every K``), and
    models graded on the old split are no longer comparable with ones graded on the new.
    """
    if int(every) < 2:
        raise HoldoutError(f"every must be at least 2 (every {every}-th patient held out), got {every}")
    folder = Path(dataset)
    list_cases(folder)  # a missing or empty dataset folder is refused before anything is written
    _write(folder / HOLDOUT_FILE, {"format": HOLDOUT_FORMAT, "format_version": 1, "every": int(every),
                                   "patients": {}})
    return frozen_split(folder)


def frozen_split_or_refuse(dataset: str | os.PathLike) -> Split:
    """The frozen split as it is on disk, for commands that only read the dataset (publish, evaluate).

    A patient not yet assigned would have to be assigned and saved, which writes into the dataset
    folder (maybe shared, read-only data); those commands refuse instead and say which command does it.
    """
    folder = Path(dataset)
    cases = list_cases(folder)
    data = _read(folder / HOLDOUT_FILE)
    new = sorted({_patient(c) for c in cases} - set(data["patients"]))
    if new:
        what = (f"has no frozen held-out split yet ({HOLDOUT_FILE})" if not (folder / HOLDOUT_FILE).exists() else
                f"has {len(new)} patient(s) not yet in its held-out split ({', '.join(new[:5])}"
                f"{', ...' if len(new) > 5 else ''})")
        raise HoldoutError(f"{folder} {what}; a dataset folder is input and this command never writes into it. "
                           f"Freeze the split first with: lumbarseg-train holdout --data {folder} --assign "
                           f"(or name the grading cases with --cases)")
    return frozen_split(folder, update=False)
