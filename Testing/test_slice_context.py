"""2.5D models: the network reads each slice between its neighbours.

What must hold: the engine feeds the neighbours in slice order (edge slice beyond the ends), the
training sampler builds the same input (thick-slab patches: neighbours one slab apart), a one-slice
model widened for a fine-tune starts out giving exactly its old answer, and packages say how many
slices their network reads (a manifest that disagrees with its architecture is refused).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions, segment_volume
from LumbarSegmentLib.registry.manifest import ManifestError, validate_manifest
from LumbarSegmentLib.models import VARIANTS, build_model, widen_input
from LumbarSegmentLib.registry.package import MODEL_FORMAT, MODEL_FORMAT_VERSION, default_input_contract, write_package
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.inference.slice_smoothing import neighbour_stack
from LumbarSegmentLib.training.config import TrainConfig
from LumbarSegmentLib.training.data import CaseSlices, PatchSampler, ThickSlabs, annotated_mask
from LumbarSegmentLib.training.finetune import finetune
from LumbarSegmentLib.training.run_outputs import CachedSlices
from LumbarSegmentLib.core.volume import Volume

torch.set_num_threads(1)
STARTER = load_schema("starter")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_widened_model_answers_as_before_whatever_the_neighbours(variant):
    torch.manual_seed(0)
    m = build_model(variant, num_classes=3, init_filters=4).eval()
    wide = widen_input(copy.deepcopy(m), 5)
    assert wide.in_channels == 5 and wide.builder_args["in_channels"] == 5
    x = torch.randn(2, 1, 64, 64)
    sides = torch.randn(2, 2, 64, 64) * 3
    with torch.no_grad():
        before = m(x)
        after = wide(torch.cat([sides[:, :1], sides[:, 1:], x, -sides[:, 1:], sides[:, :1] * 2], 1))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        widen_input(copy.deepcopy(m), 2)
    with pytest.raises(ValueError):
        widen_input(wide, 3)  # never narrower


def test_neighbour_stack_is_in_slice_order_with_the_edge_standing_in():
    s = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 2, 2).clone()
    got = neighbour_stack(s, 0, 6, 2)[:, :, 0, 0]
    want = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 5],
                         [2, 3, 4, 5, 5], [3, 4, 5, 5, 5]], dtype=torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(neighbour_stack(s, 2, 4, 1)[:, :, 0, 0], want[2:4, 1:4])
    one = neighbour_stack(s, 1, 3, 0)
    assert one.shape == (2, 1, 2, 2) and one.data_ptr() == s[1].data_ptr()  # a view: nothing copied


def _ramp_case(n=9, size=40):
    """Slice i is a constant image of value i (so a crop says which slice, or which mean, it came from)."""
    img = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, size, size).clone()
    lab = torch.zeros(n, size, size, dtype=torch.uint8)
    lab[:, 15:25, 15:25] = 1
    return CaseSlices("A_0", "A_0", img, lab, annotated_mask(("vertebral_body",), STARTER), ("vertebral_body",),
                      fg_slices=list(range(n)), source="A")


def test_sampler_feeds_the_neighbours_and_thick_slabs_one_slab_apart():
    c = _ramp_case()
    plain = PatchSampler([c], 16, fg_fraction=1.0, jitter=0.0, slice_context=1)
    img, lab, _ = plain.sample(32, torch.Generator().manual_seed(0))
    assert img.shape == (32, 3, 32, 32) and lab.shape == (32, 32, 32)
    mid = img[:, :, 16, 16]  # inside the case: one value per channel
    centre = mid[:, 1]
    assert torch.equal(mid[:, 0], (centre - 1).clamp(min=0)) and torch.equal(mid[:, 2], (centre + 1).clamp(max=8))
    assert {0.0, 8.0} <= set(centre.tolist())  # the edge slices are drawn, and stand in for themselves

    thick = PatchSampler([_ramp_case(20)], 16, fg_fraction=1.0, jitter=0.0, slice_context=1,
                         slabs=ThickSlabs(1.0, 3))
    img, _, _ = thick.sample(64, torch.Generator().manual_seed(1))
    mid = img[:, :, 16, 16]
    inner = (mid[:, 1] >= 6) & (mid[:, 1] <= 13)  # far enough from the ends for whole neighbour slabs
    gaps = (mid[inner, 1:] - mid[inner, :-1])
    assert inner.sum() > 10 and torch.all((gaps == 2) | (gaps == 3))  # a slab of w slices: neighbours w apart
    assert torch.all(gaps[:, 0] == gaps[:, 1])


def test_sampler_without_context_draws_what_it_drew_before():
    """slice_context 0 keeps the one-channel input and the random stream of earlier runs (resume)."""
    c = _ramp_case()
    a, _, _ = PatchSampler([c], 16, slabs=ThickSlabs(0.5)).sample(16, torch.Generator().manual_seed(4))
    b, _, _ = PatchSampler([c], 16, slabs=ThickSlabs(0.5), slice_context=0).sample(16, torch.Generator().manual_seed(4))
    assert a.shape == (16, 1, 32, 32) and torch.equal(a, b)


def _package(folder, model, context):
    return write_package(folder, model, name="ctx-tiny", schema=STARTER,
                         input_contract=default_input_contract(slice_context=context))


def test_the_engine_feeds_each_slice_its_neighbours_in_order(tmp_path):
    """A 2.5D model made to look only at its first channel labels slice s as the one-slice model labels the
    slice before it: the neighbours reach the network, in order, one slice apart."""
    torch.manual_seed(0)
    one = build_model("UVD", num_classes=3, init_filters=4).eval()
    prev = widen_input(copy.deepcopy(one), 3)
    with torch.no_grad():
        for mod in prev.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.in_channels == 3:
                mod.weight[:, 0] = mod.weight[:, 1]
                mod.weight[:, 1] = 0
    rng = np.random.default_rng(0)
    arr = rng.normal(1.0, 0.3, (48, 48, 7)).astype(np.float32)  # (z, y, x): 7 sagittal slices of 3 mm
    arr[10:30, 15:30] += np.linspace(0, 2, 7, dtype=np.float32)  # slices differ, so a shift shows
    vol = Volume(arr, spacing=(3.0, 1.0, 1.0))
    opts = SegmentOptions(precision="fp32", slice_smoothing_mm=0, confidence=True, device="cpu")
    r1 = segment_volume(vol, [_package(tmp_path / "one", one, 0)], opts)
    r3 = segment_volume(vol, [_package(tmp_path / "prev", prev, 1)], opts)
    c1, c3 = r1.confidence.array, r3.confidence.array
    assert not np.allclose(c1, c3)
    before, after = np.allclose(c3[..., 1:], c1[..., :-1], atol=1e-5), np.allclose(c3[..., :-1], c1[..., 1:],
                                                                                   atol=1e-5)
    assert before != after  # one of the two neighbours, never both
    edge = 0 if before else -1  # the first slice has no neighbour before it: itself stands in
    np.testing.assert_allclose(c3[..., edge], c1[..., edge], atol=1e-5)


def test_manifest_must_agree_on_how_many_slices_the_network_reads():
    def m(inp, in_channels):
        return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "name": "x", "version": 1,
                "architecture": {"variant": "UVD", "in_channels": in_channels}, "schema": {},
                "input": {"spacing_mm": [1, 1], **inp}, "weights": {"file": "w", "sha256": "0" * 64}}

    ok = dict(where="m", newest_format=MODEL_FORMAT_VERSION, model_format=MODEL_FORMAT)
    validate_manifest(m({"channels": 3, "slice_context": 1}, 3), **ok)
    validate_manifest(m({"channels": 1}, 1), **ok)
    for inp, ch, msg in [({"channels": 3}, 3, "must be the number 1"),
                         ({"channels": 3, "slice_context": 1}, 1, "in_channels"),
                         ({"channels": 5, "slice_context": 1}, 5, "must be the number 3"),
                         ({"channels": 3, "slice_context": True}, 3, "slice_context"),
                         ({"channels": 19, "slice_context": 9}, 19, "slice_context")]:
        with pytest.raises(ManifestError, match=msg):
            validate_manifest(m(inp, ch), **ok)


def _synth_cases(n_cases=2, size=40, slices=5):
    gen = torch.Generator().manual_seed(0)
    out = []
    for c in range(n_cases):
        img = torch.randn(slices, size, size, generator=gen) * 0.2
        lab = torch.zeros(slices, size, size, dtype=torch.uint8)
        lab[:, 10:20, 10:20], lab[:, 25:32, 25:32] = 1, 2
        img[lab == 1] += 1.5
        img[lab == 2] += 3.0
        out.append(CaseSlices(f"S_{c}", f"S_{c}", img, lab, annotated_mask(("vertebral_body", "intervertebral_disc"),
                                                                           STARTER),
                              ("vertebral_body", "intervertebral_disc"), fg_slices=list(range(slices)), source="S"))
    return out


TINY = dict(variant="UD", init_filters=4, epochs=1, steps_per_epoch=2, batch_size=2, patch=32, precision="fp32",
            log_every=1, progress_bar=False, warmup_steps=1, patience=0)


def test_finetune_widens_a_one_slice_parent_and_the_package_reads_three(tmp_path):
    torch.manual_seed(0)
    parent = write_package(tmp_path / "parent", build_model("UD", num_classes=3, init_filters=4).eval(),
                           name="parent", schema=STARTER)
    r = finetune(parent, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY, slice_context=1),
                 slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    pkg = r.package
    assert pkg.manifest["input"]["channels"] == 3 and pkg.manifest["input"]["slice_context"] == 1
    assert pkg.manifest["architecture"]["in_channels"] == 3
    assert pkg.manifest["training"]["init_from"]["slice_context"] == {"parent": 0, "run": 1}
    lm = LoadedModel.from_package(pkg)
    assert (lm.channels, lm.slice_context) == (3, 1)
    vol = Volume(np.random.default_rng(1).normal(1, 0.3, (40, 40, 5)).astype(np.float32), spacing=(3.0, 1.0, 1.0))
    res = segment_volume(vol, [pkg], SegmentOptions(device="cpu"))
    assert res.labels.same_geometry(vol)
    # its own fine-tune keeps three slices without being told; asking for fewer is refused before any file
    again = finetune(pkg, [], [], out_dir=tmp_path / "ft2", config=TrainConfig(**TINY),
                     slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert again.package.manifest["input"]["slice_context"] == 1
    wide = finetune(pkg, [], [], out_dir=tmp_path / "ft3", config=TrainConfig(**TINY, slice_context=2),
                    slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert wide.package.manifest["input"]["channels"] == 5


def test_a_fine_tune_cannot_drop_neighbours(tmp_path):
    torch.manual_seed(0)
    m = widen_input(build_model("UD", num_classes=3, init_filters=4).eval(), 5)
    pkg = _package(tmp_path / "five", m, 2)
    with pytest.raises(ValueError, match="cannot drop"):
        finetune(pkg, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY, slice_context=1),
                 slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert not (tmp_path / "ft").exists()


def test_training_a_2p5d_model_from_scratch(tmp_path):
    from LumbarSegmentLib.training.trainer import train

    r = train(TrainConfig(**TINY, slice_context=1), [], [], out_dir=tmp_path / "run",
              slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert r.package.manifest["input"]["channels"] == 3
    for bad in (-1, 5, True, 1.0):
        with pytest.raises(ValueError, match="slice_context"):
            TrainConfig(**TINY, slice_context=bad)


def test_per_epoch_checks_of_a_2p5d_model_see_every_slice():
    """A strided check would hand a 2.5D model neighbours n slices away: it scores every slice instead,
    so the check a run keeps its best epoch by is the model as users run it (one-slice models: strided)."""
    from LumbarSegmentLib.training.evaluate import eval_case_from_slices
    from LumbarSegmentLib.training.trainer import validate

    cases = [eval_case_from_slices(c) for c in _synth_cases(1, slices=9)]
    torch.manual_seed(0)
    one = build_model("UD", num_classes=3, init_filters=4).eval()
    three = widen_input(copy.deepcopy(one), 3)
    runs = {name: [validate(m, cases, STARTER, (1.0, 1.0), 32, stride=s, precision="fp32").results()
                   for s in (1, 4)] for name, m in (("one", one), ("three", three))}
    assert runs["three"][0] == runs["three"][1]
    assert runs["one"][0] != runs["one"][1]


def test_every_slice_smoothing_option_refuses_a_bad_sigma_as_a_usage_error(capsys):
    """``lumbarseg-train evaluate`` and the report scripts take the same ``--slice-smoothing`` as
    ``lumbarseg segment``: a sigma outside 0-50 mm is a usage error up front, not an engine traceback."""
    from pathlib import Path

    from LumbarSegmentLib.training.cli import main as train_main
    from conftest import load_script

    report = load_script(Path(__file__).resolve().parents[1] / "scripts" / "validation_report.py", "vr_smoothing")
    for run, argv in ((train_main, ["evaluate", "--model", "m", "--data", "d", "--slice-smoothing", "-1"]),
                      (report.main, ["--models", "m", "--which", "val", "--out", "o", "--slice-smoothing", "-1"])):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2 and "use 0 (off) to 50 mm" in capsys.readouterr().err
