"""``lumbarseg-train``: train, cross-validate, fine-tune, evaluate, publish and export models.

Examples (the training guide, training.md in the docs, has more)::

    lumbarseg-train finetune --from uvd-starter --data DATA --out runs/ft
    lumbarseg-train evaluate --model runs/ft/package --data DATA --cases MY_CASE_1,MY_CASE_2
    lumbarseg-train publish runs/ft/package --data DATA
    lumbarseg-train train --data DATA --variant UVD --val-cases MY_CASE_1,MY_CASE_2 --out runs/uvd
    lumbarseg-train cv --data DATA --variant UMD --folds 5 --out runs/umd-cv
    lumbarseg-train holdout --data DATA --show
    lumbarseg-train export runs/uvd/best.pt --out pkg/ --name my-model

Under ``torchrun --nproc_per_node N lumbarseg-train train ...`` training runs data-parallel.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from LumbarSegmentLib.inference.bn_adapt import BN_ADAPT_HELP, bn_adapt_arg
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.slice_smoothing import smoothing_mm_arg

from .cli_args import _add_data_args, _add_train_args, _folds, _mm, _threads, add_precision_arg, id_list
from .config import config_from_args

log = logging.getLogger("lumbarseg.train")


def _dataset(a):
    """The ``--data`` folder(s) of a command with its ``--patients`` map: the one view of the dataset."""
    from LumbarSegmentLib.dataset.dataset import Dataset

    return Dataset(a.data, getattr(a, "patients", None) or None)


def _select(a):
    from LumbarSegmentLib.dataset.dataset import SelectionError

    from .data import DataError

    try:
        cases, also = _dataset(a).select(id_list(a.cases) or None, id_list(a.exclude))
    except SelectionError as exc:
        raise DataError(str(exc)) from None
    if also:
        log.warning("not using %s: same patient as an excluded case", ", ".join(also))
    return cases


def _without_held_out(a, cases):
    """The cases minus those the dataset's frozen split holds out for the publish gate (``--use-held-out``
    keeps them): a fine-tune that saw them would be graded on its own training cases."""
    if getattr(a, "use_held_out", False):
        return cases
    kept, held = _dataset(a).without_held_out(cases)
    if held:
        log.warning("not training on %s: held out for the publish gate (lumbarseg-train holdout --show; "
                    "--use-held-out trains on them anyway)", ", ".join(held))
    return kept


def _split(a, cases):
    from .splits import fixed_split

    if a.val_cases:
        train, val, dropped = fixed_split(cases, id_list(a.val_cases))
        if dropped:
            log.warning("not training on %s: same patient as a validation case", ", ".join(dropped))
        return train, val
    return list(cases), []


# --------------------------------------------------------------------------------------
def refuse_existing_run(a) -> None:
    """``--out`` holding another run without ``--resume`` would mix two runs' checkpoints and logs: refuse.

    A ``progress.jsonl`` without any training step (a start that failed on its settings or data) is
    not a run: the corrected command may use the folder."""
    out = Path(a.out)
    found = [n for n in ("last.pt", "best.pt") if (out / n).exists()]
    if _trained_steps(out / "progress.jsonl"):
        found.append("progress.jsonl")
    if found and not getattr(a, "resume", False):
        raise ValueError(f"{out} already holds a training run ({', '.join(found)}); continue it with --resume, "
                         f"or choose a new --out folder")


def _trained_steps(path: Path) -> bool:
    """True when a progress log records at least one training step, epoch or finished run."""
    import json

    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            event = json.loads(line).get("event")
        except (ValueError, AttributeError):
            return True  # not ours to judge: keep refusing
        if event in ("step", "epoch", "done"):
            return True
    return False


def refuse_output_in_dataset(a) -> None:
    """A dataset folder is input: ``--out`` may be neither the ``--data`` folder nor a folder inside it."""
    out, data = getattr(a, "out", None), getattr(a, "data", None)
    if not out or not data:
        return
    o, d = Path(out).resolve(), Path(data).resolve()
    if o == d or d in o.parents:
        raise ValueError(f"--out {out} is {'the' if o == d else 'inside the'} dataset folder {data}: a dataset folder "
                         f"is input and is never written into (its case files would be mixed with the results); "
                         f"choose an --out folder outside it")


def command_line() -> str:
    """This run's command as typed (program name normalised), recorded in the package's provenance."""
    import shlex

    return "lumbarseg-train " + " ".join(shlex.quote(x) for x in sys.argv[1:])


def cmd_train(a) -> int:
    from .run_outputs import RunOutputs
    from .trainer import train

    refuse_existing_run(a)
    cfg = config_from_args(a)
    cases = _select(a)
    tr, va = _split(a, cases)
    r = train(cfg, tr, va, out_dir=a.out, outputs=RunOutputs(provenance={"command": command_line()}))
    if r.package is not None:
        print(f"package: {r.package.path}")
        if r.val_metrics:
            print(f"validation mean Dice (fg) {r.val_metrics['mean_dice_fg']:.4f}, "
                  f"mean IoU (fg) {r.val_metrics['mean_iou_fg']:.4f}")
    return 0


def cmd_cv(a) -> int:
    from .crossval import cross_validate

    cfg = config_from_args(a)
    summary = cross_validate(cfg, _select(a), k=a.folds, out_dir=a.out, only_folds=id_list(a.fold) or None)
    print(summary["markdown"])
    return 0


def _finetune_config(args, parent):
    """The run's config from a ``lumbarseg-train finetune`` command line: the parent's spacing unless
    ``--spacing`` was given (the architecture is the parent's anyway: ``finetune.finetune`` sets it)."""
    cfg = config_from_args(args)
    if getattr(args, "spacing", None) in (None, (1.0, 1.0)):
        cfg = cfg.replace(spacing=tuple(parent.spacing))
    return cfg


def _resolve(a, ref: str):
    """A model ref resolved in ``--registry`` when given, else in the default catalogue."""
    from LumbarSegmentLib.registry.catalog import resolve_model
    from LumbarSegmentLib.registry.registry import Registry

    return resolve_model(ref, [Registry(a.registry, read_only=True)] if a.registry else None)


def cmd_finetune(a) -> int:
    from .finetune import finetune, retention_from_args
    from .run_outputs import RunOutputs

    refuse_existing_run(a)
    cases = _without_held_out(a, _select(a))
    tr, va = _split(a, cases)
    parent = _resolve(a, a.source)
    teacher = _resolve(a, a.teacher) if a.teacher else None
    r = finetune(parent, tr, va, out_dir=a.out, schema=a.schema, config=_finetune_config(a, parent),
                 retention=dataclasses.replace(retention_from_args(a), teacher=teacher),
                 outputs=RunOutputs(provenance={"command": command_line()}))
    print(f"package: {r.package.path}" if r.package else "no package written")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate_cli

    return evaluate_cli(a)


def cmd_publish(a) -> int:
    from .publish import publish_cli

    return publish_cli(a)


def cmd_export(a) -> int:
    from .finetune import export_checkpoint

    pkg = export_checkpoint(a.checkpoint, a.out, name=a.name, half=not a.fp32_weights)
    print(f"package: {pkg.path}")
    return 0


def cmd_soup(a) -> int:
    from .soup import soup

    pkgs = [_resolve(a, ref) for ref in id_list(a.packages)]
    try:
        weights = [float(w) for w in id_list(a.weights)] if a.weights else None
    except ValueError:
        raise ValueError(f"--weights {a.weights!r}: give one number per package, comma-separated") from None
    pkg = soup(pkgs, a.out, name=a.name or pkgs[0].name, weights=weights, command=command_line(),
               half=not a.fp32_weights)
    print(f"package: {pkg.path} (the average of {', '.join(p.ref for p in pkgs)})")
    return 0


def cmd_effort(a) -> int:
    from .effort_report import effort_cli

    return effort_cli(a)


def cmd_holdout(a) -> int:
    """Show, choose or redraw the dataset's frozen held-out cases (the publish gate grades on them)."""
    from LumbarSegmentLib.dataset.cases import list_cases
    from LumbarSegmentLib.dataset.holdout import MIN_HOLDOUT_CASES, frozen_split, redraw_holdout, set_holdout

    if a.cases is not None and a.every is not None:
        raise ValueError("give --cases or --every, not both")
    if a.cases is not None:
        cases = list_cases(a.data)
        patient_of = {c.case_id: c.patient for c in cases}
        wanted = id_list(a.cases)
        if not wanted:
            raise ValueError("--cases names no case; give case ids, comma-separated")
        # a patient's name is accepted too; either way all of that patient's cases are held out
        known = set(patient_of) | set(patient_of.values())
        unknown = [x for x in wanted if x not in known]
        if unknown:
            raise ValueError(f"unknown case id(s) in {a.data}: {', '.join(unknown)} (it holds "
                             f"{', '.join(sorted(patient_of)[:8])}{', ...' if len(patient_of) > 8 else ''})")
        split = set_holdout(a.data, sorted({patient_of.get(x, x) for x in wanted}))
    elif a.every is not None:
        split = redraw_holdout(a.data, a.every)
    elif getattr(a, "assign", False):  # the explicit command that writes new patients into .holdout.json
        split = frozen_split(a.data, update=True)
    else:
        split = frozen_split(a.data, update=False)  # showing changes nothing on disk
    if a.show or (a.cases is None and a.every is None):
        print(f"held out ({len(split.holdout)} of {len(split.holdout) + len(split.train)} cases; of new patients, "
              f"1 in {split.every} held out): {', '.join(split.holdout_ids) or 'none'}")
        print(f"train: {', '.join(split.train_ids) or 'none'}")
    else:
        print(f"held out: {', '.join(split.holdout_ids) or 'none'}")
    if not split.enough:
        print(f"warning: fewer than {MIN_HOLDOUT_CASES} held-out cases; publish will not replace the model in "
              f"use without --force", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from LumbarSegmentLib.core.help_format import DOCS_NOTE, DefaultsFormatter

    examples = __doc__.split("Examples", 1)[1].split("::", 1)[1].strip("\n")
    p = argparse.ArgumentParser(prog="lumbarseg-train", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter,
                                epilog=f"examples:\n{examples}\n\n{DOCS_NOTE}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model (fixed split with --val-cases, or no validation)")
    _add_data_args(t)
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("cv", help="k-fold cross-validation by patient")
    _add_data_args(c, val=False)
    _add_train_args(c)
    c.add_argument("--folds", type=_folds, default=5)
    c.add_argument("--fold", help="run only these fold numbers (1-based, comma-separated)")
    c.set_defaults(func=cmd_cv)

    f = sub.add_parser("finetune", help="continue training a model package (a schema may add classes)")
    f.add_argument("--from", dest="source", required=True, help="package folder or registry name[@version]")
    f.add_argument("--registry", help="registry folder to resolve --from in (default: user, then shipped)")
    _add_data_args(f)
    _add_train_args(f, finetune=True)
    f.add_argument("--use-held-out", action="store_true",
                   help="also train on the cases DATA/.holdout.json holds out for the publish gate (by default "
                        "they are left out, so the gate never grades a model on its own training cases)")
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("evaluate", help="per-class Dice/IoU of models on cases (tables + charts)")
    e.add_argument("--model", required=True, help="comma-separated package folders or registry refs; "
                                                  "'A+B' is the ensemble of A and B")
    e.add_argument("--registry", help="registry folder for refs (default: user, then shipped)")
    e.add_argument("--data", required=True)
    e.add_argument("--cases", help="case ids (default: the first model's validation cases, else all)")
    e.add_argument("--exclude")
    e.add_argument("--out", help="write metrics.md/.csv/.json and charts here")
    e.add_argument("--device", default="auto")
    add_precision_arg(e)
    e.add_argument("--mode", choices=("fast", "tta", "ensemble"),
                   help="engine mode (default: fast for one model, ensemble for A+B)")
    e.add_argument("--bn-adapt", type=bn_adapt_arg, default=0.0, metavar="W", help=BN_ADAPT_HELP)
    e.add_argument("--slice-smoothing", type=smoothing_mm_arg, metavar="MM",
                   help="the engine's across-slice smoothing in mm (default: the engine's own, as users get it)")
    e.add_argument("--postprocess", choices=("none", "spine"), default="none",
                   help="clean-up after the network (spine: drop blobs apart from the spinal column)")
    e.add_argument("--thick-slab", type=_mm, metavar="MM",
                   help="score clinical-looking stacks instead: slabs of MM averaged across slices, "
                        "0.6 mm in-plane (see --inplane), nearest-neighbour labels")
    e.add_argument("--inplane", type=_mm, metavar="MM",
                   help="in-plane pixel size of the --thick-slab stacks (default 0.6; e.g. 1.6 for a coarse "
                        "2D protocol like the unseen source's)")
    e.add_argument("--threads", type=_threads, help="CPU threads (1-1024; default: PyTorch's)")
    e.set_defaults(func=cmd_evaluate)

    u = sub.add_parser("publish", help="add a package to a registry; default only if at least as good")
    u.add_argument("package", help="package folder")
    u.add_argument("--registry", help="registry folder (default: the user registry)")
    u.add_argument("--data", help="dataset folder to evaluate candidate and default on the frozen val cases")
    u.add_argument("--cases", help="frozen validation case ids (default: the candidate's validation cases)")
    u.add_argument("--patients", metavar="FILE",
                   help="patient map of --data (lumbarsegment.patients): the gate skips cases whose patient trained "
                        "the candidate, not only the cases themselves")
    u.add_argument("--metric", choices=("mean_dice_fg", "mean_iou_fg", "level_range_dice"), default="mean_dice_fg",
                   help="what the gate compares: mean Dice or IoU over the foreground classes, or level_range_dice "
                        "(Dice counted inside the spine levels each manual label covers +-2 mm, so levels the "
                        "annotators did not label count for neither model)")
    u.add_argument("--name", help="publish as a version of this model name (default: the package's own name), "
                                  "e.g. a fine-tune trained under a working name as the next uvd-starter")
    u.add_argument("--max-source-drop", type=float, default=0.02, metavar="D",
                   help="refuse a candidate that loses more than D level-range Dice on any source and class of "
                        "the held-out cases, even if its mean is better (default 0.02; negative: off)")
    u.add_argument("--reference", metavar="DIR",
                   help="reference cases of every source the model in use knows (default: the set shipped with "
                        "LumbarSegment, Resources/Reference)")
    u.add_argument("--max-reference-drop", type=float, default=0.01, metavar="D",
                   help="refuse a candidate that loses more than D level-range Dice on any source of the reference "
                        "set (default 0.01; negative: off)")
    u.add_argument("--own-source-only", action="store_true",
                   help="only the team's own source matters: a loss on the reference set does not refuse the "
                        "candidate (recorded in its manifest, shown by `lumbarseg models`)")
    u.add_argument("--force", action="store_true", help="make it the default even if worse")
    u.add_argument("--no-default", action="store_true", help="never make it the default")
    u.add_argument("--refine", action="store_true",
                   help="a click-guided model (lumbarseg-train guidance): publish it as the one click correction "
                        "uses (lumbarseg refine, click to fix); it never becomes the drafting default")
    u.add_argument("--ensemble", help="set the registry's default ensemble (refs, comma-separated; "
                                      "'@new' = the version being published)")
    u.add_argument("--device", default="auto")
    add_precision_arg(u)
    u.set_defaults(func=cmd_publish)

    h = sub.add_parser("holdout", help="show or set the dataset's frozen held-out cases (graded by publish)")
    h.add_argument("--data", required=True, help="dataset folder of exported cases")
    h.add_argument("--cases", help="hold out these cases' patients (case ids, comma-separated); all others train")
    h.add_argument("--every", type=int, metavar="K", help="draw the split again: every K-th patient held out")
    h.add_argument("--assign", action="store_true",
                   help="assign patients not yet in the split by its rule (every k-th held out) and save it in "
                        "DATA/.holdout.json; publish and evaluate only read the split")
    h.add_argument("--show", action="store_true", help="print the held-out and training cases (the default "
                                                       "without --cases/--every)")
    h.set_defaults(func=cmd_holdout)

    ef = sub.add_parser("effort", help="what correcting the drafts cost, per drafting model (from the exports' "
                        "effort records), with a chart")
    ef.add_argument("data", help="dataset folder of exported cases")
    ef.add_argument("--chart", metavar="PNG", help="also draw the medians per model into this PNG")
    ef.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ef.set_defaults(func=cmd_effort)

    from .guidance_run import add_parser as add_guidance_parser

    add_guidance_parser(sub)
    x = sub.add_parser("export", help="checkpoint (last.pt/best.pt of a run) -> model package (safetensors)")
    x.add_argument("checkpoint")
    x.add_argument("--out", required=True)
    x.add_argument("--name")
    x.add_argument("--fp32-weights", action="store_true")
    x.set_defaults(func=cmd_export)
    s = sub.add_parser("soup", help="average the weights of fine-tunes of one parent into one package "
                                    "(one model's speed; unrelated models: use an ensemble)")
    s.add_argument("packages", help="comma-separated package folders or registry refs (at least two)")
    s.add_argument("--out", required=True, help="new folder for the averaged package")
    s.add_argument("--name", help="package name (default: the first ingredient's)")
    s.add_argument("--weights", help="comma-separated share of each package (default: equal)")
    s.add_argument("--registry", help="registry folder for refs (default: user, then shipped)")
    s.add_argument("--fp32-weights", action="store_true")
    s.set_defaults(func=cmd_soup)
    from LumbarSegmentLib.core.help_format import show_defaults

    return show_defaults(p)


def _one_line(exc: BaseException) -> str:
    """An OS error as a sentence (``file: reason``), not a bare ``[Errno N]`` prefix; others as they are."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.DEBUG if a.verbose else (logging.INFO if rank == 0 else logging.WARNING),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        refuse_output_in_dataset(a)
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        if hasattr(a, "resume"):  # the training commands keep checkpoints to resume from
            print("interrupted; continue with the same command plus --resume", file=sys.stderr)
        else:  # everything else writes atomically
            print(f"interrupted; {a.command} did not finish and left nothing half-written; run the same command "
                  f"again", file=sys.stderr)
        return 130
    except (ValueError, OSError, EngineError) as exc:
        # EngineError covers the device and precision checks (e.g. bf16 asked for on a CPU without it),
        # which are the user's settings, not a bug: a message, not a traceback.
        if a.verbose:
            raise
        print(f"lumbarseg-train {a.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
