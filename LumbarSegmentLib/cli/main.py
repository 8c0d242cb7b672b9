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


def _tile(value: str):
    if value in ("auto", "patch", "whole"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use auto, patch, whole or a window size in pixels "
                                         f"(e.g. 256)") from None
    if n < 32:
        raise argparse.ArgumentTypeError(f"{value!r}: a window must be at least 32 pixels")
    return n


def _parser() -> argparse.ArgumentParser:
    from LumbarSegmentLib.inference.bn_adapt import BN_ADAPT_HELP, bn_adapt_arg
    from LumbarSegmentLib.core.checks import number_arg
    from LumbarSegmentLib.inference.slice_smoothing import SLICE_SMOOTHING_MM, smoothing_mm_arg

    _positive_int = number_arg(1, kind=int, what="a whole number", use="must be at least 1")
    _overlap = number_arg(0, 0.95, below_hi=True, use="must be at least 0 and below 0.95")

    p = argparse.ArgumentParser(prog="lumbarseg", description="Lumbar-spine MRI segmentation (LumbarSegment).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment one or more sagittal lumbar MR volumes")
    s.add_argument("inputs", nargs="+", help="volume file (.nii[.gz], .nrrd, .mha), DICOM series folder, or a folder of "
                   "volumes and/or DICOM series folders (a cohort)")
    s.add_argument("-o", "--output", required=True,
                   help="label map file for one input (.nii.gz/.nrrd/.mha); a folder for several")
    s.add_argument("--model", default=None, help="model NAME[@VERSION] or package folder; comma-separated for "
                   "an ensemble (default: the registry's default model / default ensemble)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run: auto = CUDA GPU, else Apple MPS, else CPU (default: auto; under "
                   "torchrun each rank takes cuda:LOCAL_RANK)")
    s.add_argument("--mode", default="fast", choices=["fast", "tta", "ensemble"],
                   help="fast: one model, one pass; tta: also the anterior-posterior flip (2 forwards per "
                   "window); ensemble: each model x 2 flips (the default ensemble: 2 x 2 = 4 forwards per window); "
                   "default: fast")
    s.add_argument("--postprocess", default="none", choices=["none", "spine"],
                   help="clean-up: spine = drop foreground blobs that are not connected to the spinal column "
                   "(default none; docs/validation.md gives what it changes)")
    s.add_argument("--bn-adapt", type=bn_adapt_arg, default=0.0, metavar="W", help=BN_ADAPT_HELP)
    s.add_argument("--slice-smoothing", type=smoothing_mm_arg, default=SLICE_SMOOTHING_MM, metavar="MM",
                   help="sigma in mm of the Gaussian average of probabilities across neighbouring slices "
                   f"(default {SLICE_SMOOTHING_MM:g}; 0 = each slice on its own)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="arithmetic: auto = fp16/bf16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    s.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="windows per forward pass (default: 8 on CPU, 32 on CUDA; halved on out-of-memory)")
    s.add_argument("--tile", type=_tile, default="auto", metavar="auto|patch|whole|PIXELS",
                   help="inference window: auto = whole slice when it fits in twice the model's patch, else "
                   "sliding patches; patch; whole; or a square window of PIXELS (>= 32)")
    s.add_argument("--overlap", type=_overlap, default=0.25, metavar="F",
                   help="fraction of a sliding window shared with its neighbour, 0 <= F < 0.95 (default: 0.25)")
    s.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's; under torchrun the node's cores split "
                   "between its ranks)")
    s.add_argument("--reslice", action="store_true", help="accept axial/coronal stacks (cut sagittal slices)")
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
    s.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nrrd", ".mha"],
                   help="label-map file type in cohort mode (default: .nii.gz)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    m = sub.add_parser("models", help="list the installed models")
    m.add_argument("--json", action="store_true", help="print the models as JSON (ref, variant, schema, "
                   "spacing, registry, default/ensemble flags, metrics)")
    # Listed here for --help only: main() hands everything after "web" to the browser front end's own
    # parser (LumbarSegmentWeb.serve), imported lazily so the Lib never depends on trame.
    sub.add_parser("web", help="annotate in a browser: lumbarseg web [--host 127.0.0.1] [--port 8080] "
                   "[--data FOLDER] [--models REGISTRY] (needs the [web] extra; lumbarseg web --help)")
    return p


