"""Click-guided correction (LumbarSegmentLib/inference/refine.py) on synthetic stacks and one real case."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.inference.refine import Click, ClickError, RefineSession, check_clicks
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.core.volume import Volume

#: stored [k, j, i] runs as the canonical [s, r, c] stack (right->left, superior->inferior, A->P)
CANONICAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
BODY, DISC = 1, 2


def background_model():
    """A real network (one 1x1 convolution) that calls every pixel background with probability 0.78:
    the clicks alone must then say where a structure is."""
    import torch

    from LumbarSegmentLib.inference.engine import LoadedModel

    conv = torch.nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
    return LoadedModel.from_module(conv.eval(), load_schema("starter"), (1.0, 1.0), (64, 64))


def phantom(shape=(20, 40, 40)):
    """A bright box (the 'body') in slices 4..15, rows 10..25, columns 10..29 of a dim stack."""
    img = np.full(shape, 10.0, np.float32)
    img[4:16, 10:26, 10:30] = 100.0
    return Volume(img, spacing=(1.0, 1.0, 1.0), direction=CANONICAL)


def lps(volume: Volume, s: int, r: int, c: int) -> tuple[float, float, float]:
    return tuple(float(v) for v in (volume.ijk_to_lps() @ np.array([c, r, s, 1.0]))[:3])


@pytest.fixture(scope="module")
def session():
    vol = phantom()
    return vol, RefineSession(vol, background_model())


def truth_of(vol):
    t = np.zeros(vol.array.shape, np.uint8)
    t[4:16, 10:26, 10:30] = BODY
    return t


def test_positive_click_carries_the_last_section_over_the_missed_slices(session):
    vol, sess = session
    draft = truth_of(vol)
    draft[11:16] = 0  # the draft stops 5 slices short
    res = sess.refine(draft, [Click(lps(vol, 13, 17, 20), "vertebral_body", True)])
    assert np.array_equal(res.labels, truth_of(vol))
    assert res.changed_voxels == 5 * 16 * 20


def test_negative_click_removes_the_false_end_slices(session):
    vol, sess = session
    draft = truth_of(vol)
    draft[16:19, 10:26, 10:30] = BODY  # 3 slices too many
    res = sess.refine(draft, [Click(lps(vol, 17, 17, 20), "vertebral_body", False)])
    assert np.array_equal(res.labels, truth_of(vol))


def test_positive_click_moves_a_border_out_by_the_missed_band(session):
    vol, sess = session
    draft = truth_of(vol)
    draft[:, :, 27:30] = 0  # the posterior 3 columns missed in every slice
    res = sess.refine(draft, [Click(lps(vol, 9, 17, 28), "vertebral_body", True)])
    assert np.array_equal(res.labels, truth_of(vol))


def test_hand_painted_voxels_of_other_structures_are_never_touched(session):
    vol, sess = session
    draft = truth_of(vol)
    draft[11:16] = 0
    draft[12:14, 15:18, 12:16] = 7  # a structure the model does not know, painted by hand
    draft[14, 20:22, 20:22] = DISC  # a disc the annotator insists on: protected below
    protect = draft == DISC
    res = sess.refine(draft, [Click(lps(vol, 13, 17, 20), "vertebral_body", True)], protect=protect)
    assert np.array_equal(res.labels[draft == 7], draft[draft == 7])
    assert np.all(res.labels[protect] == DISC)
    assert (res.labels[11:16] == BODY).sum() == 5 * 16 * 20 - 2 * 3 * 4 - 4
    outside = np.ones_like(protect)
    outside[4:16, 10:26, 10:30] = False
    assert np.array_equal(res.labels[outside], draft[outside])  # nothing outside the structure's region


def test_clicks_applied_again_to_the_result_change_nothing(session):
    vol, sess = session
    draft = truth_of(vol)
    draft[11:16] = 0
    draft[:, :, 27:30] = 0
    clicks = [Click(lps(vol, 13, 17, 20), "vertebral_body", True), Click(lps(vol, 7, 17, 28), "vertebral_body", True)]
    once = sess.refine(draft, clicks).labels
    assert sess.refine(once, clicks).changed_voxels == 0
    assert once.dtype == draft.dtype


@pytest.mark.parametrize("text, msg", [
    ("1,2,3,vertebral_body", "expected X,Y,Z,STRUCTURE,+"),
    ("1,2,x,vertebral_body,+", "must be numbers"),
    ("1,2,3,vertebral_body,*", "sign must be"),
    ("1,2,nan,vertebral_body,+", "finite"),
])
def test_malformed_clicks_are_refused(text, msg):
    with pytest.raises(ClickError, match=msg):
        Click.parse(text)


def test_clicks_outside_the_image_or_of_unknown_structures_are_refused():
    vol = phantom()
    schema = load_schema("starter")
    with pytest.raises(ClickError, match="outside the image"):
        check_clicks(vol, [Click((500.0, 0.0, 0.0), "vertebral_body", True)], schema)
    with pytest.raises(ClickError, match="unknown structure 'spinal_canal'.*vertebral_body, intervertebral_disc"):
        check_clicks(vol, [Click(lps(vol, 5, 5, 5), "spinal_canal", True)], schema)
    with pytest.raises(ClickError, match="unknown structure 'background'"):
        check_clicks(vol, [Click(lps(vol, 5, 5, 5), "background", False)], schema)


# ------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def real_case(shared_data, tmp_path_factory):
    """IVD_25 cropped to its 9 central slices: image and a draft that misses one disc's section."""
    from LumbarSegmentLib.formats.io import read_volume, write_volume

    folder = tmp_path_factory.mktemp("refine")
    image = read_volume(shared_data / "lumbar-mr" / "IVD_25_image.mha")
    label = read_volume(shared_data / "lumbar-mr" / "IVD_25_label.mha")
    i0 = image.array.shape[2] // 2 - 4
    origin = np.asarray(image.origin) + image.direction[:, 0] * image.spacing[0] * i0
    crop = dict(spacing=image.spacing, origin=origin, direction=image.direction)
    img = Volume(image.array[:, :, i0:i0 + 9].copy(), **crop)
    discs = np.where(label.array[:, :, i0:i0 + 9] > 0, DISC, 0).astype(np.uint8)
    write_volume(img, folder / "image.nii.gz")
    write_volume(img.with_array(discs), folder / "truth.nii.gz")
    return folder, img, discs


