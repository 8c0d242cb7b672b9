"""The 2D U-Net variant family of Saenz-Gamboa et al. (ICPR 2020).

One table (:data:`VARIANTS`) holds the per-variant architecture switches and
training defaults, and one builder (:func:`build_model`) turns a table entry
(plus optional overrides) into a :class:`SegmentationNet`.

Letters in the variant names:

* ``A`` - attention gates on the skip connections,
* ``D`` - deep supervision (auxiliary heads on intermediate decoder levels),
* ``M`` - multi-kernel (inception) blocks instead of double 3x3 convs,
* ``V`` - VGG16-style encoder (trained from scratch),
* ``U1`` - the plain U-Net, ``FCN8`` - FCN-8s on a VGG16 backbone.

Forward contract (all variants)
-------------------------------
Input ``[B, C, H, W]`` float.  Any ``H, W`` is accepted (>= 32 recommended):
the input is padded (replicate, centred) to the next multiple of
:attr:`SegmentationNet.size_divisor` (32) and every output is cropped back to
``H x W``.

* ``eval()`` -> main logits ``[B, K, H, W]`` (one tensor);
* ``train()`` without deep supervision -> the same tensor;
* ``train()`` with deep supervision -> ``(main, [aux_1, ..., aux_n])`` where
  each aux is already upsampled to ``[B, K, H, W]`` (coarsest first).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    ACTIVATIONS,
    AttentionGate,
    ConvBNAct,
    DeepSupervisionHead,
    FCN8Fusion,
    UNetEncoder,
    VGGEncoder,
    init_weights,
    make_block,
    upsample_to,
)

__all__ = [
    "VariantSpec",
    "VARIANTS",
    "SegmentationNet",
    "UNetFamilyNet",
    "FCN8Net",
    "build_model",
    "replace_heads",
    "count_parameters",
    "get_spec",
]

ModelOutput = Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]


@dataclass(frozen=True)
class VariantSpec:
    """Architecture switches and training defaults for one variant."""

    name: str
    description: str
    optimizer: str  # "adam" | "rmsprop" | "adadelta"
    lr: float
    activation: str  # "relu" | "prelu"
    init_filters: int
    encoder: str = "unet"  # "unet" | "vgg16"
    block: str = "conv"  # "conv" | "inception"
    attention: bool = False
    deep_supervision: bool = False
    fcn8: bool = False

    @property
    def architecture(self) -> str:
        """Short human-readable summary, e.g. ``"vgg16 enc, conv, DS"``."""
        if self.fcn8:
            return "FCN-8s (vgg16 enc)"
        parts = [f"{self.encoder} enc", self.block]
        if self.attention:
            parts.append("attention")
        if self.deep_supervision:
            parts.append("DS")
        return ", ".join(parts)


def _spec(name: str, description: str, optimizer: str, lr: float, activation: str,
          init_filters: int, **switches: Any) -> Tuple[str, VariantSpec]:
    return name, VariantSpec(name, description, optimizer, lr, activation, init_filters, **switches)


#: Seed table of the paper's variants (the only place these values live).
VARIANTS: Dict[str, VariantSpec] = dict([
    _spec("UAD", "U-Net + attention gates + deep supervision",
          "rmsprop", 1e-3, "relu", 16, attention=True, deep_supervision=True),
    _spec("UVAD", "U-Net with VGG16 encoder + attention gates + deep supervision",
          "adam", 3.3e-4, "prelu", 32, encoder="vgg16", attention=True, deep_supervision=True),
    _spec("UAMD", "U-Net + attention gates + multi-kernel (inception) blocks + deep supervision",
          "adam", 3.3e-4, "relu", 16, block="inception", attention=True, deep_supervision=True),
    _spec("UVD", "U-Net with VGG16 encoder + deep supervision",
          "adam", 3.3e-4, "prelu", 32, encoder="vgg16", deep_supervision=True),
    _spec("UMD", "U-Net + multi-kernel (inception) blocks + deep supervision",
          "adam", 3.3e-4, "relu", 32, block="inception", deep_supervision=True),
    _spec("UD", "U-Net + deep supervision",
          "adam", 3.3e-4, "relu", 64, deep_supervision=True),
    _spec("U1", "plain U-Net",
          "adadelta", 1.0, "relu", 64),
    _spec("FCN8", "FCN-8s on a VGG16 backbone (skip fusion from pool3/pool4)",
          "adam", 3.3e-4, "relu", 32, encoder="vgg16", fcn8=True),
])


def get_spec(variant: str) -> VariantSpec:
    """Look up a table entry by (case-insensitive) name."""
    key = str(variant).strip().upper()
    try:
        return VARIANTS[key]
    except KeyError:
        raise ValueError(
            f"unknown model variant {variant!r}; valid variants: {', '.join(VARIANTS)}"
        ) from None


class SegmentationNet(nn.Module):
    """Base class: padding/cropping and the train/eval output contract.

    Subclasses implement :meth:`_forward_padded` and :meth:`head_modules`.

    Attributes
    ----------
    spec : VariantSpec
        Table entry with the builder overrides applied.
    builder_args : dict
        JSON-serialisable; ``build_model(**builder_args)`` rebuilds the same
        architecture (identical state_dict keys and shapes).
    head : nn.Conv2d
        The 1x1 conv producing the main class scores.
    aux_heads : nn.ModuleList
        Deep-supervision heads (empty without deep supervision).
    """

    #: inputs are padded to a multiple of this (2 ** number of poolings, max 5)
    size_divisor: int = 32
    #: ``F.pad`` mode used for that padding ("replicate" or "constant")
    pad_mode: str = "replicate"

    head: nn.Conv2d
    aux_heads: nn.ModuleList

    def __init__(self, spec: VariantSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.builder_args: Dict[str, Any] = {}

    # -- to be provided by subclasses -------------------------------------
    def _forward_padded(self, x: torch.Tensor, with_aux: bool
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        raise NotImplementedError

    def head_modules(self) -> Dict[str, nn.Conv2d]:
        """All convs that output class scores, by qualified module name."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------
    def _pad(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, int, int, int]]]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        if ph == 0 and pw == 0:
            return x, None
        top, left = ph // 2, pw // 2
        if self.pad_mode == "constant":
            x = F.pad(x, (left, pw - left, top, ph - top), mode="constant", value=0.0)
        else:
            x = F.pad(x, (left, pw - left, top, ph - top), mode=self.pad_mode)
        return x, (top, left, h, w)

    @staticmethod
    def _crop(y: torch.Tensor, box: Optional[Tuple[int, int, int, int]]) -> torch.Tensor:
        if box is None:
            return y
        top, left, h, w = box
        return y[..., top:top + h, left:left + w]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if x.dim() != 4:
            raise ValueError(f"expected input [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channel(s), got {x.shape[1]}")
        with_aux = self.training and self.spec.deep_supervision
        xp, box = self._pad(x)
        main, aux = self._forward_padded(xp, with_aux)
        main = self._crop(main, box)
        if with_aux:
            return main, [self._crop(a, box) for a in aux]
        return main

    def extra_repr(self) -> str:
        return (f"variant={self.spec.name}, in_channels={self.in_channels}, "
                f"num_classes={self.num_classes}, init_filters={self.spec.init_filters}, "
                f"activation={self.spec.activation}, "
                f"deep_supervision={self.spec.deep_supervision}")


