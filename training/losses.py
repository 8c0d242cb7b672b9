"""Losses for partially labelled cases: marginal cross-entropy + soft Dice over annotated classes.

A case annotates only some structures (``annotated`` mask, one row per sample,
background column always True). Where its label is 0 the truth is "background *or*
one of the structures this case does not annotate", so the marginal cross-entropy
uses the probability of that union::

    label c > 0:  -log p_c
    label 0:      -log(p_background + sum of p_k over classes k the case does not annotate)

(computed stably as a ``logsumexp`` of log-probabilities). When a case annotates
every class this is the ordinary cross-entropy. A voxel whose target is a *set code*
(``training.targets``: "one of these classes", e.g. SPIDER's whole vertebra = vertebral body or
posterior elements) costs ``-log(sum of p_k over the set)``, the same marginal idea per voxel. A plain cross-entropy instead
would teach "disc = background" from every vertebra-only case.

The marginal loss leaves the split between background and an unannotated class
free. When the data sets are easy to tell apart (each annotates one structure), a
model may then paint the unannotated class over whole regions of "the other" data
set's images. ``unannotated_bg_weight`` (default 0) adds a weak preference for
background there; strong intensity augmentation (``LumbarSegmentLib.training.augment``) attacks the
same problem by making the data sets harder to tell apart.

The soft Dice term is computed per foreground class over the samples of the batch
that annotate that class (batch Dice: sums over those samples and all their
pixels), ``1 - (2 I + 1) / (P + T + 1)``, averaged over the classes annotated by at
least one sample. Unannotated classes get no Dice gradient at all.

Deep supervision (``DEFAULT_DS_WEIGHTS``): the main output has weight 1 and the
auxiliary outputs 0.5 (1/2 resolution), 0.25 (1/4) and 0.125 (1/8); the
weighted sum is divided by the sum of the weights, so losses of variants with and
without deep supervision are on the same scale.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .targets import IGNORE_INDEX, decode_set_codes

#: weights of the auxiliary outputs, finest first (the model returns them coarsest first)
DEFAULT_DS_WEIGHTS = (0.5, 0.25, 0.125)


def class_weight_vector(pairs, schema) -> torch.Tensor | None:
    """``((class id, weight), ...)`` -> a ``[K]`` weight per schema channel (1 elsewhere), or None when empty;
    an id the schema lacks is refused with the ids it has. ``background`` weighs the voxels that are
    background for sure (not the label-0 voxels that may be a class the case does not annotate)."""
    if not pairs:
        return None
    channel = schema.channel_of()
    unknown = [cid for cid, _ in pairs if cid not in channel]
    if unknown:
        raise ValueError(f"--class-weight: schema {schema.name!r} has no class {', '.join(map(repr, unknown))}; "
                         f"its classes are {', '.join(channel)}")
    w = torch.ones(len(channel))
    for cid, weight in pairs:
        w[channel[cid]] = float(weight)
    return w


def merged_background_mask(annotated: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool: the channels whose probabilities add up to "label 0" for each sample."""
    merge = ~annotated.bool()
    merge[:, 0] = True
    return merge


