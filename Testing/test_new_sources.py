"""Training targets of the new sources (synthetic cases), and loading the real ones when they are present."""
from pathlib import Path

import numpy as np
import pytest
import torch

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.training.data import DataError, select_cases
from LumbarSegmentLib.training.targets import IGNORE_INDEX, SURE_BACKGROUND, case_target, set_code

SPINE = load_schema("spine6")
CH = SPINE.channel_of()


def _case(labels, annotated, **extra):
    return Case(case_id="X_1", image_path=Path("x_image.mha"), label_path=Path("x_label.mha"),
                labels=labels, annotated_structures=annotated, extra=extra)


def test_spider_like_case_union_and_sure_background_above_the_lowest_disc():
    lab = np.zeros((40, 6, 3), np.uint8)  # [z, y, x]
    lab[4:8, 1:3] = 2     # L5/S1 disc (lowest)
    lab[9:16, 1:3] = 1    # L5 vertebra
    lab[17:20, 1:3] = 2   # L4/L5 disc
    lab[5:30, 4] = 3      # canal
    case = _case({1: "vertebra", 2: "intervertebral_disc", 3: "spinal_canal"},
                 ["vertebra", "intervertebral_disc", "spinal_canal"])
    t, structures = case_target(case, lab, SPINE)
    assert set(structures) == {"vertebral_body", "posterior_elements", "intervertebral_disc", "spinal_canal"}
    assert (t[lab == 1] == set_code([CH["vertebral_body"], CH["posterior_elements"]])).all()
    assert (t[lab == 2] == CH["intervertebral_disc"]).all() and (t[lab == 3] == CH["spinal_canal"]).all()
    assert (t[:8][lab[:8] == 0] == 0).all()  # at and below the lowest disc: may be sacrum (marginal)
    assert (t[8:][lab[8:] == 0] == SURE_BACKGROUND).all()  # above it: background for sure


def _identity(lab):
    from LumbarSegmentLib.core.geometry import sagittal_layout
    from LumbarSegmentLib.core.volume import Volume

    return sagittal_layout(Volume(lab, spacing=(1.0, 1.0, 1.0)))


def test_whole_vertebra_is_split_at_the_canal_when_the_layout_is_given():
    """Body for sure in front of the canal's anterior wall, posterior elements behind it, the union in
    a band around it; lateral slices without canal borrow the wall of the others, and so do rows within
    reach of one with canal; a vertebra far from any canal keeps the union."""
    lab = np.zeros((60, 30, 3), np.uint8)  # [z, y, x], y = anterior -> posterior, 1 mm
    lab[10:40, 2:24] = 1                   # a vertebra as deep as the canal, every slice
    lab[40:60, 2:10] = 1                   # above: body only; rows 52-59 have no canal
    lab[10:52, 12:16, 1] = 3               # the canal, mid slice only: anterior wall at y = 12
    case = _case({1: "vertebra", 3: "spinal_canal"}, ["vertebra", "spinal_canal"])
    body, pe = CH["vertebral_body"], CH["posterior_elements"]
    union = set_code([body, pe])
    t_plain, _ = case_target(case, lab, SPINE)
    assert (t_plain[lab == 1] == union).all()  # without the layout: the union, as drawn
    t, _ = case_target(case, lab, SPINE, layout=_identity(lab))
    assert (t[10:60, 2:10] == body).all()                          # in front, every slice and row
    assert (t[10:40, 16:24] == pe).all()                           # behind, lateral slices too
    assert (t[10:40, 10:15, 0] == union).all() and (t[10:40, 10:12, 1] == union).all()  # the band
    assert (t[lab == 3] == CH["spinal_canal"]).all()
    far = np.zeros_like(lab)
    far[0:10, 12:16, 1] = 3
    far[35:60, 2:24] = 1                   # 25+ mm above the canal's top row
    t_far, _ = case_target(case, far, SPINE, layout=_identity(far))
    assert (t_far[far == 1] == union).all()


def test_vb1_lowest_instance_is_sacrum_and_sacrum_stays_unannotated():
    lab = np.zeros((30, 4, 2), np.uint8)
    lab[20:25] = 3
    lab[2:6] = 7   # the lowest instance (ids have no anatomical order)
    lab[10:15] = 1
    case = _case({1: "vertebral_body", 3: "vertebral_body", 7: "vertebral_body"}, ["vertebral_body"])
    t, structures = case_target(case, lab, SPINE, source="VB1")
    assert (t[2:6] == CH["sacrum"]).all() and (t[10:15] == CH["vertebral_body"]).all()
    assert structures == ("vertebral_body",)
    t2, _ = case_target(case, lab, SPINE, source="VB2")  # other sources: every instance is a body
    assert (t2[2:6] == CH["vertebral_body"]).all()
    t3, _ = case_target(case, lab, load_schema("starter"), source="VB1")  # no sacrum class: unknown
    assert (t3[2:6] == IGNORE_INDEX).all()


