"""The generalisation recipe's ingredients: source-balanced sampling, thick-slab and low-resolution
patches, the "domain" intensity randomisation and its "remap" and "tissue" extensions."""
from __future__ import annotations

import pytest
import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.training import augment as aug
from LumbarSegmentLib.training.data import CaseSlices, PatchSampler, ThickSlabs, annotated_mask, case_source


def _slices(cid, source, n=6, size=64, structures=("vertebral_body",)):
    s = load_schema("starter")
    img = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, size, size).clone()
    lab = torch.zeros(n, size, size, dtype=torch.uint8)
    lab[:, 20:40, 20:40] = 1
    return CaseSlices(cid, cid, img, lab, annotated_mask(structures, s), tuple(structures),
                      fg_slices=list(range(n)), source=source)


def test_case_source_from_json_field_or_id_prefix(tmp_path):
    mk = lambda cid, extra: Case(cid, tmp_path / "i", tmp_path / "l", {1: "vertebral_body"},  # noqa: E731
                                 ["vertebral_body"], extra=extra)
    assert case_source(mk("VB3_12", {})) == "VB3"
    assert case_source(mk("VB3_12", {"source": "site-A"})) == "site-A"
    assert case_source(mk("lonely", {})) == "lonely"


def test_sources_balance_gives_each_source_the_same_share():
    data = [_slices(f"A_{i}", "A") for i in range(6)] + [_slices("B_0", "B")]
    w = PatchSampler(data, 32, balance="sources").case_weights
    assert float(w[:6].sum()) == pytest.approx(0.5) and float(w[6]) == pytest.approx(0.5)
    w2 = PatchSampler(data, 32, balance="structures").case_weights  # all one structure group: per case
    assert float(w2[6]) == pytest.approx(1 / 7)


def test_thick_slab_patches_average_neighbouring_slices_and_keep_the_label():
    c = _slices("A_0", "A", n=8)
    always = PatchSampler([c], 32, fg_fraction=1.0, slabs=ThickSlabs(1.0), jitter=0.0)
    never = PatchSampler([c], 32, fg_fraction=1.0, slabs=ThickSlabs(0.0), jitter=0.0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    img_s, lab_s, _ = always.sample(16, g1)
    img_n, lab_n, _ = never.sample(16, g2)
    # every slice is a constant image = its index: a plain crop is an integer, a slab mean mostly is not
    frac = lambda t: (t.flatten(1).amax(1) % 1 != 0).float().mean()  # noqa: E731
    assert frac(img_n) == 0 and frac(img_s) > 0.3
    assert set(lab_s.unique().tolist()) <= {0, 1}


def test_domain_intensity_and_resolution_change_only_the_image():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 1, 64, 64)
    lab = (torch.rand(8, 64, 64, generator=g) > 0.7).to(torch.uint8)
    off = aug.AugmentConfig(True, 0, (1, 1), 0, 0, "off", 0.0)
    dom = aug.AugmentConfig(True, 0, (1, 1), 0, 0, "domain", 1.0)
    x0, y0 = aug.augment_batch(img, lab, off, 32, torch.Generator().manual_seed(5))
    x1, y1 = aug.augment_batch(img, lab, dom, 32, torch.Generator().manual_seed(5))
    assert torch.equal(y0, y1), "intensity/resolution augmentation must not move labels"
    assert not torch.allclose(x0, x1) and torch.isfinite(x1).all()


def test_resolution_round_trip_removes_fine_detail():
    x = torch.zeros(2, 1, 64, 64)
    x[:, :, ::2] = 1.0  # 1-pixel stripes: gone after a 2x shrink and back
    y = aug.degrade_resolution(x, torch.tensor([2.0, 1.0]))
    assert y[0].std() < 0.1 * x[0].std() and torch.equal(y[1], x[1])


def test_domain_parameters_include_inversions_and_bias_fields():
    p = aug.random_params(400, aug.AugmentConfig(intensity="domain", resolution_p=0.3), torch.Generator().manual_seed(1))
    assert 0.1 < p["invert"].float().mean() < 0.3
    assert 0.35 < (p["bias"] != 0).float().mean() < 0.65
    assert 0.2 < (p["resolution"] > 1).float().mean() < 0.4


