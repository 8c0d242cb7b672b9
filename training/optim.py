"""The optimiser and the learning-rate schedule of a training run (warm-up, then cosine, poly or constant)."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


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
