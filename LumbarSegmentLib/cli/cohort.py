"""What a cohort is, and where each of its cases' outputs go (the CLI's batch mode, one or many processes).

Why a module of its own: the single-process loop and the ``torchrun`` shards must agree exactly on
the list of cases and on every output path, or two ranks would write the same file (or none would).

**Inputs.** Each command-line input is expanded in order:

* a volume file (``.nii[.gz]``, ``.nrrd``, ``.mha``) is one case;
* a folder holding volume files and/or sub-folders that contain DICOM files is a cohort: one case per
  volume file (``*_label*`` files and hidden files skipped) and one per DICOM sub-folder (a series);
* any other folder (DICOM files directly inside, or nothing recognisable) is one DICOM series case.

A folder of series folders is taken as one study instead (one case, whose series the DICOM reader
lists and ``--series`` picks) when ``--series`` is given or ``-o`` names a label file rather than a
folder: both say "one case".

The list is sorted the same way on every machine, and two cases whose outputs would share a name
(``a.nii.gz`` and ``a.mha``) are refused before any work starts.

**Outputs in cohort mode** (``-o`` is a folder): ``<stem>_seg<format>`` and ``<stem>_report.json`` for
every case; the optional outputs take an optional folder: given without a value (or with ``""``) they go
into the output folder, given a folder they go there (created if missing):

===================  ==================================
``--seg-nrrd [DIR]``   ``<stem>.seg.nrrd``
``--preview [DIR]``    ``<stem>_preview.png``
``--confidence [DIR]`` ``<stem>_confidence.nii.gz``
``--dicom-seg [DIR]``  ``<stem>_seg.dcm`` (DICOM cases only)
``--report [FILE]``    the cohort summary (default ``summary.json`` in the output folder)
===================  ==================================
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from LumbarSegmentLib.formats.io import atomic_path, volume_suffix

SUMMARY_NAME = "summary.json"


class CohortError(ValueError):
    """The inputs cannot be turned into a cohort with one output name per case."""


def _holds_dicom(folder: Path, probe: int = 64) -> bool:
    """True if ``folder`` (searched recursively, the first ``probe`` files) holds a DICOM file (``DICM`` magic)."""
    seen = 0
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        seen += 1
        try:
            with open(f, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if head[128:132] == b"DICM":
            return True
        if seen >= probe:
            break
    return False


def _direct_dicom(folder: Path, probe: int = 16) -> bool:
    """True if DICOM files sit directly in ``folder`` (then it is a series, not a cohort)."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))[:probe]
    for f in files:
        try:
            with open(f, "rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def expand_inputs(inputs: list[str], *, series_folders: bool = True) -> list[Path]:
    """The cases named by the command-line inputs, in a stable order (see the module doc).

    ``series_folders=False`` keeps a folder of DICOM series folders as one case.
    """
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.is_dir():
            out.append(p)
            continue
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
        vols = [f for f in entries if f.is_file() and volume_suffix(f) and "_label" not in f.name]
        series = [] if not series_folders or _direct_dicom(p) else [
            d for d in entries if d.is_dir() and _holds_dicom(d)]
        out.extend(vols + series if (vols or series) else [p])
    return out


def case_stem(path: Path) -> str:
    suf = volume_suffix(path)
    return path.name[: -len(suf)] if suf else path.name


def check_unique_stems(cases: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for c in cases:
        stem = case_stem(c)
        if stem in seen:
            raise CohortError(f"{seen[stem]} and {c} would both write {stem}_seg...; rename one, or segment them "
                              f"into different output folders")
        seen[stem] = c


def _folder(value: str | None, out: Path) -> Path | None:
    """``None``: output not wanted; ``""``: the output folder; else the folder named (created later, by
    :func:`prepare_cohort`, once every output has been checked against every input)."""
    if value is None:
        return None
    folder = out if value == "" else Path(value)
    if folder.exists() and not folder.is_dir():
        raise CohortError(f"{folder}: in cohort mode this option takes a folder, and this is a file")
    return folder


@dataclass(frozen=True)
class CohortPlan:
    """Output folders of a cohort run, resolved once (before any case runs)."""

    out: Path
    label_format: str
    seg_nrrd: Path | None = None
    preview: Path | None = None
    confidence: Path | None = None
    dicom_seg: Path | None = None
    summary: Path | None = None

    @classmethod
    def from_args(cls, out: Path, args) -> "CohortPlan":
        report = getattr(args, "report", None)
        summary = None if report is None else (out / SUMMARY_NAME if report == "" else Path(report))
        if summary is not None and (summary.is_dir() or not (summary.parent.is_dir() or summary.parent == out)):
            raise CohortError(f"--report {report}: in cohort mode it names the summary JSON file, in an "
                              f"existing folder")
        return cls(out=out, label_format=args.format, seg_nrrd=_folder(args.seg_nrrd, out),
                   preview=_folder(args.preview, out), confidence=_folder(args.confidence, out),
                   dicom_seg=_folder(getattr(args, "dicom_seg", None), out), summary=summary)

    def folders(self) -> list[tuple[str, Path]]:
        """Every output folder with its flag (the output folder first)."""
        named = (("--seg-nrrd", self.seg_nrrd), ("--preview", self.preview), ("--confidence", self.confidence),
                 ("--dicom-seg", self.dicom_seg))
        return [("-o/--output", self.out), *((flag, f) for flag, f in named if f is not None)]

    def case(self, case: Path):
        """One case and every output it will produce, by kind (an ``outputs.CasePlan``)."""
        from LumbarSegmentLib.cli.outputs import CasePlan

        s = case_stem(case)
        targets = {"label": self.out / f"{s}_seg{self.label_format}",
                   "report": self.out / f"{s}_report.json",
                   "seg_nrrd": self.seg_nrrd / f"{s}.seg.nrrd" if self.seg_nrrd else None,
                   "preview": self.preview / f"{s}_preview.png" if self.preview else None,
                   "confidence": self.confidence / f"{s}_confidence.nii.gz" if self.confidence else None,
                   "dicom_seg": self.dicom_seg / f"{s}_seg.dcm" if self.dicom_seg else None}
        return CasePlan(case, {k: v for k, v in targets.items() if v is not None})


def prepare_cohort(cases: list[Path], out: Path, args) -> CohortPlan:
    """Check every output of every case against every input, then create the output folders.

    The same rules as for one input (``outputs.check_plans``): each output's type by its name, never an
    input or inside an input DICOM folder, never two outputs on one file; and no output folder is made
    inside an input folder. Nothing is created before all of it passed.
    """
    from LumbarSegmentLib.cli.outputs import CasePlan, check_output_folders, check_plans, note_replaced

    check_unique_stems(cases)
    plan = CohortPlan.from_args(out, args)
    check_output_folders(plan.folders(), cases)
    plans = [plan.case(c) for c in cases]
    extra = CasePlan(Path("summary"), {"summary": plan.summary}) if plan.summary is not None else None
    check_plans(plans, extra=extra, pending=[f for _, f in plan.folders()])
    for _, folder in plan.folders():
        folder.mkdir(parents=True, exist_ok=True)  # exist_ok: torchrun's ranks race to create them
    note_replaced(plans, extra)
    return plan


def case_row(case: Path, rank: int, seconds: float, report: dict | None = None, error: str | None = None) -> dict:
    """One line of the cohort summary."""
    row = {"input": str(case), "rank": rank, "ok": error is None, "seconds": round(seconds, 3)}
    if report is not None:
        row.update(outputs=report.get("outputs", []), device=report.get("device"),
                   voxels_per_class=report.get("voxels_per_class"))
    if error is not None:
        row["error"] = error
    return row


def write_summary(path: Path, rows: list[dict], *, world_size: int, wall_s: float, models: list[str]) -> dict:
    """Write the cohort summary JSON (atomic) and return it."""
    ok = sum(r["ok"] for r in rows)
    summary = {"format": "lumbarsegment.cohort_summary", "format_version": 1,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world_size, "models": models,
               "cases": len(rows), "succeeded": ok, "failed": len(rows) - ok, "wall_s": round(wall_s, 3),
               "cases_per_min": round(60.0 * len(rows) / wall_s, 3) if wall_s > 0 else None,
               "rows": sorted(rows, key=lambda r: r["input"])}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    return summary


def run_cohort(cases: list[Path], out: Path, args, packages, segment_one, print_case,
               plan: CohortPlan | None = None) -> int:
    """Segment this process's share of ``cases`` into ``out``; return how many cases failed.

    ``segment_one(case_plan, args=, packages=)`` does one case (the CLI's, so a cohort case is
    exactly a single-input run); ``print_case(report)`` prints its one-line result. One bad case is
    reported and the others still run. Under torchrun every rank runs this on the same list and keeps
    its shard; rank 0 gathers the rows and writes the summary (always when distributed, else only
    with ``--report``), and its count (every rank's failures) is the run's exit status. The other ranks
    return 0: torchrun ends all ranks when one exits with an error, so a rank whose own case failed
    must not cut short the others, and all wait until the summary is written.
    """
    from LumbarSegmentLib.core import distributed as dist

    plan = plan or prepare_cohort(cases, out, args)
    me = dist.current_rank()
    dist.init(me)
    try:
        args.device = dist.device_for(me, args.device)
        args.threads = dist.threads_for(me, args.threads)
        mine = dist.shard(cases, me)
        if me.distributed:
            print(f"{me.tag}{len(mine)} of {len(cases)} cases on {args.device}", file=sys.stderr)
        started = time.perf_counter()
        rows = []
        for src in mine:
            t0 = time.perf_counter()
            try:
                report = segment_one(plan.case(src), args=args, packages=packages)
                print_case(report)
                rows.append(case_row(src, me.rank, time.perf_counter() - t0, report))
            except Exception as exc:  # one bad case must not stop a cohort
                rows.append(case_row(src, me.rank, time.perf_counter() - t0, error=str(exc)))
                print(f"lumbarseg: error: {me.tag}{src}: {exc}", file=sys.stderr)
        everyone = dist.gather_rows(me, rows)
        wall = time.perf_counter() - started
        if everyone is not None and (plan.summary is not None or me.distributed):
            write_summary(plan.summary or out / SUMMARY_NAME, everyone, world_size=me.world, wall_s=wall,
                          models=[p.ref for p in packages])
        # torchrun stops every rank as soon as one exits with an error: no rank may leave before rank 0
        # has written the summary
        dist.barrier(me)
    finally:
        dist.finish(me)
    if everyone is None:  # not rank 0: its failures are in rank 0's summary and exit status
        return 0
    failed = sum(not r["ok"] for r in everyone)
    if failed:
        print(f"lumbarseg: {failed} of {len(everyone)} inputs failed", file=sys.stderr)
    return failed
