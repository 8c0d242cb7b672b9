"""Where the ``segment`` command's outputs go, checked before any work, and committed all at once.

The rules this module enforces for the command line:

* every output name is checked before anything is read or computed: its type matches
  what will be written (a preview is a PNG, a report is JSON, ...), its folder exists and
  is writable, it is not an existing folder;
* no output is an input (compared after resolving links, and by inode for hard links)
  and no output lies inside an input DICOM folder; no two outputs are the same file;
* cohort outputs get unique names even when two inputs share a file or folder name;
* the outputs of one input are written under hidden temporary names, then renamed in
  one commit; if any rename fails, the ones already renamed are removed and the files
  they replaced are put back, so a failed run leaves what was there before.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from LumbarSegmentLib.core.files import owner_tag, make_partial, sweep_stale_partials
from LumbarSegmentLib.formats.io import volume_suffix

VOLUME_OUT = (".nii.gz", ".nii", ".nrrd", ".mha")
# output kind -> (command-line flag, accepted suffixes, what the file is)
KINDS = {
    "label": ("-o/--output", VOLUME_OUT, "a label map"),
    "seg_nrrd": ("--seg-nrrd", (".seg.nrrd",), "a Slicer segmentation"),
    "preview": ("--preview", (".png",), "a PNG image"),
    "confidence": ("--confidence", VOLUME_OUT, "a confidence map (a volume)"),
    "report": ("--report", (".json",), "a JSON report"),
    "measurements": ("--measurements", (".csv",), "a CSV table"),  # level_outputs.py
    "measurements_png": ("--measurements-png", (".png",), "a PNG image"),
    "dicom_seg": ("--dicom-seg", (".dcm",), "a DICOM SEG file"),
    "summary": ("--report (the cohort summary)", (".json",), "the cohort summary (JSON)"),
}
# The order outputs are written (the report last: it lists the others).
ORDER = ("label", "seg_nrrd", "preview", "confidence", "report")


@dataclass
class CasePlan:
    """One input and the files it will produce, by kind."""

    src: Path
    targets: dict[str, Path] = field(default_factory=dict)

    def ordered(self) -> list[tuple[str, Path]]:
        extra = [k for k in self.targets if k not in ORDER]
        return [(k, self.targets[k]) for k in (*ORDER[:-1], *extra, ORDER[-1]) if k in self.targets]


def check_name(kind: str, path: Path) -> None:
    flag, suffixes, what = KINDS[kind]
    name = path.name.lower()
    if not any(name.endswith(s) for s in suffixes) or name in suffixes:
        raise ValueError(f"{flag} {path}: this output is {what}; give it a name ending in "
                         f"{' or '.join(suffixes)}")
    room = _name_max(path.parent) - TEMPORARY_NAME_EXTRA - len(owner_tag())
    if len(path.name.encode("utf-8", "surrogateescape")) > room:
        raise ValueError(f"{flag} {path.name[:40]}...: the file name is {len(path.name)} characters long; at most "
                         f"{room} fit in this folder (each output is first written under a longer hidden "
                         f"temporary name); choose a shorter name")


TEMPORARY_NAME_EXTRA = 32  # ".<name>.<pid@host>.XXXXXXXX.partial.seg.nrrd" beyond the name and the owner tag


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def input_files(src: Path) -> list[Path]:
    """Every file (or folder) an input consists of: the file, a header's data files, a DICOM folder."""
    found = [src]
    suf = volume_suffix(src)
    if src.is_file() and suf in (".mhd", ".mha", ".nhdr", ".nrrd"):
        from LumbarSegmentLib.formats.headers import data_files

        with contextlib.suppress(OSError):
            found += data_files(src, suf)
    return found


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_plans(plans: list[CasePlan], input_folders: list[Path] = (), extra: CasePlan | None = None,
                pending: list[Path] = ()) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other, or cannot be written.

    ``extra`` holds outputs that belong to no input (the cohort summary); every output is compared
    with every input of the run, not only with its own.
    """
    inputs = [(f, plan.src) for plan in plans for f in input_files(plan.src)]
    claimed: list[tuple[Path, str]] = []
    for plan in [*plans, *([extra] if extra else [])]:
        for kind, target in plan.ordered():
            flag = KINDS.get(kind, (f"--{kind.replace('_', '-')}",))[0]
            if kind in KINDS:
                check_name(kind, target)
            if target.is_dir():
                raise ValueError(f"{flag} {target} is an existing folder; give a file name")
            folder = target.parent
            if not folder.is_dir() and folder in pending:  # made once every check passed: its parent must allow it
                folder = next((f for f in folder.parents if f.is_dir()), Path("."))
            elif not folder.is_dir():
                raise ValueError(f"output folder {folder} does not exist (for {flag} {target}); create it first")
            if not os.access(folder, os.W_OK):
                raise ValueError(f"output folder {folder} is not writable (for {flag} {target}); choose another "
                                 f"folder or make it writable")
            real = target.resolve()
            for f, src in inputs:
                if _same(target, f):
                    raise ValueError(f"{flag} {target} is the input {f} itself: an output must never overwrite an "
                                     f"input; choose another output name")
                if f.is_dir() and f.resolve() in real.parents:
                    raise ValueError(f"{flag} {target} lies inside the input folder {f}; write the outputs "
                                     f"somewhere else, so that the input is left as it was")
            for other, other_flag in claimed:
                if _same(target, other):
                    raise ValueError(f"{other_flag} and {flag} both name {target}; give each output its own file")
            claimed.append((target, flag))
    for folder in input_folders:
        for target, flag in claimed:
            if target.parent.resolve() == folder.resolve():
                raise ValueError(f"the output folder {target.parent} is the input folder {folder}: its results "
                                 f"would be mixed with (and later re-read as) the inputs; choose another folder")


# ------------------------------------------------------------------------------ writing
def stage(plan: CasePlan, writers: dict) -> list[tuple[Path, Path]]:
    """Write each output of ``plan`` to a hidden temporary beside its target; returns ``(tmp, target)`` pairs.

    ``writers`` maps an output kind to ``fn(tmp_path)``. On any failure the temporaries
    written so far are deleted and the error is raised, explained (disk full, ...).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for kind, target in plan.ordered():
            sweep_stale_partials(target.parent, [target.name])  # left by a run that was killed
            tmp = make_partial(target)
            staged.append((tmp, target))
            writers[kind](tmp)
    except OSError as exc:
        discard(staged)
        raise explain_os_error(exc, staged[-1][1] if staged else plan.src) from exc
    except BaseException:
        discard(staged)
        raise
    return staged


