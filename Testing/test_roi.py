"""``--roi``: the box around the spine from a scout of the middle slices, the prediction inside it only,
background outside, and the cases where the whole plane is kept."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from LumbarSegmentLib.inference import roi
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
from LumbarSegmentLib.core.schema import load_schema

STARTER_SCHEMA = load_schema("starter")

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "VB2_06_image.mha"


class BrightIsBone:
    """A stand-in network: 'vertebral body' wherever the input is bright, background elsewhere."""

    def __init__(self, slice_context=0):
        self.spec = SimpleNamespace(schema=STARTER_SCHEMA, patch_size=(256, 256), slice_context=slice_context,
                                    spacing=(1.0, 1.0))
        self.group = 4
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        body = (x[:, :1] > 0.5).astype(np.float32)
        out = np.zeros((x.shape[0], STARTER_SCHEMA.num_classes) + x.shape[2:], np.float32)
        out[:, STARTER_SCHEMA.channel_of()["background"]] = 1 - body[:, 0]
        out[:, STARTER_SCHEMA.channel_of()["vertebral_body"]] = body[:, 0]
        return out


def _slices(n=12, size=(300, 260), square=(100, 140, 120, 150)):
    s = np.zeros((n,) + size, np.float32)
    y0, y1, x0, x1 = square
    s[:, y0:y1, x0:x1] = 1.0
    return s


def test_a_level_seen_only_off_the_middle_slice_widens_the_box():
    """A scoliotic spine: the lowest level is bright only in the lateral slices; the spread scout sees it."""
    slices = _slices(n=20)
    slices[3:7, 220:260, 120:150] = 1.0  # lateral slices only (around 30 % of the stack)
    box = roi.find_box(BrightIsBone(), slices, SegmentOptions(), lambda: None)
    assert box is not None and box.y1 >= 260


def test_the_box_is_what_the_scout_finds_plus_the_margin_in_whole_blocks():
    runner = BrightIsBone()
    box = roi.find_box(runner, _slices(), SegmentOptions(), lambda: None)
    assert box is not None and box.plane == (300, 260)
    m = int(roi.MARGIN_MM)
    assert box.y0 <= 100 - m and box.y1 >= 140 + m and box.x0 <= 120 - m and box.x1 >= 150 + m
    assert box.y0 % roi.BLOCK == 0 and box.x0 % roi.BLOCK == 0  # on the whole plane's block grid
    assert all(n % roi.BLOCK == 0 or end == full for n, end, full in zip(box.size, (box.y1, box.x1), (300, 260)))
    assert 0 <= box.y0 < box.y1 <= 300 and 0 <= box.x0 < box.x1 <= 260
    assert len(runner.seen) == 1 and runner.seen[0][0] == len(roi.SCOUT_AT)  # only the scout slices first

    probs = np.random.default_rng(0).random((2, STARTER_SCHEMA.num_classes) + box.size).astype(np.float32)
    full = box.paste(probs, roi.background_channel(runner))
    assert full.shape == (2, STARTER_SCHEMA.num_classes, 300, 260)
    np.testing.assert_array_equal(box.cut(full), probs)
    outside = np.ones((300, 260), bool)
    outside[box.y0:box.y1, box.x0:box.x1] = False
    assert (full[:, 0][:, outside] == 1).all() and (full[:, 1:][:, :, outside] == 0).all()


@pytest.mark.parametrize("case", ["nothing found", "too few slices", "box nearly the plane"])
def test_the_whole_plane_is_kept_where_a_box_would_not_pay(case):
    slices = {"nothing found": _slices(square=(0, 0, 0, 0)), "too few slices": _slices(n=roi.MIN_SLICES - 1),
              "box nearly the plane": _slices(square=(20, 280, 20, 240))}[case]
    assert roi.find_box(BrightIsBone(), slices, SegmentOptions(), lambda: None) is None


@pytest.fixture(scope="module")
def sample_slab():
    """12 central sagittal slices of the shipped sample (381 x 381 at 1 mm), physical positions kept."""
    from conftest import central_slices

    return central_slices(SAMPLE, 12)


def test_the_shipped_model_inside_the_box_labels_what_the_whole_plane_labels(sample_slab):
    """The default model on 12 slices of the sample: the box is much smaller than the plane, nothing is
    labelled outside it, and the labels agree with the whole plane's (Dice >= 0.98 per structure)."""
    from LumbarSegmentLib.cli.main import resolve_models

    models = resolve_models(None, "fast")
    opts = dict(device="cpu", runtime="torch", precision="fp32", threads=2)
    whole = segment_volume(sample_slab, models, SegmentOptions(**opts))
    boxed = segment_volume(sample_slab, models, SegmentOptions(**opts, roi=True))
    box = boxed.report["roi"]
    assert box is not None and "roi" not in whole.report
    (y0, y1), (x0, x1) = box["rows"], box["columns"]
    assert (y1 - y0) * (x1 - x0) <= roi.MAX_AREA * box["plane"][0] * box["plane"][1]
    for value in (1, 2):
        a, b = whole.labels.array == value, boxed.labels.array == value
        assert a.sum() > 500 and 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98


def test_labelling_inside_the_box_gives_what_pasting_the_box_gives(sample_slab, monkeypatch):
    """On a 1 mm input (model plane = input plane) the steps after the network run inside the box only;
    the labels, the confidence and the report's voxel counts are those of the box pasted into the whole
    plane (background, probability 1, outside)."""
    from LumbarSegmentLib.cli.main import resolve_models
    from LumbarSegmentLib.inference import engine

    models = resolve_models(None, "fast")
    opts = SegmentOptions(device="cpu", runtime="torch", precision="fp32", threads=2, roi=True, confidence=True)
    inside = segment_volume(sample_slab, models, opts)
    prepare = engine._Prediction.prepare

    def pasting(self, models):
        prepare(self, models)
        assert self.label_box is not None  # (the path under test was taken above)
        self.label_box = None

    monkeypatch.setattr(engine._Prediction, "prepare", pasting)
    pasted = segment_volume(sample_slab, models, opts)
    np.testing.assert_array_equal(inside.labels.array, pasted.labels.array)
    np.testing.assert_allclose(inside.confidence.array, pasted.confidence.array, atol=1e-6)
    assert inside.report["voxels_per_class"] == pasted.report["voxels_per_class"]
    a, b = inside.report["uncertainty"], pasted.report["uncertainty"]
    assert a["foreground_voxels"] == b["foreground_voxels"]
    assert a["mean_entropy_foreground"] == pytest.approx(b["mean_entropy_foreground"], abs=1e-6)
