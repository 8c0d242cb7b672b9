"""The training loop: patches -> model -> partial-label loss; validation, checkpoints, package.

``train(config, train_cases, val_cases, out_dir)`` is the Python API behind
``lumbarseg-train train``. One call:

1. caches the cases' model-plane slices in memory (``LumbarSegmentLib.training.data``);
2. builds the variant (or takes ``init_model``, e.g. a fine-tuning start) with the
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
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from LumbarSegmentLib.cases import Case
from LumbarSegmentLib.models import build_model, count_parameters
from LumbarSegmentLib.packages import ModelPackage, code_version, default_input_contract, write_package
from LumbarSegmentLib.progress import PROGRESS_FILE, ProgressLog  # the event schema lives there

from . import augment as aug
from .config import TrainConfig
from LumbarSegmentLib.devices import autocast, autocast_dtype, pick_device, precision_name
from LumbarSegmentLib.engine import LoadedModel

from .data import CaseSlices, PatchSampler, as_schema, data_manifest, epoch_generator, load_dataset
from .evaluate import EvalCase, Scorer, eval_case_from_slices, every_nth_slice, predict, prepare_cases
from .losses import deep_supervision_loss
from .metrics import MetricAccumulator, clean

log = logging.getLogger("lumbarseg.train")

CHECKPOINT_FORMAT = "lumbarsegment.checkpoint"


class TrainingInterrupted(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# small pieces
def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The training device (``devices.pick_device``; under torchrun CUDA rank i uses GPU i)."""
    return pick_device(name, local_rank)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then cosine/poly/constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return min_ratio + (1 - min_ratio) * (1 - t) ** 0.9  # poly


