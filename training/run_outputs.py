"""What a training run hands over and writes at its end: the result, the package with its provenance,
``data_manifest.json`` and the run report; and the typed inputs of ``trainer.train`` besides the config."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.registry.package import ModelPackage, default_input_contract, write_package

from .config import TrainConfig
from .data import CaseSlices, data_manifest
from .metrics import clean

log = logging.getLogger("lumbarseg.train")


@dataclass(frozen=True)
class StartFrom:
    """Weights a run starts from (a fine-tune's parent, adapted) and what the manifest records of them
    (``training.init_from``)."""
    model: torch.nn.Module
    info: dict | None = None
    teacher: torch.nn.Module | None = None  # distillation's teacher when it is not ``model`` (a slimmed start)


@dataclass(frozen=True)
class CachedSlices:
    """Already cached model-plane slices of the training and validation cases (they must match the
    cases and the config's spacing); None: loaded from the cases."""
    train: Sequence[CaseSlices] | None = None
    val: Sequence[CaseSlices] | None = None


@dataclass(frozen=True)
class RunOutputs:
    """What a run writes besides its checkpoints: a model package (``write_package``), whose manifest's
    ``training`` field also gets ``provenance`` (the command, the cross-validation fold, ...)."""
    write_package: bool = True
    provenance: dict | None = None


@dataclass(frozen=True)
class RunFacts:
    """How the run went, as its manifest records it besides the config and the result."""
    schema: object
    train_ids: Sequence[str]
    val_ids: Sequence[str]
    device: str
    precision: str
    world_size: int
    steps_per_epoch: int


@dataclass
class TrainResult:
    out_dir: Path
    package: ModelPackage | None
    model: torch.nn.Module
    history: list = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    val_metrics: dict | None = None
    val_per_case: dict | None = None
    epochs_run: int = 0
    wall_s: float = 0.0
    stopped_early: bool = False
    val_confusion: dict | None = None  # case -> (confusion matrix, annotated mask), for pooled CV metrics
    val_by_source: dict | None = None  # source -> metrics (strict)
    val_level_range: dict | None = None  # source -> class -> level-range Dice
    train_time_s: float = 0.0  # wall time of the training loop over all (resumed) sessions
    train_cpu_s: float = 0.0  # CPU time of this process's training loop over all sessions


def write_outputs(result: TrainResult, cfg: TrainConfig, facts: RunFacts,
                  cases: tuple[Sequence[Case], Sequence[Case]], provenance: dict) -> ModelPackage:
    """The run's package (``package/``, with its provenance), ``data_manifest.json`` and report.

    ``cases`` are the (training, validation) cases whose files the data manifest records;
    ``provenance`` is added to the manifest's ``training`` field (``init_from``, the command, ...)."""
    from . import report

    train_cases, val_cases = cases
    schema, steps = facts.schema, facts.steps_per_epoch

    out_dir = result.out_dir
    manifest = data_manifest(list(train_cases) + list(val_cases)) if (train_cases or val_cases) else None
    (out_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=1)) if manifest else None
    training = {
        "variant": cfg.variant, "config": cfg.to_dict(),
        "data_manifest_sha256": manifest["sha256"] if manifest else None,
        "data_manifest": manifest["cases"] if manifest else None,
        "train_cases": list(facts.train_ids), "val_cases": list(facts.val_ids),
        "epochs": result.epochs_run, "epochs_configured": cfg.epochs, "steps_per_epoch": steps,
        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "folds": None, "seed": cfg.seed, "device": facts.device, "precision": facts.precision,
        "world_size": facts.world_size,
        "wall_time_s": round(result.wall_s, 1), "train_time_s": round(result.train_time_s, 1),
        "train_cpu_s": round(result.train_cpu_s, 1), "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "loss": ("marginal cross-entropy + soft Dice over annotated classes"
                 + (f", unannotated->background weight {cfg.unannotated_bg_weight}" if cfg.unannotated_bg_weight
                    else "")) if cfg.marginal
        else "cross-entropy + soft Dice (all classes treated as annotated)",
        "init_from": None,
        **provenance,
    }
    metrics = {"validation": {**clean(result.val_metrics), "per_case": clean(result.val_per_case),
                              "per_source": clean(result.val_by_source), "level_range": clean(result.val_level_range),
                              "primary": cfg.metric, "predicted_by": "engine.segment_volume"}} \
        if result.val_metrics else {}
    pkg_dir = out_dir / "package"
    if pkg_dir.exists():
        import shutil

        shutil.rmtree(pkg_dir)
    pkg = write_package(pkg_dir, result.model, name=cfg.package_name, version=1, schema=schema,
                        input_contract=default_input_contract(cfg.spacing, (cfg.patch, cfg.patch), cfg.slice_context),
                        training=training, metrics=metrics, half=cfg.half_weights)
    try:
        report.write_run_report(out_dir, result.history, result.val_metrics, result.val_per_case, schema,
                                name=cfg.package_name)
    except Exception as exc:  # a failed plot must not lose a trained model
        log.warning("could not write the run report: %s", exc)
    return pkg
