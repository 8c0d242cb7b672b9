"""Composable building blocks for the lumbar-spine segmentation networks.

Everything here is plain PyTorch (no Qt / Slicer imports) so it can be used
from the Slicer GUI, from command-line training scripts and from tests.

Design choices shared by all blocks
-----------------------------------
* Convolutions that feed a BatchNorm have ``bias=False`` (the BN shift makes
  a conv bias redundant, and a redundant bias would only receive a zero
  gradient).
* All resampling is done with ``F.interpolate(mode="bilinear",
  align_corners=False)`` to an explicit target *size* (never a scale factor),
  so feature maps always line up exactly with the skip connection they are
  merged with.  Bilinear upsampling is parameter free, has no checkerboard
  artefacts and is well supported for bfloat16 autocast and channels_last
  tensors on CPU and GPU.
* Nothing here modifies a tensor in place that is used elsewhere, so the
  blocks are safe with autograd, ``torch.autocast`` and ``channels_last``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "BLOCK_KINDS",
    "make_activation",
    "ConvBNAct",
    "ConvBlock",
    "InceptionBlock",
    "make_block",
    "Encoder",
    "VGGEncoder",
    "UNetEncoder",
    "VGG16_CONVS",
    "AttentionGate",
    "DeepSupervisionHead",
    "FCN8Fusion",
    "upsample_to",
    "init_weights",
]

#: Names accepted by :func:`make_activation`.
ACTIVATIONS: Tuple[str, ...] = ("relu", "prelu")

#: Names accepted by :func:`make_block`.
BLOCK_KINDS: Tuple[str, ...] = ("conv", "inception")

#: Number of 3x3 convolutions in each of the five VGG16 stages.
VGG16_CONVS: Tuple[int, ...] = (2, 2, 3, 3, 3)


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize ``x`` to spatial ``size`` (no-op if already there)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def make_activation(name: str, channels: int) -> nn.Module:
    """Return a fresh activation module.

    ``"relu"`` gives an in-place ReLU; ``"prelu"`` gives a PReLU with one
    learnable slope per channel (``channels`` slopes, initialised to 0.25).
    """
    key = str(name).strip().lower()
    if key == "relu":
        return nn.ReLU(inplace=True)
    if key == "prelu":
        return nn.PReLU(num_parameters=int(channels))
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class ConvBNAct(nn.Sequential):
    """``Conv2d(k x k, same padding, no bias) -> BatchNorm2d -> activation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 activation: str = "relu") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size,
                      padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            make_activation(activation, out_channels),
        )


class ConvBlock(nn.Sequential):
    """``n_convs`` stacked :class:`ConvBNAct` 3x3 layers.

    The first layer maps ``in_channels -> out_channels``, the rest keep
    ``out_channels``.  This is the classic U-Net "double conv" for
    ``n_convs=2`` and one VGG stage for ``n_convs`` in (2, 3).
    """

    def __init__(self, in_channels: int, out_channels: int, n_convs: int = 2,
                 activation: str = "relu") -> None:
        if n_convs < 1:
            raise ValueError("ConvBlock needs at least one convolution")
        layers = [ConvBNAct(in_channels if i == 0 else out_channels, out_channels, 3, activation)
                  for i in range(n_convs)]
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


class InceptionBlock(nn.Module):
    """Multi-kernel (inception-style) block.

    Four parallel branches look at the same input with different receptive
    fields; their outputs are concatenated along the channel axis and fused
    by a 1x1 :class:`ConvBNAct` down to ``out_channels``:

    ========  ==============================================  ==============
    branch    layers                                          receptive field
    ========  ==============================================  ==============
    ``b1``    1x1                                             1x1
    ``b3``    1x1 (reduce) -> 3x3                             3x3
    ``b5``    1x1 (reduce) -> 3x3 -> 3x3                      5x5
    ``bp``    3x3 max-pool (stride 1) -> 1x1                  3x3
    ========  ==============================================  ==============

    Every conv is a :class:`ConvBNAct`.  The 5x5 branch is factorised as two
    3x3 convs (cheaper, same receptive field).  Each branch has
    ``branch_channels`` outputs (default ``max(out_channels // 2, 1)``), so
    the concatenation has ``4 * branch_channels`` channels before the fusing
    1x1 conv.  With the default width the block costs roughly half of a
    double 3x3 :class:`ConvBlock` of the same ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str = "relu",
                 n_convs: int = 2, branch_channels: int | None = None) -> None:
        # n_convs is accepted for signature compatibility with ConvBlock; unused.
        super().__init__()
        b = branch_channels if branch_channels is not None else max(out_channels // 2, 1)
        self.b1 = ConvBNAct(in_channels, b, 1, activation)
        self.b3 = nn.Sequential(
            ConvBNAct(in_channels, b, 1, activation),
            ConvBNAct(b, b, 3, activation),
        )
        self.b5 = nn.Sequential(
            ConvBNAct(in_channels, b, 1, activation),
            ConvBNAct(b, b, 3, activation),
            ConvBNAct(b, b, 3, activation),
        )
        self.bp = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            ConvBNAct(in_channels, b, 1, activation),
        )
        self.fuse = ConvBNAct(4 * b, out_channels, 1, activation)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)
        return self.fuse(y)


def make_block(kind: str, in_channels: int, out_channels: int, activation: str = "relu",
               n_convs: int = 2) -> nn.Module:
    """Factory for the "conv block" used at each resolution level.

    ``kind="conv"`` -> :class:`ConvBlock` with ``n_convs`` 3x3 convs;
    ``kind="inception"`` -> one :class:`InceptionBlock`.
    """
    if kind == "conv":
        return ConvBlock(in_channels, out_channels, n_convs, activation)
    if kind == "inception":
        return InceptionBlock(in_channels, out_channels, activation)
    raise ValueError(f"unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")


class Encoder(nn.Module):
    """Generic contracting path.

    Stage ``i`` is ``make_block(block, ..., widths[i], n_convs=convs[i])``;
    a 2x2 max-pool sits *between* consecutive stages (so ``len(widths) - 1``
    poolings).  :meth:`forward` returns the output of every stage, finest
    first; the last entry is the bottleneck.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], convs: Sequence[int],
                 activation: str = "relu", block: str = "conv") -> None:
        super().__init__()
        if len(widths) != len(convs) or not widths:
            raise ValueError("widths and convs must be non-empty and of equal length")
        self.widths: Tuple[int, ...] = tuple(int(w) for w in widths)
        self.convs: Tuple[int, ...] = tuple(int(n) for n in convs)
        stages = []
        prev = in_channels
        for width, n in zip(self.widths, self.convs):
            stages.append(make_block(block, prev, width, activation, n_convs=n))
            prev = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = stage(x)
            features.append(x)
        return features


