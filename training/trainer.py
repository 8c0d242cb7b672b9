"""The training loop: patches -> model -> partial-label loss; validation, checkpoints, package.

``train(config, train_cases, val_cases, out_dir)`` is the Python API behind
``lumbarseg-train train``. One call:

1. caches the cases' model-plane slices in memory (``LumbarSegmentLib.training.data``);
2. builds the variant (or starts from ``start``, e.g. a fine-tune's parent) with the
   variant's optimiser / learning rate unless overridden, a warm-up + cosine (or
   poly) schedule stepped per iteration;
3. per epoch draws ``steps_per_epoch`` batches of foreground-aware patches,
   augments them on the device (``LumbarSegmentLib.training.augment``), optimises the marginal
   CE + soft Dice loss (``LumbarSegmentLib.training.losses``), optionally under autocast;
4. validates through the engine users run (``training.evaluate``: same windows, precision
   and class-id mapping as ``lumbarseg segment``), keeps the best weights by ``config.metric``, stops
   early after ``patience`` validations without improvement;
5. writes ``last.pt`` (model, optimiser, scheduler, scaler, RNG states, epoch,
   history) atomically after every epoch, so ``resume=True`` continues a killed run
   exactly; writes ``progress.jsonl`` (one JSON object per line, read by the Slicer
   module) and a model package ``package/`` (safetensors) with provenance.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the model is
wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA); every process draws
its own patches (``batch_size`` is per process), rank 0 validates, logs and writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.models import build_model, count_parameters
from LumbarSegmentLib.registry.package import code_version
from LumbarSegmentLib.core.progress import PROGRESS_FILE, ProgressLog, eta_seconds  # the event schema lives there

from . import augment as aug
from .config import TrainConfig
from LumbarSegmentLib.inference.devices import autocast, autocast_dtype, pick_device, precision_name
from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions

from .checkpoints import (CHECKPOINT_FORMAT, atomic_torch_save, load_checkpoint, rng_state,  # noqa: F401
                          seed_everything, set_rng_state)
from .data import PatchSampler, Replayed, ThickSlabs, as_schema, epoch_generator, load_dataset
from .distributed import broadcast_floats, mean_across, setup_distributed
from .evaluate import eval_case_from_slices, every_nth_slice, predict, prepare_cases
from .scoring import EvalCase, Scorer
from .losses import class_weight_vector, deep_supervision_loss
from .optim import make_optimizer, make_scheduler
from .run_outputs import CachedSlices, RunFacts, RunOutputs, StartFrom, TrainResult, write_outputs

log = logging.getLogger("lumbarseg.train")

class TrainingInterrupted(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# small pieces
def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The training device (``devices.pick_device``; under torchrun CUDA rank i uses GPU i)."""
    return pick_device(name, local_rank)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except Exception:  # not installed: no TensorBoard logging
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


# --------------------------------------------------------------------------------------
def validate(model, cases: Sequence[EvalCase], schema, spacing, patch, *, stride: int = 1, device="cpu",
             precision: str = "auto") -> Scorer:
    """Score ``model`` (left untouched: the engine runs an eval-mode copy) on ``cases`` through the
    engine's prediction path; ``stride`` keeps every n-th slice (cheap per-epoch checks), except for a
    2.5D model: with slices dropped its neighbours would be n slices away, so it sees every slice."""
    lm = LoadedModel.from_module(model, schema, spacing, patch, ref="training run").snapshot()
    stride = 1 if lm.slice_context else stride
    scorer = Scorer(schema)
    for c in cases:
        c = every_nth_slice(c, stride)
        scorer.add(c, predict([lm], c.image, SegmentOptions(device=str(device), precision=precision)))
    return scorer


