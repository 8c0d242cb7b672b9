"""Set codes in a training target: the loss of "one of these classes" is -log of their summed probability."""
import math

import pytest
import torch

from LumbarSegmentLib.training.losses import marginal_cross_entropy, partial_label_loss, soft_dice_loss
from LumbarSegmentLib.training.targets import IGNORE_INDEX, SURE_BACKGROUND, decode_set_codes, set_code

K = 6  # spine6: background, body, disc, posterior elements, canal, sacrum


def _one_pixel(code, logits, annotated=None):
    t = torch.full((1, 1, 1), code, dtype=torch.uint8)
    return marginal_cross_entropy(logits.view(1, K, 1, 1), t, annotated)


def test_union_is_log_of_summed_member_probabilities():
    logits = torch.tensor([0.3, 1.2, -0.4, 0.7, -1.0, 0.1])
    p = torch.softmax(logits, 0)
    got = _one_pixel(set_code([1, 3]), logits)
    assert got.item() == pytest.approx(-math.log(p[1] + p[3]), rel=1e-5)
    # a one-member set is that class for sure, even where the case leaves other classes unannotated
    ann = torch.tensor([[True, True, True, True, True, False]])
    assert _one_pixel(SURE_BACKGROUND, logits, ann).item() == pytest.approx(-math.log(p[0]), rel=1e-5)
    # plain label 0 there is the marginal "background or sacrum"
    assert _one_pixel(0, logits, ann).item() == pytest.approx(-math.log(p[0] + p[5]), rel=1e-5)


def test_union_leaves_the_split_between_members_free():
    base = torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0, 0.0])
    shifted = base.clone()
    shifted[[1, 3]] = torch.logsumexp(base[[1, 3]], 0) - math.log(2)  # same summed mass, split evenly
    code = set_code([1, 3])
    assert _one_pixel(code, base).item() == pytest.approx(_one_pixel(code, shifted).item(), rel=1e-5)


def test_decode_and_ignore():
    t = torch.tensor([[[0, 2, IGNORE_INDEX, set_code([1, 3])]]], dtype=torch.uint8)
    is_set, members = decode_set_codes(t, K)
    assert is_set.tolist() == [[[False, False, False, True]]]
    assert members[0, :, 0, 3].tolist() == [False, True, False, True, False, False]
    assert not members[0, :, 0, :3].any()
    with pytest.raises(ValueError):
        set_code([7])


def test_gradients_finite_and_dice_ignores_members_of_a_set():
    torch.manual_seed(0)
    logits = torch.randn(2, K, 8, 8, requires_grad=True)
    t = torch.zeros(2, 8, 8, dtype=torch.uint8)
    t[0, :4] = set_code([1, 3])
    t[0, 4:, :2] = 2
    t[1, :, :3] = IGNORE_INDEX
    t[1, 5:, 5:] = SURE_BACKGROUND
    ann = torch.ones(2, K, dtype=torch.bool)
    ann[1, 3:] = False
    loss = partial_label_loss(logits, t, ann)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # the Dice of body / posterior elements does not depend on how a set voxel splits between them
    a = logits.detach().clone()
    b = a.clone()
    b[0, 1, :4], b[0, 3, :4] = a[0, 3, :4], a[0, 1, :4]  # swap the two members inside the set
    only_set = torch.zeros_like(t)
    only_set[0] = t[0]
    only_set[1] = IGNORE_INDEX
    assert soft_dice_loss(a, only_set, ann).item() == pytest.approx(soft_dice_loss(b, only_set, ann).item(), rel=1e-5)
