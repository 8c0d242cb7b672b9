"""Click-guided models: the click maps, the package contract, the guided correction and the simulated clicks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from LumbarSegmentLib.core.guidance import GuidanceError, GuidanceSpec, ModelClick, disk_radius_px, draw_maps
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.inference.refine import Click, RefineSession

CANONICAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
SPEC = GuidanceSpec.for_classes(["background", "vertebral_body", "intervertebral_disc"])


def test_spec_lists_a_positive_and_a_negative_map_per_structure_and_round_trips():
    assert SPEC.maps == (("vertebral_body", True), ("vertebral_body", False),
                         ("intervertebral_disc", True), ("intervertebral_disc", False))
    assert GuidanceSpec.from_dict(SPEC.to_dict(), ["background", "vertebral_body", "intervertebral_disc"]) == SPEC
    assert SPEC.channel("intervertebral_disc", False) == 3 and SPEC.channel("sacrum", True) == -1


@pytest.mark.parametrize("bad, msg", [
    ({"maps": []}, "non-empty"), ({"maps": ["spleen+"]}, r"spleen\+"), ({"maps": ["vertebral_body"]}, r"\+ or -"),
    ({"maps": ["vertebral_body+", "vertebral_body+"]}, "twice"),
    ({"maps": ["vertebral_body+"], "radius_mm": -1}, "radius_mm"), ({"maps": ["vertebral_body+"], "reach_mm": True}, "reach_mm"),
])
def test_bad_guidance_sections_are_refused(bad, msg):
    with pytest.raises(GuidanceError, match=msg):
        GuidanceSpec.from_dict(bad, ["background", "vertebral_body"])


def test_a_click_is_a_ball_its_disks_shrink_with_distance_and_stop_at_the_reach():
    assert disk_radius_px(SPEC, 0.0, 1.0) == pytest.approx(3.0)
    assert 0 < disk_radius_px(SPEC, 2.0, 1.0) < 3.0
    assert disk_radius_px(SPEC, 4.0, 1.0) == 0.0  # a 4 mm clinical stack: only the clicked slice
    maps = draw_maps(SPEC, (20, 20), 0.0, [ModelClick(0.0, 10, 10, 2)], 1.0)
    assert maps.shape == (4, 20, 20) and maps[[0, 1, 3]].sum() == 0
    assert maps[2, 10, 10] == 1 and maps[2, 10, 13] == 1 and maps[2, 10, 14] == 0


def test_appended_click_channels_start_at_zero_so_the_model_drafts_as_before():
    from LumbarSegmentLib.models.variants import append_input_channels, build_model

    torch.manual_seed(0)
    net = build_model("UVD", in_channels=1, num_classes=3, init_filters=4).eval()
    x = torch.randn(2, 1, 64, 64)
    before = net(x)
    wide = append_input_channels(net, 4).eval()
    after = wide(torch.cat([x, torch.rand(2, 4, 64, 64)], 1))  # whatever the clicks: zero weights read them
    assert wide.builder_args["in_channels"] == 5
    assert torch.allclose(before, after, atol=1e-5)


def click_following_model(spec: GuidanceSpec = SPEC):
    """A real network (one 1x1 convolution on image + click maps) whose answer is background unless a
    click map says otherwise: a positive body click makes its disk body, a negative one background."""
    from LumbarSegmentLib.inference.runners import LoadedModel

    conv = torch.nn.Conv2d(1 + spec.channels, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
        conv.weight[1, 1 + spec.channel("vertebral_body", True)] = 10.0
        conv.weight[1, 1 + spec.channel("vertebral_body", False)] = -10.0
        conv.weight[2, 1 + spec.channel("intervertebral_disc", True)] = 10.0
    return LoadedModel.from_module(conv.eval(), load_schema("starter"), (1.0, 1.0), (64, 64), guidance=spec)


def phantom(shape=(20, 40, 40), slice_mm=1.0):
    img = np.full(shape, 50.0, np.float32)
    img[:, :5] = 10.0  # not constant: the engine refuses a constant image
    return Volume(img, spacing=(1.0, 1.0, slice_mm), direction=CANONICAL)


def lps(volume: Volume, s: int, r: int, c: int) -> tuple[float, float, float]:
    return tuple(float(v) for v in (volume.ijk_to_lps() @ np.array([c, r, s, 1.0]))[:3])


def test_guided_positive_click_draws_the_structure_in_the_slices_its_ball_reaches():
    vol = phantom()
    sess = RefineSession(vol, click_following_model())
    assert sess.method == "guided"
    res = sess.refine(np.zeros(vol.array.shape, np.uint8), [Click(lps(vol, 10, 20, 20), "vertebral_body", True)])
    body = res.labels == 1
    assert body[10, 20, 20] and body[10, 20, 23] and not body[10, 20, 24]
    assert sorted(set(np.nonzero(body)[0])) == [7, 8, 9, 10, 11, 12, 13]  # |d| < 4 mm
    assert res.changed_voxels == int(body.sum()) and set(np.unique(res.labels)) == {0, 1}


def test_guided_click_on_a_thick_slice_stack_stays_in_its_slice():
    vol = phantom(shape=(8, 40, 40), slice_mm=4.0)
    res = RefineSession(vol, click_following_model()).refine(
        np.zeros(vol.array.shape, np.uint8), [Click(lps(vol, 3, 20, 20), "vertebral_body", True)])
    assert sorted(set(np.nonzero(res.labels)[0])) == [3]


def test_guided_negative_click_and_protection_of_hand_painted_structures():
    vol = phantom()
    sess = RefineSession(vol, click_following_model())
    current = np.zeros(vol.array.shape, np.uint8)
    current[5:15, 10:30, 10:30] = 1
    current[10, 30:35, 20] = 2  # a disc the annotator painted, below the clicked body
    protect = current == 2
    res = sess.refine(current, [Click(lps(vol, 10, 20, 20), "vertebral_body", False)], protect=protect)
    # the model says background everywhere without clicks: only the clicked body changes, and only near the click
    assert (res.labels[current == 2] == 2).all()
    changed = res.labels != current
    assert changed.any() and (current[changed] == 1).all()
    rows = np.nonzero(changed.any(axis=(0, 2)))[0]
    assert rows.min() >= 10 - 30 and rows.max() <= 20 + 30


def test_guided_result_is_the_same_from_the_draft_or_the_last_result():
    vol = phantom()
    sess = RefineSession(vol, click_following_model())
    draft = np.zeros(vol.array.shape, np.uint8)
    clicks = [Click(lps(vol, 10, 20, 20), "vertebral_body", True), Click(lps(vol, 12, 8, 30), "intervertebral_disc", True)]
    once = sess.refine(draft, clicks).labels
    assert np.array_equal(sess.refine(once, clicks).labels, once)
    # an interactive tool passes all clicks and applies only the new one
    step1 = sess.refine(draft, clicks[:1]).labels
    assert np.array_equal(sess.refine(step1, clicks, new=1).labels, once)


def test_a_guidance_package_round_trips_and_drafts_with_empty_click_maps(tmp_path):
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.inference.runners import LoadedModel
    from LumbarSegmentLib.models.variants import append_input_channels, build_model
    from LumbarSegmentLib.registry.package import PackageError, default_input_contract, read_package, write_package

    net = append_input_channels(build_model("UVD", in_channels=1, num_classes=3, init_filters=4), SPEC.channels)
    contract = {**default_input_contract((1.0, 1.0), (64, 64)), "channels": 5, "guidance": SPEC.to_dict()}
    pkg = write_package(tmp_path / "g", net.eval(), name="g", schema=load_schema("starter"), input_contract=contract)
    loaded = LoadedModel.from_package(read_package(pkg.path))
    assert loaded.guidance == SPEC and loaded.image_channels == 1
    vol = Volume(np.random.default_rng(0).random((3, 48, 48)).astype(np.float32) * 100, spacing=(1.0, 1.0, 1.0),
                 direction=CANONICAL)
    out = segment_volume(vol, [pkg], SegmentOptions(device="cpu", threads=1))
    assert out.labels.array.shape == vol.array.shape
    bad = {**contract, "channels": 1}
    with pytest.raises(PackageError, match="click map"):
        write_package(tmp_path / "bad", net.eval(), name="bad", schema=load_schema("starter"), input_contract=bad)


def test_simulated_clicks_land_on_the_errors_with_the_right_sign():
    from LumbarSegmentLib.training.guidance import ClickSetup, ClickSim, simulate

    class Draft(torch.nn.Module):  # says body in the left half of every patch, background elsewhere
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, 0] = 1.0
            out[:, 1, :, : x.shape[3] // 2] = 2.0
            return out

    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[:, 10:50, 16:48] = 1  # truth: body in the middle
    ann = torch.tensor([[True, True, False]] * 2)
    gen = torch.Generator().manual_seed(0)
    sim = ClickSim(max_clicks=4, iterate_p=0.0)
    setup = ClickSetup(SPEC, sim, 2.0, ("background", "vertebral_body", "intervertebral_disc"))
    maps = simulate(Draft(), None, torch.zeros(2, 1, 64, 64), label, ann, setup, gen, None)
    pos, neg = maps[:, 0] > 0, maps[:, 1] > 0
    assert not (maps[:, 2:] > 0).any()  # discs are not annotated: never clicked
    missed = (label == 1).clone()
    missed[:, :, :32] = False
    false = (label == 0).clone()
    false[:, :, 32:] = False
    assert (pos <= missed).all() and (neg <= false).all()


def test_the_refine_role_names_the_click_guided_model_and_publish_refine_sets_it(tmp_path):
    from types import SimpleNamespace

    from LumbarSegmentLib.models.variants import append_input_channels, build_model
    from LumbarSegmentLib.registry.catalog import resolve_refine_model
    from LumbarSegmentLib.registry.package import PackageError, default_input_contract, write_package
    from LumbarSegmentLib.registry.registry import Registry
    from LumbarSegmentLib.training.publish import publish_cli

    schema = load_schema("starter")
    plain = write_package(tmp_path / "plain", build_model("UVD", in_channels=1, num_classes=3, init_filters=4).eval(),
                          name="plain", schema=schema, input_contract=default_input_contract((1.0, 1.0), (64, 64)))
    net = append_input_channels(build_model("UVD", in_channels=1, num_classes=3, init_filters=4), SPEC.channels)
    guide = write_package(tmp_path / "guide", net.eval(), name="guide", schema=schema,
                          input_contract={**default_input_contract((1.0, 1.0), (64, 64)), "channels": 5,
                                          "guidance": SPEC.to_dict()})
    reg = tmp_path / "reg"

    def args(pkg, refine):
        return SimpleNamespace(package=str(pkg.path), registry=str(reg), data=None, cases=None, patients=None,
                               metric="mean_dice_fg", name=None, max_source_drop=-1, reference=None,
                               max_reference_drop=-1, own_source_only=False, force=False, no_default=False,
                               refine=refine, ensemble=None, device="cpu", precision="fp32")

    assert publish_cli(args(plain, False)) == 0
    registries = [Registry(reg)]
    assert resolve_refine_model(None, registries).ref == "plain@1"  # no click-guided model: the default
    with pytest.raises(PackageError, match="not a click-guided model"):
        publish_cli(args(plain, True))
    assert publish_cli(args(guide, True)) == 0
    idx = Registry(reg).index()
    assert idx["refine"] == "guide@1" and idx["default"] == "plain@1"  # never the drafting default
    assert resolve_refine_model(None, registries).ref == "guide@1"
    assert resolve_refine_model("plain@1", registries).ref == "plain@1"
    # the front ends' drafting choice: the click-guided model only when it was trained from that model
    from LumbarSegmentLib.registry.catalog import corrector_for, resolve_model

    drafting = resolve_model("plain@1", registries)
    assert corrector_for(drafting, registries).ref == "guide@1"  # same structures, same values
    spine = write_package(tmp_path / "spine", build_model("UVD", in_channels=1, num_classes=6, init_filters=4).eval(),
                          name="spine", schema=load_schema("spine6"),
                          input_contract=default_input_contract((1.0, 1.0), (64, 64)))
    assert corrector_for(spine, registries).ref == "guide@1"  # spine6 keeps the starter's values
    assert corrector_for(guide, registries).path == guide.path  # a guidance model corrects as itself
    from LumbarSegmentLib.core.schema import LabelSchema

    swapped = schema.to_dict()
    swapped["classes"][1]["value"], swapped["classes"][2]["value"] = 2, 1
    odd = write_package(tmp_path / "odd", build_model("UVD", in_channels=1, num_classes=3, init_filters=4).eval(),
                        name="odd", schema=LabelSchema.from_dict(swapped),
                        input_contract=default_input_contract((1.0, 1.0), (64, 64)))
    assert corrector_for(odd, registries).path == odd.path  # other values: its own rules


PRIOR = GuidanceSpec.for_classes(["background", "vertebral_body", "intervertebral_disc"], prior=True)


def test_a_prior_reading_model_sees_the_current_labels_and_is_refused_for_drafting(tmp_path):
    """A 1x1 network that answers 'body' wherever the current labels say body, unless a negative body
    click is there: the correction keeps the labels and removes only near the click."""
    from LumbarSegmentLib.inference.devices import EngineError
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.inference.runners import LoadedModel

    assert PRIOR.channels == 6 and PRIOR.to_dict()["prior"] == ["vertebral_body", "intervertebral_disc"]
    assert GuidanceSpec.from_dict(PRIOR.to_dict(), ["background", "vertebral_body", "intervertebral_disc"]) == PRIOR
    with pytest.raises(GuidanceError, match="prior"):
        GuidanceSpec.from_dict({**PRIOR.to_dict(), "prior": ["background"]}, ["background", "vertebral_body",
                                                                           "intervertebral_disc"])
    conv = torch.nn.Conv2d(1 + PRIOR.channels, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        conv.weight[1, 1] = 4.0  # the body mask of the current labels
        conv.weight[1, 1 + 2 + PRIOR.channel("vertebral_body", False)] = -10.0
    model = LoadedModel.from_module(conv.eval(), load_schema("starter"), (1.0, 1.0), (64, 64), guidance=PRIOR)
    vol = phantom()
    current = np.zeros(vol.array.shape, np.uint8)
    current[5:15, 10:30, 10:30] = 1
    res = RefineSession(vol, model).refine(current, [Click(lps(vol, 10, 20, 20), "vertebral_body", False)])
    removed = (current == 1) & (res.labels == 0)
    assert removed[10, 20, 20] and not removed[10, 20, 25] and removed.sum() == res.changed_voxels
    assert (res.labels[current == 1] == 1).sum() > 0.9 * (current == 1).sum()
    with pytest.raises(EngineError, match="does not draft"):
        segment_volume(vol, [model], SegmentOptions(device="cpu", threads=1))


def test_prior_simulation_shows_a_draft_or_a_made_wrong_truth_and_clicks_its_errors():
    from LumbarSegmentLib.training.guidance import ClickSetup, ClickSim, perturb, simulate

    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[20:40, 20:40] = True
    changed = [bool((perturb(mask, gen) != mask).any()) for _ in range(20)]
    assert sum(changed) >= 15

    class Empty(torch.nn.Module):  # a parent that drafts nothing, a model that answers background
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, 0] = 1.0
            return out

    label = torch.zeros(4, 64, 64, dtype=torch.long)
    label[:, 20:40, 20:40] = 1
    ann = torch.tensor([[True, True, False]] * 4)
    setup = ClickSetup(PRIOR, ClickSim(max_clicks=3, iterate_p=0.0, synthetic_p=1.0), 2.0,
                       ("background", "vertebral_body", "intervertebral_disc"))
    ch = simulate(Empty(), Empty(), torch.zeros(4, 1, 64, 64), label, ann, setup, gen, None)
    assert ch.shape == (4, 6, 64, 64)
    body_prior = ch[:, 0] > 0
    overlap = (body_prior & (label == 1)).sum() / (label == 1).sum()
    assert overlap > 0.5 and not (ch[:, 1] > 0).any()  # a made-wrong truth, no discs anywhere
