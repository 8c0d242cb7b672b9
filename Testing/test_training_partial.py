"""Partial labels: training on cases that each annotate one structure must not learn "other = background".

Synthetic images hold two bright shapes, a square (class 1, "A") and a brighter disc
(class 2, "B"). Half of the training images annotate only A (B's pixels read 0), the
other half only B. A held-out image shows both. With the marginal cross-entropy the
model finds both shapes; with plain cross-entropy (unannotated = background) it is
taught that each shape is background half of the time and suppresses them.
"""
from __future__ import annotations

import torch

from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.training.losses import partial_label_loss

torch.set_num_threads(1)  # tiny tensors; avoids oversubscribing a shared machine


def _shapes(n: int, gen: torch.Generator, size: int = 48):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.randn(n, 1, size, size, generator=gen) * 0.3
    lab = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        while True:
            ay, ax, by, bx = (int(v) for v in torch.randint(8, size - 8, (4,), generator=gen))
            if abs(ay - by) > 14 or abs(ax - bx) > 14:
                break
        square = ((yy - ay).abs() <= 5) & ((xx - ax).abs() <= 5)
        disc = (yy - by) ** 2 + (xx - bx) ** 2 <= 36
        img[i, 0][square] += 1.5
        img[i, 0][disc] += 3.0
        lab[i][square] = 1
        lab[i][disc] = 2
    return img, lab


def _train(marginal: bool, dice_weight: float, steps: int = 120, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model("UD", num_classes=3, init_filters=4, deep_supervision=False)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    annotated = torch.zeros(8, 3, dtype=torch.bool)
    annotated[:, 0] = True
    annotated[:4, 1] = True  # samples 0-3 annotate only A
    annotated[4:, 2] = True  # samples 4-7 annotate only B
    for _ in range(steps):
        img, lab = _shapes(8, gen)
        lab[:4][lab[:4] == 2] = 0
        lab[4:][lab[4:] == 1] = 0
        loss = partial_label_loss(model(img), lab, annotated, marginal=marginal, dice_weight=dice_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    img, lab = _shapes(16, torch.Generator().manual_seed(999))
    with torch.no_grad():
        pred = model(img).argmax(1)
    return [float(2 * ((pred == c) & (lab == c)).sum() / ((pred == c).sum() + (lab == c).sum())) for c in (1, 2)]


def test_marginal_loss_finds_both_structures_plain_ce_suppresses_them():
    marginal = _train(marginal=True, dice_weight=0.0)
    plain = _train(marginal=False, dice_weight=0.0)
    assert min(marginal) > 0.85, marginal
    assert sum(marginal) / 2 > sum(plain) / 2 + 0.25, (marginal, plain)
    assert min(plain) < 0.75, plain  # plain CE loses (at least) one of the shapes


def test_full_partial_label_loss_with_dice_finds_both():
    assert min(_train(marginal=True, dice_weight=1.0)) > 0.85