class UNetFamilyNet(SegmentationNet):
    """U-Net with optional VGG16 encoder, inception blocks, attention gates
    and deep supervision (variants UAD, UVAD, UAMD, UVD, UMD, UD, U1).

    Encoder: 5 levels / 4 poolings.  ``unet`` widths ``f, 2f, 4f, 8f, 16f``
    (2 convs per level); ``vgg16`` widths ``f, 2f, 4f, 8f, 8f`` (2, 2, 3, 3, 3
    convs).  The deepest level is the bottleneck.

    Decoder, for level ``l = 3, 2, 1, 0`` (coarse to fine):
    ``skip_l`` (optionally gated by ``AttentionGate(skip_l, y)``) is
    concatenated with ``y`` bilinearly upsampled to the skip's size, and a
    conv/inception block maps ``width[l] + width[l+1] -> width[l]``.
    ``head`` is a 1x1 conv on the level-0 decoder output.

    Deep supervision: one :class:`DeepSupervisionHead` on the decoder output
    of levels 3, 2 and 1 (1/8, 1/4, 1/2 resolution), i.e. between decoder
    blocks; ``aux_heads[0]`` is the coarsest.
    """

    def __init__(self, spec: VariantSpec, in_channels: int, num_classes: int) -> None:
        super().__init__(spec, in_channels, num_classes)
        f, act = spec.init_filters, spec.activation
        if spec.encoder == "vgg16":
            self.encoder = VGGEncoder(in_channels, f, act)
        else:
            self.encoder = UNetEncoder(in_channels, f, act, spec.block)
        widths = self.encoder.widths
        levels = range(len(widths) - 1)
        self.decoders = nn.ModuleList(
            make_block(spec.block, widths[l] + widths[l + 1], widths[l], act) for l in levels)
        self.gates = nn.ModuleList(
            AttentionGate(widths[l], widths[l + 1]) for l in levels) if spec.attention else None
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.aux_levels: Tuple[int, ...] = (
            tuple(range(len(widths) - 2, 0, -1)) if spec.deep_supervision else ())
        self.aux_heads = nn.ModuleList(
            DeepSupervisionHead(widths[l], num_classes) for l in self.aux_levels)

    def _forward_padded(self, x: torch.Tensor, with_aux: bool
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feats = self.encoder(x)
        y = feats[-1]
        out_size = x.shape[-2:]
        aux: List[torch.Tensor] = []
        aux_index = 0
        for level in range(len(feats) - 2, -1, -1):
            skip = feats[level]
            if self.gates is not None:
                skip = self.gates[level](skip, y)
            y = self.decoders[level](torch.cat([skip, upsample_to(y, skip.shape[-2:])], dim=1))
            if with_aux and level in self.aux_levels:
                aux.append(self.aux_heads[aux_index](y, out_size))
                aux_index += 1
        return self.head(y), aux

    def head_modules(self) -> Dict[str, nn.Conv2d]:
        mods: Dict[str, nn.Conv2d] = {"head": self.head}
        for i, h in enumerate(self.aux_heads):
            mods[f"aux_heads.{i}.conv"] = h.conv
        return mods


class FCN8Net(SegmentationNet):
    """FCN-8s on a VGG16-style encoder trained from scratch.

    ``pool5`` (1/32) feeds two conv layers standing in for VGG's fc6/fc7
    (3x3 then 1x1, ``16f`` channels, BN + activation), then ``head`` (1x1
    conv) scores the classes; :class:`FCN8Fusion` adds the scores of
    ``pool4`` and ``pool3`` on the way up and resizes to the input size.
    Deep supervision is not defined for this variant.
    """

    def __init__(self, spec: VariantSpec, in_channels: int, num_classes: int) -> None:
        super().__init__(spec, in_channels, num_classes)
        if spec.deep_supervision:
            raise ValueError("deep supervision is not supported for FCN8")
        f, act = spec.init_filters, spec.activation
        self.encoder = VGGEncoder(in_channels, f, act)
        w = self.encoder.widths
        self.fc = nn.Sequential(ConvBNAct(w[4], 16 * f, 3, act), ConvBNAct(16 * f, 16 * f, 1, act))
        self.head = nn.Conv2d(16 * f, num_classes, 1)
        self.fusion = FCN8Fusion(w[2], w[3], num_classes)
        self.aux_heads = nn.ModuleList()

    def _forward_padded(self, x: torch.Tensor, with_aux: bool
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feats = self.encoder(x)
        pool3 = F.max_pool2d(feats[2], 2)
        pool4 = F.max_pool2d(feats[3], 2)
        pool5 = F.max_pool2d(feats[4], 2)
        score = self.head(self.fc(pool5))
        return self.fusion(score, pool4, pool3, x.shape[-2:]), []

    def head_modules(self) -> Dict[str, nn.Conv2d]:
        return {"head": self.head,
                "fusion.score_pool4": self.fusion.score_pool4,
                "fusion.score_pool3": self.fusion.score_pool3}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


_INITIALISE = contextvars.ContextVar("lumbarseg_initialise_weights", default=True)


@contextlib.contextmanager
def shapes_only():
    """Build networks without drawing initial weights: for a skeleton whose shapes alone are read.

    On PyTorch's meta device the random initialisers run through PyTorch's reference implementations,
    whose first use imports the whole compiler stack (``torch._dynamo``: over a second of every
    ``lumbarseg segment`` start-up on a busy 2-core machine) to draw numbers nobody reads.
    """
    token = _INITIALISE.set(False)
    try:
        yield
    finally:
        _INITIALISE.reset(token)


def build_model(variant: str, *, in_channels: int = 1, num_classes: int = 12,
                init_filters: Optional[int] = None, activation: Optional[str] = None,
                deep_supervision: Optional[bool] = None) -> SegmentationNet:
    """Build a variant from :data:`VARIANTS`; non-``None`` overrides replace
    the table defaults.

    Raises ``ValueError`` for an unknown variant (the message lists the
    valid names) or invalid overrides.
    """
    spec = get_spec(variant)
    in_channels = _check_int("in_channels", in_channels, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    overrides: Dict[str, Any] = {}
    if init_filters is not None:
        overrides["init_filters"] = _check_int("init_filters", init_filters, 1)
    if activation is not None:
        act = str(activation).strip().lower()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        overrides["activation"] = act
    if deep_supervision is not None:
        overrides["deep_supervision"] = bool(deep_supervision)
    spec = dataclasses.replace(spec, **overrides)

    net_cls = FCN8Net if spec.fcn8 else UNetFamilyNet
    model = net_cls(spec, in_channels, num_classes)
    if _INITIALISE.get():
        model.apply(init_weights)
        for conv in model.head_modules().values():
            conv.reset_parameters()  # PyTorch default init for the class-score layers
    model.builder_args = {
        "variant": spec.name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "init_filters": spec.init_filters,
        "activation": spec.activation,
        "deep_supervision": spec.deep_supervision,
    }
    return model


def replace_heads(model: SegmentationNet, num_classes: int) -> SegmentationNet:
    """Swap every class-score conv for a freshly initialised one with
    ``num_classes`` outputs (same device/dtype); all other weights are kept.

    Used to fine-tune a trained model on a label schema with a different
    number of classes.  Updates ``model.num_classes`` and
    ``model.builder_args``; returns ``model`` (modified in place).
    """
    num_classes = _check_int("num_classes", num_classes, 1)
    for qualname, old in model.head_modules().items():
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size,
                        stride=old.stride, padding=old.padding, bias=old.bias is not None)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        parent_name, _, attr = qualname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    model.num_classes = num_classes
    model.builder_args = dict(model.builder_args, num_classes=num_classes)
    return model


def widen_input(model: SegmentationNet, in_channels: int) -> SegmentationNet:
    """Let a model read ``in_channels`` (odd) input slices instead of its ``2a+1``: the convs that read
    the input get new zero weights for the added outer channels and keep theirs for the middle
    ones, so the widened model's output is exactly the old one's until training teaches it to use
    the neighbours (how a one-slice model becomes the start of a 2.5D fine-tune). In place; returns
    ``model``.
    """
    old_in = model.in_channels
    in_channels = _check_int("in_channels", in_channels, old_in)
    if (in_channels - old_in) % 2:
        raise ValueError(f"a model reading {old_in} slice(s) widens by a slice on each side: "
                         f"{in_channels} is not {old_in} + an even number")
    if in_channels == old_in:
        return model
    pad = (in_channels - old_in) // 2
    readers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == old_in]
    if not readers:
        raise ValueError(f"no conv of {type(model).__name__} reads its {old_in} input channel(s)")
    for qualname, old in readers:
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                        padding_mode=old.padding_mode).to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, pad:pad + old_in].copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        parent_name, _, attr = qualname.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    model.in_channels = in_channels
    model.builder_args = dict(model.builder_args, in_channels=in_channels)
    return model


def append_input_channels(model: SegmentationNet, extra: int) -> SegmentationNet:
    """Let a model read ``extra`` more input channels after its own (a click-guided model's click maps):
    the convs that read the input get zero weights for them, so the output is exactly the old one's
    until training teaches the network to use them. In place; returns ``model``."""
    extra = _check_int("extra", extra, 0)
    if not extra:
        return model
    old_in = model.in_channels
    readers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == old_in]
    if not readers:
        raise ValueError(f"no conv of {type(model).__name__} reads its {old_in} input channel(s)")
    for qualname, old in readers:
        new = nn.Conv2d(old_in + extra, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                        padding_mode=old.padding_mode).to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :old_in].copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        parent_name, _, attr = qualname.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    model.in_channels = old_in + extra
    model.builder_args = dict(model.builder_args, in_channels=old_in + extra)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
