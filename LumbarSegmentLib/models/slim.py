"""A narrower copy of a trained U-Net: the start of a lighter model distilled from it.

On a CPU without bf16 arithmetic the network is most of a draft's time, and its cost grows
with the square of its width: a UVD of first-level width 8 does about a quarter of the
multiply-adds of one of width 16. Training such a network from scratch takes the many stages
the shipped models went through; starting it from the wide model's own filters and letting the
wide model teach it (``training.retention``'s distillation) gets there in one fine-tune.

Which channels are kept (network slimming, after Liu et al., ICCV 2017): every conv of the
variant family is followed by a BatchNorm, whose scale ``|gamma|`` says how much a channel
contributes downstream; each layer keeps its ``n`` channels of largest ``|gamma|`` (in their
original order), and the layers that read it keep the matching input channels. A decoder block
reads ``cat([skip, upsampled])``, so its input map is the skip's kept channels followed by the
upsampled path's kept channels shifted by the skip's full width. The copy is not the wide
model's function (the dropped channels' contributions are gone, the BatchNorm statistics are
the wide model's): it is a start that training then corrects.

Only the U-Net family with plain conv blocks and no attention gates (``UVD``, ``UD``, ``U1``) is
covered; the others are refused with the reason.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .variants import SegmentationNet, UNetFamilyNet, build_model

__all__ = ["check_slimmable", "slim_model"]


def _keep(gamma: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` channels of largest ``|gamma|``, in ascending order."""
    return torch.sort(torch.topk(gamma.detach().abs().float(), n).indices).values


def _units(state: Dict[str, torch.Tensor], prefix: str) -> List[str]:
    """The conv+BN+activation units under ``prefix`` (``"<prefix>.<j>"``), in order."""
    out, j = [], 0
    while f"{prefix}.{j}.0.weight" in state:
        out.append(f"{prefix}.{j}")
        j += 1
    return out


def _copy_unit(dst: Dict[str, torch.Tensor], src: Dict[str, torch.Tensor], unit: str,
               rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Conv ``unit.0`` (output rows, input cols), its BatchNorm ``unit.1`` and activation ``unit.2``."""
    dst[f"{unit}.0.weight"] = src[f"{unit}.0.weight"][rows][:, cols].clone()
    if f"{unit}.0.bias" in src:
        dst[f"{unit}.0.bias"] = src[f"{unit}.0.bias"][rows].clone()
    for key in ("weight", "bias", "running_mean", "running_var"):
        dst[f"{unit}.1.{key}"] = src[f"{unit}.1.{key}"][rows].clone()
    dst[f"{unit}.1.num_batches_tracked"] = src[f"{unit}.1.num_batches_tracked"].clone()
    act = src.get(f"{unit}.2.weight")
    if act is not None:  # PReLU: one slope per channel, or a single shared one
        dst[f"{unit}.2.weight"] = act[rows].clone() if act.numel() > 1 else act.clone()


def check_slimmable(model: SegmentationNet, width: int) -> None:
    """Refuse (``ValueError`` with the reason) a model or width :func:`slim_model` cannot copy."""
    spec = model.spec
    if not isinstance(model, UNetFamilyNet) or spec.block != "conv" or spec.attention:
        raise ValueError(f"only U-Nets with plain conv blocks and no attention gates can be slimmed "
                         f"(UVD, UD, U1); {spec.name} has {spec.architecture}")
    if not 1 <= int(width) < spec.init_filters:
        raise ValueError(f"a slimmed model must be narrower than its source: width {width} is not between "
                         f"1 and {spec.init_filters - 1}")


def slim_model(model: SegmentationNet, width: int) -> SegmentationNet:
    """A copy of ``model`` with first-level width ``width`` (every level narrowed in proportion), its
    weights taken from ``model``'s channels of largest BatchNorm scale (module doc). ``model`` is
    not changed; the copy is on the CPU in float32, in ``model``'s train/eval mode."""
    check_slimmable(model, width)
    args = dict(model.builder_args, init_filters=int(width))
    slim = build_model(**args)
    src = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
           for k, v in model.state_dict().items()}
    dst: Dict[str, torch.Tensor] = {}
    wide_widths = list(model.encoder.widths)
    narrow_widths = list(slim.encoder.widths)
    cols = torch.arange(model.in_channels)
    stage_out: List[torch.Tensor] = []
    for s in range(len(wide_widths)):
        for unit in _units(src, f"encoder.stages.{s}"):
            rows = _keep(src[f"{unit}.1.weight"], narrow_widths[s])
            _copy_unit(dst, src, unit, rows, cols)
            cols = rows
        stage_out.append(cols)
    below = stage_out[-1]  # what the coarsest decoder's upsampled input keeps
    decoder_out: Dict[int, torch.Tensor] = {}
    for level in range(len(wide_widths) - 2, -1, -1):
        cols = torch.cat([stage_out[level], wide_widths[level] + below])
        for unit in _units(src, f"decoders.{level}"):
            rows = _keep(src[f"{unit}.1.weight"], narrow_widths[level])
            _copy_unit(dst, src, unit, rows, cols)
            cols = rows
        decoder_out[level] = below = cols
    dst["head.weight"] = src["head.weight"][:, decoder_out[0]].clone()
    dst["head.bias"] = src["head.bias"].clone()
    for i, level in enumerate(model.aux_levels):
        dst[f"aux_heads.{i}.conv.weight"] = src[f"aux_heads.{i}.conv.weight"][:, decoder_out[level]].clone()
        if f"aux_heads.{i}.conv.bias" in src:
            dst[f"aux_heads.{i}.conv.bias"] = src[f"aux_heads.{i}.conv.bias"].clone()
    slim.load_state_dict(dst, strict=True)
    return slim.train(model.training)