def make_scheduler(opt, total_steps, cfg: TrainConfig):
    """LambdaLR over ``total_steps`` (an int, or a one-element list the caller may shrink later)."""
    holder = total_steps if isinstance(total_steps, list) else [int(total_steps)]
    warm = min(cfg.warmup_steps, max(0, holder[0] // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, holder[0], warm, cfg.schedule, cfg.min_lr_ratio))


def plain(obj):
    """``obj`` with numpy values turned into tensors and Python numbers: what ``weights_only=True`` loads."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load_checkpoint(path: Path) -> dict:
    """A checkpoint this code wrote, read with ``weights_only=True``: tensors and plain data only, no code.

    A file holding anything else (a pickle made to run code, a foreign checkpoint) is refused
    before any of its objects is built.
    """
    try:
        ck = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, ... by torch version
        raise ValueError(f"{path}: not a LumbarSegment training checkpoint, or one holding more than tensors and "
                         f"plain data ({type(exc).__name__}); refused without running anything from it. Start "
                         f"the run in a new --out folder") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a LumbarSegment training checkpoint")
    return ck


def atomic_torch_save(obj, path: Path) -> None:
    obj = plain(obj)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers, so a checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                    float(gauss)],
          "python": [int(version), torch.tensor(internal, dtype=torch.int64), py_gauss]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = st["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), py_gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except Exception:  # not installed: no TensorBoard logging
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


# --------------------------------------------------------------------------------------
# distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device_name: str = "auto") -> DistInfo:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, initialised_here=True)


def _broadcast_floats(values: list[float], dist_info: DistInfo, device) -> list[float]:
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def _mean_across(value: float, dist_info: DistInfo, device) -> float:
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist_info.world


# --------------------------------------------------------------------------------------
def validate(model, cases: Sequence[EvalCase], schema, spacing, patch, *, stride: int = 1, device="cpu",
             precision: str = "auto") -> Scorer:
    """Score ``model`` (left untouched: the engine runs an eval-mode copy) on ``cases`` through the
    engine's prediction path; ``stride`` keeps every n-th slice (cheap per-epoch checks)."""
    lm = LoadedModel.from_module(model, schema, spacing, patch, ref="training run")
    scorer = Scorer(schema)
    for c in cases:
        c = every_nth_slice(c, stride)
        scorer.add(c, predict([lm], c.image, device=str(device), precision=precision))
    return scorer


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


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train(config: TrainConfig, train_cases: Sequence[Case], val_cases: Sequence[Case] = (), *,
          out_dir: str | os.PathLike, init_model: torch.nn.Module | None = None, init_info: dict | None = None,
          train_data: Sequence[CaseSlices] | None = None, val_data: Sequence[CaseSlices] | None = None,
          callbacks: Sequence[Callable[[dict], None]] = (), write_pkg: bool = True,
          extra_provenance: dict | None = None) -> TrainResult:
    """Train one model; see the module docstring. Returns a :class:`TrainResult`.

    ``train_data``/``val_data`` may pass already cached slices (they must match the
    cases and ``config.spacing``); ``init_model`` starts from given weights (fine-tuning);
    ``callbacks`` are called with each "epoch" record (an exception there interrupts the
    run after that epoch's checkpoint, as a kill would).
    """
    cfg = config
    out_dir = Path(out_dir)
    dist_info = setup_distributed(cfg.device)
    device = resolve_device(cfg.device, dist_info.local_rank)
    amp_dtype = autocast_dtype(device, cfg.precision)
    amp = precision_name(amp_dtype)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    plog = ProgressLog(out_dir / PROGRESS_FILE, enabled=dist_info.is_main)
    t_start = time.time()
    tb = None
    try:
        schema = as_schema(cfg.schema)
        class_ids = schema.ids
        if train_data is None:
            train_data = load_dataset(train_cases, schema, cfg.spacing)
        if val_data is None:
            val_eval = prepare_cases(val_cases, schema) if (val_cases and dist_info.is_main) else []
            val_ids = [c.case_id for c in val_cases]
        else:
            val_eval = [eval_case_from_slices(c, cfg.spacing) for c in val_data]
            val_ids = [c.case_id for c in val_data]
        sampler = PatchSampler(train_data, cfg.patch, cfg.fg_fraction, cfg.balance, slab_p=cfg.slab_p)
        steps = cfg.steps_per_epoch or max(1, math.ceil(sampler.num_fg_slices / cfg.batch_size))
        total_steps = steps * cfg.epochs
        aug_cfg = aug.AugmentConfig(cfg.augment, cfg.rotation_deg, cfg.zoom, cfg.flip_p, cfg.shift,
                                    cfg.intensity_aug, cfg.resolution_p)

        seed_everything(cfg.seed)
        if init_model is not None:
            model = init_model
        else:
            model = build_model(**cfg.builder_kwargs(schema.num_classes))
        if model.builder_args["num_classes"] != schema.num_classes:
            raise ValueError(f"the model outputs {model.builder_args['num_classes']} classes but schema "
                             f"{schema.name!r} has {schema.num_classes}")
        model = model.to(device)
        opt = make_optimizer(cfg.resolved_optimizer, model.parameters(), cfg.resolved_lr, cfg.weight_decay)
        planned_epochs = cfg.epochs  # may shrink to fit cfg.max_minutes (recorded in the checkpoint)
        total_holder = [total_steps]
        sched = make_scheduler(opt, total_holder, cfg)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

        history: list[dict] = []
        elapsed_before = cpu_before = wall_before = 0.0
        start_epoch = 0
        best = {"metric": -math.inf, "epoch": None, "state": None, "stale": 0}
        ckpt_path = out_dir / "last.pt"
        if cfg.resume and ckpt_path.exists():
            ck = load_checkpoint(ckpt_path)
            if ck["builder_args"] != model.builder_args:
                raise ValueError(f"{ckpt_path} was written for {ck['builder_args']}, not {model.builder_args}; "
                                 f"use another --out folder or the same settings")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
            planned_epochs = int(ck.get("planned_epochs", cfg.epochs))
            total_holder[0] = total_steps = steps * planned_epochs
            clock_key = "train_cpu_s" if cfg.budget_clock == "cpu" else "train_time_s"
            elapsed_before = float(ck.get(clock_key, ck.get("train_time_s", 0.0)))
            cpu_before = float(ck.get("train_cpu_s", 0.0))
            wall_before = float(ck.get("train_time_s", 0.0))
            old_cfg = ck.get("config", {})
            if (old_cfg.get("max_minutes"), old_cfg.get("budget_clock", "wall"), old_cfg.get("epochs")) != \
                    (cfg.max_minutes, cfg.budget_clock, cfg.epochs):
                # a new budget or epoch count: plan again from the configured epochs
                planned_epochs = cfg.epochs
                total_holder[0] = total_steps = steps * planned_epochs
                log.info("resume with a new budget/epochs: planning %d epochs again", planned_epochs)
            history = ck["history"]
            start_epoch = ck["epoch"] + 1
            best = {"metric": ck["best"]["metric"], "epoch": ck["best"]["epoch"], "stale": ck["best"]["stale"],
                    "state": None}
            best_file = out_dir / "best.pt"
            if best["epoch"] is not None and best_file.exists():
                best["state"] = load_checkpoint(best_file)["model"]
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
        if ckpt_path.exists() and not cfg.resume and dist_info.is_main and start_epoch == 0:
            log.warning("%s exists and resume is off: starting over (it will be overwritten)", ckpt_path)

        ddp_model = model
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        if dist_info.is_main:
            tb = _tensorboard(out_dir)
            (out_dir / "config.json").write_text(json.dumps(
                {**cfg.to_dict(), "builder_args": model.builder_args, "device": str(device), "precision": amp,
                 "world_size": dist_info.world, "steps_per_epoch": steps,
                 "train_cases": [c.case_id for c in train_data], "val_cases": val_ids},
                indent=1))
            log.info("%s: %d parameters, %s, precision %s, %d train / %d val cases, %d steps x %d epochs, "
                     "batch %d x %d process(es)", cfg.variant, count_parameters(model), device, amp,
                     len(train_data), len(val_ids), steps, cfg.epochs, cfg.batch_size, dist_info.world)

        use_bar = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
        step_times: list[float] = []
        val_time = 0.0
        stopped_early = False
        epoch = start_epoch - 1
        epochs_done = start_epoch
        clock = time.process_time if cfg.budget_clock == "cpu" else time.time
        t_loop, t_loop_cpu, t_loop_wall = clock(), time.process_time(), time.time()
        epoch_times: list[float] = []
        val_clock = 0.0
        for epoch in range(start_epoch, cfg.epochs):
            if epoch >= planned_epochs:
                break
            t_epoch = clock()
            ddp_model.train()
            gen = epoch_generator(cfg.seed, epoch, dist_info.rank)
            losses = []
            bar = None
            if use_bar and dist_info.is_main:
                from tqdm import tqdm

                bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{planned_epochs}", leave=False, mininterval=1.0)
            for step in range(steps):
                t0 = time.time()
                img, lab, ann = sampler.sample(cfg.batch_size, gen)
                x, y = aug.augment_batch(img, lab, aug_cfg, cfg.patch, gen, device)
                ann = ann.to(device)
                with autocast(device, amp_dtype):
                    out = ddp_model(x)
                loss = deep_supervision_loss(out, y, ann, ds_weights=cfg.ds_weights, dice_weight=cfg.dice_weight,
                                             marginal=cfg.marginal, unannotated_bg_weight=cfg.unannotated_bg_weight)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                sched.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise FloatingPointError(f"loss became {lv} at epoch {epoch + 1}, step {step + 1}; "
                                             f"lower the learning rate (--lr) or use --precision fp32")
                losses.append(lv)
                step_times.append(time.time() - t0)
                gstep = epoch * steps + step + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.4f}")
                if dist_info.is_main and (gstep % max(1, cfg.log_every) == 0):
                    eta = _eta(step_times, total_steps - gstep, val_time, planned_epochs, cfg.val_every, epoch)
                    plog.write("step", epoch=epoch + 1, step=gstep, loss=lv, lr=opt.param_groups[0]["lr"],
                               eta_s=eta, total_epochs=planned_epochs, total_steps=total_steps)
                    if tb is not None:
                        tb.add_scalar("train/loss", lv, gstep)
            if bar is not None:
                bar.close()
            train_loss = _mean_across(float(np.mean(losses)), dist_info, device)

            rec = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "loss": train_loss,
                   "lr": opt.param_groups[0]["lr"]}
            epoch_times.append(clock() - t_epoch)
            if cfg.max_minutes:
                # shrink the plan (never grow it) so the run ends within the budget; every process agrees
                used = elapsed_before + (clock() - t_loop)
                left = cfg.max_minutes * 60 - used
                per_epoch = float(np.mean(epoch_times[-3:])) + (val_clock / max(1, cfg.val_every) if val_ids else 0.0)
                fit = epoch + 1 + max(0, int(left // max(per_epoch, 1e-6)))
                fit = int(_broadcast_floats([float(fit)], dist_info, device)[0])
                if fit < planned_epochs:
                    planned_epochs = max(epoch + 1, fit)
                    total_holder[0] = total_steps = steps * planned_epochs
                    log.info("time budget: schedule shortened to %d epochs", planned_epochs)
            is_last = epoch + 1 >= planned_epochs
            do_val = bool(val_ids) and ((epoch + 1) % max(1, cfg.val_every) == 0 or is_last)
            stop = 0.0
            if do_val and dist_info.is_main:
                tv, tvc = time.time(), clock()
                metrics = validate(model, val_eval, schema, cfg.spacing, cfg.patch, stride=cfg.val_stride,
                                   device=device, precision=cfg.precision).all.compute()
                val_time, val_clock = time.time() - tv, clock() - tvc
                score = metrics[cfg.metric]
                rec["val"] = metrics
                rec["val_s"] = val_time
                if score is not None and not math.isnan(score) and score > best["metric"] + cfg.min_delta:
                    best.update(metric=score, epoch=epoch + 1, stale=0,
                                state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                    atomic_torch_save({"format": CHECKPOINT_FORMAT, "kind": "best", "epoch": epoch,
                                       "builder_args": model.builder_args, "config": cfg.to_dict(),
                                       "metric": {cfg.metric: score}, "model": best["state"]},
                                      out_dir / "best.pt")
                else:
                    best["stale"] += 1
                if cfg.patience and best["stale"] >= cfg.patience:
                    stop = 1.0
                if tb is not None:
                    for k in ("mean_dice_fg", "mean_iou_fg"):
                        tb.add_scalar(f"val/{k}", metrics[k], epoch + 1)
            stop = _broadcast_floats([stop], dist_info, device)[0]
            rec["best_epoch"] = best["epoch"]
            rec["best_metric"] = best["metric"] if best["epoch"] else None
            history.append(rec)
            if dist_info.is_main:
                atomic_torch_save({
                    "format": CHECKPOINT_FORMAT, "epoch": epoch, "builder_args": model.builder_args,
                    "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": rng_state(), "history": history,
                    "best": {"metric": best["metric"], "epoch": best["epoch"], "stale": best["stale"]},
                    "planned_epochs": planned_epochs, "train_time_s": wall_before + (time.time() - t_loop_wall),
                    "train_cpu_s": cpu_before + (time.process_time() - t_loop_cpu),
                    "code_version": code_version(),
                }, ckpt_path)
                remaining = total_steps - (epoch + 1) * steps
                plog.write("epoch", epoch=epoch + 1, step=(epoch + 1) * steps, loss=train_loss,
                           lr=rec["lr"], val=rec.get("val"), best_epoch=best["epoch"],
                           best_metric=rec["best_metric"], metric=cfg.metric,
                           eta_s=_eta(step_times, remaining, val_time, planned_epochs, cfg.val_every, epoch),
                           total_epochs=planned_epochs, total_steps=total_steps)
                msg = f"epoch {epoch + 1}/{planned_epochs} loss {train_loss:.4f}"
                if "val" in rec:
                    v = rec["val"]
                    msg += (f" | val dice " + " ".join(f"{k}={v['dice'][k]:.3f}" for k in class_ids[1:]
                                                      if v["dice"][k] == v["dice"][k])
                            + f" mean_fg={v['mean_dice_fg']:.4f} (best {best['metric']:.4f} @ {best['epoch']})")
                log.info(msg)
            epochs_done = epoch + 1
            if dist_info.enabled:
                torch.distributed.barrier()
            for cb in callbacks:
                cb(rec)
            if stop:
                stopped_early = True
                log.info("early stop: no %s improvement in %d validations", cfg.metric, cfg.patience)
                break

        result = TrainResult(out_dir=out_dir, package=None, model=model, history=history,
                             train_time_s=wall_before + (time.time() - t_loop_wall),
                             train_cpu_s=cpu_before + (time.process_time() - t_loop_cpu),
                             best_epoch=best["epoch"], best_metric=best["metric"] if best["epoch"] else None,
                             epochs_run=epochs_done, stopped_early=stopped_early)
        if dist_info.is_main:
            if best["state"] is not None:
                model.load_state_dict(best["state"])
            if val_ids:
                scorer = validate(model, val_eval, schema, cfg.spacing, cfg.patch, device=device,
                                  precision=cfg.precision)
                acc = scorer.all
                result.val_metrics, result.val_per_case = acc.compute(), acc.per_case()
                result.val_by_source = {k: v.compute() for k, v in scorer.by_source.items()}
                result.val_level_range = scorer.level_range()
                result.val_confusion = {k: (cm.tolist(), ann.tolist()) for k, (cm, ann) in acc.cases.items()}
            result.wall_s = time.time() - t_start
            if write_pkg:
                result.package = _write_outputs(result, cfg, schema, train_cases, val_cases, train_data, val_ids,
                                                device, amp, dist_info, steps, init_info, extra_provenance)
            plog.write("done", epoch=result.epochs_run, step=result.epochs_run * steps,
                       loss=history[-1]["loss"] if history else None, val=result.val_metrics,
                       best_epoch=result.best_epoch, best_metric=result.best_metric,
                       package=str(result.package.path) if result.package else None,
                       wall_s=result.wall_s, eta_s=0, stopped_early=stopped_early)
        if dist_info.enabled:
            torch.distributed.barrier()
        return result
    except BaseException as exc:
        if dist_info.is_main:
            kind = "interrupted" if isinstance(exc, (KeyboardInterrupt, TrainingInterrupted)) else "error"
            plog.write("error", message=f"{type(exc).__name__}: {exc}", kind=kind,
                       resume_hint=f"lumbarseg-train ... --out {out_dir} --resume")
        raise
    finally:
        if tb is not None:
            tb.close()
        if dist_info.initialised_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _eta(step_times, remaining_steps, val_time, planned_epochs, val_every, epoch) -> float:
    if not step_times:
        return float("nan")
    per = float(np.mean(step_times[-50:]))
    remaining_epochs = max(0, planned_epochs - epoch - 1)
    return per * max(0, remaining_steps) + val_time * remaining_epochs / max(1, val_every)


def _write_outputs(result: TrainResult, cfg: TrainConfig, schema, train_cases, val_cases, train_data, val_ids,
                   device, amp, dist_info, steps, init_info, extra_provenance) -> ModelPackage:
    from . import report

    out_dir = result.out_dir
    manifest = data_manifest(list(train_cases) + list(val_cases)) if (train_cases or val_cases) else None
    (out_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=1)) if manifest else None
    training = {
        "variant": cfg.variant, "config": cfg.to_dict(),
        "data_manifest_sha256": manifest["sha256"] if manifest else None,
        "data_manifest": manifest["cases"] if manifest else None,
        "train_cases": [c.case_id for c in train_data], "val_cases": list(val_ids),
        "epochs": result.epochs_run, "epochs_configured": cfg.epochs, "steps_per_epoch": steps,
        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "folds": None, "seed": cfg.seed, "device": str(device), "precision": amp, "world_size": dist_info.world,
        "wall_time_s": round(result.wall_s, 1), "train_time_s": round(result.train_time_s, 1),
        "train_cpu_s": round(result.train_cpu_s, 1), "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "loss": ("marginal cross-entropy + soft Dice over annotated classes"
                 + (f", unannotated->background weight {cfg.unannotated_bg_weight}" if cfg.unannotated_bg_weight
                    else "")) if cfg.marginal
        else "cross-entropy + soft Dice (all classes treated as annotated)",
        "init_from": init_info,
        **(extra_provenance or {}),
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
                        input_contract=default_input_contract(cfg.spacing, (cfg.patch, cfg.patch)),
                        training=training, metrics=metrics, half=cfg.half_weights)
    try:
        report.write_run_report(out_dir, result.history, result.val_metrics, result.val_per_case, schema,
                                name=cfg.package_name)
    except Exception as exc:  # a failed plot must not lose a trained model
        log.warning("could not write the run report: %s", exc)
    return pkg