WEB_INSTALL_HINT = "pip install 'lumbarsegment[web]' (from a source checkout: pip install -e '.[web]')"


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
        print(f"lumbarseg: error: the browser front end is not installed ({exc}); {WEB_INSTALL_HINT}",
              file=sys.stderr)
        return EXIT_FAIL
    return web_main(argv)


def _expand_inputs(inputs: list[str], series_folders: bool = True) -> list[Path]:
    from LumbarSegmentLib.cli.cohort import expand_inputs  # volume files, DICOM series folders, folders of either

    return expand_inputs(inputs, series_folders=series_folders)


def _resolve_models(arg: str | None, mode: str):
    from LumbarSegmentLib.registry.packages import resolve_ensemble, resolve_model

    if arg:
        pkgs = [resolve_model(r.strip()) for r in arg.split(",") if r.strip()]
    elif mode == "ensemble":
        pkgs = resolve_ensemble()
    else:
        pkgs = [resolve_model(None)]
    return pkgs


def _segment_one(src: Path, label_out: Path, args, packages, report_out=None, seg_out=None, preview_out=None,
                 conf_out=None, dicom_seg_out=None) -> dict:
    import time

    from LumbarSegmentLib.core.checks import check_segmentable, empty_result_warning
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.cli.outputs import CasePlan, check_plans, write_case_outputs

    wanted = {"label": label_out, "report": report_out, "seg_nrrd": seg_out, "preview": preview_out,
              "confidence": conf_out, "dicom_seg": dicom_seg_out}
    plan = CasePlan(Path(src), {k: Path(v) for k, v in wanted.items() if v})
    check_plans([plan])  # before any work: no output may be an input, or another output
    t0 = time.perf_counter()
    volume = read_volume(src, series_uid=args.series)
    check_segmentable(volume, packages, allow_reslice=args.reslice)  # nonsense in, refused, not "segmented"
    if dicom_seg_out:
        from LumbarSegmentLib.formats.dicom_seg import require_dicom_source

        require_dicom_source(volume, str(src))  # before inference: a SEG needs source instances to reference
    t_read = time.perf_counter() - t0
    tile = args.tile if args.tile in ("auto", "patch", "whole") else int(args.tile)
    opts = SegmentOptions(device=args.device, mode=args.mode, batch_size=args.batch_size, tile=tile,
                          overlap=args.overlap, allow_reslice=args.reslice, confidence=bool(conf_out),
                          precision=args.precision, threads=args.threads, postprocess=args.postprocess,
                          slice_smoothing_mm=args.slice_smoothing, bn_adapt=args.bn_adapt)
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
    # every output under a hidden temporary name first, then all renamed together (outputs.commit)
    write_case_outputs(plan, result, volume, report, allow_reslice=args.reslice, mode=args.mode)
    return report