def discard(staged: list[tuple[Path, Path]]) -> None:
    for tmp, _ in staged:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename every temporary onto its target, all or nothing (earlier files are restored on failure)."""
    moved: list[tuple[Path, Path | None, bool]] = []  # target, backup of the earlier file, renamed yet
    try:
        for tmp, target in staged:
            backup = None
            if target.exists() or target.is_symlink():
                backup = make_partial(target, suffix="", mark=".backup")
                os.replace(target, backup)
            moved.append((target, backup, False))
            os.replace(tmp, target)
            moved[-1] = (target, backup, True)
    except BaseException as exc:
        for target, backup, renamed in reversed(moved):
            with contextlib.suppress(OSError):
                if renamed:
                    target.unlink()
                if backup is not None:
                    os.replace(backup, target)
        discard(staged)
        if isinstance(exc, OSError):
            raise explain_os_error(exc, moved[-1][0] if moved else staged[0][1]) from exc
        raise
    for _, backup, _ in moved:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def explain_os_error(exc: OSError, target: Path) -> OSError:
    """An OS error while writing ``target``, turned into one line that says what to do."""
    text = str(exc)
    code = exc.errno
    if code is None and "No space left" in text:
        code = errno.ENOSPC
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        msg = f"the disk is full: could not write {target}; free some disk space or choose another output folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = f"could not write {target}: {exc.strerror or text}; choose a writable output folder"
    elif code == errno.EISDIR:
        msg = f"could not write {target}: it is an existing folder; give a file name"
    else:
        msg = text if code is None else f"could not write {target}: {exc.strerror or text}"
    out = OSError(msg + ("" if code is None else ". Nothing of this input was written; earlier files are unchanged"))
    out.errno = code  # kept for callers, but not printed as a bare "[Errno N]"
    return out


def note(message: str) -> None:
    print(f"lumbarseg: note: {message}", file=sys.stderr)


def write_case_outputs(plan: CasePlan, result, volume, report: dict, *, allow_reslice: bool, mode: str,
                       extra_writers: dict | None = None) -> None:
    """Write every output of one segmented input, then commit them together (see :func:`commit`).

    ``extra_writers`` maps further output kinds of ``plan`` (``level_outputs``) to ``fn(tmp_path)``.
    """
    from LumbarSegmentLib.formats.io import write_volume

    refs = [m["ref"] for m in report["models"]]

    def seg_nrrd(tmp):
        from LumbarSegmentLib.formats.segfile import write_seg_nrrd

        write_seg_nrrd(result.labels, result.schema, tmp, model_ref=",".join(refs),  # Slicer tracks the drafter
                       model_sha256=report["models"][0]["sha256"] if len(refs) == 1 else None)

    def preview(tmp):
        from LumbarSegmentLib.formats.preview import render_preview

        render_preview(volume, result.labels, result.schema, tmp, allow_reslice=allow_reslice,
                       title=f"{plan.src.name} - {', '.join(refs)} ({mode})")

    def dicom_seg(tmp):
        from LumbarSegmentLib.formats.dicom_seg import write_dicom_seg

        write_dicom_seg(result.labels, volume, result.schema, tmp, model_name=",".join(refs),
                        model_version=",".join(str(m.get("sha256", ""))[:12] for m in report["models"]))

    writers = {"label": lambda tmp: write_volume(result.labels, tmp), "seg_nrrd": seg_nrrd, "preview": preview,
               "confidence": lambda tmp: write_volume(result.confidence, tmp), "dicom_seg": dicom_seg,
               "report": lambda tmp: tmp.write_text(json.dumps(report, indent=1)), **(extra_writers or {})}
    report["outputs"] = [str(t) for k, t in plan.ordered() if k != "report"]
    commit(stage(plan, writers))


def check_input_folders(raw_inputs: list[str], out_folders: list[Path]) -> None:
    """Refuse folder inputs that are ambiguous, or that the outputs would be written into.

    A folder that holds DICOM files *and* volume files (say, a label map saved into the
    series folder) could be meant as the series or as the volumes: it is refused rather
    than guessed. Results written into an input folder would be mixed with its inputs and
    segmented again by the next run over that folder. ``*_label*`` files are skipped, and
    said so.
    """
    for raw in raw_inputs:
        p = Path(raw)
        if not p.is_dir():
            continue
        for o in out_folders:
            if o.exists() and o.resolve() == p.resolve():
                raise ValueError(f"the output folder {o} is the input folder {p}: results would be mixed with the "
                                 f"inputs (and segmented again by the next run); choose another output folder")
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        vols = [f for f in files if volume_suffix(f)]
        dicoms = [f for f in files[:64] if not volume_suffix(f) and _is_dicom(f)]
        if vols and dicoms:
            raise ValueError(f"{p} holds DICOM files and volume files ({', '.join(f.name for f in vols[:3])}); it is "
                             f"not clear which to segment. Move the volume files out of the series folder, or give "
                             f"the volume files one by one")
        labels = [f.name for f in vols if "_label" in f.name]
        if labels:
            note(f"{p}: skipped {len(labels)} label map(s) ({', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''}); "
                 f"give a file by name to segment it anyway")


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def check_output_folders(folders: list[tuple[str, Path]], inputs: list[Path]) -> None:
    """Refuse output folders that are an input file, or are or lie inside an input folder (a DICOM series),
    before any of them is created: a folder made there would already change the input."""
    for flag, folder in folders:
        real = folder.resolve()
        for src in inputs:
            if src.is_file() and _same(folder, src):
                raise ValueError(f"{flag} {folder} is the input {src} itself; choose an output folder")
            if src.is_dir() and (real == src.resolve() or src.resolve() in real.parents):
                raise ValueError(f"{flag} {folder} lies inside the input folder {src}; write the outputs somewhere "
                                 f"else, so that the input is left as it was")


def note_replaced(plans: list[CasePlan], extra: CasePlan | None = None) -> None:
    """Say which existing files this run will replace (replacing an earlier result is allowed, never silent)."""
    found = [t for plan in [*plans, *([extra] if extra else [])] for _, t in plan.ordered() if t.is_file()]
    if found:
        names = ", ".join(t.name for t in found[:3]) + (" ..." if len(found) > 3 else "")
        note(f"{len(found)} existing output file(s) will be replaced when their input succeeds ({names})")