def test_augment_share_leaves_the_rest_of_the_patches_plain_crops():
    # a share of 0.3: about 30 % of the patches get geometry and intensity, the others are the
    # unaugmented centre crop; a share of 1 draws the same parameters as before the option existed
    g = torch.Generator().manual_seed(0)
    img, lab = torch.randn(64, 1, 64, 64, generator=g), (torch.rand(64, 64, 64, generator=g) > 0.7).to(torch.uint8)
    plain = aug.AugmentConfig(False)
    share = aug.AugmentConfig(True, 20, (0.5, 1.5), 0.5, 0.1, "domain", 0.3, augment_p=0.3)
    x0, y0 = aug.augment_batch(img, lab, plain, 32, torch.Generator().manual_seed(5))
    x, y = aug.augment_batch(img, lab, share, 32, torch.Generator().manual_seed(5))
    # (the plain ones still pass through the batch's intensity steps with neutral parameters: equal up to rounding)
    same = torch.tensor([torch.allclose(x[i], x0[i], atol=1e-5) and torch.equal(y[i], y0[i]) for i in range(64)])
    assert 0.5 < same.float().mean() < 0.9, same.float().mean()
    assert torch.isfinite(x).all()
    full = aug.AugmentConfig(intensity="domain", resolution_p=0.3)
    a = aug.random_params(50, full, torch.Generator().manual_seed(3))
    b = aug.random_params(50, aug.AugmentConfig(intensity="domain", resolution_p=0.3, augment_p=1.0),
                          torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="augment_p"):
        aug.AugmentConfig(augment_p=1.5)


def test_remap_reorders_tissue_intensities_and_leaves_unpicked_samples_alone():
    # three flat "tissues" at 0, 1 and 2: a monotone map (inversion, gamma) keeps or flips their
    # order; the random curve must be able to put the middle one outside the other two
    img = torch.zeros(64, 1, 8, 24)
    img[..., 8:16], img[..., 16:] = 1.0, 2.0
    out = aug.random_remap(img, torch.ones(64), torch.Generator().manual_seed(2))
    lo, mid, hi = out[:, 0, 0, 0], out[:, 0, 0, 12], out[:, 0, 0, 20]
    middle_outside = ((mid > lo) & (mid > hi)) | ((mid < lo) & (mid < hi))
    assert middle_outside.float().mean() > 0.2
    assert torch.isfinite(out).all() and out.min() >= 0 - 1e-6 and out.max() <= 2 + 1e-6
    kept = aug.random_remap(img, torch.zeros(64), torch.Generator().manual_seed(2))
    assert torch.equal(kept, img)


def test_remap_mode_is_domain_plus_curves_for_about_half_the_patches():
    p = aug.random_params(400, aug.AugmentConfig(intensity="remap"), torch.Generator().manual_seed(1))
    assert 0.4 < (p["remap"] > 0).float().mean() < 0.6 and float(p["remap"].max()) <= 1.0
    assert 0.1 < p["invert"].float().mean() < 0.3  # the domain ingredients are still there
    d = aug.random_params(400, aug.AugmentConfig(intensity="domain"), torch.Generator().manual_seed(1))
    assert not bool((d["remap"] > 0).any())
    g = torch.Generator().manual_seed(0)
    img, lab = torch.randn(8, 1, 64, 64), (torch.rand(8, 64, 64, generator=g) > 0.7).to(torch.uint8)
    cfg = aug.AugmentConfig(True, 0, (1, 1), 0, 0, "remap", 0.0)
    x, y = aug.augment_batch(img, lab, cfg, 32, torch.Generator().manual_seed(5))
    x0, y0 = aug.augment_batch(img, lab, aug.AugmentConfig(True, 0, (1, 1), 0, 0, "off", 0.0), 32,
                               torch.Generator().manual_seed(5))
    assert torch.equal(y, y0) and torch.isfinite(x).all() and not torch.allclose(x, x0)


def _two_structures(n=32):
    """A flat image (0) with two labelled squares of one class (1) and one of another (2)."""
    img = torch.zeros(n, 1, 48, 48)
    lab = torch.zeros(n, 48, 48, dtype=torch.long)
    img[:, :, 4:12, 4:12] = 1.0  # an unlabelled "structure" at intensity 1 sets the range
    lab[:, 16:24, 8:16] = 1
    lab[:, 16:24, 30:38] = 1
    lab[:, 34:42, 20:28] = 2
    lab[:, 0, 0] = 255  # ignore stays out of it
    return img, lab


