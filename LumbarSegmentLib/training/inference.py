"""Slice-wise prediction used by validation and ``lumbarseg-train evaluate``.

Prediction runs on the model-plane stack produced by ``preprocess.model_slices``;
``predict_volume`` resizes the class probabilities back to the volume's in-plane size
(bilinear), takes the arg-max and undoes the canonical layout, so metrics are computed
on the case's own voxel grid.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from LumbarSegmentLib import preprocess
from LumbarSegmentLib.geometry import resize_planes


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {"off", "bf16", "fp16"} (a null context for "off")."""
    if amp in (None, "off", False):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_probabilities(models: Sequence[torch.nn.Module], stack: torch.Tensor, *, batch: int = 8,
                          device: torch.device | str = "cpu", amp: str = "off",
                          channel_maps: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Mean softmax of ``models`` over a ``[S, H, W]`` stack -> ``[S, K, H, W]`` float32 (CPU).

    ``channel_maps[i]`` reorders model i's channels onto the first model's (ensembles of
    models whose schemas list the same classes in another order).
    """
    device = torch.device(device)
    out = None
    for mi, model in enumerate(models):
        was_training = model.training
        model.eval()
        parts = []
        for s0 in range(0, stack.shape[0], batch):
            x = stack[s0:s0 + batch, None].to(device)
            with autocast_context(device, amp):
                logits = model(x)
            p = F.softmax(logits.float(), dim=1).cpu()
            if channel_maps is not None:
                p = p[:, list(channel_maps[mi])]
            parts.append(p)
        model.train(was_training)
        probs = torch.cat(parts)
        out = probs if out is None else out + probs
    return out / len(models)


@torch.no_grad()
def predict_labels(model: torch.nn.Module, stack: torch.Tensor, *, batch: int = 8,
                   device: torch.device | str = "cpu", amp: str = "off") -> torch.Tensor:
    """Arg-max labels ``[S, H, W]`` (uint8) on the model plane."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    parts = []
    for s0 in range(0, stack.shape[0], batch):
        x = stack[s0:s0 + batch, None].to(device)
        with autocast_context(device, amp):
            logits = model(x)
        parts.append(logits.argmax(1).to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(parts)


def predict_volume(models: Sequence[torch.nn.Module], volume, spacing_mm, *, batch: int = 8,
                   device="cpu", amp: str = "off", channel_maps=None) -> np.ndarray:
    """Label map (schema values = channel index) on ``volume``'s own grid."""
    stack, layout, _ = preprocess.model_slices(volume, tuple(spacing_mm))
    probs = predict_probabilities(models, stack, batch=batch, device=device, amp=amp, channel_maps=channel_maps)
    canon_shape = layout.to_canonical(np.empty(volume.array.shape, dtype=np.uint8)).shape
    size = tuple(canon_shape[1:])
    if tuple(probs.shape[-2:]) != size:
        probs = resize_planes(probs, size, mode="bilinear")
    labels = probs.argmax(1).to(torch.uint8).numpy()
    return np.ascontiguousarray(layout.from_canonical(labels))
