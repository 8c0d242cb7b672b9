"""The case format: the one contract between the Slicer module's export and training.

A *dataset* is a folder of cases. A *case* is three files side by side::

    <stem>.json          what the case is (this module reads/writes it)
    <stem>_image.mha     the MR volume
    <stem>_label.mha     a label map on exactly the image's grid

and ``<stem>.json`` holds (format version 1)::

    {
      "format": "lumbarsegment.case", "format_version": 1,
      "case": "VB2_06",                       # case id: letters, digits, '_', '-', '.'
      "version": 1,                           # export number; the highest version wins
      "patient": "VB2_06",                    # grouping key for cross-validation
      "image": "VB2_06_image.mha", "label": "VB2_06_label.mha",
      "labels": {"1": "vertebral_body", ...}, # label value -> structure (class id)
      "annotated_structures": ["vertebral_body"],
      ... optional: "sequence", "dataset", "drafted_by", "edited_structures", "exported_at", "note"
    }

**Partial labels.** ``annotated_structures`` lists the structures the label map
is complete for. Voxels of any other structure are *unknown*, not background:
training must not learn "not annotated" as "background" (see
``LumbarSegmentLib.training.losses``). Background is known wherever the case annotates at least
one structure and no annotated structure is present.

The public cases in ``shared/data/lumbar-mr`` use exactly this shape (they carry
no ``format`` field, which reads as version 1). Exports never overwrite: each
writes a new version ``<case>__v<N>``, claiming N with an exclusive lock file,
writing the volumes first and the JSON last (the JSON is the commit marker).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.files import atomic_path, pid_alive
from LumbarSegmentLib.formats.io import read_volume, write_volume
from LumbarSegmentLib.core.volume import Volume, VolumeError

CASE_FORMAT = "lumbarsegment.case"
CASE_FORMAT_VERSION = 1
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class CaseError(ValueError):
    """A case file is malformed, inconsistent, or cannot be written."""


def validate_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id) or ".." in case_id or "__v" in case_id:
        raise CaseError(
            f"invalid case id {case_id!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            f"or digit, without '..', path separators or '__v'"
        )
    return case_id


@dataclass
class Case:
    case_id: str
    image_path: Path
    label_path: Path
    labels: dict[int, str]
    annotated_structures: list[str]
    patient: str = ""
    version: int = 1
    json_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.patient = self.patient or self.case_id

    def load(self) -> tuple[Volume, Volume]:
        """Image and label volumes; refuses a label map whose grid differs from the image's."""
        image = read_volume(self.image_path)
        label = read_volume(self.label_path)
        if not image.same_geometry(label):
            raise CaseError(
                f"case {self.case_id}: label geometry ({label.describe_geometry()}, origin {label.origin}) "
                f"differs from the image's ({image.describe_geometry()}, origin {image.origin}); "
                f"resample the label map onto the image grid"
            )
        raw = np.unique(label.array)
        whole = (raw == np.round(raw)) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
        bad = raw[~whole | (raw < 0) | (raw > 255)]
        if bad.size or not np.all(np.isfinite(raw)):
            shown = ", ".join(f"{v:g}" for v in bad[:5].tolist()) if bad.size else "NaN/inf"
            raise CaseError(f"case {self.case_id}: the label map {self.label_path.name} holds values that are not "
                            f"whole label numbers 0..255 ({shown}); a resampled or smoothed label map? Export it "
                            f"again with nearest-neighbour interpolation")
        values = {int(v) for v in raw} - {0}
        unknown = sorted(values - set(self.labels))
        if unknown:
            raise CaseError(f"case {self.case_id}: label values {unknown} are not described in 'labels'")
        return image, label

    def to_json(self) -> dict:
        return {
            "format": CASE_FORMAT, "format_version": CASE_FORMAT_VERSION, "case": self.case_id,
            "version": self.version, "patient": self.patient,
            "image": self.image_path.name, "label": self.label_path.name,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "annotated_structures": list(self.annotated_structures), **self.extra,
        }


