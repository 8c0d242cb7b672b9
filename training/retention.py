"""Keeping what a parent model knew while it is fine-tuned on a team's own cases.

A fine-tune on a few slices of one new source drifts the whole network towards that source:
the BatchNorm running statistics become the new contrast's (every other sequence is then
normalised wrongly at inference), and the weights wander as far as the few cases let them.
``docs/lab/forgetting.md`` measures what each guard below buys; the fine-tune default is the
combination that paid.

* **keep BN statistics** (``keep_bn_stats``): the BatchNorm layers run in eval mode during the
  fine-tune, so they normalise with the parent's running mean and variance and never update
  them; their scale and shift still learn.
* **L2-SP** (``l2sp``): ``l2sp * sum((w - w_parent)^2)`` over the parent's trainable weights
  (class-score rows a new schema added start fresh and are left free): a spring back to the
  starting point rather than to zero (Li et al., ICML 2018); a class a new schema added is
  anchored to its fresh start, which only damps it as weight decay would.
* **replay** (``replay``): a share of every batch comes from a few shipped slices of each source
  the parent trained on (``training.replay``), so those sources stay in the loss.
* **blending** (``wise``): the written weights are ``parent + wise x (fine-tune - parent)``
  (``training.wise``, WiSE-FT): most of the gain, most of what the parent knew.
* **distillation** (``distill``): where a patch's label says nothing definite (label 0 or
  ignored: background *or* a structure the case does not annotate), the KL divergence from the
  parent's softmax to the model's, ``distill`` times its mean over those pixels: the model keeps
  the parent's answers wherever the team's labels do not contradict them (learning without
  forgetting, Li and Hoiem 2017). It needs the parent's classes: a fine-tune whose schema
  changed the class count skips it. A slimmed fine-tune (``models.slim``) learns from the wide
  parent this way while its own narrower weights train. A named teacher may teach only some classes
  (``teacher_channels``): its log-probabilities of those classes and the parent's of the others are
  put together and normalised again, so a light model that draws the posterior elements well can teach
  them while the parent keeps teaching the discs it draws better (``docs/lab/lite-model.md``). A
  slimmed student meant to stand in for its teacher may copy it everywhere (``everywhere``): on the
  labelled pixels too, where the teacher's soft borders say more than the hard label.

:class:`Retention` holds the parent's copy and applies the guards; the trainer calls
:meth:`Retention.train_mode` after putting the model in train mode and adds
:meth:`Retention.penalty` to each step's loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


@dataclass(frozen=True)
class RetentionSettings:
    """Which guards a fine-tune uses (all off: a plain fine-tune)."""

    keep_bn_stats: bool = False
    l2sp: float = 0.0
    distill: float = 0.0
    replay: float = 0.0  # share of each batch drawn from the shipped replay set (training.replay)
    replay_set: str | None = None  # a folder of cases to replay instead of the shipped set
    wise: float = 1.0  # share of the fine-tune's change kept in the written weights (training.wise); 1 = all
    teacher: object = None  # a package or ref whose answers are distilled instead of the parent's
    teacher_channels: tuple = ()  # with a teacher: the channels it teaches; the parent teaches the others
    everywhere: bool = False  # distil on every pixel, not only where the labels leave the answer open

    def __post_init__(self):
        for name in ("l2sp", "distill"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= float(v) <= 1e6):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if not (isinstance(self.replay, (int, float)) and 0 <= float(self.replay) < 1):
            raise ValueError(f"replay must be a share of the batch in [0, 1), got {self.replay!r}")
        if not (isinstance(self.wise, (int, float)) and 0 < float(self.wise) <= 1):
            raise ValueError(f"wise must be a share in (0, 1], got {self.wise!r}")

    @property
    def active(self) -> bool:
        return bool(self.keep_bn_stats or self.l2sp or self.distill or self.replay or self.wise < 1)


def freeze_bn_stats(model: torch.nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode (running statistics used, not updated);
    returns how many. Call after ``model.train()``, which would switch them back."""
    n = 0
    for m in model.modules():
        if isinstance(m, _BN):
            m.eval()
            n += 1
    return n