class UNetEncoder(Encoder):
    """U-Net encoder: 5 levels with ``f, 2f, 4f, 8f, 16f`` filters, 4 poolings.

    ``block`` selects plain double-conv stages or inception stages.
    """

    def __init__(self, in_channels: int, init_filters: int, activation: str = "relu",
                 block: str = "conv", depth: int = 5) -> None:
        widths = [init_filters * 2 ** i for i in range(depth)]
        super().__init__(in_channels, widths, [2] * depth, activation, block)


class VGGEncoder(Encoder):
    """VGG16-style encoder trained from scratch (no pretrained weights).

    Five stages of 2, 2, 3, 3, 3 conv3x3+BN+act layers with
    ``f, 2f, 4f, 8f, 8f`` filters (``f=64`` is the original VGG16).  The
    pooling after stage 5 (VGG's ``pool5``) is left to the caller: the U-Net
    decoders use stage 5 as the bottleneck, FCN-8s pools it once more.
    """

    def __init__(self, in_channels: int, init_filters: int, activation: str = "relu") -> None:
        f = init_filters
        widths = [f, 2 * f, 4 * f, 8 * f, 8 * f]
        super().__init__(in_channels, widths, VGG16_CONVS, activation, "conv")


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (after Oktay et al. 2018).

    Given the skip features ``x`` (fine, ``C_x`` channels) and the gating
    signal ``g`` (the coarser decoder state, ``C_g`` channels):

    1. ``theta = W_x * x``  (1x1 conv, no bias) at the skip resolution;
    2. ``phi   = W_g * g + b`` (1x1 conv) computed at the *coarse* resolution
       and bilinearly resized to the skip resolution (cheaper than resizing
       ``g`` first, and identical for a linear map);
    3. ``alpha = sigmoid(psi * relu(theta + phi) + b_psi)`` - one coefficient
       in (0, 1) per pixel;
    4. output ``x * alpha`` - same shape as ``x``.

    Unlike the original formulation, which down-samples ``x`` with a strided
    conv and up-samples ``alpha``, the gate here is evaluated directly at the
    skip resolution, which gives a sharper attention map.
    """

    def __init__(self, skip_channels: int, gate_channels: int,
                 inter_channels: int | None = None) -> None:
        super().__init__()
        if inter_channels is None:
            inter_channels = max(skip_channels // 2, 1)
        self.theta = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv2d(inter_channels, 1, 1, bias=True)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention map ``alpha`` of shape ``[B, 1, H_x, W_x]``."""
        phi = upsample_to(self.phi(g), x.shape[-2:])
        return torch.sigmoid(self.psi(F.relu(self.theta(x) + phi)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(x, g)


class DeepSupervisionHead(nn.Module):
    """Auxiliary classifier: 1x1 conv to ``num_classes`` then bilinear resize.

    ``forward(x, size)`` returns logits resized to ``size`` (normally the
    padded input size), so every auxiliary output can be compared with the
    full-resolution label map.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return upsample_to(self.conv(x), size)


class FCN8Fusion(nn.Module):
    """FCN-8s skip fusion.

    ``forward(score_top, pool4, pool3, size)``:

    * ``score_top`` - class scores at 1/32 resolution (from the fc6/fc7
      stand-ins on top of ``pool5``);
    * 2x upsample, add ``score_pool4(pool4)`` (1/16);
    * 2x upsample, add ``score_pool3(pool3)`` (1/8);
    * 8x upsample to ``size``.

    Upsampling is bilinear (fixed, the usual initialisation of FCN's
    learnable deconvolutions) instead of learnable transposed convolutions.
    """

    def __init__(self, pool3_channels: int, pool4_channels: int, num_classes: int) -> None:
        super().__init__()
        self.score_pool4 = nn.Conv2d(pool4_channels, num_classes, 1)
        self.score_pool3 = nn.Conv2d(pool3_channels, num_classes, 1)

    def forward(self, score_top: torch.Tensor, pool4: torch.Tensor, pool3: torch.Tensor,
                size: Sequence[int]) -> torch.Tensor:
        s = upsample_to(score_top, pool4.shape[-2:]) + self.score_pool4(pool4)
        s = upsample_to(s, pool3.shape[-2:]) + self.score_pool3(pool3)
        return upsample_to(s, size)


def init_weights(module: nn.Module) -> None:
    """He-normal init for convs (fan-out, ReLU gain), BN to identity.

    Meant for ``model.apply(init_weights)``.  Output heads are re-initialised
    separately with PyTorch's default (smaller-variance) conv init.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
