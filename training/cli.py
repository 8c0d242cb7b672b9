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
import logging
import os
import sys
from pathlib import Path

from LumbarSegmentLib.inference.bn_adapt import BN_ADAPT_HELP, bn_adapt_arg
from LumbarSegmentLib.core.checks import number_arg
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.models import VARIANTS
from LumbarSegmentLib.inference.slice_smoothing import smoothing_mm_arg

from .config import INTENSITY_MODES, METRICS, OPTIMIZERS, PRECISIONS, SCHEDULES, config_from_args, precision_from_amp

log = logging.getLogger("lumbarseg.train")


def _ids(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _floats(s: str) -> tuple:
    return tuple(float(x) for x in str(s).replace("x", ",").split(",") if x)


SPACING_RANGE_MM = (0.1, 10.0)


def _spacing(s: str) -> tuple:
    """``--spacing``: one or two in-plane pixel sizes in mm, each within SPACING_RANGE_MM."""
    lo, hi = SPACING_RANGE_MM
    try:
        values = _floats(s)
    except ValueError:
        values = ()
    if len(values) not in (1, 2) or not all(lo <= v <= hi for v in values):  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"{s!r}: give one or two pixel sizes in mm ({lo:g}-{hi:g} each), e.g. 1.0 "
                                         f"or 0.8,0.8")
    return values