def l2sp_penalty(model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum((w - anchor[w])^2)`` over the parameters named in ``anchor`` whose shape still matches."""
    total = None
    for name, p in model.named_parameters():
        a = anchor.get(name)
        if a is None or a.shape != p.shape or not p.requires_grad:
            continue
        term = (p.float() - a).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return next(model.parameters()).sum() * 0.0
    return total


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 everywhere: bool = False) -> torch.Tensor:
    """Mean KL(teacher || student) over the pixels whose label is 0 or ignored (``[B, K, H, W]`` logits),
    or over every pixel (``everywhere``)."""
    s = F.log_softmax(student_logits.float(), dim=1)
    t = F.log_softmax(teacher_logits.float(), dim=1)
    kl = (t.exp() * (t - s)).sum(1)  # [B, H, W]
    if everywhere:
        return kl.mean()
    free = (target == 0) | (target == IGNORE_INDEX)
    return (kl * free).sum() / free.sum().clamp(min=1)


class Retention:
    """The guards of one fine-tune, bound to its parent's weights (taken when built)."""

    def __init__(self, settings: RetentionSettings, parent: torch.nn.Module, teacher: torch.nn.Module | None = None):
        self.settings = settings
        self.anchor: dict[str, torch.Tensor] = {}
        if settings.l2sp:  # the starting point: the parent's weights (a new class's fresh rows included)
            self.anchor = {n: p.detach().float().clone() for n, p in parent.named_parameters()}
        self.teacher = self.parent = None
        if settings.distill:
            self.teacher = _frozen(teacher if teacher is not None else parent)
            if settings.teacher_channels and teacher is not None:
                self.parent = _frozen(parent)

    def to(self, device) -> "Retention":
        self.anchor = {k: v.to(device) for k, v in self.anchor.items()}
        if self.teacher is not None:
            self.teacher = self.teacher.to(device)
        if self.parent is not None:
            self.parent = self.parent.to(device)
        return self

    def train_mode(self, model: torch.nn.Module) -> None:
        if self.settings.keep_bn_stats:
            freeze_bn_stats(model)

    def penalty(self, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, output, autocast_ctx
                ) -> torch.Tensor | None:
        """The guards' loss term for one step (``None`` when no guard adds to the loss)."""
        s = self.settings
        terms = []
        if s.l2sp and self.anchor:
            terms.append(float(s.l2sp) * l2sp_penalty(model, self.anchor))
        if s.distill and self.teacher is not None:
            main = _main(output)
            if self.teacher.builder_args.get("num_classes") == main.shape[1]:
                with torch.no_grad(), autocast_ctx():
                    t = _main(self.teacher(x))
                    if self.parent is not None:
                        t = mix_teachers(t, _main(self.parent(x)), s.teacher_channels)
                terms.append(float(s.distill) * distill_loss(main, t, target, s.everywhere))
        return sum(terms) if terms else None


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` that takes no gradient."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _main(output):
    """The main (finest) output of a model that may also return deep-supervision outputs."""
    return output[0] if isinstance(output, (tuple, list)) else output


def mix_teachers(teacher_logits: torch.Tensor, parent_logits: torch.Tensor, channels) -> torch.Tensor:
    """Log-probabilities (up to a constant per pixel) of the teacher for ``channels`` and of the parent for
    the rest, ``[B, K, H, W]``; the distillation's softmax normalises them again."""
    pick = torch.zeros(teacher_logits.shape[1], dtype=torch.bool, device=teacher_logits.device)
    pick[list(channels)] = True
    t = F.log_softmax(teacher_logits.float(), dim=1)
    p = F.log_softmax(parent_logits.float(), dim=1)
    return torch.where(pick[None, :, None, None], t, p)


def retention_for(cfg, model: torch.nn.Module, teacher: torch.nn.Module | None = None) -> "Retention | None":
    """The guards a :class:`~training.config.TrainConfig` asks for, bound to the starting weights ``model``
    (and to ``teacher`` when the parent is not the starting network, e.g. a slimmed copy of it, or a named
    teacher); None when no guard is on. ``cfg.teacher_classes`` are mapped to channels of ``cfg.schema``."""
    channels = ()
    if cfg.teacher_classes:
        from LumbarSegmentLib.core.schema import load_schema

        of = load_schema(cfg.schema).channel_of()
        channels = tuple(of[c] for c in cfg.teacher_classes)
    settings = RetentionSettings(cfg.keep_bn_stats, cfg.l2sp, cfg.distill, teacher_channels=channels,
                                 everywhere=bool(cfg.distill_everywhere))
    return Retention(settings, model, teacher) if settings.active else None
