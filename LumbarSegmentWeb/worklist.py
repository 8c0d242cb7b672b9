"""The cases an annotator works through: which volumes there are and how far each one got.

Plain files, no web server and no MRML, so the states are easy to test and to inspect
by hand. A *work folder* (``--work``, default ``./lumbarseg-web``) holds everything the
app writes; the data folder (``--data``) is only read, so it may be read-only or shared:

    <work>/uploads/<case>.<ext>          volumes uploaded through the browser
    <work>/drafts/<case>.seg.nrrd        the latest segmentation (model draft + edits)
    <work>/drafts/<case>.json            what the draft is: model, uncertainty, edited segments
    <work>/cases/                        exported training cases (LumbarSegmentLib.dataset.cases format)
    <work>/training/run-*/               retraining runs started from the page

State of a case, in the order an annotator moves it along:

* ``new``        no draft yet;
* ``drafted``    a draft exists and no segment differs from what the model produced;
* ``corrected``  a draft exists and at least one segment was edited (the Lib's draft
                 tracking decides, see ``mrml.edited_segments``);
* ``exported``   the case is in ``<work>/cases`` (a later edit and export adds a version).

"Next case" takes the annotator to the case where their time helps most: among the
drafted (not yet corrected or exported) cases, the one whose draft the model was least
sure of (the engine's ``uncertainty.mean_entropy_foreground`` in its run report); when
none is drafted, the first new case in name order.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

NEW, DRAFTED, CORRECTED, EXPORTED = "new", "drafted", "corrected", "exported"
_LABEL_STEM = re.compile(r"[_-](label|labels|seg|mask)$", re.IGNORECASE)
_IMAGE_STEM = re.compile(r"[_-](image|img)$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class CaseEntry:
    case_id: str
    path: Path  # the volume file
    state: str = NEW
    uncertainty: float | None = None
    edited: tuple[str, ...] = ()

    def to_row(self) -> dict:
        """What the page's case list shows (plain JSON types only)."""
        return {"case_id": self.case_id, "state": self.state, "file": self.path.name,
                "uncertainty": None if self.uncertainty is None else round(float(self.uncertainty), 4),
                "edited": list(self.edited)}


def case_id_for(path: Path) -> str:
    """``VB2_06_image.mha`` -> ``VB2_06``: the name a case is exported under (``cases`` rules)."""
    from LumbarSegmentLib.formats.io import volume_suffix

    name = path.name
    suffix = volume_suffix(path) or path.suffix
    stem = name[: len(name) - len(suffix)] if suffix and name.lower().endswith(suffix.lower()) else path.stem
    stem = _IMAGE_STEM.sub("", stem)
    stem = _UNSAFE.sub("_", stem).strip("._-") or "case"
    if not stem[0].isalnum():
        stem = "c" + stem
    return stem[:64].replace("__v", "_v")


def _is_image(path: Path) -> bool:
    from LumbarSegmentLib.formats.io import volume_suffix

    if not path.is_file() or path.name.startswith(".") or path.name.lower().endswith(".seg.nrrd"):
        return False
    suffix = volume_suffix(path)
    if not suffix:
        return False
    return not _LABEL_STEM.search(path.name[: -len(suffix)])


class Worklist:
    """Volumes from ``data`` (read-only) and ``<work>/uploads``, with their states from ``work``."""

    def __init__(self, work: str | os.PathLike, data: str | os.PathLike | None = None):
        self.work = Path(work)
        self.data = Path(data) if data else None
        for sub in ("uploads", "drafts", "cases", "training"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)

    @property
    def uploads(self) -> Path:
        return self.work / "uploads"

    @property
    def drafts(self) -> Path:
        return self.work / "drafts"

    @property
    def dataset(self) -> Path:
        """The exported cases: what retraining trains on."""
        return self.work / "cases"

    def draft_path(self, case_id: str) -> Path:
        return self.drafts / f"{case_id}.seg.nrrd"

    def draft_info_path(self, case_id: str) -> Path:
        return self.drafts / f"{case_id}.json"

    # --- listing -----------------------------------------------------------------------
    def volumes(self) -> dict[str, Path]:
        """Case id -> volume file; an upload of the same name wins over the data folder's copy."""
        found: dict[str, Path] = {}
        for folder in (self.data, self.uploads):
            if folder is None or not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if _is_image(p):
                    found[case_id_for(p)] = p
        return dict(sorted(found.items()))

    def exported_ids(self) -> set[str]:
        from LumbarSegmentLib.dataset.cases import CaseError, list_cases

        try:
            return {c.case_id for c in list_cases(self.dataset)}
        except (CaseError, OSError, ValueError):
            return set()

    def read_info(self, case_id: str) -> dict:
        try:
            return json.loads(self.draft_info_path(case_id).read_text())
        except (OSError, ValueError):
            return {}

    def write_info(self, case_id: str, info: dict) -> None:
        """Atomic, like every file the tools write: a crash never leaves half a JSON file."""
        path = self.draft_info_path(case_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{case_id}.", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, path)

    def entries(self) -> list[CaseEntry]:
        exported = self.exported_ids()
        out = []
        for case_id, path in self.volumes().items():
            entry = CaseEntry(case_id, path)
            info = self.read_info(case_id) if self.draft_path(case_id).is_file() else {}
            if info:
                entry.uncertainty = info.get("uncertainty")
                entry.edited = tuple(info.get("edited") or ())
                entry.state = CORRECTED if entry.edited else DRAFTED
            if case_id in exported:
                entry.state = EXPORTED
            out.append(entry)
        return out

    def next_case(self, exclude: str | None = None) -> CaseEntry | None:
        """The most uncertain drafted case, else the first new one (see the module docstring)."""
        entries = [e for e in self.entries() if e.case_id != exclude]
        drafted = [e for e in entries if e.state == DRAFTED]
        if drafted:
            return max(drafted, key=lambda e: (e.uncertainty if e.uncertainty is not None else -1.0, e.case_id))
        return next((e for e in entries if e.state == NEW), None)

    # --- uploads -----------------------------------------------------------------------
    def save_upload(self, name: str, content: bytes) -> Path:
        """Store an uploaded volume under a safe name (never a path the client chose)."""
        from LumbarSegmentLib.formats.io import volume_suffix

        base = Path(name).name  # drop any folder part the browser sent
        suffix = volume_suffix(Path(base))
        if not suffix:
            from LumbarSegmentLib.formats.io import VOLUME_SUFFIXES

            raise ValueError(f"{base}: not a volume file; upload one of {', '.join(VOLUME_SUFFIXES)}")
        target = self.uploads / f"{case_id_for(Path(base))}{suffix}"
        fd, tmp = tempfile.mkstemp(prefix=".upload.", suffix=suffix, dir=self.uploads)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, target)
        return target