def test_t1_levels_case_unknown_outside_complete_range_and_s1_only_sacrum():
    lab = np.zeros((50, 8, 1), np.uint8)
    lab[10:15] = 6
    lab[16:20] = 5
    case = _case({5: "vertebral_body", 6: "sacrum"}, ["vertebral_body", "sacrum"],
                 levels={"5": "L5", "6": "S1"}, labels_complete_z_range=[10, 19])
    t, structures = case_target(case, lab, SPINE)
    # inside the complete range the sacrum is known (S1 or not sacrum); its lower segments lie below it
    assert structures == ("vertebral_body", "sacrum")
    no_range = _case({5: "vertebral_body", 6: "sacrum"}, ["vertebral_body", "sacrum"], levels={"5": "L5", "6": "S1"})
    assert case_target(no_range, lab, SPINE)[1] == ("vertebral_body",), "S1 alone, lower segments unknown"
    assert (t[10:15] == CH["sacrum"]).all() and (t[16:20] == CH["vertebral_body"]).all()
    assert (t[:10] == IGNORE_INDEX).all() and (t[20:] == IGNORE_INDEX).all()
    whole = _case({6: "sacrum"}, ["sacrum"])  # a sacrum outlined without levels counts as annotated
    assert case_target(whole, lab, SPINE)[1] == ("sacrum",)


def test_several_data_folders_and_duplicate_ids(tmp_path, shared_data):
    a = shared_data / "spider-t2space"
    if not a.is_dir() or not (shared_data / "t1-levels").is_dir():
        pytest.skip("spider-t2space/ or t1-levels/ not in the shared data")
    cases = select_cases(f"{a},{shared_data / 't1-levels'}", ["SP_18", "T1L_0001"])
    assert [c.case_id for c in cases] == ["SP_18", "T1L_0001"]
    with pytest.raises(DataError, match="two data folders"):
        select_cases(f"{a},{a}", ["SP_18"])


def test_real_new_sources_load_as_training_slices(shared_data):
    from LumbarSegmentLib.training.data import load_case_slices

    if not (shared_data / "spider-t2space").is_dir() or not (shared_data / "t1-levels").is_dir():
        pytest.skip("spider-t2space/ or t1-levels/ not in the shared data")
    sp, t1 = select_cases(f"{shared_data / 'spider-t2space'},{shared_data / 't1-levels'}", ["SP_18", "T1L_0001"])
    s = load_case_slices(sp, SPINE)
    assert s.source == "SP" and s.num_slices == 13 and s.annotated[CH["posterior_elements"]]
    codes = set(torch.unique(s.label).tolist())
    assert set_code([CH["vertebral_body"], CH["posterior_elements"]]) in codes and SURE_BACKGROUND in codes
    # in-plane spacing comes from the file (0.89 mm here): the 1 mm model plane is smaller than 320 x 256
    assert s.image.shape[1] < 320 and s.image.shape[2] < 256
    t = load_case_slices(t1, SPINE)
    assert t.num_slices == 1 and t.annotated[CH["sacrum"]]
    assert {CH["sacrum"], CH["vertebral_body"], IGNORE_INDEX} <= set(torch.unique(t.label).tolist())


def test_finetune_into_spine6_starts_new_bone_classes_from_the_body(tmp_path):
    from conftest import make_package

    from LumbarSegmentLib.training.finetune import prepare_finetune_model

    pkg = make_package(tmp_path / "src", schema="starter")
    model, target, info = prepare_finetune_model(pkg, SPINE)
    assert info["started_from_related"] == {"posterior_elements": "vertebral_body", "sacrum": "vertebral_body"}
    for m in model.head_modules().values():
        body, sac, pe = CH["vertebral_body"], CH["sacrum"], CH["posterior_elements"]
        assert torch.equal(m.weight[sac], m.weight[body]) and torch.equal(m.weight[pe], m.weight[body])
        if m.bias is not None:
            assert m.bias[sac] < m.bias[body]
    # the parent's decision is kept: no pixel's arg-max moves to a class that starts from the body
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        old = pkg.load_model().eval()(x)
        old = old[0] if isinstance(old, (tuple, list)) else old
    new_arg = out.argmax(1)
    assert not ((new_arg == CH["sacrum"]) | (new_arg == CH["posterior_elements"])).any()
    assert torch.equal(out[:, :3].argmax(1), old.argmax(1))