def train(config: TrainConfig, train_cases: Sequence[Case], val_cases: Sequence[Case] = (), *,
          out_dir: str | os.PathLike, start: StartFrom | None = None, slices: CachedSlices | None = None,
          callbacks: Sequence[Callable[[dict], None]] = (), outputs: RunOutputs = RunOutputs()) -> TrainResult:
    """Train one model; see the module docstring. Returns a :class:`TrainResult`.

    ``slices`` may pass already cached slices (:class:`CachedSlices`); ``start`` starts from given
    weights (fine-tuning); ``outputs`` says whether a package is written and what provenance it gets;
    ``callbacks`` are called with each "epoch" record (an exception there interrupts the
    run after that epoch's checkpoint, as a kill would).

    The steps, each a method of :class:`_Run`: ``setup`` -> ``resume`` -> per epoch
    ``train_epoch``, ``fit_budget``, ``validate_and_keep_best``, ``save_epoch`` -> ``finish``.
    """
    run = _Run(config, Path(out_dir), callbacks)
    try:
        run.setup(train_cases, val_cases, slices or CachedSlices(), start)
        run.resume()
        run.announce()
        for epoch in range(run.start_epoch, run.cfg.epochs):
            if epoch >= run.planned_epochs:
                break
            rec = run.train_epoch(epoch)
            run.fit_budget(epoch)
            stop = run.validate_and_keep_best(epoch, rec)
            run.save_epoch(epoch, rec)
            if stop:
                run.stopped_early = True
                log.info("early stop: no %s improvement in %d validations", run.cfg.metric, run.cfg.patience)
                break
        return run.finish(train_cases, val_cases, start, outputs)
    except BaseException as exc:
        run.record_failure(exc)
        raise
    finally:
        run.close()