def marginal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None,
                           ignore_index: int = IGNORE_INDEX, unannotated_bg_weight: float = 0.0,
                           class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over labelled pixels of the marginal negative log-likelihood (see module doc).

    ``unannotated_bg_weight`` (w) adds ``-w log(p_bg / (p_bg + sum p_unannotated))`` at label-0
    pixels: given "background or unannotated", a weak preference for background. w = 0 is the
    pure marginal loss, w = 1 plain cross-entropy.

    ``class_weights`` (``[K]``, 1 = as is) scales the cost of the pixels labelled with each class for
    sure, a one-class set code (background for sure) included; label-0 pixels (background or an
    unannotated class) and sets of several classes keep weight 1. The mean is still over pixels, so a weight of 8
    makes a rare class's pixels count as eight (the sacrum: one S1 per case against five bodies that
    look the same, docs/lab/spine6-sources.md).
    """
    logits = logits.float()
    b, k = logits.shape[:2]
    if annotated is None:
        annotated = torch.ones(b, k, dtype=torch.bool, device=logits.device)
    logp = F.log_softmax(logits, dim=1)
    merge = merged_background_mask(annotated.to(logits.device))[:, :, None, None]
    logp_bg = torch.logsumexp(logp.masked_fill(~merge, float("-inf")), dim=1)
    valid = target != ignore_index
    is_set, members = decode_set_codes(target, k)
    t = torch.where(valid & ~is_set, target, torch.zeros_like(target)).long()
    logp_t = logp.gather(1, t[:, None]).squeeze(1)
    if unannotated_bg_weight:
        # -log p_bg = -logp_bg_merged - (logp_0 - logp_bg_merged); weight the second part
        nll_bg = -logp_bg - unannotated_bg_weight * (logp[:, 0] - logp_bg)
    else:
        nll_bg = -logp_bg
    nll = torch.where(t == 0, nll_bg, -logp_t)
    if bool(is_set.any()):
        logp_set = torch.logsumexp(logp.masked_fill(~members, float("-inf")), dim=1)
        nll = torch.where(is_set, -logp_set.masked_fill(~is_set, 0.0), nll)
    if class_weights is not None:
        # a set of one class (e.g. background for sure) is that class for sure and takes its weight
        single = is_set & (members.sum(1) == 1)
        sure = torch.where(single, members.int().argmax(1), t)
        w = class_weights.to(nll.device, nll.dtype)[sure]
        nll = nll * torch.where((is_set & ~single) | (~is_set & (t == 0)), torch.ones_like(w), w)
    n = valid.sum()
    return (nll * valid).sum() / n.clamp(min=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, per foreground class over the samples that annotate it, averaged over classes."""
    logits = logits.float()
    b, k = logits.shape[:2]
    if annotated is None:
        annotated = torch.ones(b, k, dtype=torch.bool, device=logits.device)
    annotated = annotated.to(logits.device)
    prob = F.softmax(logits, dim=1)
    valid = (target != ignore_index)
    is_set, members = decode_set_codes(target, k)
    t = torch.where(valid & ~is_set, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(t, k).permute(0, 3, 1, 2).to(prob.dtype)
    # a set voxel is a sure negative for the classes outside the set and unknown for its members; a
    # one-member set is a sure positive of that member
    single = members.sum(1, keepdim=True) == 1
    onehot = torch.where(is_set[:, None], (members & single).to(prob.dtype), onehot)
    known = valid[:, None] & ~(members & ~single)
    w = known.to(prob.dtype) * annotated[:, :, None, None].to(prob.dtype)
    inter = (prob * onehot * w).sum(dim=(0, 2, 3))
    denom = ((prob + onehot) * w).sum(dim=(0, 2, 3))
    dice = (2 * inter + smooth) / (denom + smooth)
    present = annotated.any(dim=0)
    present[0] = False  # background: its Dice would be that of the merged class; CE covers it
    if not bool(present.any()):
        return logits.sum() * 0.0
    return (1 - dice[present]).mean()


def partial_label_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None,
                       *, dice_weight: float = 1.0, marginal: bool = True,
                       unannotated_bg_weight: float = 0.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Marginal CE + ``dice_weight`` x soft Dice; ``marginal=False`` treats every class as annotated
    (plain CE + Dice: what *not* to do with partial labels; kept for comparison)."""
    if not marginal or annotated is None:
        annotated = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    loss = marginal_cross_entropy(logits, target, annotated, unannotated_bg_weight=unannotated_bg_weight,
                                  class_weights=class_weights)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, target, annotated)
    return loss


def deep_supervision_loss(output, target, annotated, *, ds_weights: Sequence[float] = DEFAULT_DS_WEIGHTS,
                          dice_weight: float = 1.0, marginal: bool = True,
                          unannotated_bg_weight: float = 0.0, class_weights: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Loss of a model output: a logits tensor, or ``(main, [aux coarsest..finest])``."""
    if isinstance(output, (tuple, list)):
        main, aux = output
    else:
        main, aux = output, []
    kw = {"dice_weight": dice_weight, "marginal": marginal, "unannotated_bg_weight": unannotated_bg_weight,
          "class_weights": class_weights}
    total = partial_label_loss(main, target, annotated, **kw)
    wsum = 1.0
    if aux:
        # finest-first weights -> coarsest-first outputs; outputs beyond the list get weight 0
        weights = (list(ds_weights)[:len(aux)] + [0.0] * max(0, len(aux) - len(ds_weights)))[::-1]
        for w, a in zip(weights, aux):
            if w:
                total = total + w * partial_label_loss(a, target, annotated, **kw)
                wsum += w
    return total / wsum
