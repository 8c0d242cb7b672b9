"""Training configuration: one dataclass, defaults per variant from ``LumbarSegmentLib.models.VARIANTS``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from LumbarSegmentLib.registry.manifest import SLICE_CONTEXT_MAX
from LumbarSegmentLib.models import VARIANTS

OPTIMIZERS = ("adam", "rmsprop", "adadelta")
SCHEDULES = ("cosine", "poly", "constant")
from LumbarSegmentLib.inference.devices import PRECISIONS

# intensity augmentation modes, described in LumbarSegmentLib.training.augment
INTENSITY_MODES = ("off", "light", "strong", "domain", "remap", "tissue", "gin")
METRICS = ("mean_dice_fg", "mean_iou_fg", "mean_dice", "mean_iou")


def precision_from_amp(value: str) -> str:
    """The precision a value of the setting's old name ``amp`` means (``"off"`` -> ``"fp32"``; the others
    are already precisions): the one place old configs and the old ``--amp`` flag are read."""
    return {"off": "fp32"}.get(value, value)


@dataclass
class TrainConfig:
    """Everything that decides a training run (stored in checkpoints and package manifests).

    ``None`` means "the variant's default" for ``init_filters``, ``activation``,
    ``deep_supervision``, ``optimizer`` and ``lr``.
    """

    variant: str = "UVD"
    schema: str = "starter"
    init_filters: Optional[int] = None
    activation: Optional[str] = None
    deep_supervision: Optional[bool] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: float = 0.0
    epochs: int = 40
    steps_per_epoch: Optional[int] = None  # None: (foreground training slices) / batch size
    batch_size: int = 8  # per process
    patch: int = 256
    spacing: tuple = (1.0, 1.0)
    fg_fraction: float = 0.67
    balance: str = "structures"
    augment: bool = True
    rotation_deg: float = 20.0
    zoom: tuple = (0.5, 1.5)
    flip_p: float = 0.5
    shift: float = 0.10
    intensity_aug: str = "off"  # one of INTENSITY_MODES (see LumbarSegmentLib.training.augment)
    resolution_p: float = 0.0  # probability of a low-resolution round trip per patch (augment)
    augment_p: float = 1.0  # share of patches augmented at all; the rest are plain crops (augment)
    slab_p: float = 0.0  # probability of a thick-slab (partial volume) patch (data.PatchSampler)
    slice_context: int = 0  # 2.5D: neighbour slices fed on each side of the labelled one (0 = one slice)
    unannotated_bg_weight: float = 0.0  # small pull of unannotated classes towards background (see losses)
    class_weights: tuple = ()  # ((class id, weight), ...): cross-entropy weight of a rare class's pixels (losses)
    beyond_levels_mm: float = 0.0  # rows just outside a case's labelled levels ignored (data.ignore_beyond_levels)
    pseudo_labels: Optional[tuple] = None  # teacher refs/folders that draft unannotated classes (training.pseudo)
    pseudo_threshold: float = 0.8  # teacher confidence needed for a pseudo-labelled voxel (below: ignored)
    pseudo_mode: str = "auto"  # engine mode of the teacher: auto = fast for one teacher, ensemble for several
    keep_bn_stats: bool = False  # fine-tunes: BatchNorm keeps the parent's statistics (training.retention)
    l2sp: float = 0.0  # fine-tunes: weight of the pull towards the parent's weights (training.retention)
    distill: float = 0.0  # fine-tunes: weight of the parent's answers where labels say nothing (training.retention)
    teacher_classes: tuple = ()  # fine-tunes with a named teacher: the classes it teaches; the parent the rest
    distill_everywhere: bool = False  # distil on every pixel, labelled ones too (a student copying its teacher)
    slim_width: int = 0  # fine-tunes: train a narrower copy of the parent, this first-level width (models.slim); 0 off
    replay_fraction: float = 0.0  # fine-tunes: share of each batch drawn from the replay cases (training.replay)
    replay_ids: tuple = ()  # fine-tunes: the training cases that are replayed, not the team's own
    marginal: bool = True
    dice_weight: float = 1.0
    ds_weights: tuple = (0.5, 0.25, 0.125)
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.0
    patience: int = 10  # validations without improvement before stopping (0: never stop early)
    min_delta: float = 1e-4
    metric: str = "mean_dice_fg"
    val_every: int = 1
    val_stride: int = 1  # use every n-th slice for the per-epoch validation (final one uses all)
    device: str = "auto"
    precision: str = "auto"  # devices.PRECISIONS: auto = bf16 on CUDA / bf16-capable CPUs, else fp32
    threads: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    name: Optional[str] = None
    half_weights: bool = True
    resume: bool = False
    max_minutes: Optional[float] = None  # time budget: shortens the schedule (only downwards) to fit
    budget_clock: str = "wall"  # "wall" (elapsed time) or "cpu" (this process's CPU time, all its threads)
    progress_bar: Optional[bool] = None  # None: only when stderr is a terminal

    def __post_init__(self):
        self.variant = str(self.variant).upper()
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock must be wall or cpu, got {self.budget_clock!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.patch < 32 or self.patch % 2:
            raise ValueError("patch must be an even number >= 32")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        self.intensity_aug = {True: "light", False: "off", None: "off"}.get(self.intensity_aug, self.intensity_aug)
        if self.intensity_aug not in INTENSITY_MODES:
            raise ValueError(f"intensity_aug must be one of {'|'.join(INTENSITY_MODES)}, got {self.intensity_aug!r}")
        if not (0 <= self.resolution_p <= 1 and 0 <= self.slab_p <= 1 and 0 <= self.augment_p <= 1):
            raise ValueError("resolution_p, slab_p and augment_p are probabilities in [0, 1]")
        if isinstance(self.slice_context, bool) or not (isinstance(self.slice_context, int)
                                                        and 0 <= self.slice_context <= SLICE_CONTEXT_MAX):
            raise ValueError(f"slice_context (--slice-context) must be an integer 0-{SLICE_CONTEXT_MAX}, "
                             f"got {self.slice_context!r}")
        if not 0 <= self.beyond_levels_mm <= 200:
            raise ValueError(f"beyond_levels_mm (--ignore-beyond-levels) must be 0-200 mm, got {self.beyond_levels_mm}")
        if self.pseudo_labels is not None:
            refs = [self.pseudo_labels] if isinstance(self.pseudo_labels, str) else list(self.pseudo_labels)
            self.pseudo_labels = tuple(str(r) for r in refs if str(r).strip()) or None
        if not 0.5 <= self.pseudo_threshold < 1:
            raise ValueError(f"pseudo_threshold must be in [0.5, 1), got {self.pseudo_threshold}")
        if self.pseudo_mode not in ("auto", "fast", "tta", "ensemble"):
            raise ValueError(f"pseudo_mode must be auto|fast|tta|ensemble, got {self.pseudo_mode!r}")
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) == 1:
            self.spacing = self.spacing * 2
        self.zoom = tuple(float(z) for z in self.zoom)
        self.ds_weights = tuple(float(w) for w in self.ds_weights)

    # --- variant defaults ---------------------------------------------------------
    @property
    def spec(self):
        return VARIANTS[self.variant]

    @property
    def resolved_optimizer(self) -> str:
        return self.optimizer or self.spec.optimizer

    @property
    def resolved_lr(self) -> float:
        return float(self.lr if self.lr is not None else self.spec.lr)

    @property
    def package_name(self) -> str:
        return self.name or f"{self.variant.lower()}-{self.schema_name}"

    @property
    def schema_name(self) -> str:
        from pathlib import Path

        return Path(str(self.schema)).stem

    def builder_kwargs(self, num_classes: int) -> dict:
        return {"variant": self.variant, "in_channels": 2 * self.slice_context + 1, "num_classes": num_classes,
                "init_filters": self.init_filters, "activation": self.activation,
                "deep_supervision": self.deep_supervision}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["resolved"] = {"optimizer": self.resolved_optimizer, "lr": self.resolved_lr}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if "amp" in d and "precision" not in d:  # configs written before the setting had one name
            d = {**d, "precision": precision_from_amp(d["amp"])}
        return cls(**{k: (_tuples(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def _tuples(v: list) -> tuple:
    """A JSON list back into the config's tuple (pairs such as ``class_weights`` too)."""
    return tuple(tuple(x) if isinstance(x, list) else x for x in v)


def config_from_args(a, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from parsed ``lumbarseg-train`` arguments (absent/None = default) + overrides."""
    keys = ["variant", "schema", "init_filters", "activation", "deep_supervision", "optimizer", "lr",
            "weight_decay", "epochs", "steps_per_epoch", "batch_size", "patch", "spacing", "fg_fraction",
            "balance", "augment", "zoom", "rotation_deg", "intensity_aug", "resolution_p", "augment_p", "slab_p",
            "slice_context",
            "unannotated_bg_weight", "class_weights", "beyond_levels_mm", "marginal", "keep_bn_stats", "l2sp", "distill",
            "teacher_classes", "distill_everywhere", "slim_width", "pseudo_labels", "pseudo_threshold", "pseudo_mode",
            "dice_weight", "schedule", "warmup_steps",
            "grad_clip", "patience", "metric", "val_every", "val_stride", "device", "precision", "threads", "seed",
            "name", "half_weights", "resume", "progress_bar", "max_minutes", "budget_clock"]
    kw = {k: getattr(a, k) for k in keys if hasattr(a, k) and getattr(a, k) is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**kw)


__all__ = ["config_from_args", "TrainConfig", "OPTIMIZERS", "SCHEDULES", "PRECISIONS", "METRICS"]
