"""Fine-tuning a model package, and exporting a training checkpoint as a package.

A fine-tune starts from a package's weights. If the target schema has the same
classes in the same order, everything is kept. Otherwise the body is kept and every
class-score layer is replaced (``models.replace_heads``); for classes present in both
schemas (matched **by class id**, never by position) the new layer's rows are copied
from the old one, so the model still predicts what it already knew while it learns the
new classes. Classes that the target schema drops are simply no longer output.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.models import build_model, replace_heads, widen_input
from LumbarSegmentLib.registry.package import ModelPackage, default_input_contract, write_package
from LumbarSegmentLib.registry.catalog import resolve_model
from LumbarSegmentLib.core.schema import LabelSchema, load_schema

from .config import TrainConfig
from .retention import RetentionSettings
from .run_outputs import StartFrom

log = logging.getLogger("lumbarseg.train")

#: what a fine-tune does by default to keep what its parent knew (training.retention); measured on
#: the forgetting experiment (scripts/forgetting_experiment.py, docs/lab/forgetting.md)
RETENTION_DEFAULT = RetentionSettings(keep_bn_stats=False, l2sp=0.0, distill=0.0, replay=0.5, wise=0.6)


def retention_from_args(args) -> RetentionSettings:
    """The guards a command line asks for: ``--plain-finetune`` none, else the defaults with any of
    ``--[no-]keep-bn-stats``, ``--l2sp``, ``--distill`` given replacing theirs."""
    if getattr(args, "plain_finetune", False):
        return RetentionSettings()
    d = RETENTION_DEFAULT
    pick = lambda name: getattr(d, name) if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    return RetentionSettings(keep_bn_stats=bool(pick("keep_bn_stats")), l2sp=float(pick("l2sp")),
                             distill=float(pick("distill")), replay=float(pick("replay")),
                             replay_set=getattr(args, "replay_set", None), wise=float(pick("wise")))


def adapt_to_schema(model, source: LabelSchema, target: LabelSchema) -> dict:
    """Make ``model`` (trained on ``source``) output ``target``'s classes; returns what was kept/added."""
    if source.ids == target.ids:
        return {"kept_classes": list(target.ids), "new_classes": [], "dropped_classes": [],
                "heads_replaced": False}
    old = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
           for name, m in model.head_modules().items()}
    replace_heads(model, target.num_classes)
    src_ch = source.channel_of()
    kept = [c for c in target.ids if c in src_ch]
    with torch.no_grad():
        for name, m in model.head_modules().items():
            w_old, b_old = old[name]
            for t_ch, cid in enumerate(target.ids):
                if cid in src_ch:
                    m.weight[t_ch].copy_(w_old[src_ch[cid]])
                    if m.bias is not None and b_old is not None:
                        m.bias[t_ch].copy_(b_old[src_ch[cid]])
    from .head_init import init_from_related

    related = init_from_related(model, source.ids, target.ids)
    return {"kept_classes": kept, "started_from_related": related, "new_classes": [c for c in target.ids if c not in src_ch],
            "dropped_classes": [c for c in source.ids if c not in target.ids], "heads_replaced": True}


def prepare_finetune_model(package: ModelPackage, target: LabelSchema | None = None):
    """``(model in train mode, target schema, info)`` starting from ``package``'s weights."""
    model = package.load_model("cpu").train()
    target = target or package.schema
    info = {"package": package.ref, "weights_sha256": package.sha256, **adapt_to_schema(model, package.schema,
                                                                                           target)}
    return model, target, info


def _context_for(model, requested: int, ref: str) -> dict:
    """``{"parent": k, "run": k'}``: the slice context of a fine-tune is the parent's unless more is asked
    for (a one-slice parent is widened to a 2.5D start); fewer neighbours than the parent reads would
    discard what it learnt."""
    parent = (model.in_channels - 1) // 2
    if requested and requested < parent:
        raise ValueError(f"{ref} reads {parent} neighbour slice(s) on each side; a fine-tune cannot drop to "
                         f"{requested}: leave --slice-context out, or train a new model")
    return {"parent": parent, "run": max(int(requested or 0), parent)}


