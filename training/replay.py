"""Replay: a few shipped slices of the parent's own sources mixed into every fine-tune batch.

A team fine-tuning on its own scanner's cases shows the network one contrast only; whatever the
weights need to read the other sequences then drifts away, and a pull towards the parent's
weights (L2-SP) only slows that drift. Replaying a few labelled slices of every source the
parent was trained on keeps those sources in the loss itself, so the fine-tune has to stay good
on them while it learns the new one (rehearsal, as in continual learning). A team that has only
its own cases gets the same protection as one that re-exports the parent's training cases.

The set ships with the models (``Resources/Replay``: a few sagittal slices of training cases of
the shipped models, never of a validation, test or reference case; PROVENANCE.md there says
where each comes from and under which terms it ships). A fine-tune replays only the sources its
parent trained on (a case's source is its ``source`` field; the parent's, the prefixes of its
training case ids), only cases whose structures the fine-tune's schema has, and no patient the
team's own cases already hold.

``fraction`` is the share of each batch drawn from the replayed cases (spread evenly over their
sources); the team's cases fill the rest. docs/lab/forgetting.md measures what it buys.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from LumbarSegmentLib.dataset.cases import Case, list_cases
from LumbarSegmentLib.core.schema import LabelSchema, SchemaError, check_compatible

from .data import case_source

log = logging.getLogger("lumbarseg.train")

#: environment variable naming another replay folder (a site's own cases); "" turns the shipped one off
REPLAY_ENV = "LUMBARSEG_REPLAY"


def replay_root() -> Path:
    """The shipped replay folder (``LumbarSegmentLib/shipped_replay`` in a wheel, else ``Resources/Replay``
    of a checkout or the Slicer extension), or ``$LUMBARSEG_REPLAY``."""
    env = os.environ.get(REPLAY_ENV)
    if env is not None:
        return Path(env)
    from LumbarSegmentLib.core.files import shipped_folder

    return shipped_folder("shipped_replay", "Replay")


def parent_sources(manifest: dict) -> set[str]:
    """The sources a package was trained on: the id prefixes of its training cases (``VB3_12`` -> ``VB3``)."""
    cases = (manifest.get("training") or {}).get("train_cases") or []
    return {str(c).split("_", 1)[0] for c in cases if "_" in str(c)}


def _fits(case: Case, schema: LabelSchema) -> bool:
    """Whether a fine-tune to ``schema`` could take the case (the check every training case passes)."""
    try:
        check_compatible(schema, case.annotated_structures)
    except SchemaError:
        return False
    return True


def replay_cases(schema: LabelSchema, sources: Iterable[str] | None, team: Sequence[Case] = (),
                 root: str | Path | None = None) -> list[Case]:
    """The replay cases a fine-tune to ``schema`` uses (module doc); ``[]`` when the set is absent or off.

    ``sources`` None replays every source of the set. Cases of a patient in ``team`` are left out: the
    team's own copy of that patient already trains the model.
    """
    if root is None and os.environ.get(REPLAY_ENV) == "":
        return []
    folder = Path(root) if root is not None else replay_root()
    if not folder.is_dir() or not any(folder.glob("*.json")):
        if root is not None:
            raise FileNotFoundError(f"replay folder {folder} holds no cases (<case>.json + image + label); "
                                    f"give a folder of exported cases, or --replay 0 to fine-tune without replay")
        return []
    wanted = None if sources is None else set(sources)
    team_patients = {c.patient for c in team} | {c.case_id for c in team}
    out, skipped = [], []
    for case in list_cases(folder):
        if wanted is not None and case_source(case) not in wanted:
            continue
        if case.patient in team_patients or case.case_id in team_patients:
            skipped.append(f"{case.case_id} (the team's cases hold this patient)")
        elif not _fits(case, schema):
            skipped.append(f"{case.case_id} ({', '.join(case.annotated_structures)} not all in {schema.name!r})")
        else:
            out.append(case)
    if skipped:
        log.info("replay: left out %s", "; ".join(skipped))
    return out
