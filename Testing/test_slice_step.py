"""``--slice-step N``: the network on every Nth thin slice, the slices between blended from the computed ones
around them (computed after all where those disagree); whole stacks kept where the step does not apply."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.inference import slice_step
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
from LumbarSegmentLib.inference.options import OptionError
from LumbarSegmentLib.inference.slice_step import SliceStepper, step_applies

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "VB2_06_image.mha"


class Ramp:
    """Stand-in probabilities: 2 channels (0 background), each slice's structure probability rising with its
    index (so a blend is checkable), a structure square that grows from slice ``grow_at`` on."""

    def __init__(self, n, grow_at=None):
        self.n, self.grow_at, self.asked = n, grow_at, []

    def truth(self, s):
        p = np.zeros((2, 8, 8), np.float32)
        fg = np.zeros((8, 8), np.float32)
        fg[2:5, 2:5] = 0.6 + 0.01 * s
        if self.grow_at is not None and s >= self.grow_at:
            fg[:, :] = 0.9  # the structure fills the plane: a disagreement with the slices before
        p[1], p[0] = fg, 1 - fg
        return p

    def __call__(self, idx):
        self.asked += list(idx)
        return np.stack([self.truth(s) for s in idx])


def _run(stepper, n, chunk):
    return np.concatenate([stepper.chunk(c0, min(n, c0 + chunk)) for c0 in range(0, n, chunk)])


@pytest.mark.parametrize("chunk", [16, 5, 3])
def test_anchors_are_computed_and_the_slices_between_blended_whatever_the_chunks(chunk):
    n = 21
    net = Ramp(n)
    stepper = SliceStepper(n, 3, net, background=0)
    out = _run(stepper, n, chunk)
    assert sorted(net.asked) == [0, 3, 6, 9, 12, 15, 18, 20]  # every 3rd slice and the last, each once
    assert stepper.report() == {"step": 3, "computed_slices": 8, "redone_slices": 0, "blended_slices": 13}
    assert stepper.anchor_count() == 8 and SliceStepper(22, 3, net, background=0).anchor_count() == 8
    for s in range(n):  # the ramp is linear in the slice index: the blend gives it back exactly
        np.testing.assert_allclose(out[s], net.truth(s), atol=1e-6)


def test_slices_between_anchors_that_disagree_are_computed_after_all():
    n = 12
    net = Ramp(n, grow_at=5)
    stepper = SliceStepper(n, 2, net, background=0, pixel_mm2=4.0)  # the plane: 64 pixels of 4 mm2
    out = _run(stepper, n, 4)
    assert 5 in net.asked and 3 not in net.asked  # anchors 4 and 6 disagree; 2 and 4 do not
    assert stepper.report()["redone_slices"] == 1
    np.testing.assert_allclose(out[5], net.truth(5), atol=1e-6)
    assert out[5][1].min() == pytest.approx(0.9)
    small = SliceStepper(n, 2, Ramp(n, grow_at=5), background=0, pixel_mm2=1.0)  # the same change on 64 mm2:
    _run(small, n, 4)
    assert small.report()["redone_slices"] == 0  # under the smallest area worth a redo


def test_the_step_applies_to_thin_stacks_only():
    assert step_applies(2, 77, 1.0) and step_applies(2, 13, 0.9)
    assert not step_applies(1, 77, 1.0)  # every slice asked for
    assert not step_applies(2, 15, 4.0)  # a clinical 4 mm stack: its neighbours are too far apart
    assert not step_applies(2, slice_step.MIN_SLICES - 1, 1.0)
    assert not step_applies(2, 1, 1.0)  # a single slice


def test_the_option_refuses_what_the_contract_does_not_allow():
    for bad in (0, 5, 2.5, "two", True):
        with pytest.raises(OptionError, match="--slice-step"):
            SegmentOptions(slice_step=bad).validate()
    assert SegmentOptions(slice_step=3).to_argv() == ["--slice-step", "3"]


@pytest.fixture(scope="module")
def sample_slab():
    """16 central sagittal slices of the shipped sample (1 mm), physical positions kept."""
    from conftest import central_slices

    return central_slices(SAMPLE, 16)


def test_the_shipped_model_every_second_slice_labels_what_every_slice_labels(sample_slab):
    """The default model on 16 slices of the 1 mm sample: half the slices (or a few more) go through the
    network, the labels agree with every slice's (Dice >= 0.98 per structure), and the report says so."""
    from LumbarSegmentLib.cli.main import resolve_models

    models = resolve_models(None, "fast")
    opts = dict(device="cpu", runtime="torch", precision="fp32", threads=2)
    every = segment_volume(sample_slab, models, SegmentOptions(**opts))
    stepped = segment_volume(sample_slab, models, SegmentOptions(**opts, slice_step=2))
    rep = stepped.report["slice_step"]
    assert "slice_step" not in every.report
    assert rep["step"] == 2 and 9 <= rep["computed_slices"] < 16
    assert rep["computed_slices"] + rep["blended_slices"] == 16
    for value in (1, 2):
        a, b = every.labels.array == value, stepped.labels.array == value
        assert a.sum() > 500 and 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98


def test_a_thick_stack_is_computed_slice_by_slice_and_the_report_says_why(sample_slab):
    from LumbarSegmentLib.cli.main import resolve_models

    thick = Volume(sample_slab.array, spacing=(4.0,) + tuple(sample_slab.spacing[1:]), origin=sample_slab.origin,
                   direction=sample_slab.direction)
    opts = dict(device="cpu", runtime="torch", precision="fp32", threads=2)
    res = segment_volume(thick, resolve_models(None, "fast"), SegmentOptions(**opts, slice_step=2))
    assert res.report["slice_step"]["step"] == 1 and "1.5 mm" in res.report["slice_step"]["why"]
