"""Training a click-guided model: a drafting model taught to read the annotator's clicks.

The start is a drafting package (the shipped default) with one zero-initialised input channel per
(structure, sign) map (``core.guidance``), so before the first step it drafts exactly as its parent.
Each step draws patches as drafting training does (same sampler, same geometric and intensity
augmentation, same partial-label loss), then simulates the clicks an annotator would make on this
very network's errors, the protocol of DeepEdit and RITM:

1. the network (no gradient, eval mode) segments the patch with no clicks;
2. for a random number of clicks (0..``max_clicks``), one at a time: the deepest point of what is
   still wrong for an annotated structure (missed: a positive click, false: a negative one), with
   the others suppressed around it; with probability ``iterate_p`` the last click is instead
   chosen after the network has answered the earlier ones (its own remaining error);
3. the network learns from the patch with these clicks drawn in.

Disks are drawn with random radii up to ``radius_mm``: a click seen from a neighbouring slice is
a smaller disk (``core.guidance``). Click simulation uses the label map only where the case
annotates the structure (a VB case's discs are unknown, not background: no click there).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from LumbarSegmentLib.core.guidance import GuidanceSpec, draw_batch_disks
from LumbarSegmentLib.inference.devices import autocast
from LumbarSegmentLib.models.variants import append_input_channels

from .targets import IGNORE_INDEX, decode_set_codes

log = logging.getLogger("lumbarseg.train")


@dataclass(frozen=True)
class ClickSim:
    max_clicks: int = 4  # clicks per patch: uniform 0..max_clicks
    iterate_p: float = 0.5  # the last click chosen on the network's answer to the earlier ones
    min_error_px: int = 4  # an error region needs at least this depth-weighted size to be clicked
    suppress_px: int = 12  # after a click, no other click of the same kind this close
    max_depth: int = 16  # erosion steps of the depth map
    synthetic_p: float = 0.5  # a prior-reading model: share of samples shown a made-wrong truth


@dataclass(frozen=True)
class ClickSetup:
    """What simulating clicks needs besides the batch: the maps, the protocol and the schema's class ids."""
    spec: GuidanceSpec
    sim: ClickSim
    radius_px: float  # a click's disk in the slice it was made in, model pixels
    schema_ids: tuple[str, ...]


def guided_model(parent_module, spec: GuidanceSpec):
    """A copy of ``parent_module`` that also reads ``spec``'s click maps (zero weights: same output)."""
    import copy

    return append_input_channels(copy.deepcopy(parent_module), spec.channels)


def truth_masks(label: torch.Tensor, annotated: torch.Tensor, num_classes: int, cls: int):
    """``(is_cls, not_cls)`` bool ``[B, H, W]`` of a target batch for channel ``cls``: where it surely is the
    class and where it surely is not (unknown, ignored and unannotated voxels are neither)."""
    is_set, members = decode_set_codes(label, num_classes)
    single = members.sum(1) == 1
    is_cls = (label == cls) | (is_set & single & members[:, cls])
    maybe = is_set & members[:, cls]
    known = (label != IGNORE_INDEX) & ~maybe
    not_cls = annotated[:, cls].view(-1, 1, 1) & known & ~is_cls
    return is_cls, not_cls