def cmd_segment(args) -> int:
    from LumbarSegmentLib.core.checks import check_options
    from LumbarSegmentLib.formats.io import volume_suffix
    from LumbarSegmentLib.cli.outputs import check_input_folders

    check_options(args)
    out_folders = [Path(v) for v in (args.output, args.seg_nrrd, args.preview, args.confidence,
                                     getattr(args, "dicom_seg", None)) if v]
    check_input_folders(args.inputs, out_folders)
    # --series or a label-file output: a folder of series folders is one study to pick a series from
    inputs = _expand_inputs(args.inputs, series_folders=not (args.series or volume_suffix(Path(args.output))))
    packages = _resolve_models(args.model, args.mode)
    if args.mode == "fast" and len(packages) > 1:
        raise ValueError("several models were given: use --mode ensemble")
    out = Path(args.output)
    from LumbarSegmentLib.core.distributed import current_rank

    single = len(inputs) == 1 and not out.is_dir() and not current_rank().distributed
    for name in ("report", "seg_nrrd", "preview", "confidence", "dicom_seg"):
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
        rep = _segment_one(inputs[0], out, args, packages, args.report, args.seg_nrrd, args.preview, args.confidence,
                           args.dicom_seg)
        _summary(rep)
        return EXIT_OK
    if not out.exists():
        out.mkdir(parents=True, exist_ok=True)  # exist_ok: torchrun's ranks race to create it
    if not out.is_dir():
        raise ValueError(f"output {out} must be a folder when segmenting {len(inputs)} inputs")
    from LumbarSegmentLib.cli.cohort import run_cohort  # one process or a torchrun shard; see cohort.py / distributed.py

    return EXIT_FAIL if run_cohort(inputs, out, args, packages, _segment_one, _summary) else EXIT_OK


def _summary(rep: dict) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in rep["voxels_per_class"].items() if k != "background")
    print(f"{rep['input_path']}: {rep['slices']} slices, {rep['device']}/{rep['precision']}, "
          f"{rep['timings_s']['total']:.2f} s; voxels {counts}; outputs: {', '.join(rep['outputs'])}")
    for w in rep["warnings"]:
        print(f"  warning: {w}")


def cmd_models(args) -> int:
    """Each ref once, exactly one default, and where each model comes from (see ``packages.Catalog``)."""
    from LumbarSegmentLib.registry.packages import Catalog

    catalog = Catalog()
    entries = catalog.entries(skip_broken=True)
    for err in catalog.errors:  # list the readable registries, then fail
        print(f"lumbarseg: error: {err}", file=sys.stderr)
    for c in catalog.conflicts:
        print(f"lumbarseg: warning: {c.package.ref} in {c.registry.root} is set aside: the {c.source} registry's "
              f"ref of that name wins; publish that package again to give it a version of its own", file=sys.stderr)
    rows = [{"ref": e.package.ref, "variant": e.package.manifest["architecture"].get("variant"),
             "schema": e.package.schema.name, "spacing_mm": list(e.package.spacing), "source": e.source,
             "registry": str(e.registry.root), "default": e.default, "ensemble": e.ensemble,
             "parent": (e.package.parent or {}).get("ref"), "sha256": e.package.sha256,
             "metrics": e.package.manifest.get("metrics", {}).get("summary", {}),
             "own_source_only": bool((e.package.manifest.get("publish") or {}).get("own_source_only"))}
            for e in entries]
    status = EXIT_FAIL if catalog.errors else EXIT_OK
    if args.json:
        print(json.dumps(rows, indent=1))
        return status
    if not rows:
        print("no models installed" + (" that could be read" if catalog.errors else ""))
        return status
    for r in rows:
        flags = ("default " if r["default"] else "") + ("ensemble" if r["ensemble"] else "")
        origin = r["source"] + (f", fine-tuned from {r['parent']}" if r["parent"] else "") + \
            (" [own source only: may have forgotten other sources]" if r["own_source_only"] else "")
        print(f"{r['ref']:<22} {r['variant'] or '?':<6} schema={r['schema']:<9} spacing={r['spacing_mm']} "
              f"{flags:<17} {origin}  sha256 {r['sha256'][:12]}")
    return status


def _terminate_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) cleans up exactly like Ctrl-C


def main(argv=None) -> int:
    import signal
    import threading

    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["web"]:
        return cmd_web(raw[1:])
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        previous = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    else:
        previous = None
    try:
        return {"segment": cmd_segment, "models": cmd_models}[args.command](args)
    except KeyboardInterrupt:
        print("lumbarseg: interrupted; nothing was written for the unfinished input", file=sys.stderr)
        return EXIT_FAIL
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        print(f"lumbarseg: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
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
