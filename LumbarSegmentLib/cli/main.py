"""``lumbarseg``: the command line, a thin layer over the engine.

    lumbarseg segment INPUT [INPUT ...] -o OUTPUT [--model NAME[,NAME]] [--device auto|cpu|cuda]
                      [--mode fast|tta|ensemble] [--report R.json] [--seg-nrrd S.seg.nrrd] [--preview P.png]
    lumbarseg models

INPUT is a volume file, a DICOM series folder, or a folder of volumes (a cohort).
For one input OUTPUT is the label-map file; for several it is a folder. Every
output of a case is written under a temporary name and renamed only when the
whole case succeeded: a failed or cancelled run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from LumbarSegmentLib.core.checks import number_arg
    from LumbarSegmentLib.core.help_format import DOCS_NOTE
    from LumbarSegmentLib.inference.options import MAX_THREADS, SegmentOptions

    p = _Parser(prog="lumbarseg", description="Lumbar-spine MRI segmentation (LumbarSegment).", epilog=DOCS_NOTE)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment one or more sagittal lumbar MR volumes")
    s.add_argument("inputs", nargs="+", help="volume file (.nii[.gz], .nrrd, .mha), DICOM series folder, or a folder of "
                   "volumes and/or DICOM series folders (a cohort)")
    s.add_argument("-o", "--output", required=True,
                   help="label map file for one input (.nii.gz/.nrrd/.mha); a folder for several")
    s.add_argument("--model", default=None, help="model NAME[@VERSION] or package folder; comma-separated for "
                   "an ensemble (default: the registry's default model / default ensemble)")
    SegmentOptions.add_arguments(s)  # device, mode, windows, precision...: flags, help and ranges in one place
    s.add_argument("--series", default=None, help="SeriesInstanceUID to read from a DICOM folder with several")
    # One input: each of these names a file. A cohort: each takes an optional folder (none, or "": the
    # output folder) and --report names the cohort summary; see LumbarSegmentLib/cli/cohort.py and docs/cli.md.
    s.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                   help="one input: write the JSON run report to PATH; a cohort: write the cohort summary "
                   "(default OUTPUT/summary.json; per-case reports are always written)")
    s.add_argument("--seg-nrrd", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a Slicer segmentation (.seg.nrrd); a cohort: into folder PATH (default OUTPUT)")
    s.add_argument("--preview", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a PNG of central sagittal slices with the overlay; a cohort: into folder PATH")
    s.add_argument("--confidence", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the per-voxel confidence map (max probability); a cohort: into folder PATH")
    s.add_argument("--dicom-seg", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a DICOM SEG referencing the source series (DICOM inputs only); a cohort: "
                   "into folder PATH")
    s.add_argument("--levels", action="store_true",
                   help="name every vertebral body and disc by level (L1..L5, L4-L5, ...): the label map holds one "
                   "value per level, the report lists the levels and an ordering check (docs/levels.md)")
    s.add_argument("--measurements", default=None, metavar="FILE.csv",
                   help="one input: also write per-level body/disc heights (mm) and volumes (mm3) as CSV")
    s.add_argument("--measurements-png", default=None, metavar="FILE.png",
                   help="one input: also write a PNG of the height lines on the mid-sagittal slice")
    s.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nrrd", ".mha"],
                   help="label-map file type in cohort mode (default: .nii.gz)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r = sub.add_parser("refine", help="correct a label map with clicks (positive: this is STRUCTURE; "
                       "negative: it is not)")
    r.add_argument("image", help="the image the labels belong to (volume file or DICOM series folder)")
    r.add_argument("--labels", required=True, help="the current label map (a draft or the last result)")
    r.add_argument("-o", "--output", required=True, help="the corrected label map (.nii.gz/.nrrd/.mha)")
    r.add_argument("--click", action="append", required=True, metavar="X,Y,Z,STRUCTURE,+|-",
                   help="a click in LPS millimetres with a class id of the model (e.g. vertebral_body) and a "
                   "sign; repeat it, oldest first, for every click so far")
    r.add_argument("--model", default=None, help="model NAME[@VERSION] or package folder (default: the installed "
                   "click-guided model, else the default model with the training-free rules)")
    r.add_argument("--threads", type=number_arg(1, MAX_THREADS, kind=int, what="a whole number",
                                                use=f"use 1-{MAX_THREADS} CPU threads"),
                   default=None, metavar="N", help="CPU threads for PyTorch")
    m = sub.add_parser("models", help="list the installed models")
    m.add_argument("--json", action="store_true", help="print the models as JSON (ref, variant, schema, "
                   "spacing, registry, default/ensemble flags, metrics)")
    # Listed here for --help only: main() hands everything after "web" to the browser front end's own
    # parser (LumbarSegmentWeb.serve), imported lazily so the Lib never depends on trame.
    sub.add_parser("web", help="annotate in a browser: lumbarseg web [--host 127.0.0.1] [--port 8080] "
                   "[--data FOLDER] [--models REGISTRY] (needs the [web] extra; lumbarseg web --help)")
    from LumbarSegmentLib.core.help_format import show_defaults

    return show_defaults(p)


# options that take an optional file name: given just before the input, they swallow it
_OPTIONAL_FILE_OPTIONS = ("--report", "--seg-nrrd", "--preview", "--confidence", "--dicom-seg")
_argv_seen: list[str] = []


def swallowed_input_hint(argv: list[str]) -> str:
    """Why ``inputs`` is missing when an optional-file option took the input as its value, else ''."""
    for i, tok in enumerate(argv[:-1]):
        value = argv[i + 1]
        if tok in _OPTIONAL_FILE_OPTIONS and not value.startswith("-"):
            return (f"; {tok} took {value} as its own file name, so no input was left: put the inputs first "
                    f"(lumbarseg segment {value} -o OUT ... {tok} FILE) or give {tok} a file name")
    return ""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose 'inputs are required' error says when an option swallowed the input."""

    def error(self, message):
        if "required" in message and "inputs" in message:
            message += swallowed_input_hint(_argv_seen)
        super().error(message)


