"""One prediction path: models in memory, validation, evaluation and value<->channel mapping all go
through ``engine.segment_volume`` and ``LabelSchema``'s one conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions, segment_volume
from LumbarSegmentLib.core.schema import LabelSchema, load_schema
from LumbarSegmentLib.training import evaluate as ev
from LumbarSegmentLib.training.data import CaseSlices, annotated_mask
from LumbarSegmentLib.core.volume import Volume


def test_values_and_channels_convert_by_class_id():
    base = load_schema("starter")
    d = base.to_dict()
    # the same classes with values that are neither channel indices nor in order
    d["classes"] = [dict(c, value=v) for c, v in zip(d["classes"], (0, 7, 3))]
    s = LabelSchema.from_dict(d)
    vals = np.array([[0, 7, 3, 7]], dtype=np.uint8)
    ch = s.values_to_channels(vals)
    assert ch.tolist() == [[0, 1, 2, 1]]
    assert s.channels_to_values(ch).tolist() == vals.tolist()
    assert s.values_to_channels(np.array([5]))[0] == 255  # a value the schema lacks is not a class


def test_in_memory_model_predicts_like_its_package_and_is_left_untouched(small_real_volume, tiny_package):
    model = tiny_package.load_model("cpu").train()  # as a training loop holds it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = LoadedModel.from_module(model, tiny_package.schema, tiny_package.spacing, tiny_package.patch_size)
    opts = SegmentOptions(precision="fp32")
    a = segment_volume(small_real_volume, [lm], opts).labels.array
    b = segment_volume(small_real_volume, [tiny_package], opts).labels.array
    assert np.array_equal(a, b)
    assert model.training, "the engine must not switch the caller's model to eval mode"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN folding must happen on a copy"
    assert set(after) == set(before)
    snap = lm.snapshot()  # one owned copy for many volumes: same labels, the caller's model still untouched
    assert snap.owned and snap.module is not model
    assert np.array_equal(segment_volume(small_real_volume, [snap], opts).labels.array, a)
    assert np.array_equal(segment_volume(small_real_volume, [snap], opts).labels.array, a)  # reused as is
    assert model.training and all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_evaluate_scores_what_the_engine_predicts(small_real_volume, tiny_package):
    """The score of a case equals the Dice of the engine's own output (no second prediction loop)."""
    schema = tiny_package.schema
    pred = segment_volume(small_real_volume, [tiny_package], SegmentOptions(precision="fp32")).labels.array
    # a truth that agrees with the prediction on vertebral body except for one slab: Dice is known
    truth_vals = pred.copy()
    truth_vals[:, :, :2] = 0
    case = ev.EvalCase("c", small_real_volume, schema.values_to_channels(truth_vals),
                       annotated_mask(["vertebral_body", "intervertebral_disc"], schema), source="S")
    r = ev.score_models([tiny_package], [case], schema, SegmentOptions(device="cpu", precision="fp32"))
    for cid in ("vertebral_body", "intervertebral_disc"):
        v = schema[cid].value
        p, t = pred == v, truth_vals == v
        if p.sum() + t.sum() == 0:
            continue
        want = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert r["metrics"]["dice"][cid] == pytest.approx(want, abs=1e-9)
        assert r["per_source"]["S"]["dice"][cid] == pytest.approx(want, abs=1e-9)


def test_level_range_counts_only_rows_the_truth_covers():
    arr = np.zeros((6, 40, 30), dtype=np.float32)  # canonical [s, r, c]
    img = Volume(arr + 1, spacing=(1, 1, 1), direction=ev.CANONICAL_DIRECTION)
    truth = np.zeros(arr.shape, np.uint8)
    truth[:, 10:20, 5:10] = 1
    pred = truth.copy()
    pred[:, 30:35, 5:10] = 1  # a (correct but unlabelled) structure far outside the labelled levels
    i, p, t = ev.level_range_counts(pred, truth, img, 1, margin_mm=2)
    assert (i, p, t) == (truth.sum(), truth.sum(), truth.sum())
    pred[:, 21, 5:10] = 1  # within the 2 mm margin: counted
    assert ev.level_range_counts(pred, truth, img, 1, margin_mm=2)[1] == truth.sum() + 6 * 5


