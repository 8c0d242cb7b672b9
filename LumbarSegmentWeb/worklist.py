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
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
_WARNED: set = set()  # damaged case files already reported
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


def image_fingerprint(volume) -> str:
    """sha256 of the voxels and the geometry: a draft belongs to exactly this image."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    arr = np.ascontiguousarray(volume.array)
    h.update(repr((str(arr.dtype), arr.shape, tuple(volume.spacing), tuple(volume.origin),
                   np.asarray(volume.direction, dtype=float).round(9).tolist())).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


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

    def exported(self):
        """The exported cases as the Lib's one dataset view (cases, held-out split, patients)."""
        from LumbarSegmentLib.dataset.dataset import Dataset

        return Dataset(self.dataset)

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
        """Ids of the exported cases; a damaged case file is skipped (once logged), never a crash.

        A file named ``<id>__v<N>.json`` claims its id even when it cannot be read, so an
        upload never takes it.
        """
        damaged: list = []
        ids = self.exported().claimed_ids(damaged)
        for jp, exc in damaged:
            if jp not in _WARNED:
                _WARNED.add(jp)
                log.warning("%s: not a readable case file (%s); skipped", jp, exc)
        return ids

    def read_info(self, case_id: str) -> dict:
        try:
            info = json.loads(self.draft_info_path(case_id).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def write_info(self, case_id: str, info: dict) -> None:
        """Atomic, like every file the tools write: a crash never leaves half a JSON file."""
        path = self.draft_info_path(case_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{case_id}.", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, path)

    def set_aside(self, case_id: str) -> Path:
        """Move a draft that must not be opened (damaged, or of another image) to ``drafts/set-aside/``."""
        import time

        folder = self.drafts / "set-aside"
        folder.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while (folder / f"{case_id}.{stamp}.seg.nrrd").exists():
            n += 1
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        target = folder / f"{case_id}.{stamp}.seg.nrrd"
        os.replace(self.draft_path(case_id), target)
        if self.draft_info_path(case_id).is_file():
            os.replace(self.draft_info_path(case_id), folder / f"{case_id}.{stamp}.json")
        return target

    def entries(self) -> list[CaseEntry]:
        exported = self.exported_ids()
        out = []
        for case_id, path in self.volumes().items():
            entry = CaseEntry(case_id, path)
            if self.draft_path(case_id).is_file():
                info = self.read_info(case_id)
                unc, edited = info.get("uncertainty"), info.get("edited")
                entry.uncertainty = unc if isinstance(unc, (int, float)) and not isinstance(unc, bool) else None
                entry.edited = tuple(e for e in edited if isinstance(e, str)) if isinstance(edited, list) else ()
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
    def taken_ids(self) -> set[str]:
        """Case ids in use: volumes, drafts (even of a volume that is gone) and exported cases."""
        drafts = {p.name[: -len(".seg.nrrd")] for p in self.drafts.glob("*.seg.nrrd")}
        drafts |= {p.stem for p in self.drafts.glob("*.json") if not p.name.startswith(".")}
        return set(self.volumes()) | drafts | self.exported_ids()

    def save_upload(self, name: str, content: bytes, check=None) -> Path:
        """Store an uploaded volume under a safe name of its own (never a path the client chose).

        An upload never replaces a file and never takes the case id of another volume, draft
        or exported case: names that sanitise or truncate to one already in use get ``_2``,
        ``_3``... The same bytes uploaded again return the earlier upload. ``check(path)``
        (e.g. reading the volume) runs on the hidden temporary file; if it raises, nothing is
        kept and the error goes to the caller.
        """
        from LumbarSegmentLib.formats.io import volume_suffix

        base = Path(name).name  # drop any folder part the browser sent
        suffix = volume_suffix(Path(base))
        if not suffix:
            from LumbarSegmentLib.formats.io import VOLUME_SUFFIXES

            raise ValueError(f"{base}: not a volume file; upload one of {', '.join(VOLUME_SUFFIXES)}")
        same = self._same_upload(content, suffix)
        if same is not None:
            return same
        fd, tmp = tempfile.mkstemp(prefix=".upload.", suffix=suffix, dir=self.uploads)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            if check is not None:
                check(Path(tmp))
            return self._claim_name(Path(tmp), case_id_for(Path(base)), suffix)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _same_upload(self, content: bytes, suffix: str) -> Path | None:
        for p in self.uploads.iterdir():
            if p.name.endswith(suffix) and not p.name.startswith(".") and p.is_file() \
                    and p.stat().st_size == len(content) and p.read_bytes() == content:
                return p
        return None

    def _claim_name(self, tmp: Path, case_id: str, suffix: str) -> Path:
        """Hard-link ``tmp`` to the first free ``<id>[_n]<suffix>``: the link fails rather than replace."""
        taken = self.taken_ids()
        for n in range(1, 10000):
            tail = "" if n == 1 else f"_{n}"
            candidate = case_id[: 64 - len(tail)] + tail
            target = self.uploads / f"{candidate}{suffix}"
            if candidate in taken or case_id_for(target) != candidate or os.path.lexists(target):
                continue
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue  # taken since we looked
            except OSError:  # no hard links here: reserve the name exclusively, then move in
                try:
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.replace(tmp, target)
            return target
        raise OSError(f"no free name left for {case_id} in {self.uploads}")