FRONTENDS = "lumbarsegment.frontends"  # entry-point group: front ends register themselves here


def cmd_web(argv: list[str]) -> int:
    """``lumbarseg web ...``: start the browser front end (a separate package, optional extra).

    The front end registers itself under the ``lumbarsegment.frontends`` entry point, so the Lib never
    imports it: the dependency points from the front end to the Lib only (docs/architecture.md).
    """
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=FRONTENDS) if ep.name == "web"]
    try:
        if not found:
            raise ImportError("no 'web' front end is registered")
        web_main = found[0].load()
    except ImportError as exc:
        from LumbarSegmentLib.core.install_hint import extra_install_hint

        print(f"lumbarseg: error: the browser front end is not installed ({exc}); it is the [web] extra: "
              f"{extra_install_hint('web')}", file=sys.stderr)
        return EXIT_FAIL
    return web_main(argv)


def _expand_inputs(inputs: list[str], series_folders: bool = True) -> list[Path]:
    from LumbarSegmentLib.cli.cohort import expand_inputs  # volume files, DICOM series folders, folders of either

    return expand_inputs(inputs, series_folders=series_folders)


def resolve_models(arg: str | None, mode: str):
    from LumbarSegmentLib.registry.catalog import resolve_ensemble, resolve_model

    if arg:
        pkgs = [resolve_model(r.strip()) for r in arg.split(",") if r.strip()]
    elif mode == "ensemble":
        pkgs = resolve_ensemble()
    else:
        pkgs = [resolve_model(None)]
    return pkgs