def _surface(pred, truth, slice_mm=1.0, tol=(1.0, 2.0, 4.0)):
    img = Volume(np.ones(truth.shape, np.float32), spacing=(1, 1, slice_mm), direction=ev.CANONICAL_DIRECTION)
    counts = ev.surface_counts(pred, truth, img, 1, tol, margin_mm=2)
    return {t: c / n for t, (c, n) in counts.items()}


def test_surface_dice_counts_border_voxels_within_the_tolerance():
    """Same outline: 1; an outline one voxel off all round: its faces inside 1 mm, its edges and corners
    (sqrt 2 and sqrt 3 mm off) only inside 1.75 mm, nothing inside 0.5 mm; two voxels off along one axis:
    only those faces miss at 1 mm; a blob beyond the labelled levels: not counted."""
    truth = np.zeros((12, 40, 30), np.uint8)  # canonical [s, r, c]
    truth[3:9, 10:20, 8:18] = 1
    assert _surface(truth, truth) == {1.0: 1.0, 2.0: 1.0, 4.0: 1.0}
    grown = np.zeros_like(truth)
    grown[2:10, 9:21, 7:19] = 1
    got = _surface(grown, truth, tol=(0.5, 1.0, 1.75))
    assert got[0.5] == 0.0 and 0.8 < got[1.0] < 1 and got[1.75] == 1.0  # the box's edges and corners are sqrt 2, 3 off
    shifted = np.zeros_like(truth)
    shifted[3:9, 12:22, 8:18] = 1  # moved 2 voxels along r
    got = _surface(shifted, truth)
    assert 0 < got[1.0] < 1 and got[2.0] == 1.0
    blob = truth.copy()
    blob[3:9, 32:38, 8:18] = 1  # beyond the truth's rows + 2 mm
    assert _surface(blob, truth) == {1.0: 1.0, 2.0: 1.0, 4.0: 1.0}
    assert _surface(np.zeros_like(truth), truth)[4.0] == 0.0  # nothing drawn: no border is close


def test_surface_dice_measures_in_millimetres_across_thick_slices():
    """A draft one slice off on a 4 mm stack is 4 mm off at its side faces: inside 4 mm, not inside 2 mm
    (with the spacing read along the wrong axis it would pass at 2 mm)."""
    truth = np.zeros((12, 40, 30), np.uint8)
    truth[3:9, 10:20, 8:18] = 1
    moved = np.zeros_like(truth)
    moved[4:10, 10:20, 8:18] = 1
    got = _surface(moved, truth, slice_mm=4.0)
    assert got[2.0] < 1 and got[4.0] == 1.0
    assert _surface(moved, truth, slice_mm=1.0)[1.0] == 1.0


def test_thick_slab_averages_slices_and_keeps_centre_labels():
    arr = np.zeros((8, 20, 24), dtype=np.float32)  # [s, r, c] at 1 mm
    for s in range(8):
        arr[s] = s
    lab = np.zeros(arr.shape, np.uint8)
    lab[1, 5:10, 5:10] = 1  # only slice 1 is the centre (k//2 = 1 of 0..3) of a 2-slice... slab of 4: centres 2, 6
    lab[2, 5:10, 5:10] = 2
    img_v = Volume(arr, direction=ev.CANONICAL_DIRECTION)
    lab_v = img_v.with_array(lab)
    ti, tl = ev.thick_slab(img_v, lab_v, slab_mm=4, inplane_mm=0.5)
    assert ti.array.shape == (2, 40, 48) and tl.array.shape == (2, 40, 48)
    assert np.allclose(ti.array[0], 1.5) and np.allclose(ti.array[1], 5.5)  # means of 0..3 and 4..7
    assert set(np.unique(tl.array[0])) == {0, 2}  # the label of slice 2 (the slab's centre), not slice 1
    assert ti.spacing == pytest.approx((0.5, 0.5, 4.0))