def _zoom_range(s: str) -> tuple:
    """``--zoom LO,HI``: the range of the random scale (the seed's is 0.5,1.5)."""
    try:
        lo, hi = (float(x) for x in str(s).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LO,HI (e.g. 0.85,1.2), got {s!r}") from None
    if not 0.1 <= lo <= hi <= 4:
        raise argparse.ArgumentTypeError(f"need 0.1 <= LO <= HI <= 4, got {lo:g},{hi:g}")
    return lo, hi


_rotation = number_arg(0, 180, what="a number of degrees", use="use 0-180 degrees")
_share = number_arg(0, 1, what="a share", use="use 0 (no patch augmented) to 1 (every patch)")
_probability = number_arg(0, 1, what="a probability", use="use a probability from 0 to 1")
_whole = "a whole number"
_threads = number_arg(1, 1024, kind=int, what=_whole, use="use 1-1024 CPU threads")
_epochs = number_arg(1, 100000, kind=int, what=_whole, use="use 1-100000 epochs")
_count = number_arg(1, 100000, kind=int, what=_whole, use="use a whole number from 1 to 100000")
_batch = number_arg(1, 1024, kind=int, what=_whole, use="use 1-1024 patches per batch")
_patch = number_arg(32, 2048, kind=int, what=_whole, use="use a patch of 32-2048 pixels")
_filters = number_arg(1, 256, kind=int, what=_whole, use="use 1-256 filters in the first level")
_lr = number_arg(0, 10, below_hi=True, what="a number", use="use a learning rate above 0 and below 10")
_nonneg = number_arg(0, 1e6, what="a number", use="use a number from 0 up")
_mm = number_arg(0.1, 50, what="a number of mm", use="use 0.1-50 mm")
_folds = number_arg(2, 100, kind=int, what=_whole, use="use 2-100 folds")
_whole0 = number_arg(0, 10**9, kind=int, what=_whole, use="use a whole number from 0 up")
_minutes = number_arg(0.01, 10**7, what="a number of minutes", use="use a positive number of minutes")


def add_precision_arg(p, default: str = "auto") -> None:
    """``--precision`` (the one name of the setting, as in ``lumbarseg segment``); ``--amp`` is its old
    spelling, still accepted (``off`` = ``fp32``) so existing scripts keep working."""
    p.add_argument("--precision", choices=PRECISIONS, default=default,
                   help="autocast precision: auto = bf16 on CUDA and on CPUs with native bf16, else fp32 "
                        f"(default {default})")
    p.add_argument("--amp", dest="precision", type=precision_from_amp, choices=PRECISIONS,
                   help=argparse.SUPPRESS)


def _add_data_args(p: argparse.ArgumentParser, val: bool = True) -> None:
    p.add_argument("--data", required=True, help="dataset folder of exported cases (<case>.json + image + label)")
    p.add_argument("--cases", help="only these case ids (comma-separated); default: all")
    p.add_argument("--exclude", help="case ids never used (e.g. a demo case), comma-separated; with --patients, "
                                     "their patients' other cases too")
    p.add_argument("--patients", metavar="FILE",
                   help="patient map (lumbarsegment.patients JSON): cases of one patient never straddle a split")
    if val:
        p.add_argument("--val-cases", help="fixed split: these case ids validate (their patients never train)")


def _add_train_args(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    g = p.add_argument_group("model")
    if not finetune:
        g.add_argument("--variant", default="UVD", type=str.upper, choices=list(VARIANTS),
                       help="model variant (default UVD); defaults for optimiser, lr, activation, filters "
                            "come from the variant table")
        g.add_argument("--init-filters", type=_filters, help="width of the first level (variant default otherwise)")
        g.add_argument("--activation", choices=("relu", "prelu"))
        g.add_argument("--deep-supervision", dest="deep_supervision", action="store_true", default=None)
        g.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_false")
    g.add_argument("--schema", default=None if finetune else "starter",
                   help="label schema name or JSON path (default: %s)" %
                        ("the source model's" if finetune else "starter"))
    g.add_argument("--name", help="package name (default <variant>-<schema>)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=_lr)
    g.add_argument("--weight-decay", type=_nonneg, default=0.0)
    g.add_argument("--epochs", type=_epochs, default=15 if finetune else 40)
    g.add_argument("--steps-per-epoch", type=_count, help="default: foreground training slices / batch size")
    g.add_argument("--batch-size", type=_batch, default=8, help="per process (default 8)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    g.add_argument("--warmup-steps", type=_whole0, default=50)
    g.add_argument("--grad-clip", type=_nonneg, default=0.0)
    g.add_argument("--patience", type=_whole0, default=10, help="validations without improvement before stopping "
                                                              "(0: never stop early)")
    g.add_argument("--metric", choices=METRICS, default="mean_dice_fg", help="validation metric for best/early stop")
    g.add_argument("--max-minutes", type=_minutes, help="time budget: shorten the schedule to fit it")
    g.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                   help="what --max-minutes counts: elapsed time or this process's CPU time")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--patch", type=_patch, default=256, help="training patch in pixels, 32-2048 (default 256)")
    g.add_argument("--spacing", type=_spacing, default=(1.0, 1.0), help="model in-plane spacing in mm, "
                   f"{SPACING_RANGE_MM[0]:g}-{SPACING_RANGE_MM[1]:g} (e.g. 1.0 or 0.8,0.8)")
    g.add_argument("--fg-fraction", type=_probability, default=0.67, help="share of patches centred on foreground")
    g.add_argument("--balance", choices=("structures", "sources", "cases", "slices"), default="structures",
                   help="how patches are shared among cases: structures = equal share per annotated-structure "
                        "group; sources = per (source, structures) group; cases; slices")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--zoom", dest="zoom", type=_zoom_range, metavar="LO,HI",
                   help="range of the random scale of a patch (default: the seed's 0.5,1.5)")
    g.add_argument("--rotation", dest="rotation_deg", type=_rotation, metavar="DEG",
                   help="largest random in-plane rotation in degrees (default: the seed's 20)")
    g.add_argument("--intensity-aug", nargs="?", const="light", default="off", choices=INTENSITY_MODES,
                   help="intensity augmentation (not in the seed): light = contrast/brightness/noise jitter; "
                        "strong = + gamma, wider ranges (domain randomisation for partially labelled data sets); "
                        "domain = strong with wider ranges + inversion, bias field, blur; "
                        "remap = domain + random non-monotone intensity curves (tissue order reshuffled); "
                        "tissue = domain + a random contrast per labelled structure; "
                        "gin = domain + the patch seen through a random shallow network")
    g.add_argument("--resolution-aug", dest="resolution_p", type=_probability, default=0.0, metavar="P",
                   help="probability of simulating a 1.2-2.2 mm in-plane acquisition per patch (default 0)")
    g.add_argument("--augment-share", dest="augment_p", type=_share, default=None, metavar="P",
                   help="share of patches augmented at all (geometry, intensity, resolution); the rest go in as "
                        "plain crops of the real image (default 1: every patch)")
    g.add_argument("--slab-aug", dest="slab_p", type=_probability, default=0.0, metavar="P",
                   help="probability of a thick-slice patch (mean of 2-5 neighbouring slices) (default 0)")
    g.add_argument("--slice-context", type=int, default=None, metavar="K",
                   help="2.5D: feed the network K neighbouring slices on each side of the one it labels (2K+1 "
                        "input channels; a fine-tune widens a one-slice parent's first layer so it starts as the "
                        "parent; default 0, or the parent's)")
    g.add_argument("--unannotated-bg-weight", type=_nonneg, default=0.0,
                   help="weight of a small cross-entropy pull of unannotated classes towards background "
                        "(tie-breaker where the marginal loss leaves them free; 0 = pure marginal)")
    g.add_argument("--ignore-beyond-levels", dest="beyond_levels_mm", type=_nonneg, default=0.0, metavar="MM",
                   help="treat the MM of rows just above and below each case's labelled levels as unknown, not "
                        "background (sources label different stretches of the spine; 0 = off, the default)")
    g.add_argument("--pseudo-labels", type=_ids, metavar="REF[,REF...]",
                   help="teacher model(s) that draft, on each training case, the structures it does not annotate "
                        "(confident voxels become labels, unsure ones are ignored; the manual label always wins)%s"
                        % ("; 'parent' = the model being fine-tuned" if finetune else ""))
    g.add_argument("--pseudo-threshold", type=_probability, default=0.8,
                   help="teacher probability needed for a pseudo-labelled voxel (default 0.8)")
    g.add_argument("--pseudo-mode", choices=("auto", "fast", "tta", "ensemble"), default="auto",
                   help="how the teacher runs (auto: fast for one model, ensemble for several)")
    if finetune:
        _add_retention_args(p)
    g.add_argument("--plain-ce", dest="marginal", action="store_false",
                   help="treat unannotated structures as background (wrong for partial labels; for comparison)")
    g.add_argument("--dice-weight", type=_nonneg, default=1.0)
    g.add_argument("--val-every", type=_count, default=1)
    g.add_argument("--val-stride", type=_count, default=1, help="validate on every n-th slice during training")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder (checkpoints, progress.jsonl, package/, reports)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_precision_arg(g)
    g.add_argument("--threads", type=_threads, help="CPU threads for this process (1-1024)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if present")
    g.add_argument("--fp32-weights", dest="half_weights", action="store_false",
                   help="store the package weights in float32 (default float16)")
    g.add_argument("--progress", dest="progress_bar", action="store_true", default=None, help="force tqdm bars")


def _add_retention_args(p: argparse.ArgumentParser) -> None:
    """What keeps a fine-tune from forgetting the parent's other sources (training.retention; the
    defaults are training.finetune.RETENTION_DEFAULT, measured in docs/lab/forgetting.md)."""
    from .finetune import RETENTION_DEFAULT as d

    g = p.add_argument_group("keeping what the parent knew (defaults on; docs/training.md)")
    g.add_argument("--keep-bn-stats", dest="keep_bn_stats", action="store_true", default=None,
                   help=f"BatchNorm keeps the parent's statistics (default {'on' if d.keep_bn_stats else 'off'})")
    g.add_argument("--no-keep-bn-stats", dest="keep_bn_stats", action="store_false",
                   help="let BatchNorm statistics follow the new cases")
    g.add_argument("--l2sp", type=_weight, metavar="W", help=f"pull towards the parent's weights (default {d.l2sp:g}; 0 off)")
    g.add_argument("--distill", type=_weight, metavar="W",
                   help=f"keep the parent's answers where the labels say nothing (default {d.distill:g}; 0 off)")
    g.add_argument("--plain-finetune", action="store_true",
                   help="none of these guards (the model may forget every source it is not fine-tuned on)")


_weight = number_arg(0, 1e6, what="a weight", use="use a number >= 0 (0 turns it off)")


def _select(a):
    from LumbarSegmentLib.dataset.cases import read_patient_map, with_patients

    from .data import select_cases

    if not getattr(a, "patients", None):
        return select_cases(a.data, _ids(a.cases) or None, _ids(a.exclude))
    patient_of = read_patient_map(a.patients)
    cases = with_patients(select_cases(a.data, _ids(a.cases) or None), patient_of)
    excluded = _ids(a.exclude)
    gone = {c.patient for c in with_patients(select_cases(a.data, excluded), patient_of)} if excluded else set()
    also = sorted(c.case_id for c in cases if c.patient in gone and c.case_id not in excluded)
    if also:
        log.warning("not using %s: same patient as an excluded case", ", ".join(also))
    return [c for c in cases if c.patient not in gone]


def _split(a, cases):
    from .splits import fixed_split

    if a.val_cases:
        train, val, dropped = fixed_split(cases, _ids(a.val_cases))
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
    from .trainer import train

    refuse_existing_run(a)
    cfg = config_from_args(a)
    cases = _select(a)
    tr, va = _split(a, cases)
    r = train(cfg, tr, va, out_dir=a.out, extra_provenance={"command": command_line()})
    if r.package is not None:
        print(f"package: {r.package.path}")
        if r.val_metrics:
            print(f"validation mean Dice (fg) {r.val_metrics['mean_dice_fg']:.4f}, "
                  f"mean IoU (fg) {r.val_metrics['mean_iou_fg']:.4f}")
    return 0


def cmd_cv(a) -> int:
    from .crossval import cross_validate

    cfg = config_from_args(a)
    summary = cross_validate(cfg, _select(a), k=a.folds, out_dir=a.out, only_folds=_ids(a.fold) or None)
    print(summary["markdown"])
    return 0


def cmd_finetune(a) -> int:
    from .finetune import finetune

    refuse_existing_run(a)
    cases = _select(a)
    tr, va = _split(a, cases)
    r = finetune(a.source, tr, va, out_dir=a.out, schema=a.schema, args=a,
                 registry=a.registry, extra_provenance={"command": command_line()})
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
    from LumbarSegmentLib.registry.registry import Registry
    from LumbarSegmentLib.registry.catalog import resolve_model

    from .soup import soup

    regs = [Registry(a.registry, read_only=True)] if a.registry else None
    pkgs = [resolve_model(ref, regs) for ref in _ids(a.packages)]
    try:
        weights = [float(w) for w in _ids(a.weights)] if a.weights else None
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
        wanted = _ids(a.cases)
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
