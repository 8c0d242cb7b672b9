"""Test-time BatchNorm adaptation: a model's normalisation statistics re-estimated on the volume it
is about to segment (AdaBN, Li et al. 2016; the prior-weighted form of Schneider et al., NeurIPS 2020).

Why: a BatchNorm layer normalises its input with the mean and variance it saw in training. On a
scanner or sequence the model never saw (water-fat images for a model trained on T2w), the
features arrive with other statistics, every layer after the first is shifted, and the draft
suffers before any weight is wrong. Re-estimating the statistics on the test volume itself costs
one extra forward pass over (a sample of) its slices, needs no labels and changes no weight.

``weight`` mixes the two estimates: ``mean = (1 - w) * trained + w * volume`` (the variance
likewise), so 0 leaves the model as trained and 1 uses the volume's statistics alone. The engine
exposes it as ``SegmentOptions.bn_adapt`` (``lumbarseg segment --bn-adapt W``); docs/validation.md
(ninth round) gives what it buys per source.

The adaptation always runs on a private copy of the network: one volume's statistics never leak
into the next volume's prediction.
"""
from __future__ import annotations

from LumbarSegmentLib.core.checks import number_arg

#: the most slices whose windows feed the statistics (evenly spaced over the stack)
MAX_ADAPT_SLICES = 32


#: the ``--bn-adapt W`` argument of every command line (0 .. 1)
bn_adapt_arg = number_arg(0, 1, use="use 0 (off) to 1 (the volume's statistics alone)")


BN_ADAPT_HELP = ("re-estimate the model's BatchNorm statistics on this volume before segmenting it: the weight "
                 "of the volume's statistics, 0 (off, default) to 1; one extra pass over up to "
                 f"{MAX_ADAPT_SLICES} slices (docs/validation.md, ninth round)")


def batchnorm_layers(module) -> list:
    """The model's BatchNorm2d layers that keep running statistics (nothing to adapt without them)."""
    from torch import nn

    return [m for m in module.modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]


def adapt_slices(n_slices: int, limit: int = MAX_ADAPT_SLICES) -> list[int]:
    """Indices of at most ``limit`` slices spread evenly over ``n_slices`` (ends included)."""
    if n_slices <= limit:
        return list(range(n_slices))
    step = (n_slices - 1) / (limit - 1)
    return sorted({int(round(i * step)) for i in range(limit)})


def mixed_batches(windows, batch: int, place=lambda x: x):
    """``windows`` [N, C, H, W] shuffled (a fixed seed: the same volume always gives the same
    statistics) into near-equal batches of at most ``batch``, each passed through ``place`` (to the
    device): every batch then mixes the whole stack and weighs the same in the average."""
    import torch

    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    for part in torch.tensor_split(windows[order], -(-windows.shape[0] // max(1, batch))):
        yield place(part)


def adapt_batchnorm(module, batches, weight: float) -> int:
    """Re-estimate ``module``'s BatchNorm statistics on ``batches`` (an iterable of input tensors
    [B, C, H, W] on the module's device), mixed with the trained ones by ``weight`` in (0, 1].

    The statistics are the average over the batches of each batch's own mean and (unbiased)
    variance, with every BatchNorm normalising by the batch's statistics as in training; the
    caller should give batches that each mix the volume's slices (not one end of the stack), so
    each batch looks like the volume. Returns the number of layers adapted (0: the model has no
    BatchNorm statistics; it is left unchanged). The module is left in eval mode.
    """
    import torch

    if not 0 < weight <= 1:
        raise ValueError(f"BatchNorm adaptation weight must be in (0, 1], got {weight}")
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    trained = [(bn.running_mean.clone(), bn.running_var.clone(), bn.momentum) for bn in layers]
    module.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches, not an exponential one
        bn.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            module(x)
            seen += 1
    for bn, (mean, var, momentum) in zip(layers, trained):
        bn.momentum = momentum
        if seen:
            bn.running_mean.mul_(weight).add_(mean, alpha=1 - weight)
            bn.running_var.mul_(weight).add_(var, alpha=1 - weight)
        else:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    module.eval()
    return len(layers) if seen else 0


__all__ = ["BN_ADAPT_HELP", "MAX_ADAPT_SLICES", "adapt_batchnorm", "adapt_slices", "batchnorm_layers", "bn_adapt_arg",
           "mixed_batches"]
