"""The effort ledger: what correcting a draft cost the annotator, recorded with every export.

A case's ``case.json`` carries ``"effort"`` next to ``"drafted_by"``::

    {"clicks": 4,                       click-to-fix clicks used
     "voxels_painted": 1520,            voxels that hold a structure the draft did not give them
     "voxels_erased": 310,              voxels whose drafted structure was removed
     "voxels_by_clicks": 2290,          voxels the clicks changed
     "active_seconds": 184.0}           time spent on the case while active (gaps over IDLE_S not counted)

:func:`summarise` turns the cases of a dataset into one row per drafting model: how many drafts
were accepted without any edit, the median number of voxels corrected per case and the median
active time - the loop's own measure of whether a newer model saves work.

The hand counts are not tallied stroke by stroke (undo, redo and tools that rewrite a whole segment
would make that fragile): at export the front end compares the exported label map with the draft
(:func:`hand_edits`), leaving out the voxels a click changed, which the clicks already count.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Mapping

import numpy as np

IDLE_S = 60.0  # a pause longer than this is not counted as active time


@dataclass
class EffortLedger:
    clicks: int = 0
    voxels_painted: int = 0
    voxels_erased: int = 0
    voxels_by_clicks: int = 0
    active_seconds: float = 0.0
    _last_event: float | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "EffortLedger":
        data = dict(data or {})
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        # None: a count that is not known (hand edits of a draft the front end never saw); read as 0
        return cls(**{k: type(getattr(cls, k))(v) for k, v in data.items() if k in known and v is not None})

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["active_seconds"] = round(float(out["active_seconds"]), 1)
        return out

    @property
    def voxels_corrected(self) -> int:
        return self.voxels_painted + self.voxels_erased + self.voxels_by_clicks

    def touch(self, now: float) -> None:
        """An annotator action at time ``now`` (seconds, monotonic): the time since the last one counts
        as active unless it is longer than :data:`IDLE_S`."""
        if self._last_event is not None and 0 <= now - self._last_event <= IDLE_S:
            self.active_seconds += now - self._last_event
        self._last_event = now

    def add_hand_edit(self, before: np.ndarray, after: np.ndarray) -> None:
        """A brush/erase edit of one structure's mask (or of a label map): voxels gained and lost."""
        before, after = np.asarray(before) != 0, np.asarray(after) != 0
        self.voxels_painted += int((after & ~before).sum())
        self.voxels_erased += int((before & ~after).sum())

    def set_hand_edits(self, draft: np.ndarray, final: np.ndarray, clicked: np.ndarray | None = None) -> None:
        """The hand counts of an export (replacing earlier ones, so exporting twice does not add up)."""
        self.voxels_painted, self.voxels_erased = hand_edits(draft, final, clicked)

    def add_click(self, changed_voxels: int) -> None:
        self.clicks += 1
        self.voxels_by_clicks += int(changed_voxels)


def hand_edits(draft: np.ndarray, final: np.ndarray, clicked: np.ndarray | None = None) -> tuple[int, int]:
    """``(painted, erased)`` between two label maps of one grid: painted voxels now hold a structure they
    did not hold in ``draft``, erased voxels lost the structure ``draft`` gave them (a voxel moved from
    one structure to another is both). Voxels in ``clicked`` are left out: they count for the clicks."""
    draft, final = np.asarray(draft), np.asarray(final)
    if draft.shape != final.shape:
        raise ValueError(f"the draft {draft.shape} and the exported label map {final.shape} differ in shape")
    moved = draft != final
    if clicked is not None:
        moved &= ~np.asarray(clicked, dtype=bool)
    return int((moved & (final != 0)).sum()), int((moved & (draft != 0)).sum())


def summarise(cases: Iterable) -> list[dict]:
    """One row per drafting model (``case.extra['drafted_by']['model']``, or 'by hand') over the cases'
    effort records: cases, drafts accepted unedited, median voxels corrected, median active seconds."""
    groups: dict[str, list[EffortLedger]] = {}
    unknown_hand: set[int] = set()  # ids of ledgers whose hand edits were not known: never "accepted"
    unrecorded: dict[str, int] = {}
    for case in cases:
        extra = getattr(case, "extra", {}) or {}
        model = (extra.get("drafted_by") or {}).get("model", "by hand")
        if "effort" not in extra:
            unrecorded[model] = unrecorded.get(model, 0) + 1
            continue
        ledger = EffortLedger.from_dict(extra["effort"])
        if any((extra["effort"] or {}).get(k, 0) is None for k in ("voxels_painted", "voxels_erased")):
            unknown_hand.add(id(ledger))
        groups.setdefault(model, []).append(ledger)
    rows = []
    for model in sorted(set(groups) | set(unrecorded)):
        led = groups.get(model, [])
        rows.append({
            "model": model, "cases": len(led), "without_record": unrecorded.get(model, 0),
            "accepted_unedited": sum(e.voxels_corrected == 0 and e.clicks == 0 and id(e) not in unknown_hand
                                     for e in led),
            "median_voxels_corrected": statistics.median(e.voxels_corrected for e in led) if led else None,
            "median_clicks": statistics.median(e.clicks for e in led) if led else None,
            "median_active_seconds": round(statistics.median(e.active_seconds for e in led), 1) if led else None,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| drafting model | cases | accepted unedited | median voxels corrected | median clicks | "
            "median active minutes | exports without a record |\n|---|---|---|---|---|---|---|")
    body = [f"| {r['model']} | {r['cases']} | {r['accepted_unedited']} | {_show(r['median_voxels_corrected'])} | "
            f"{_show(r['median_clicks'])} | {_minutes(r['median_active_seconds'])} | {r['without_record']} |"
            for r in rows]
    return "\n".join([head, *body])


def _show(v) -> str:
    return "-" if v is None else f"{v:g}"


def _minutes(seconds) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"