def depth_map(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Pixels' depth inside ``mask [B, H, W]`` (erosions survived, 0..steps): a cheap distance transform."""
    m = mask.float()[:, None]
    depth = m.clone()
    for _ in range(steps - 1):
        m = -F.max_pool2d(-m, 3, 1, 1)
        if not bool(m.any()):
            break
        depth += m
    return depth[:, 0]


def _errors(pred: torch.Tensor, truth: list, fg: list[int]):
    """Per foreground channel: (missed, false) masks of ``pred [B, H, W]`` against ``truth``'s masks."""
    return {c: (is_c & (pred != c), not_c & (pred == c)) for c, (is_c, not_c) in zip(fg, truth)}


def add_clicks(maps, pred, truth, fg, setup: ClickSetup, wanted, gen):
    """One more click per sample whose ``wanted`` count is not reached, at the deepest point of its
    largest-depth error, drawn into ``maps [B, G, H, W]``; returns how many samples got one."""
    spec, sim = setup.spec, setup.sim
    errs = _errors(pred, truth, fg)
    cand = []  # per (channel, sign): depth maps
    for c in fg:
        for positive, err in ((True, errs[c][0]), (False, errs[c][1])):
            ch = spec.channel(setup.schema_ids[c], positive)
            if ch >= 0:
                cand.append((ch, depth_map(err, sim.max_depth)))
    if not cand:
        return 0
    depths = torch.stack([d for _, d in cand], 1)  # [B, N, H, W]
    # do not click again where a click already is (any channel)
    taken = maps.amax(1, keepdim=True) > 0
    taken = F.max_pool2d(taken.float(), 2 * sim.suppress_px + 1, 1, sim.suppress_px) > 0
    depths = depths.masked_fill(taken, 0)
    b, n, h, w = depths.shape
    best, idx = depths.view(b, -1).max(1)
    added = 0
    for i in range(b):
        if wanted[i] <= 0 or float(best[i]) < 1:
            continue
        k, pos = divmod(int(idx[i]), h * w)
        y, x = divmod(pos, w)
        scale = 0.5 + 0.5 * float(torch.rand((), generator=gen))
        draw_batch_disks(maps, i, cand[k][0], y, x, setup.radius_px * scale)
        wanted[i] -= 1
        added += 1
    return added


def perturb(mask: torch.Tensor, gen) -> torch.Tensor:
    """A structure's true mask ``[H, W]`` made wrong the way drafts are: its border moved out or in by
    1-3 pixels, or the whole mask shifted by 1-3 pixels, on all of it or on one side of a random line."""
    k = 1 + int(torch.randint(3, (1,), generator=gen))
    op = int(torch.randint(3, (1,), generator=gen))
    m = mask.float()[None, None]
    if op == 0:
        out = F.max_pool2d(m, 2 * k + 1, 1, k)
    elif op == 1:
        out = -F.max_pool2d(-m, 2 * k + 1, 1, k)
    else:
        dy, dx = (int(v) for v in torch.randint(-k, k + 1, (2,), generator=gen))
        out = torch.roll(m, (dy, dx), (2, 3))
    out = out[0, 0] > 0.5
    if float(torch.rand((), generator=gen)) < 0.5:  # only on one side of a line through the patch
        h, w = mask.shape
        a = float(torch.rand((), generator=gen)) * 6.2832
        yy, xx = torch.meshgrid(torch.arange(h, device=mask.device), torch.arange(w, device=mask.device), indexing="ij")
        side = (yy - h / 2) * torch.cos(torch.tensor(a)) + (xx - w / 2) * torch.sin(torch.tensor(a)) > 0
        out = torch.where(side, out, mask)
    return out


def _prior_labels(draft, truth, fg, sim: ClickSim, gen):
    """The label map a prior-reading model is shown: the parent's draft, and for about half of the samples
    the annotated structures replaced by their truth made wrong (:func:`perturb`): errors of every size
    and side, which the draft on training cases (known by heart) seldom has."""
    out = draft.clone()
    for i in range(out.shape[0]):
        if float(torch.rand((), generator=gen)) >= sim.synthetic_p:
            continue
        for c, (is_c, not_c) in zip(fg, truth):
            known = is_c[i] | not_c[i]
            if not bool(is_c[i].any()):
                continue
            out[i][(out[i] == c) & known] = 0
            out[i][perturb(is_c[i], gen) & (known | (out[i] == 0))] = c
    return out


def simulate(model, parent, x, label, ann, setup: ClickSetup, gen, dtype):
    """The guidance channels ``[B, P + M, H, W]`` (prior masks, then click maps) for a batch
    ``x [B, C, H, W]``: clicks on the errors of what the model is shown (a model without prior: its own
    answer; with one: the ``parent``'s draft or a made-wrong truth), see the module doc."""
    spec, sim, schema_ids = setup.spec, setup.sim, setup.schema_ids
    b, _, h, w = x.shape
    k = len(schema_ids)
    fg = [c for c in range(k) if schema_ids[c] != "background"]
    truth = [truth_masks(label, ann, k, c) for c in fg]
    wanted = torch.randint(0, sim.max_clicks + 1, (b,), generator=gen).tolist()
    maps = x.new_zeros((b, len(spec.maps), h, w))
    prior = x.new_zeros((b, 0, h, w))
    was = model.training
    model.eval()
    with torch.no_grad(), autocast(x.device, dtype):
        if spec.prior:
            shown = _prior_labels(parent(x).argmax(1), truth, fg, sim, gen)
            prior = torch.stack([shown == schema_ids.index(c) for c in spec.prior], 1).to(x.dtype)
        else:
            shown = model(torch.cat([x, maps], 1)).argmax(1) if any(wanted) else None
        iterate = float(torch.rand((), generator=gen)) < sim.iterate_p
        first = [max(0, n - 1) if iterate else n for n in wanted]
        last = [n - f for n, f in zip(wanted, first)]
        while any(first) and add_clicks(maps, shown, truth, fg, setup, first, gen):
            pass
        if any(last):
            pred = model(torch.cat([x, prior, maps], 1)).argmax(1)
            add_clicks(maps, pred, truth, fg, setup, last, gen)
    model.train(was)
    return torch.cat([prior, maps], 1)


class Budget:
    """A wall-clock budget in minutes (None: none)."""

    def __init__(self, minutes: float | None):
        self.t0, self.minutes = time.monotonic(), minutes

    def over(self) -> bool:
        return self.minutes is not None and (time.monotonic() - self.t0) > 60 * self.minutes