def _segment_one(plan, args, packages) -> dict:
    """Segment one input and write the outputs ``plan`` (an ``outputs.CasePlan``) names, by kind."""
    import time

    from LumbarSegmentLib.core.checks import check_segmentable, empty_result_warning
    from LumbarSegmentLib.inference.engine import segment_volume
    from LumbarSegmentLib.inference.options import SegmentOptions
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.cli.outputs import check_plans, write_case_outputs

    src, wanted = plan.src, plan.targets
    check_plans([plan])  # before any work: no output may be an input, or another output
    t0 = time.perf_counter()
    volume = read_volume(src, series_uid=args.series)
    check_segmentable(volume, packages, allow_reslice=args.reslice)  # nonsense in, refused, not "segmented"
    if "dicom_seg" in wanted:
        from LumbarSegmentLib.formats.dicom_seg import require_dicom_source

        require_dicom_source(volume, str(src))  # before inference: a SEG needs source instances to reference
    t_read = time.perf_counter() - t0
    opts = SegmentOptions.from_namespace(args, confidence="confidence" in wanted)  # a cohort rank set its device
    bar = None
    from LumbarSegmentLib.core.progress import BATCH, ProgressLog

    # A front end that runs this CLI as a child names a JSON-lines file in $LUMBARSEG_PROGRESS and
    # draws a determinate bar from these events (segment_job.py); the tqdm bar is for a terminal.
    events = ProgressLog.from_environment()

    def progress(done, total):
        nonlocal bar
        events.write(BATCH, done=done, total=total, input=str(src))
        if bar is None and not args.no_progress:  # made at the first report: its first frame knows the total
            from tqdm import tqdm

            bar = tqdm(total=total, desc=src.name, unit=" batches", leave=False, file=sys.stderr)
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        result = segment_volume(volume, packages, opts, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    report = dict(result.report)
    report["input_path"] = str(src)
    report["timings_s"] = {"read": round(t_read, 4), **report["timings_s"]}
    warning = empty_result_warning(result.labels)
    if warning:
        report["warnings"] = [*report.get("warnings", []), warning]
    from LumbarSegmentLib.spine.level_outputs import LevelRequest, apply_levels  # --levels / --measurements; no-op without them

    request = LevelRequest(getattr(args, "levels", False), "measurements" in wanted, "measurements_png" in wanted)
    result, extra = apply_levels(request, result, volume, report, allow_reslice=args.reslice)
    # every output under a hidden temporary name first, then all renamed together (outputs.commit)
    write_case_outputs(plan, result, volume, report, allow_reslice=args.reslice, mode=args.mode, extra_writers=extra)
    return report


def cmd_segment(args, resolve=None) -> int:
    """``resolve(model_arg, mode)`` -> models: a warm worker (worker.py) passes its cache of loaded models."""
    from LumbarSegmentLib.formats.io import volume_suffix
    from LumbarSegmentLib.cli.outputs import check_input_folders
    from LumbarSegmentLib.inference.options import SegmentOptions
    from LumbarSegmentLib.inference.runtime_choice import auto_runtime

    # refused before any work (a Namespace built by a caller, not argparse); then auto becomes the runtime
    # that will run: OpenVINO without a GPU (where installed), else PyTorch
    args.runtime = auto_runtime(SegmentOptions.from_namespace(args))
    if not str(args.output).strip():
        raise ValueError("-o/--output is empty; give a label-map file name (one input) or a folder (several)")
    out_folders = [Path(v) for v in (args.output, args.seg_nrrd, args.preview, args.confidence,
                                     getattr(args, "dicom_seg", None)) if v]
    check_input_folders(args.inputs, out_folders)
    # --series or a label-file output: a folder of series folders is one study to pick a series from
    inputs = _expand_inputs(args.inputs, series_folders=not (args.series or volume_suffix(Path(args.output))))
    if args.series:  # --series picks a series of a DICOM folder; on a volume file it would be ignored
        files = [p for p in inputs if p.is_file()]
        if files:
            raise ValueError(f"--series picks a series inside a DICOM folder, but {files[0]} is a volume file; "
                             f"leave --series out, or give the DICOM folder")
    packages = (resolve or resolve_models)(args.model, args.mode)
    if args.mode == "fast" and len(packages) > 1:
        raise ValueError("several models were given: use --mode ensemble")
    out = Path(args.output)
    from LumbarSegmentLib.core.distributed import current_rank

    single = len(inputs) == 1 and not out.is_dir() and not current_rank().distributed
    for name in ("report", "seg_nrrd", "preview", "confidence", "dicom_seg", "measurements", "measurements_png"):
        extra = getattr(args, name)
        if single and extra == "":
            raise ValueError(f"--{name.replace('_', '-')} needs a file name when segmenting one input")
        folder = Path(extra).parent if extra else None
        if folder is not None and not folder.is_dir() and single:
            raise ValueError(f"output folder {folder} does not exist (for {extra}); create it first")
    if single:
        if not out.parent.is_dir():
            raise ValueError(f"output folder {out.parent} does not exist; create it first")
        if not volume_suffix(out):
            raise ValueError(f"output {out}: use a .nii.gz, .nrrd or .mha file name (or an existing folder)")
        from LumbarSegmentLib.cli.outputs import CasePlan

        wanted = {"label": out, "report": args.report, "seg_nrrd": args.seg_nrrd, "preview": args.preview,
                  "confidence": args.confidence, "dicom_seg": args.dicom_seg, "measurements": args.measurements,
                  "measurements_png": args.measurements_png}
        rep = _segment_one(CasePlan(Path(inputs[0]), {k: Path(v) for k, v in wanted.items() if v}), args, packages)
        _summary(rep)
        return EXIT_OK
    if args.measurements or args.measurements_png:
        raise ValueError("--measurements and --measurements-png take one input; run each input on its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} must be a folder when segmenting {len(inputs)} inputs")
    from LumbarSegmentLib.cli.cohort import prepare_cohort, run_cohort  # one process or a torchrun shard; see cohort.py

    plan = prepare_cohort(inputs, out, args)  # every output checked against every input, then folders made
    return EXIT_FAIL if run_cohort(inputs, out, args, packages, _segment_one, _summary, plan) else EXIT_OK


def _summary(rep: dict) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in rep["voxels_per_class"].items() if k != "background")
    print(f"{rep['input_path']}: {rep['slices']} slices, {rep['device']}/{rep['precision']}, "
          f"{rep['timings_s']['total']:.2f} s; voxels {counts}; outputs: {', '.join(rep['outputs'])}")
    if "ordering" in rep:  # --levels / --measurements
        o = rep["ordering"]
        print(f"  levels: {' '.join(lv['name'] for lv in rep['levels'])} (ordering confidence {o['confidence']:.2f}"
              + "".join(f"; check {f['level'] or ''}: {f['code']}" for f in o["flags"]) + ")")
    for w in rep["warnings"]:
        print(f"  warning: {w}")