def test_every_nth_slice_keeps_geometry_consistent():
    arr = np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)
    case = ev.EvalCase("c", Volume(arr, direction=ev.CANONICAL_DIRECTION), np.zeros(arr.shape, np.uint8),
                       torch.tensor([True, True, False]))
    sub = ev.every_nth_slice(case, 2)
    assert sub.image.array.shape == (3, 4, 5) and np.array_equal(sub.image.array, arr[::2])
    assert sub.image.spacing[2] == 2.0 and sub.truth.shape == (3, 4, 5)


def test_eval_case_from_slices_is_the_canonical_stack():
    s = load_schema("starter")
    img = torch.randn(5, 32, 40)
    lab = torch.zeros(5, 32, 40, dtype=torch.uint8)
    lab[:, 3:9, 4:10] = 2
    c = CaseSlices("x", "x", img, lab, annotated_mask(["intervertebral_disc"], s), ("intervertebral_disc",))
    e = ev.eval_case_from_slices(c, (1.0, 1.0))
    from LumbarSegmentLib.core.geometry import sagittal_layout

    layout = sagittal_layout(e.image)
    assert layout.perm == (0, 1, 2) and not any(layout.flip)
    assert np.array_equal(layout.to_canonical(e.truth), lab.numpy())


def test_evaluation_labels_stay_apart_when_two_folders_share_a_package_name(tmp_path):
    """Two runs exported under the name they will be published as: both columns must survive."""
    from conftest import make_package

    a = make_package(tmp_path / "run-a", name="uvd-starter")
    b = make_package(tmp_path / "run-b", name="uvd-starter", seed=1)
    c = make_package(tmp_path / "other", name="uvd-partner", seed=2)
    spec = f"{a.path},{b.path},{a.path}+{c.path}"
    entries = ev.resolve_entries(spec)
    assert list(entries) == [str(a.path), str(b.path), f"{a.path}+uvd-partner"]
    assert [p.path for p in entries[str(b.path)]] == [b.path]
    # a lone folder is still labelled by its package name
    assert list(ev.resolve_entries(f"{c.path}")) == ["uvd-partner"]


def test_scoring_hands_one_options_object_to_the_engine(monkeypatch, small_real_volume, tiny_package):
    """Whatever options a scoring command builds reach every engine call unchanged (the per-option
    keywords of earlier versions dropped some on the way); several models run as the ensemble."""
    schema = tiny_package.schema
    seen = []
    real = ev.segment_volume

    def spy(volume, models, options):
        seen.append((len(models), options))
        return real(volume, models, options)

    monkeypatch.setattr(ev, "segment_volume", spy)
    truth = np.zeros(small_real_volume.array.shape, dtype=np.uint8)
    case = ev.EvalCase("c", small_real_volume, truth, annotated_mask(["vertebral_body"], schema), source="S")
    opts = ev.eval_options(device="cpu", precision="fp32", slice_smoothing_mm=0, bn_adapt=0.25, postprocess="spine")
    assert (opts.slice_smoothing_mm, opts.bn_adapt) == (0.0, 0.25)
    assert ev.eval_options().slice_smoothing_mm == SegmentOptions().slice_smoothing_mm  # None: the engine default
    ev.score_models([tiny_package], [case], schema, opts)
    ev.score_models([tiny_package, tiny_package], [case], schema, opts)
    assert [n for n, _ in seen] == [1, 2]
    assert seen[0][1] == opts and seen[1][1].mode == "ensemble"
    for _, o in seen:
        assert (o.device, o.precision, o.slice_smoothing_mm, o.bn_adapt, o.postprocess) == ("cpu", "fp32", 0.0, 0.25,
                                                                                              "spine")
