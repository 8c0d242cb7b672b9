"""Training building blocks: metrics, losses, augmentation, splits, schedule (fast, no data needed)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.training import augment as aug
from LumbarSegmentLib.training.data import PatchSampler, CaseSlices, annotated_mask, epoch_generator
from LumbarSegmentLib.training.losses import (class_weight_vector, deep_supervision_loss, marginal_cross_entropy,
                             partial_label_loss, soft_dice_loss)
from LumbarSegmentLib.training.metrics import MetricAccumulator, confusion_matrix, iou_dice_from_cm
from LumbarSegmentLib.training.splits import SplitError, fixed_split, kfold_by_patient
from LumbarSegmentLib.training.optim import lr_factor

torch.set_num_threads(1)  # tiny tensors; avoids oversubscribing a shared machine
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lumbar-mr"


# --------------------------------------------------------------------------------------
# metrics
def test_iou_and_dice_match_a_hand_computed_example():
    truth = torch.tensor([[0, 0, 1, 1],
                          [0, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 2, 0, 1]])
    cm = confusion_matrix(pred, truth, 3)
    # rows = truth, columns = prediction
    assert cm.tolist() == [[1, 1, 1], [0, 3, 0], [1, 0, 1]]
    iou, dice = iou_dice_from_cm(cm)
    # class 0: m_cc=1, t=3, m=2 -> 1/(3+2-1) ; class 1: 3/(3+4-3) ; class 2: 1/(2+2-1)
    assert iou.tolist() == pytest.approx([1 / 4, 3 / 4, 1 / 3])
    assert dice.tolist() == pytest.approx([2 / 5, 6 / 7, 2 / 4])
    acc = MetricAccumulator(["background", "a", "b"])
    acc.add("x", pred, truth, [True, True, True])
    m = acc.compute()
    assert m["mean_iou"] == pytest.approx((1 / 4 + 3 / 4 + 1 / 3) / 3)
    assert m["mean_iou_fg"] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert m["mean_dice_fg"] == pytest.approx((6 / 7 + 2 / 4) / 2)


def test_metrics_are_accumulated_over_all_pixels_not_averaged_per_case():
    acc = MetricAccumulator(["background", "a"])
    acc.add("c1", torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 0, 0]), [True, True])  # perfect
    acc.add("c2", torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]), [True, True])
    # class a pooled: m_cc = 3, t = 6, m = 3 -> IoU 3/6, Dice 6/9 (the per-case mean would be 0.625 / 0.7)
    assert acc.compute()["iou"]["a"] == pytest.approx(0.5)
    assert acc.compute()["dice"]["a"] == pytest.approx(6 / 9)


def test_partial_labels_in_metrics():
    ids = ["background", "vb", "disc"]
    acc = MetricAccumulator(ids)
    # a vertebra-only case: pixel 2 is an (unlabelled) disc the model found -> not a background error
    acc.add("vb_case", torch.tensor([1, 1, 2, 0]), torch.tensor([1, 1, 0, 0]), annotated_mask(["vb"], _schema()))
    # a disc-only case with a perfect disc
    acc.add("disc_case", torch.tensor([2, 0, 1]), torch.tensor([2, 0, 0]), annotated_mask(["disc"], _schema()))
    m = acc.compute()
    assert m["dice"]["vb"] == pytest.approx(1.0)  # only the vb case scores vb; the stray vb in disc_case is ignored
    assert m["dice"]["disc"] == pytest.approx(1.0)
    assert m["iou"]["background"] == pytest.approx(1.0)
    # the same prediction scored as if fully annotated is worse
    full = MetricAccumulator(ids)
    full.add("vb_case", torch.tensor([1, 1, 2, 0]), torch.tensor([1, 1, 0, 0]), [True, True, True])
    assert full.compute()["iou"]["background"] < 1.0
    per_case = acc.per_case()
    assert set(per_case["vb_case"]["dice"]) == {"background", "vb"}


def _schema():
    from LumbarSegmentLib.core.schema import LabelSchema, LabelClass

    return LabelSchema("t", (LabelClass(0, "background", "bg", (0, 0, 0)), LabelClass(1, "vb", "vb", (1, 1, 1)),
                             LabelClass(2, "disc", "disc", (2, 2, 2))))


# --------------------------------------------------------------------------------------
# losses
def test_marginal_ce_is_plain_ce_when_everything_is_annotated():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    ref = torch.nn.functional.cross_entropy(logits, target)
    assert marginal_cross_entropy(logits, target, torch.ones(2, 3, dtype=torch.bool)) == pytest.approx(float(ref),
                                                                                                        rel=1e-5)


def test_marginal_ce_merges_unannotated_classes_with_background():
    logits = torch.tensor([[0.0, 0.0, 5.0]])[:, :, None, None]  # confident "class 2" at a label-0 pixel
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    ann_all = torch.tensor([[True, True, True]])
    ann_no2 = torch.tensor([[True, True, False]])
    p = torch.softmax(logits[0, :, 0, 0], 0)
    assert float(marginal_cross_entropy(logits, target, ann_all)) == pytest.approx(-math.log(p[0]), rel=1e-5)
    assert float(marginal_cross_entropy(logits, target, ann_no2)) == pytest.approx(-math.log(p[0] + p[2]), rel=1e-5)
    # no gradient pushes the unannotated class down relative to background
    lg = logits.clone().requires_grad_(True)
    marginal_cross_entropy(lg, target, ann_no2).backward()
    assert lg.grad[0, 1, 0, 0] > 0  # the annotated class 1 is pushed down
    assert lg.grad[0, 2, 0, 0] <= 1e-7  # the unannotated class 2 is not (it may be what this pixel is)


def test_unannotated_background_weight_interpolates_marginal_and_plain_ce():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0][target[0] == 2] = 0
    target[1][target[1] == 1] = 0
    ann = torch.tensor([[True, True, False], [True, False, True]])
    marginal = float(marginal_cross_entropy(logits, target, ann))
    plain = float(marginal_cross_entropy(logits, target, torch.ones(2, 3, dtype=torch.bool)))
    assert float(marginal_cross_entropy(logits, target, ann, unannotated_bg_weight=1.0)) == pytest.approx(plain)
    mixed = float(marginal_cross_entropy(logits, target, ann, unannotated_bg_weight=0.25))
    assert mixed == pytest.approx(0.75 * marginal + 0.25 * plain, rel=1e-5)


def test_class_weight_scales_only_the_pixels_labelled_with_that_class():
    from LumbarSegmentLib.core.schema import load_schema
    from LumbarSegmentLib.training.targets import set_code
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 2
    target[0, 1, 0] = set_code([1, 2])  # a set voxel keeps weight 1
    per_pixel = []
    for w2 in (1.0, 3.0):
        per_pixel.append(float(marginal_cross_entropy(logits, target, class_weights=torch.tensor([1.0, 1.0, w2]))))
    logp = torch.log_softmax(logits, 1)
    extra = float(-(logp[0, 2, 0, :2]).sum()) * 2 / 16  # the two class-2 pixels count 3x instead of 1x
    assert per_pixel[1] - per_pixel[0] == pytest.approx(extra, rel=1e-5)
    # background for sure (a one-class set) takes background's weight; plain label 0 does not
    target[0, 3, :3] = set_code([0])
    base = float(marginal_cross_entropy(logits, target))
    heavy = float(marginal_cross_entropy(logits, target, class_weights=torch.tensor([2.0, 1.0, 1.0])))
    assert heavy - base == pytest.approx(float(-(logp[0, 0, 3, :3]).sum()) / 16, rel=1e-5)
    schema = load_schema("spine6")
    w = class_weight_vector((("sacrum", 8.0),), schema)
    assert w[schema.channel_of()["sacrum"]] == 8 and float(w.sum()) == len(w) - 1 + 8
    assert class_weight_vector((), schema) is None
    with pytest.raises(ValueError, match="no class 'sacrumm'.*sacrum"):
        class_weight_vector((("sacrumm", 2.0),), schema)


def test_soft_dice_scores_only_annotated_classes():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 1
    target[1, 0:2, 0:2] = 2  # class 2 is labelled in sample 1 only
    ann = torch.tensor([[True, True, False], [True, True, True]])
    p = torch.softmax(logits, 1)
    d1 = (2 * (p[:, 1] * (target == 1)).sum() + 1) / ((p[:, 1] + (target == 1)).sum() + 1)
    d2 = (2 * (p[1, 2] * (target[1] == 2)).sum() + 1) / ((p[1, 2] + (target[1] == 2)).sum() + 1)
    assert float(soft_dice_loss(logits, target, ann)) == pytest.approx(float(1 - (d1 + d2) / 2), rel=1e-5)
    # a batch annotating no foreground class has no Dice term
    assert float(soft_dice_loss(logits, target * 0, torch.tensor([[True, False, False]] * 2))) == 0


def test_deep_supervision_weights():
    torch.manual_seed(2)
    main = torch.randn(1, 3, 8, 8)
    aux = [torch.randn(1, 3, 8, 8) for _ in range(3)]
    target = torch.randint(0, 3, (1, 8, 8))
    ann = torch.ones(1, 3, dtype=torch.bool)
    parts = [float(partial_label_loss(x, target, ann)) for x in [main] + aux]
    expected = (parts[0] + 0.125 * parts[1] + 0.25 * parts[2] + 0.5 * parts[3]) / 1.875
    assert float(deep_supervision_loss((main, aux), target, ann)) == pytest.approx(expected, rel=1e-5)
    assert float(deep_supervision_loss(main, target, ann)) == pytest.approx(parts[0], rel=1e-6)


# --------------------------------------------------------------------------------------
# augmentation
def _blobs(n=6, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(n, size, size, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for v in (1, 2, 3):
            cy, cx = (int(t) for t in torch.randint(15, size - 15, (2,), generator=g))
            lab[i][((yy - cy) ** 2 + (xx - cx) ** 2) <= 100] = v
        lab[i, 10:30, 60:62] = 4  # a thin asymmetric bar
    return lab


def test_augmentation_keeps_image_and_label_aligned_and_labels_integer():
    lab = _blobs()
    img = lab.float()[:, None]  # an image equal to its label
    g = torch.Generator().manual_seed(3)
    x, y = aug.augment_batch(img, lab, aug.AugmentConfig(), 48, g)
    assert y.dtype == torch.int64 and x.shape == (6, 1, 48, 48) and y.shape == (6, 48, 48)
    assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4}
    # bilinear image vs nearest label: equal wherever the image is not on an edge
    interior = (x[:, 0] - x[:, 0].round()).abs() < 1e-4
    assert interior.float().mean() > 0.8
    assert torch.equal(x[:, 0][interior].round().long(), y[interior])
    assert float((x[:, 0].round().long() == y).float().mean()) > 0.97
    # the transforms really vary (not an identity)
    center = lab[:, 24:72, 24:72].long()
    assert not torch.equal(y, center)


@pytest.mark.parametrize("mode", ["light", "strong"])
def test_intensity_augmentation_changes_only_the_image(mode):
    lab = _blobs(n=4)
    img = lab.float()[:, None] + 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x0, y0 = aug.augment_batch(img, lab, aug.AugmentConfig(), 48, g1)
    x1, y1 = aug.augment_batch(img, lab, aug.AugmentConfig(intensity=mode), 48, g2)
    assert torch.equal(y0, y1)  # same geometry, same labels
    assert not torch.allclose(x0, x1)
    assert torch.isfinite(x1).all()
    # brighter structures stay brighter on average (monotone intensity changes + small noise)
    means = [float(x1[:, 0][y1 == v].mean()) for v in (1, 2, 3, 4) if (y1 == v).any()]
    assert means == sorted(means)


def test_no_augmentation_is_an_exact_centre_crop_and_flip_flips():
    lab = _blobs(n=2)
    img = torch.randn(2, 1, 96, 96)
    p = aug.random_params(2, aug.AugmentConfig(enabled=False), torch.Generator())
    x, y = aug.apply(img, lab, aug.theta_from_params(p, 96, 48), 48)
    assert torch.allclose(x, img[:, :, 24:72, 24:72], atol=1e-5)
    assert torch.equal(y, lab[:, 24:72, 24:72].long())
    p["flip"] = torch.tensor([True, False])
    x, y = aug.apply(img, lab, aug.theta_from_params(p, 96, 48), 48)
    assert torch.allclose(x[0], img[0, :, 24:72, 24:72].flip(-1), atol=1e-5)
    assert torch.equal(y[0], lab[0, 24:72, 24:72].flip(-1).long())


def test_sampler_prefers_foreground_and_is_reproducible():
    lab = _blobs(n=10, size=80)
    lab[5:] = 0
    c = CaseSlices("c", "p", lab.float(), lab, torch.tensor([True, True, True, True, True]), ("x",),
                   fg_slices=list(range(5)))
    s = PatchSampler([c], patch=32, fg_fraction=1.0)
    a = s.sample(16, epoch_generator(0, 0))
    b = s.sample(16, epoch_generator(0, 0))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].shape == (16, 1, 64, 64)
    centre = a[1][:, 16:48, 16:48]
    assert float((centre > 0).flatten(1).any(1).float().mean()) > 0.9


# --------------------------------------------------------------------------------------
# splits
def _case(cid, patient=None, structures=("vertebral_body",)):
    return Case(case_id=cid, image_path=Path(f"{cid}_image.mha"), label_path=Path(f"{cid}_label.mha"),
                labels={1: structures[0]}, annotated_structures=list(structures), patient=patient or cid)


def _check_folds(case_list, folds):
    seen = []
    for train, val in folds:
        assert not ({c.patient for c in train} & {c.patient for c in val})
        assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in case_list}
        seen += [c.case_id for c in val]
    assert sorted(seen) == sorted(c.case_id for c in case_list)  # each case validates exactly once


def test_kfold_by_patient_never_splits_a_patient():
    cs = [_case(f"A{i}", f"P{i // 3}") for i in range(12)] + \
         [_case(f"D{i}", f"Q{i}", ("intervertebral_disc",)) for i in range(5)]
    for k in (2, 3, 5):
        for seed in (0, 1):
            folds = kfold_by_patient(cs, k, seed)
            assert len(folds) == k
            _check_folds(cs, folds)
    # stratified: the 5 disc patients spread over the 5 folds
    folds = kfold_by_patient(cs, 5, 0)
    assert all(any("intervertebral_disc" in c.annotated_structures for c in val) for _, val in folds)
    with pytest.raises(SplitError):
        kfold_by_patient(cs[:3], 5)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared lumbar-mr data not found at {DATA}")
def test_kfold_on_the_real_cases():
    from LumbarSegmentLib.dataset.cases import list_cases

    cs = list_cases(DATA)
    folds = kfold_by_patient(cs, 5, 0)
    _check_folds(cs, folds)


def test_fixed_split_keeps_patients_on_one_side():
    cs = [_case("a1", "P"), _case("a2", "P"), _case("b", "Q"), _case("c", "R")]
    train, val, dropped = fixed_split(cs, ["a1"])
    assert [c.case_id for c in val] == ["a1"]
    assert [c.case_id for c in train] == ["b", "c"] and dropped == ["a2"]
    with pytest.raises(SplitError):
        fixed_split(cs, ["zz"])


def test_lr_schedule_warms_up_and_decays():
    f = [lr_factor(s, 100, 10, "cosine", 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(0.01, abs=0.01)
    p = [lr_factor(s, 100, 0, "poly", 0.0) for s in range(100)]
    assert p[0] == 1.0 and p[-1] < 0.05