def test_cli_refines_a_real_case_on_its_grid(real_case, tmp_path, capsys):
    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import read_volume, write_volume

    folder, img, discs = real_case
    draft = discs.copy()
    k, j, i = np.nonzero(discs == DISC)
    one = (k > np.median(k))  # erase the lower half of the discs in the two right-most slices
    wipe = one & (i <= 1)
    draft[k[wipe], j[wipe], i[wipe]] = 0
    write_volume(img.with_array(draft), tmp_path / "draft.nrrd")
    kk, jj, ii = k[wipe][len(k[wipe]) // 2], j[wipe][len(k[wipe]) // 2], i[wipe][len(k[wipe]) // 2]
    x, y, z = (img.ijk_to_lps() @ np.array([ii, jj, kk, 1.0]))[:3]
    out = tmp_path / "fixed.nii.gz"
    rc = main(["refine", str(folder / "image.nii.gz"), "--labels", str(tmp_path / "draft.nrrd"), "-o", str(out),
               "--click", f"{x},{y},{z},intervertebral_disc,+", "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    res = read_volume(out)
    assert res.same_geometry(img) and res.array.dtype == draft.dtype
    assert set(np.unique(res.array)) <= {0, DISC}
    assert (res.array != draft).sum() > 0
    changed = res.array != draft
    assert np.all(res.array[changed] == DISC)  # a positive disc click only paints disc


@pytest.mark.parametrize("click, msg", [
    ("0,0,9999,vertebral_body,+", "outside the image"),
    ("{c},spinal_cord,+", "unknown structure"),
    ("1,2,vertebral_body,+", "expected X,Y,Z"),
])
def test_cli_bad_clicks_exit_2_and_write_nothing(real_case, tmp_path, capsys, click, msg):
    from LumbarSegmentLib.cli.main import main

    folder, img, _ = real_case
    centre = (img.ijk_to_lps() @ np.array([*(np.array(img.size_ijk) // 2), 1.0]))[:3]
    click = click.replace("{c}", ",".join(f"{v:.2f}" for v in centre))
    out = tmp_path / "out.nii.gz"
    rc = main(["refine", str(folder / "image.nii.gz"), "--labels", str(folder / "truth.nii.gz"), "-o", str(out),
               "--click", click])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ click to fix on MRML
def test_click_to_fix_on_a_real_segmentation_node_with_undo_and_hand_edits_protected():
    pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")
    from LumbarSegmentLib.slicer import mrml
    from LumbarSegmentLib.slicer.refine import ClickToFix

    ctx = mrml.MRMLContext.standalone()
    schema = load_schema("starter")
    vol = phantom()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    draft = truth_of(vol)
    draft[11:16] = 0
    draft[3, 12:20, 12:20] = DISC  # drafted disc that the annotator will have edited by hand
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(draft), schema, node)
    disc_id = next(sid for sid, c in mrml.segment_classes(seg, schema).items() if c.id == "intervertebral_disc")
    hand_disc = np.zeros(draft.shape, bool)
    hand_disc[3, 12:20, 12:20] = True
    hand_disc[12, 14:18, 14:18] = True  # painted by hand into the body's missing slices
    mrml.set_segment_mask(ctx.seg_logic, seg, disc_id, hand_disc, node)

    tool = ClickToFix(ctx.scene, ctx.seg_logic, node, seg, background_model())
    changed = tool.click(lps(vol, 13, 17, 20), "vertebral_body", True, now=0.0)
    after = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema).array
    assert changed == 5 * 16 * 20 - 16
    assert np.all(after[hand_disc] == DISC)  # the hand-painted disc is untouched
    assert np.all(after[11:16][~hand_disc[11:16] & (truth_of(vol)[11:16] == BODY)] == BODY)
    assert tool.ledger.clicks == 1 and tool.ledger.voxels_by_clicks == changed
    assert tool.undo() and not tool.undo()
    back = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, schema).array
    expected = draft.copy()
    expected[hand_disc] = DISC
    assert np.array_equal(back, expected)



def test_click_to_fix_hands_the_session_every_click_and_lets_only_the_last_edit():
    """The whole history goes to the session (a guidance model reads it), ``new=1`` so the older clicks do
    not edit again; undo drops the click from the history, so the next click does not see it."""
    pytest.importorskip("slicer", reason="slicer-core (the MRML libraries) is not installed")
    from LumbarSegmentLib.slicer import mrml
    from LumbarSegmentLib.slicer.refine import ClickToFix

    ctx = mrml.MRMLContext.standalone()
    vol = phantom()
    node = mrml.volume_to_node(ctx.scene, vol, "MR")
    draft = truth_of(vol)
    draft[11:16] = 0
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(draft), load_schema("starter"), node)
    tool = ClickToFix(ctx.scene, ctx.seg_logic, node, seg, background_model())
    seen = []
    real = tool.session.refine

    def spy(current, clicks, protect=None, new=None):
        seen.append((list(clicks), new))
        return real(current, clicks, protect=protect, new=new)

    tool.session.refine = spy
    first = Click(lps(vol, 13, 17, 20), "vertebral_body", True)
    second = Click(lps(vol, 17, 17, 20), "vertebral_body", False)  # outside the body: changes nothing
    assert tool.click(first.point_lps, first.structure, first.positive, now=0.0) == 5 * 16 * 20
    assert tool.click(second.point_lps, second.structure, second.positive, now=1.0) == 0
    assert seen == [([first], 1), ([first, second], 1)]
    assert tool.history == [first, second]
    assert tool.undo() and tool.history == [first]  # the click that changed nothing is taken back too
    third = Click(lps(vol, 9, 17, 28), "vertebral_body", True)
    tool.click(third.point_lps, third.structure, third.positive, now=2.0)
    assert seen[-1] == ([first, third], 1)
    assert tool.ledger.clicks == 3  # effort spent stays counted after an undo


def test_slice_probabilities_are_the_engine_prediction(tiny_package, small_real_volume):
    """The cached per-slice probabilities give exactly the engine's label map (without the across-slice
    average, which needs every slice): one prediction path."""
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.inference.engine_slices import SliceProbabilities
    from LumbarSegmentLib.core.geometry import sagittal_layout

    opts = SegmentOptions(device="cpu", precision="fp32", slice_smoothing_mm=0.0)
    labels = segment_volume(small_real_volume, [tiny_package], opts).labels.array
    probs = SliceProbabilities(small_real_volume, tiny_package, opts)
    n = probs.n_slices
    p = probs.get([n - 1, 0] + list(range(1, n - 1)))  # any order, each slice computed once
    p = np.concatenate([p[1:2], p[2:], p[:1]])
    assert probs.cached == list(range(n))
    mine = tiny_package.schema.channels_to_values(p.argmax(axis=1))
    layout = sagittal_layout(small_real_volume)
    assert np.array_equal(mine, layout.to_canonical(labels))
    assert probs.get([1], slice(2, 5), slice(0, 3)).shape == (1, tiny_package.schema.num_classes, 3, 3)