class _Run:
    """The state of one training run, advanced by :func:`train` through short named steps."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, callbacks):
        self.cfg, self.out_dir, self.callbacks = cfg, out_dir, list(callbacks)
        self.dist = setup_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.autocast_dtype = autocast_dtype(self.device, cfg.precision)
        self.precision = precision_name(self.autocast_dtype)
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.plog = ProgressLog(out_dir / PROGRESS_FILE, enabled=self.dist.is_main)
        self.t_start = time.time()
        self.tb = None
        self.history: list[dict] = []
        self.start_epoch = self.epochs_done = 0
        self.best = {"metric": -math.inf, "epoch": None, "state": None, "stale": 0}
        self.elapsed_before = self.cpu_before = self.wall_before = 0.0
        self.step_times: list[float] = []
        self.epoch_times: list[float] = []
        self.val_time = self.val_clock = 0.0
        self.stopped_early = False
        self.ckpt_path = out_dir / "last.pt"
        self.clock = time.process_time if cfg.budget_clock == "cpu" else time.time

    # --- setup -----------------------------------------------------------------------
    def setup(self, train_cases, val_cases, slices: CachedSlices, start: StartFrom | None) -> None:
        """Data, sampler, model, optimiser and schedule."""
        cfg, train_data, val_data = self.cfg, slices.train, slices.val
        init_model = start.model if start is not None else None
        self.schema = schema = as_schema(cfg.schema)
        self.train_data = train_data if train_data is not None else load_dataset(train_cases, schema, cfg.spacing)
        if cfg.beyond_levels_mm > 0:
            from .data import ignore_beyond_levels

            ignored = ignore_beyond_levels(self.train_data, cfg.beyond_levels_mm, row_mm=float(cfg.spacing[0]))
            log.info("rows ignored beyond the labelled levels: %d over %d cases", sum(ignored.values()), len(ignored))
        self.pseudo = None
        if cfg.pseudo_labels:
            self.pseudo = self._pseudo_label(train_cases)
        if val_data is None:
            self.val_eval = prepare_cases(val_cases, schema) if (val_cases and self.dist.is_main) else []
            self.val_ids = [c.case_id for c in val_cases]
        else:
            self.val_eval = [eval_case_from_slices(c, cfg.spacing) for c in val_data]
            self.val_ids = [c.case_id for c in val_data]
        self.class_weights = class_weight_vector(cfg.class_weights, schema)
        self.sampler = PatchSampler(self.train_data, cfg.patch, cfg.fg_fraction, cfg.balance,
                                    slabs=ThickSlabs(cfg.slab_p), slice_context=cfg.slice_context
                                    ).replaying(Replayed(frozenset(cfg.replay_ids), cfg.replay_fraction))
        self.steps = cfg.steps_per_epoch or max(1, math.ceil(self.sampler.num_fg_slices / cfg.batch_size))
        self.aug_cfg = aug.AugmentConfig(cfg.augment, cfg.rotation_deg, cfg.zoom, cfg.flip_p, cfg.shift,
                                         cfg.intensity_aug, cfg.resolution_p, cfg.augment_p)
        seed_everything(cfg.seed)
        model = init_model if init_model is not None else build_model(**cfg.builder_kwargs(schema.num_classes))
        if model.builder_args["num_classes"] != schema.num_classes:
            raise ValueError(f"the model outputs {model.builder_args['num_classes']} classes but schema "
                             f"{schema.name!r} has {schema.num_classes}")
        if model.builder_args.get("in_channels", 1) != 2 * cfg.slice_context + 1:
            raise ValueError(f"the model reads {model.builder_args.get('in_channels', 1)} slice(s) but slice_context "
                             f"{cfg.slice_context} feeds {2 * cfg.slice_context + 1}")
        self.model = model.to(self.device)
        self.retention = _retention(cfg, self.model, start.teacher) if init_model is not None else None
        self.opt = make_optimizer(cfg.resolved_optimizer, self.model.parameters(), cfg.resolved_lr, cfg.weight_decay)
        self.planned_epochs = cfg.epochs  # may shrink to fit cfg.max_minutes (recorded in the checkpoint)
        self.total_holder = [self.steps * cfg.epochs]
        self.sched = make_scheduler(self.opt, self.total_holder, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def _pseudo_label(self, train_cases) -> dict:
        """Teacher drafts of each training case's unannotated classes (``training.pseudo``)."""
        from .pseudo import PseudoLabelSettings, add_pseudo_labels

        cfg = self.cfg
        settings = PseudoLabelSettings(cfg.pseudo_labels, threshold=cfg.pseudo_threshold, mode=cfg.pseudo_mode,
                                       device=str(self.device), precision=cfg.precision)
        summary = add_pseudo_labels(self.train_data, train_cases, self.schema, cfg.spacing, settings,
                                    cache_dir=self.out_dir / "pseudo")
        if self.dist.is_main:
            (self.out_dir / "pseudo_labels.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _plan(self, epochs: int) -> None:
        self.planned_epochs = epochs
        self.total_holder[0] = self.steps * epochs

    def resume(self) -> None:
        """Continue from ``last.pt`` (model, optimiser, schedule, RNGs, history, best) when asked to."""
        cfg, path = self.cfg, self.ckpt_path
        if not (cfg.resume and path.exists()):
            if path.exists() and self.dist.is_main:
                log.warning("%s exists and resume is off: starting over (it will be overwritten)", path)
            return
        ck = load_checkpoint(path)
        if ck["builder_args"] != self.model.builder_args:
            raise ValueError(f"{path} was written for {ck['builder_args']}, not {self.model.builder_args}; "
                             f"use another --out folder or the same settings")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self._plan(int(ck.get("planned_epochs", cfg.epochs)))
        clock_key = "train_cpu_s" if cfg.budget_clock == "cpu" else "train_time_s"
        self.elapsed_before = float(ck.get(clock_key, ck.get("train_time_s", 0.0)))
        self.cpu_before = float(ck.get("train_cpu_s", 0.0))
        self.wall_before = float(ck.get("train_time_s", 0.0))
        old = ck.get("config", {})
        if (old.get("max_minutes"), old.get("budget_clock", "wall"), old.get("epochs")) != \
                (cfg.max_minutes, cfg.budget_clock, cfg.epochs):
            self._plan(cfg.epochs)  # a new budget or epoch count: plan again from the configured epochs
            log.info("resume with a new budget/epochs: planning %d epochs again", cfg.epochs)
        self.history = ck["history"]
        self.start_epoch = self.epochs_done = ck["epoch"] + 1
        b = ck["best"]
        self.best = {"metric": b["metric"], "epoch": b["epoch"], "stale": b["stale"], "state": None}
        best_file = self.out_dir / "best.pt"
        if b["epoch"] is not None and best_file.exists():
            self.best["state"] = load_checkpoint(best_file)["model"]
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    def announce(self) -> None:
        """DDP wrapping, config.json, the start-up log line, the loop's clocks."""
        cfg, model = self.cfg, self.model
        self.ddp_model = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.dist.is_main:
            self.tb = _tensorboard(self.out_dir)
            (self.out_dir / "config.json").write_text(json.dumps(
                {**cfg.to_dict(), "builder_args": model.builder_args, "device": str(self.device),
                 "precision": self.precision, "world_size": self.dist.world, "steps_per_epoch": self.steps,
                 "train_cases": [c.case_id for c in self.train_data], "val_cases": self.val_ids}, indent=1))
            log.info("%s: %d parameters, %s, precision %s, %d train / %d val cases, %d steps x %d epochs, "
                     "batch %d x %d process(es)", cfg.variant, count_parameters(model), self.device, self.precision,
                     len(self.train_data), len(self.val_ids), self.steps, cfg.epochs, cfg.batch_size,
                     self.dist.world)
        self.use_bar = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
        self.t_loop, self.t_loop_cpu, self.t_loop_wall = self.clock(), time.process_time(), time.time()

    # --- one epoch ---------------------------------------------------------------------
    def _optimise(self, loss) -> None:
        cfg, opt, scaler = self.cfg, self.opt, self.scaler
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            opt.step()
        self.sched.step()

    def train_epoch(self, epoch: int) -> dict:
        """``steps`` optimiser steps on freshly drawn, augmented patches; returns the epoch record."""
        cfg, dev, steps = self.cfg, self.device, self.steps
        self.t_epoch = self.clock()
        self.ddp_model.train()
        if self.retention is not None:
            self.retention.train_mode(self.model)
        gen = epoch_generator(cfg.seed, epoch, self.dist.rank)
        losses = []
        bar = None
        if self.use_bar and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.planned_epochs}", leave=False, mininterval=1.0)
        for step in range(steps):
            t0 = time.time()
            img, lab, ann = self.sampler.sample(cfg.batch_size, gen)
            x, y = aug.augment_batch(img, lab, self.aug_cfg, cfg.patch, gen, dev)
            with autocast(dev, self.autocast_dtype):
                out = self.ddp_model(x)
            loss = deep_supervision_loss(out, y, ann.to(dev), ds_weights=cfg.ds_weights, dice_weight=cfg.dice_weight,
                                         marginal=cfg.marginal, unannotated_bg_weight=cfg.unannotated_bg_weight,
                                         class_weights=self.class_weights)
            if self.retention is not None:
                extra = self.retention.penalty(self.model, x, y, out, lambda: autocast(dev, self.autocast_dtype))
                loss = loss if extra is None else loss + extra
            self._optimise(loss)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss became {lv} at epoch {epoch + 1}, step {step + 1}; "
                                         f"lower the learning rate (--lr) or use --precision fp32")
            losses.append(lv)
            self.step_times.append(time.time() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.4f}")
            self._log_step(epoch, epoch * steps + step + 1, lv)
        if bar is not None:
            bar.close()
        train_loss = mean_across(float(np.mean(losses)), self.dist, dev)
        self.epoch_times.append(self.clock() - self.t_epoch)
        return {"epoch": epoch + 1, "step": (epoch + 1) * steps, "loss": train_loss,
                "lr": self.opt.param_groups[0]["lr"]}

    def _log_step(self, epoch: int, gstep: int, lv: float) -> None:
        if not self.dist.is_main or gstep % max(1, self.cfg.log_every):
            return
        total = self.total_holder[0]
        eta = eta_seconds(self.step_times, total - gstep, self.val_time, self.planned_epochs, self.cfg.val_every, epoch)
        self.plog.write("step", epoch=epoch + 1, step=gstep, loss=lv, lr=self.opt.param_groups[0]["lr"],
                        eta_s=eta, total_epochs=self.planned_epochs, total_steps=total)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", lv, gstep)

    def fit_budget(self, epoch: int) -> None:
        """Shrink the plan (never grow it) so the run ends within ``max_minutes``; every process agrees."""
        cfg = self.cfg
        if not cfg.max_minutes:
            return
        used = self.elapsed_before + (self.clock() - self.t_loop)
        left = cfg.max_minutes * 60 - used
        per_epoch = float(np.mean(self.epoch_times[-3:])) + (
            self.val_clock / max(1, cfg.val_every) if self.val_ids else 0.0)
        fit = epoch + 1 + max(0, int(left // max(per_epoch, 1e-6)))
        fit = int(broadcast_floats([float(fit)], self.dist, self.device)[0])
        if fit < self.planned_epochs:
            self._plan(max(epoch + 1, fit))
            log.info("time budget: schedule shortened to %d epochs", self.planned_epochs)

    def validate_and_keep_best(self, epoch: int, rec: dict) -> bool:
        """Validate when due (rank 0), keep the best weights in ``best.pt``; True = stop early."""
        cfg, best = self.cfg, self.best
        is_last = epoch + 1 >= self.planned_epochs
        stop = 0.0
        if self.val_ids and ((epoch + 1) % max(1, cfg.val_every) == 0 or is_last) and self.dist.is_main:
            tv, tvc = time.time(), self.clock()
            metrics = validate(self.model, self.val_eval, self.schema, cfg.spacing, cfg.patch, stride=cfg.val_stride,
                               device=self.device, precision=cfg.precision).all.compute()
            self.val_time, self.val_clock = time.time() - tv, self.clock() - tvc
            score = metrics[cfg.metric]
            rec["val"], rec["val_s"] = metrics, self.val_time
            if score is not None and not math.isnan(score) and score > best["metric"] + cfg.min_delta:
                best.update(metric=score, epoch=epoch + 1, stale=0,
                            state={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})
                atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": "best", "epoch": epoch,
                                   "builder_args": self.model.builder_args, "config": cfg.to_dict(),
                                   "metric": {cfg.metric: score}, "model": best["state"]}, self.out_dir / "best.pt")
            else:
                best["stale"] += 1
            if cfg.patience and best["stale"] >= cfg.patience:
                stop = 1.0
            if self.tb is not None:
                for k in ("mean_dice_fg", "mean_iou_fg"):
                    self.tb.add_scalar(f"val/{k}", metrics[k], epoch + 1)
        rec["best_epoch"] = best["epoch"]
        rec["best_metric"] = best["metric"] if best["epoch"] else None
        return bool(broadcast_floats([stop], self.dist, self.device)[0])

    def save_epoch(self, epoch: int, rec: dict) -> None:
        """Append the record, write ``last.pt`` and the progress event, then the callbacks."""
        cfg, best, steps = self.cfg, self.best, self.steps
        self.history.append(rec)
        if self.dist.is_main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "builder_args": self.model.builder_args,
                "config": cfg.to_dict(), "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng_state(), "history": self.history,
                "best": {"metric": best["metric"], "epoch": best["epoch"], "stale": best["stale"]},
                "planned_epochs": self.planned_epochs, "train_time_s": self._wall(), "train_cpu_s": self._cpu(),
                "code_version": code_version(),
            }, self.ckpt_path)
            total = self.total_holder[0]
            self.plog.write("epoch", epoch=epoch + 1, step=(epoch + 1) * steps, loss=rec["loss"], lr=rec["lr"],
                            val=rec.get("val"), best_epoch=best["epoch"], best_metric=rec["best_metric"],
                            metric=cfg.metric,
                            eta_s=eta_seconds(self.step_times, total - (epoch + 1) * steps, self.val_time,
                                              self.planned_epochs, cfg.val_every, epoch),
                            total_epochs=self.planned_epochs, total_steps=total)
            msg = f"epoch {epoch + 1}/{self.planned_epochs} loss {rec['loss']:.4f}"
            if "val" in rec:
                v = rec["val"]
                msg += (" | val dice " + " ".join(f"{k}={v['dice'][k]:.3f}" for k in self.schema.ids[1:]
                                                  if v["dice"][k] == v["dice"][k])
                        + f" mean_fg={v['mean_dice_fg']:.4f} (best {best['metric']:.4f} @ {best['epoch']})")
            log.info(msg)
        self.epochs_done = epoch + 1
        if self.dist.enabled:
            torch.distributed.barrier()
        for cb in self.callbacks:
            cb(rec)

    def _wall(self) -> float:
        return self.wall_before + (time.time() - self.t_loop_wall)

    def _cpu(self) -> float:
        return self.cpu_before + (time.process_time() - self.t_loop_cpu)

    # --- the end -----------------------------------------------------------------------
    def finish(self, train_cases, val_cases, start: StartFrom | None, outputs: RunOutputs) -> TrainResult:
        """Best weights back, a full validation (all slices), the package and the "done" event."""
        cfg, best, model = self.cfg, self.best, self.model
        result = TrainResult(out_dir=self.out_dir, package=None, model=model, history=self.history,
                             train_time_s=self._wall(), train_cpu_s=self._cpu(), best_epoch=best["epoch"],
                             best_metric=best["metric"] if best["epoch"] else None, epochs_run=self.epochs_done,
                             stopped_early=self.stopped_early)
        if self.dist.is_main:
            if best["state"] is not None:
                model.load_state_dict(best["state"])
            if self.val_ids:
                scorer = validate(model, self.val_eval, self.schema, cfg.spacing, cfg.patch, device=self.device,
                                  precision=cfg.precision)
                acc = scorer.all
                result.val_metrics, result.val_per_case = acc.compute(), acc.per_case()
                result.val_by_source = {k: v.compute() for k, v in scorer.by_source.items()}
                result.val_level_range = scorer.level_range()
                result.val_confusion = {k: (cm.tolist(), ann.tolist()) for k, (cm, ann) in acc.cases.items()}
            result.wall_s = time.time() - self.t_start
            provenance = {"init_from": start.info if start is not None else None, **(outputs.provenance or {})}
            if self.pseudo is not None:  # which teacher drafted what: part of what the model learnt from
                provenance = {**provenance, "pseudo_labels": {
                    k: self.pseudo[k] for k in ("teachers", "threshold", "mode")} | {
                    "cases": sorted(self.pseudo["cases"])}}
            if outputs.write_package:
                facts = RunFacts(self.schema, [c.case_id for c in self.train_data], self.val_ids, str(self.device),
                                 self.precision, self.dist.world, self.steps)
                result.package = write_outputs(result, cfg, facts, (train_cases, val_cases), provenance)
            self.plog.write("done", epoch=result.epochs_run, step=result.epochs_run * self.steps,
                            loss=self.history[-1]["loss"] if self.history else None, val=result.val_metrics,
                            best_epoch=result.best_epoch, best_metric=result.best_metric,
                            package=str(result.package.path) if result.package else None,
                            wall_s=result.wall_s, eta_s=0, stopped_early=self.stopped_early)
        if self.dist.enabled:
            torch.distributed.barrier()
        return result

    def record_failure(self, exc: BaseException) -> None:
        if self.dist.is_main:
            kind = "interrupted" if isinstance(exc, (KeyboardInterrupt, TrainingInterrupted)) else "error"
            self.plog.write("error", message=f"{type(exc).__name__}: {exc}", kind=kind,
                            resume_hint=f"lumbarseg-train ... --out {self.out_dir} --resume")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.dist.initialised_here:
            import torch.distributed as dist

            if dist.is_initialized():
                try:  # every rank reaches the end before any tears the group down (the store lives in rank 0)
                    dist.barrier()
                except RuntimeError:
                    pass  # a peer already failed: its error is the one to report
                dist.destroy_process_group()


def _retention(cfg: TrainConfig, model, teacher=None):
    """The fine-tune's guards bound to the starting weights (``training.retention.retention_for``), or None."""
    from .retention import retention_for
    return retention_for(cfg, model, teacher)
