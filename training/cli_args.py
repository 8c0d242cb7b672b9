"""The arguments of ``lumbarseg-train``: value parsers with one-line errors, and the groups of flags the
sub-commands share (data, training, retention, precision). ``training.cli`` builds the parser from them."""
from __future__ import annotations

import argparse

from LumbarSegmentLib.core.checks import number_arg
from LumbarSegmentLib.models import VARIANTS

from .config import INTENSITY_MODES, METRICS, OPTIMIZERS, PRECISIONS, SCHEDULES, precision_from_amp


def id_list(s: str | None) -> list[str]:
    """Comma-separated ids (``--cases A,B``), blanks dropped."""
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
    if finetune:
        g.add_argument("--slim", dest="slim_width", type=_filters, metavar="WIDTH",
                       help="train a narrower copy of the parent (this first-level width, e.g. 8 for a 16-wide "
                            "parent: about a quarter of the arithmetic) that learns from it; use with --distill "
                            "and --wise 1")
        g.add_argument("--teacher", metavar="MODEL",
                       help="distil from this model instead of the parent (--distill W), e.g. to continue a "
                            "--slim run from its own package; it must know the same classes")
        g.add_argument("--teacher-classes", dest="teacher_classes", type=_class_ids, metavar="IDS",
                       help="with --teacher: the classes it teaches (comma-separated ids, e.g. "
                            "posterior_elements,spinal_canal); the parent teaches the others")
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
    g.add_argument("--class-weight", dest="class_weights", type=_class_weights, metavar="ID=W[,ID=W]",
                   help="cross-entropy weight of the pixels of a class, by schema class id (e.g. sacrum=8: a rare "
                        "class that looks like a common one; default 1 for every class)")
    g.add_argument("--ignore-beyond-levels", dest="beyond_levels_mm", type=_nonneg, default=0.0, metavar="MM",
                   help="treat the MM of rows just above and below each case's labelled levels as unknown, not "
                        "background (sources label different stretches of the spine; 0 = off, the default)")
    g.add_argument("--pseudo-labels", type=id_list, metavar="REF[,REF...]",
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
    g.add_argument("--distill-everywhere", dest="distill_everywhere", action="store_true", default=None,
                   help="with --distill: the teacher's answers count on labelled pixels too (a --slim student "
                        "copying its teacher as closely as it can)")
    g.add_argument("--replay", type=_replay_share, metavar="F",
                   help=f"share of each batch drawn from the shipped slices of the parent's own sources "
                        f"(default {d.replay:g}; 0 off)")
    g.add_argument("--replay-set", metavar="FOLDER",
                   help="replay these exported cases instead of the shipped set (with --replay)")
    g.add_argument("--wise", type=_wise_share, metavar="A",
                   help=f"keep this share of the fine-tune's change in the written weights, blending them with the "
                        f"parent's (default {d.wise:g}; 1 off)")
    g.add_argument("--plain-finetune", action="store_true",
                   help="none of these guards (the model may forget every source it is not fine-tuned on)")


def _class_ids(text: str) -> tuple:
    ids = tuple(id_list(text))
    if not ids:
        raise argparse.ArgumentTypeError("give one or more class ids separated by commas")
    return ids


def _class_weights(text: str) -> tuple:
    """``sacrum=8,spinal_canal=2`` -> ``(("sacrum", 8.0), ("spinal_canal", 2.0))`` (ids are checked against the
    schema when the run starts)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        cid, eq, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        if not eq or not cid.strip() or not (0 < weight <= 1000):
            raise argparse.ArgumentTypeError(f"{item!r} is not ID=W; write a class id and a weight above 0 and at "
                                             "most 1000, e.g. sacrum=8")
        out.append((cid.strip(), weight))
    return tuple(out)


_wise_share = number_arg(0.01, 1, what="a share of the change", use="use 0.01 to 1 (1: off)")
_replay_share = number_arg(0, 0.95, what="a share of the batch", use="use a number from 0 (off) to 0.95")
_weight = number_arg(0, 1e6, what="a weight", use="use a number >= 0 (0 turns it off)")