def finetune(source: str | ModelPackage, train_cases: Sequence[Case], val_cases: Sequence[Case] = (), *,
             out_dir, schema: str | LabelSchema | None = None, config: TrainConfig | None = None,
             retention: RetentionSettings | None = None, **train_kwargs):
    """Fine-tune ``source`` (package, folder or ref in the catalogue) on the cases; returns a ``TrainResult``.

    The architecture comes from the source package, and its spacing and patch size unless ``config``
    is given; ``config`` sets the rest. With ``schema`` the model is adapted (see module doc).
    ``retention`` says how the parent's knowledge is kept (``None``: :data:`RETENTION_DEFAULT`;
    ``RetentionSettings()`` is a plain fine-tune). ``config.slim_width`` trains a narrower network instead
    (started from the parent's strongest channels, ``models.slim``) that learns from the wide parent
    through ``retention``'s distillation; ``retention.teacher`` (a package or ref) teaches in the parent's
    place: a slimmed run continued from its own package still learns from the wide model.
    ``train_kwargs`` go to ``trainer.train`` (``slices``, ``outputs``, ``callbacks``).
    """
    from .trainer import train

    pkg = source if isinstance(source, ModelPackage) else resolve_model(str(source))
    target = schema if isinstance(schema, LabelSchema) else (load_schema(schema) if schema else pkg.schema)
    # Structures the annotators labelled but the target schema lacks would silently become
    # background: refuse, naming them (a schema with more classes keeps the body, new heads).
    from LumbarSegmentLib.core.schema import check_compatible

    check_compatible(target, sorted({s for c in [*train_cases, *val_cases] for s in c.annotated_structures}))
    model, target, info = prepare_finetune_model(pkg, target)
    asked = config.slice_context if config is not None else None
    context = _context_for(model, asked or 0, pkg.ref)  # before anything is written
    keep = retention or RETENTION_DEFAULT
    slim = config.slim_width if config is not None else 0
    _check_slim(slim, keep, model)
    _check_teacher_classes(config, keep, target, slim)
    info["retention"] = {"keep_bn_stats": keep.keep_bn_stats, "l2sp": keep.l2sp, "distill": keep.distill,
                         "wise": keep.wise}
    replayed = _replayed(keep, pkg, target, list(train_cases), info)  # before anything is written too
    named = None if keep.teacher is None else _teacher(keep.teacher, target, 2 * context["run"] + 1, info)  # and this
    if named is not None and config is not None and config.teacher_classes:
        info["teacher"]["classes"] = list(config.teacher_classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema_path = out_dir / "schema.json"
    schema_path.write_text(json.dumps(target.to_dict(), indent=1))
    arch = pkg.manifest["architecture"]
    fixed = {"variant": arch["variant"], "init_filters": arch["init_filters"], "activation": arch["activation"],
             "deep_supervision": arch["deep_supervision"], "schema": str(schema_path)}
    if config is None:
        cfg = TrainConfig(**fixed, spacing=tuple(pkg.spacing), patch=pkg.patch_size[0], epochs=15)
    else:
        cfg = config.replace(**fixed)
    cfg = cfg.replace(slice_context=context["run"])
    cfg = cfg.replace(keep_bn_stats=keep.keep_bn_stats, l2sp=keep.l2sp, distill=keep.distill)
    if replayed:
        train_cases = list(train_cases) + replayed
        cfg = cfg.replace(replay_fraction=keep.replay, replay_ids=tuple(c.case_id for c in replayed))
    info["slice_context"] = context
    widen_input(model, 2 * context["run"] + 1)
    tutor = None
    if slim:
        from LumbarSegmentLib.models.slim import slim_model

        tutor, model = model, slim_model(model, slim)
        cfg = cfg.replace(init_filters=int(slim))
        teacher = info["teacher"]["package"] if named is not None else pkg.ref  # who teaches, not who was cut
        info["slimmed"] = {"from_width": int(arch["init_filters"]), "width": int(slim), "teacher": teacher}
    if named is not None:
        tutor = named
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep.wise < 1 else None
    if cfg.pseudo_labels and "parent" in cfg.pseudo_labels:  # the model as it was before this fine-tune
        cfg = cfg.replace(pseudo_labels=tuple(str(pkg.path) if r == "parent" else r for r in cfg.pseudo_labels))
    if cfg.name is None:
        cfg = cfg.replace(name=pkg.name if target.ids == pkg.schema.ids else f"{pkg.name}-{target.name}")
    log.info("fine-tuning %s: kept %s, new %s", pkg.ref, info["kept_classes"], info["new_classes"])
    if info["new_classes"] and keep.l2sp:
        log.warning("the L2-SP spring (--l2sp %g) holds the network near %s, which has no features for the new "
                    "classes %s: they may not be learned at all; when the cases replay every source the parent "
                    "knew, fine-tune with --l2sp 0", keep.l2sp, pkg.ref, ", ".join(info["new_classes"]))
    result = train(cfg, train_cases, val_cases, out_dir=out_dir, start=StartFrom(model, info, tutor), **train_kwargs)
    if keep.wise < 1 and result.package is not None:
        result.package = _blend_with_parent(result.package, pkg, keep.wise, start)
    return result


def _teacher(ref, target: LabelSchema, channels: int, info: dict):
    """The distillation teacher named by ``ref``, in the run's classes and slices (recorded in ``info``)."""
    tpkg = ref if isinstance(ref, ModelPackage) else resolve_model(str(ref))
    if tpkg.schema.ids != target.ids:
        raise ValueError(f"the teacher {tpkg.ref} outputs {', '.join(tpkg.schema.ids)}, the run "
                         f"{', '.join(target.ids)}: a teacher must know the same classes")
    model = widen_input(tpkg.load_model("cpu").eval(), channels)
    info["teacher"] = {"package": tpkg.ref, "weights_sha256": tpkg.sha256}
    return model


def _check_teacher_classes(config, keep: RetentionSettings, target: LabelSchema, slim) -> None:
    """Refuse ``teacher_classes`` that cannot be taught, before anything is written."""
    asked = tuple(config.teacher_classes) if config is not None else ()
    if not asked:
        return
    if keep.teacher is None or not keep.distill:
        raise ValueError("--teacher-classes needs --teacher MODEL and --distill W: it says which classes the "
                         "named teacher teaches")
    if slim:
        raise ValueError("--teacher-classes cannot be used with --slim: the parent teaches a slimmed run whole")
    unknown = [c for c in asked if c not in target.ids]
    if unknown:
        raise ValueError(f"--teacher-classes: the run's schema {target.name!r} has no class "
                         f"{', '.join(map(repr, unknown))}; its classes are {', '.join(target.ids)}")


def _check_slim(slim: int | None, keep: RetentionSettings, model) -> None:
    """Refuse a slimmed fine-tune that cannot work, before anything is written."""
    if not slim:
        return
    if keep.wise < 1:
        raise ValueError("a slimmed model cannot be blended with its wider parent: pass --wise 1 with --slim")
    if not keep.distill:
        log.warning("--slim without --distill: the narrow model learns from the labels alone, not from its parent")
    from LumbarSegmentLib.models.slim import check_slimmable

    check_slimmable(model, slim)


def _blend_with_parent(child: ModelPackage, parent: ModelPackage, alpha: float, start: dict) -> ModelPackage:
    """Replace the run's ``package/`` by its blend with the weights it started from (the parent's, adapted
    to the run's classes and slices; ``training.wise``); the fine-tune as trained stays beside it in
    ``package-finetuned/``."""
    import shutil

    from LumbarSegmentLib.registry.package import read_package

    from .wise import write_blend

    run = child.path.parent
    tmp, kept = run / "package-blend", run / "package-finetuned"
    write_blend(child, parent, alpha, tmp, start=start)
    if kept.exists():
        shutil.rmtree(kept)
    child.path.rename(kept)
    tmp.rename(run / "package")
    log.info("the package keeps %.0f%% of the fine-tune's change from %s (the fine-tune itself: %s)", 100 * alpha,
             parent.ref, kept)
    return read_package(run / "package")


def _replayed(keep: RetentionSettings, pkg: ModelPackage, target: LabelSchema, train_cases: list, info: dict) -> list:
    """The cases a fine-tune replays (``training.replay``; ``[]`` when replay is off or finds nothing),
    recorded in ``info["retention"]``; a replay folder given that holds no case is refused here."""
    if not keep.replay:
        return []
    from .data import case_source
    from .replay import parent_sources, replay_cases

    sources = parent_sources(pkg.manifest)
    if not sources and keep.replay_set is None:
        log.info("replay: %s records no training cases, so nothing of the shipped set is known to be its own; "
                 "fine-tuning without replay", pkg.ref)
        return []
    cases = replay_cases(target, sources or None, train_cases, keep.replay_set)
    info["retention"]["replay"] = {"fraction": keep.replay, "cases": [c.case_id for c in cases],
                                   "set": "shipped" if keep.replay_set is None else str(keep.replay_set)}
    if not cases:
        log.warning("replay is on but every replay case was left out (not of the parent's sources %s, not fitting "
                    "schema %r, or a patient the cases given already hold): fine-tuning on the cases given alone",
                    ", ".join(sorted(sources)) or "unknown", target.name)
        return []
    log.info("replaying %d case(s) of %s as %.0f%% of each batch", len(cases),
             ", ".join(sorted({case_source(c) for c in cases})), 100 * keep.replay)
    return cases


#: what a run's own package says about its data and origin, true of every checkpoint of that run
_RUN_FIELDS = ("code_version", "data_manifest_sha256", "data_manifest", "train_cases", "val_cases", "init_from",
               "command", "seed", "precision", "torch_version", "loss", "epochs_configured", "steps_per_epoch")


def _run_provenance(checkpoint: Path) -> dict:
    """The training provenance of the run the checkpoint belongs to (from ``<run>/package/manifest.json``),
    so an exported checkpoint keeps its data manifest, parent and command; ``{}`` when there is none."""
    manifest = checkpoint.parent / "package" / "manifest.json"
    try:
        training = json.loads(manifest.read_text()).get("training", {})
    except (OSError, ValueError):
        return {}
    return {k: training[k] for k in _RUN_FIELDS if k in training}


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, name: str | None = None,
                      half: bool = True) -> ModelPackage:
    """A run's ``last.pt`` or ``best.pt`` -> a model package (safetensors) in the new folder ``out``.

    The checkpoint is read with ``weights_only=True`` (tensors and plain data only), so a file
    made to run code when unpickled is refused instead. When the run wrote its own package, the
    export carries that package's provenance (data manifest, parent, command): a run's last epoch
    shipped instead of its best validated one still says what it learnt from.
    """
    from .checkpoints import load_checkpoint

    ck = load_checkpoint(Path(checkpoint))
    cfg = TrainConfig.from_dict(ck["config"])
    from LumbarSegmentLib.models.checked import build_checked

    model = build_checked(ck["builder_args"], f"checkpoint {checkpoint}",  # unknown keys, shapes: one line
                          {k: tuple(v.shape) for k, v in ck["model"].items()})
    model.load_state_dict(ck["model"])
    schema = load_schema(cfg.schema)
    training = {**_run_provenance(Path(checkpoint)), "variant": cfg.variant, "config": ck["config"],
                "checkpoint": Path(checkpoint).name, "epochs": int(ck["epoch"]) + 1}
    metrics = {"checkpoint_metric": ck["metric"]} if "metric" in ck else {}
    return write_package(out, model, name=name or cfg.package_name, schema=schema,
                         input_contract=default_input_contract(cfg.spacing, (cfg.patch, cfg.patch), cfg.slice_context),
                         training=training, metrics=metrics, half=half)