def test_tissue_contrast_moves_each_labelled_structure_and_nothing_far_from_it():
    img, lab = _two_structures()
    picked = torch.ones(len(img), dtype=torch.bool)
    out = aug.tissue_contrast(img, lab, picked, torch.Generator().manual_seed(4))
    a, b = out[:, 0, 20, 12], out[:, 0, 20, 34]  # the two squares of class 1: one level
    c = out[:, 0, 38, 24]  # class 2: a level of its own
    assert torch.allclose(a, b, atol=1e-5)
    assert float((a - c).abs().mean()) > 0.1 and float(a.std()) > 0.1  # levels differ per class and draw
    assert 0.0 - 1e-6 <= float(out[:, 0, 20, 12].min()) and float(out[:, 0, 20, 12].max()) <= 1 + 1e-6
    # far from any label (and at the unlabelled square) the image is untouched, as is an unpicked sample
    assert torch.equal(out[:, :, 4:12, 4:12], img[:, :, 4:12, 4:12])
    assert torch.equal(out[:, :, 45:, :], img[:, :, 45:, :])  # class 2 ends at row 41; the blur reaches 3 px
    assert torch.equal(out[:, :, 0, 0], img[:, :, 0, 0])
    none = aug.tissue_contrast(img, lab, torch.zeros(len(img), dtype=torch.bool), torch.Generator())
    assert torch.equal(none, img)
    again = aug.tissue_contrast(img, lab, picked, torch.Generator().manual_seed(4))
    assert torch.equal(again, out)  # reproducible from the generator


def test_tissue_mode_is_domain_plus_structure_contrast_through_the_batch_path():
    p = aug.random_params(400, aug.AugmentConfig(intensity="tissue"), torch.Generator().manual_seed(1))
    assert 0.4 < p["tissue"].float().mean() < 0.6
    assert 0.1 < p["invert"].float().mean() < 0.3  # the domain ingredients are still there
    assert not bool(aug.random_params(50, aug.AugmentConfig(intensity="domain"),
                                      torch.Generator().manual_seed(1))["tissue"].any())
    img, lab = _two_structures(8)
    img = img + 0.01 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    cfg = aug.AugmentConfig(True, 0, (1, 1), 0, 0, "tissue", 0.0)
    x, y = aug.augment_batch(img, lab, cfg, 48, torch.Generator().manual_seed(5))
    assert torch.equal(y, lab) and torch.isfinite(x).all()
    # the label reaches the structure-contrast step through apply(): with only that step switched
    # on, the labelled squares change and the rest of the patch does not
    still = aug.AugmentConfig(True, 0, (1, 1), 0, 0, "off", 0.0)
    p = aug.random_params(8, still, torch.Generator().manual_seed(5))
    theta = aug.theta_from_params(p, 48, 48)
    p["tissue"] = torch.ones(8, dtype=torch.bool)
    on, _ = aug.apply(img, lab, theta, 48, params=p, noise_gen=torch.Generator().manual_seed(6))
    p["tissue"] = torch.zeros(8, dtype=torch.bool)
    off, _ = aug.apply(img, lab, theta, 48, params=p, noise_gen=torch.Generator().manual_seed(6))
    assert torch.allclose(off, img, atol=1e-5)
    assert float((on - off)[:, 0, 17:23, 9:15].abs().mean()) > 0.05
    assert torch.allclose(on[:, :, 4:12, 4:12], off[:, :, 4:12, 4:12])


def test_gin_mode_changes_texture_keeps_range_and_leaves_unpicked_samples_alone():
    p = aug.random_params(400, aug.AugmentConfig(intensity="gin"), torch.Generator().manual_seed(1))
    assert 0.4 < (p["gin"] > 0).float().mean() < 0.6 and float(p["gin"].max()) <= 1.0
    assert 0.1 < p["invert"].float().mean() < 0.3  # the domain ingredients are still there
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 1, 40, 40, generator=g).cumsum(-1) / 5  # smooth-ish texture
    share = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    out = aug.random_network(img, share, torch.Generator().manual_seed(3))
    assert torch.equal(out[5], img[5]) and torch.isfinite(out).all()
    full = out[:4]
    # a full share has the patch's mean and spread, and is not the patch itself
    assert torch.allclose(full.mean(dim=(1, 2, 3)), img[:4].mean(dim=(1, 2, 3)), atol=1e-4)
    assert torch.allclose(full.std(dim=(1, 2, 3)), img[:4].std(dim=(1, 2, 3)), rtol=1e-3)
    assert float((full - img[:4]).abs().mean()) > 0.05
    again = aug.random_network(img, share, torch.Generator().manual_seed(3))
    assert torch.equal(again, out)  # the random weights come from the generator
    # the 2.5D case: several channels in, as many out
    three = aug.random_network(torch.randn(2, 3, 24, 24), torch.ones(2), torch.Generator().manual_seed(1))
    assert three.shape == (2, 3, 24, 24)