def read_case(json_path: str | os.PathLike) -> Case:
    p = Path(json_path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CaseError(f"{p}: cannot read case file: {exc}") from None
    fmt = data.get("format", CASE_FORMAT)
    if fmt != CASE_FORMAT:
        raise CaseError(f"{p}: format is {fmt!r}, expected {CASE_FORMAT!r}")
    version = int(data.get("format_version", 1))
    if version > CASE_FORMAT_VERSION:
        raise CaseError(f"{p}: case format version {version} is newer than supported ({CASE_FORMAT_VERSION}); "
                        f"update LumbarSegment")
    try:
        case_id = validate_case_id(str(data["case"]))
        labels = {int(k): str(v) for k, v in data["labels"].items()}
        annotated = [str(s) for s in data["annotated_structures"]]
        image_name, label_name = str(data["image"]), str(data["label"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CaseError):
            raise
        raise CaseError(f"{p}: missing or malformed field ({exc!r})") from None
    for name in (image_name, label_name):
        if Path(name).name != name:
            raise CaseError(f"{p}: file names must be plain names in the case folder, got {name!r}")
    missing = sorted(set(labels.values()) - set(annotated))
    if missing:
        raise CaseError(f"{p}: labels use structures {missing} that are not in annotated_structures")
    known = {"format", "format_version", "case", "version", "patient", "image", "label", "labels",
             "annotated_structures"}
    return Case(case_id=case_id, image_path=p.parent / image_name, label_path=p.parent / label_name,
                labels=labels, annotated_structures=annotated, patient=str(data.get("patient") or case_id),
                version=int(data.get("version", 1)), json_path=p,
                extra={k: v for k, v in data.items() if k not in known})


def list_cases(folder: str | os.PathLike, *, latest_only: bool = True) -> list[Case]:
    """All cases in a dataset folder (only the newest export of each case by default), sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseError(f"dataset folder {folder} does not exist")
    cases = []
    for jp in sorted(folder.glob("*.json")):
        if jp.name.startswith("."):
            continue
        cases.append(read_case(jp))
    if latest_only:
        newest: dict[str, Case] = {}
        for c in cases:
            if c.case_id not in newest or c.version > newest[c.case_id].version:
                newest[c.case_id] = c
        cases = list(newest.values())
    if not cases:
        raise CaseError(f"dataset folder {folder} holds no case files (<case>.json)")
    return sorted(cases, key=lambda c: (c.case_id, c.version))


@contextlib.contextmanager
def _claim_version(folder: Path, case_id: str):
    """Reserve the next free export number for ``case_id`` (safe against concurrent exports).

    The claim is an exclusive lock file ``.<case>__v<N>.lock`` holding the claimer's pid and
    host. A claim left by an export that was killed (its process is gone; same host only) is
    taken over: the volumes it had written are removed and ``N`` is used again.
    """
    n = 1
    while True:
        stem = f"{case_id}__v{n}"
        lock = folder / f".{stem}.lock"
        if (folder / f"{stem}.json").exists() or (n == 1 and (folder / f"{case_id}.json").exists()):
            n += 1  # a finished export
            continue
        if _volumes_exist(folder, stem):
            # volumes without their JSON: an export in progress, or one that was killed
            if not (lock.exists() and _reclaim_if_stale(folder, stem, lock)):
                n += 1
            continue
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _reclaim_if_stale(folder, stem, lock):
                n += 1
            continue
        if (folder / f"{stem}.json").exists() or _volumes_exist(folder, stem):
            # another export finished N (and released its claim) between the look above and our claim
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            n += 1
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            yield n, stem
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        return


_VOLUME_PARTS = ("_image.mha", "_label.mha")


def _volumes_exist(folder: Path, stem: str) -> bool:
    return any((folder / f"{stem}{part}").exists() for part in _VOLUME_PARTS)


def _reclaim_if_stale(folder: Path, stem: str, lock: Path) -> bool:
    """Remove what a killed export of ``stem`` left behind; True when the claim was stale (retry ``stem``)."""
    try:
        owner = lock.read_text().split()
    except OSError:
        return False
    if len(owner) < 2 or not owner[0].isdigit() or owner[1] != socket.gethostname() or pid_alive(int(owner[0])):
        return False  # alive, on another host, or not yet written: not ours to judge
    token = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, token)  # exactly one process wins the take-over
    except OSError:
        return True  # another process took it over first: look again
    try:
        # temporary files first, the volumes last: while a volume exists nobody claims the stem
        for pattern in (f".{stem}_image.mha.*", f".{stem}_label.mha.*", f".{stem}.json.*"):
            for leftover in folder.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        for part in _VOLUME_PARTS:
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{stem}{part}").unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            token.unlink()
    return True


def _export_error(exc: OSError, case_id: str, folder: Path) -> OSError:
    """The OS error of a failed export, saying what happened and what to do."""
    kept = "Nothing of this export was kept; earlier exports are untouched"
    if exc.errno is None:  # raised by LumbarSegment itself: the message already says what to do
        return type(exc)(f"could not export case {case_id}: {exc}. {kept}")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        todo = "free some disk space or choose another dataset folder"
    elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        todo = "choose a writable dataset folder or fix its permissions"
    else:
        todo = "check the dataset folder and try again"
    reason = exc.strerror or str(exc)
    return OSError(exc.errno, f"could not export case {case_id} to {folder}: {reason}; {todo}. {kept}")


def write_case(folder: str | os.PathLike, case_id: str, image: Volume, label: Volume, *,
               labels: dict[int, str], annotated_structures: list[str], patient: str | None = None,
               extra: dict | None = None) -> Case:
    """Write a new version of a case into ``folder``; never overwrites an earlier export."""
    validate_case_id(case_id)
    folder = Path(folder)
    if not image.same_geometry(label):
        raise CaseError(f"case {case_id}: the label map's geometry ({label.describe_geometry()}, origin "
                        f"{label.origin}) differs from the image's ({image.describe_geometry()}, origin "
                        f"{image.origin}); resample the label map onto the image grid")
    if label.array.dtype.kind not in "ui" or label.array.min() < 0 or label.array.max() > 255:
        raise CaseError(f"case {case_id}: label map must hold integers 0..255")
    present = {int(v) for v in np.unique(label.array)} - {0}
    if present - set(labels):
        raise CaseError(f"case {case_id}: label values {sorted(present - set(labels))} are not described")
    if set(labels.values()) - set(annotated_structures):
        raise CaseError(f"case {case_id}: every labelled structure must be listed in annotated_structures")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _write_version(folder, case_id, image, label, labels, annotated_structures, patient, extra)
    except OSError as exc:
        raise _export_error(exc, case_id, folder) from exc


def _write_version(folder: Path, case_id: str, image: Volume, label: Volume, labels, annotated_structures,
                   patient, extra) -> Case:
    with _claim_version(folder, case_id) as (version, stem):
        img_path, lab_path = folder / f"{stem}_image.mha", folder / f"{stem}_label.mha"
        case = Case(case_id=case_id, image_path=img_path, label_path=lab_path, labels=dict(labels),
                    annotated_structures=list(annotated_structures), patient=patient or case_id,
                    version=version, json_path=folder / f"{stem}.json",
                    extra={"exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           **(extra or {})})
        written = []
        try:
            write_volume(image, img_path)
            written.append(img_path)
            write_volume(label.with_array(label.array.astype(np.uint8)), lab_path)
            written.append(lab_path)
            with atomic_path(case.json_path) as tmp:
                tmp.write_text(json.dumps(case.to_json(), indent=1))
        except BaseException:
            for f in written:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            raise
    return case


def class_label_map(case: Case, label: Volume, schema) -> np.ndarray:
    """The case's label map in ``schema``'s values, mapped by structure id (never by position)."""
    from LumbarSegmentLib.core.schema import remap_labels

    return remap_labels(label.array, case.labels, schema)


__all__ = ["Case", "CaseError", "read_case", "list_cases", "write_case", "validate_case_id",
           "class_label_map", "CASE_FORMAT", "CASE_FORMAT_VERSION", "VolumeError"]


# --------------------------------------------------------------------------------------
PATIENT_MAP_FORMAT = "lumbarsegment.patients"


def read_patient_map(path: str | os.PathLike) -> dict[str, str]:
    """``{case id: patient}`` from a patient map file, for data sets whose case files carry no patient.

    Public data sets often hold one patient several times (two sequences of one study, or the same
    volume exported twice) without saying so; every case is then its own patient, and a split by
    patient leaks. The map names the groups found (``scripts/find_same_patient.py`` lists candidates)::

        {"format": "lumbarsegment.patients", "format_version": 1,
         "patients": {"VB1-a": {"cases": ["VB1_07", "VB1_08"], "evidence": "..."}}}

    Cases it does not name stay their own patient.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CaseError(f"patient map {p}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PATIENT_MAP_FORMAT or not isinstance(data.get("patients"), dict):
        raise CaseError(f"patient map {p}: not a {PATIENT_MAP_FORMAT} file (needs \"format\" and a \"patients\" object)")
    out: dict[str, str] = {}
    for patient, entry in data["patients"].items():
        cases = entry.get("cases") if isinstance(entry, dict) else entry
        if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
            raise CaseError(f"patient map {p}: patient {patient!r} needs a list of case ids")
        for c in cases:
            if c in out and out[c] != patient:
                raise CaseError(f"patient map {p}: case {c} is listed under two patients ({out[c]}, {patient})")
            out[c] = str(patient)
    return out


def with_patients(case_list: list[Case], patient_of: dict[str, str]) -> list[Case]:
    """The cases with their patient taken from ``patient_of`` where it names them (copies; files untouched)."""
    return [replace(c, patient=patient_of[c.case_id]) if c.case_id in patient_of else c
            for c in case_list]