def cmd_refine(args) -> int:
    """``lumbarseg refine``: the clicks applied to the labels (LumbarSegmentLib/inference/refine.py); exit 2 for bad clicks."""
    from LumbarSegmentLib.inference.refine import ClickError, refine_file

    try:
        report = refine_file(args.image, args.labels, args.output, args.click, model=args.model, threads=args.threads)
    except ClickError as exc:
        print(f"lumbarseg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.output}: {report['changed_voxels']} voxels changed by {len(args.click)} click(s) "
          f"({report['model']}, {report['method']})")
    return EXIT_OK


def cmd_models(args) -> int:
    """Each ref once, exactly one default, and where each model comes from (see ``registry.catalog.Catalog``)."""
    from LumbarSegmentLib.registry.catalog import Catalog

    catalog = Catalog()
    entries = catalog.entries(skip_broken=True)
    catalog.errors += _missing_refs(catalog, entries)
    for err in catalog.errors:  # list the readable registries, then fail
        print(f"lumbarseg: error: {err}", file=sys.stderr)
    for c in catalog.conflicts:
        print(f"lumbarseg: warning: {c.package.ref} in {c.registry.root} is set aside: the {c.source} registry's "
              f"ref of that name wins; publish that package again to give it a version of its own", file=sys.stderr)
    from LumbarSegmentLib.registry.listing import model_line, model_row

    installed = {e.package.ref for e in entries}
    rows = [model_row(e, installed) for e in entries]
    status = EXIT_FAIL if catalog.errors else EXIT_OK
    if args.json:
        print(json.dumps(rows, indent=1))
        return status
    if not rows:
        print("no models installed" + (" that could be read" if catalog.errors else ""))
        return status
    for r in rows:
        print(model_line(r))
    return status


def _missing_refs(catalog, entries) -> list[str]:
    """The default or ensemble members that an index names but no registry holds (they fail every segment)."""
    if catalog.errors:
        return []
    held = {e.package.ref for e in entries} | {e.package.name for e in entries}  # a bare name: any version
    wanted = [("default model", catalog.default_ref(skip_broken=True))]
    wanted += [("default ensemble member", r) for r in catalog.ensemble_refs()]
    return [f"the {what} {ref} is named in an index but no registry holds it; publish it again, or choose another "
            f"(lumbarseg-train publish ... / edit index.json)" for what, ref in wanted if ref and ref not in held]


def _terminate_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) cleans up exactly like Ctrl-C


def main(argv=None) -> int:
    import signal
    import threading

    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["web"]:
        return cmd_web(raw[1:])
    _argv_seen[:] = raw
    args = build_parser().parse_args(raw)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        previous = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    else:
        previous = None
    try:
        return {"segment": cmd_segment, "models": cmd_models, "refine": cmd_refine}[args.command](args)
    except KeyboardInterrupt:
        print("lumbarseg: interrupted; nothing was written for the unfinished input", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:  # `lumbarseg models --json | head`: the reader has all it wanted
        _quiet_stdout()
        return EXIT_OK
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        print(f"lumbarseg: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def one_line(exc: BaseException) -> str:
    """The error as the user should read it: an OS error's own message, not a bare '[Errno N]' prefix."""
    if isinstance(exc, MemoryError):
        return "not enough memory for this image; close other programs, or crop or downsample the image"
    if isinstance(exc, OSError) and exc.errno in (28, 122) and exc.strerror:  # ENOSPC, EDQUOT
        from LumbarSegmentLib.cli.outputs import explain_os_error

        return str(explain_os_error(exc, Path(exc.filename or "the output")))
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
