"""Test-time BatchNorm adaptation (``bn_adapt.py``; ``SegmentOptions.bn_adapt``, ``--bn-adapt``).

What must hold: the statistics are the volume's (weight 1) or the stated mix (0 < w < 1); the
model the caller holds is never changed, so one volume's statistics cannot leak into the next
volume's draft; off (0) is the engine as before; bad weights are clear errors, not tracebacks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from LumbarSegmentLib.inference.bn_adapt import MAX_ADAPT_SLICES, adapt_batchnorm, adapt_slices, batchnorm_layers
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions, segment_volume
from LumbarSegmentLib.core.volume import Volume


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2)).eval()


def _volume(seed=0, scale=1.0):
    """A sagittal-ish volume (slice axis first in x), non-constant so it is not refused."""
    rng = np.random.default_rng(seed)
    a = (rng.gamma(2.0, 40.0, size=(40, 48, 7)) * scale).astype(np.float32)
    a[10:30, 12:36, :] += 200 * scale  # a bright block, so there is structure to see
    return Volume(a, spacing=(3.0, 1.0, 1.0))


def test_adapt_slices_spread_evenly_and_keep_the_ends():
    assert adapt_slices(5) == [0, 1, 2, 3, 4]
    idx = adapt_slices(200)
    assert len(idx) == MAX_ADAPT_SLICES and idx[0] == 0 and idx[-1] == 199 and idx == sorted(set(idx))
    assert max(np.diff(idx)) - min(np.diff(idx)) <= 1


def test_weight_one_takes_the_volume_statistics_and_a_half_weight_the_midpoint():
    x = torch.randn(6, 1, 10, 10) * 2 + 3
    trained = _net()
    first = trained[0](x)  # what the first BatchNorm normalises
    want_mean, want_var = first.mean(dim=(0, 2, 3)), first.var(dim=(0, 2, 3), unbiased=True)

    full = _net()
    assert adapt_batchnorm(full, [x], 1.0) == 2
    assert torch.allclose(full[1].running_mean, want_mean, atol=1e-5)
    assert torch.allclose(full[1].running_var, want_var, rtol=1e-4)
    assert not full.training and not full[1].training and full[1].momentum == trained[1].momentum

    half = _net()
    assert adapt_batchnorm(half, [x], 0.5) == 2
    assert torch.allclose(half[1].running_mean, 0.5 * want_mean + 0.5 * trained[1].running_mean, atol=1e-5)
    assert torch.allclose(half[1].running_var, 0.5 * want_var + 0.5 * trained[1].running_var, rtol=1e-4)
    # the second layer's statistics are measured behind the first layer normalised by batch statistics
    assert not torch.allclose(full[4].running_mean, trained[4].running_mean)


def test_several_batches_average_their_statistics():
    a, b = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8) + 5
    net = _net()
    adapt_batchnorm(net, [a, b], 1.0)
    conv = _net()[0]
    want = (conv(a).mean(dim=(0, 2, 3)) + conv(b).mean(dim=(0, 2, 3))) / 2
    assert torch.allclose(net[1].running_mean, want, atol=1e-5)


def test_a_model_without_batchnorm_or_without_batches_is_left_as_trained():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)).eval()
    before = [p.clone() for p in plain.parameters()]
    assert adapt_batchnorm(plain, [torch.randn(2, 1, 8, 8)], 1.0) == 0 and batchnorm_layers(plain) == []
    assert all(torch.equal(p, q) for p, q in zip(before, plain.parameters()))
    net, ref = _net(), _net()
    assert adapt_batchnorm(net, [], 1.0) == 0
    assert torch.equal(net[1].running_mean, ref[1].running_mean)
    assert torch.equal(net[1].running_var, ref[1].running_var)


@pytest.mark.parametrize("w", [0.0, -0.1, 1.5, float("nan")])
def test_a_weight_outside_zero_to_one_is_refused(w):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        adapt_batchnorm(_net(), [torch.randn(2, 1, 4, 4)], w)
    if w != 0.0:
        with pytest.raises(EngineError, match="--bn-adapt .*: use 0 \\(off\\) to 1"):
            SegmentOptions(bn_adapt=w).validate()


def test_the_engine_adapts_a_private_copy_so_nothing_leaks_between_volumes(tiny_package):
    shared = LoadedModel.from_package(tiny_package).snapshot()  # one module for many volumes, as validation does
    before = {k: v.clone() for k, v in shared.module.state_dict().items()}
    opts = SegmentOptions(precision="fp32", bn_adapt=1.0, confidence=True)
    a, b = _volume(0), _volume(1, scale=3.0)
    segment_volume(a, [shared], opts)
    b_after_a = segment_volume(b, [shared], opts)
    b_alone = segment_volume(b, [LoadedModel.from_package(tiny_package)], opts)
    assert np.array_equal(b_after_a.labels.array, b_alone.labels.array)
    assert np.allclose(b_after_a.confidence.array, b_alone.confidence.array, atol=1e-6)
    assert all(torch.equal(v, shared.module.state_dict()[k]) for k, v in before.items())  # caller's model as it was
    assert b_alone.report["bn_adapt"] == 1.0 and b_alone.report["warnings"] == []
    off = segment_volume(b, [shared], SegmentOptions(precision="fp32", confidence=True))
    assert off.report["bn_adapt"] == 0.0
    assert not np.allclose(off.confidence.array, b_alone.confidence.array, atol=1e-4)  # it does change the draft


def test_the_segment_command_refuses_a_bad_weight_in_one_line(tmp_path, capsys):
    from LumbarSegmentLib.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["segment", str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "out.nii.gz"), "--bn-adapt", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--bn-adapt" in err and "use 0 (off) to 1" in err and "Traceback" not in err
    assert not (tmp_path / "out.nii.gz").exists()


def test_the_sweep_script_scores_each_weight_through_the_engine(tiny_package, tmp_path, capsys):
    """docs/lab/scripts/bn_adapt_sweep.py (the command behind docs/validation.md's ninth-round tables) on the
    demo case shipped in Resources/Sample: one result per weight, and the table shows both."""
    import json
    from pathlib import Path

    from conftest import load_script

    root = Path(__file__).resolve().parents[1]
    sweep = load_script(root / "docs" / "lab" / "scripts" / "bn_adapt_sweep.py", "bn_adapt_sweep")
    out = tmp_path / "sweep"
    assert sweep.main(["--model", str(tiny_package.path), "--data", str(root / "Resources" / "Sample"),
                       "--cases", "VB2_06", "--weights", "0,1", "--precision", "fp32", "--out", str(out)]) == 0
    r0, r1 = (json.loads((out / f"w{w}.json").read_text()) for w in (0, 1))
    assert r0["level_range"]["VB2"]["vertebral_body"] != r1["level_range"]["VB2"]["vertebral_body"]
    md = (out / "table.md").read_text()
    assert "| VB2 | vertebral_body | level range |" in md and "W = 0 | W = 1" in md
    with pytest.raises(SystemExit):
        sweep.main(["--model", str(tiny_package.path), "--cases", "VB2_06", "--weights", "0,3", "--out", str(out)])
    assert "use 0 (off) to 1" in capsys.readouterr().err


def test_a_cancel_stops_the_adaptation_pass_before_its_next_batch(tiny_package, monkeypatch):
    """The adaptation pass can take as long as the draft itself: a cancel must not wait for it."""
    import threading

    from LumbarSegmentLib.inference import bn_adapt
    from LumbarSegmentLib.inference.runners import Cancelled

    consumed = []
    real = bn_adapt.adapt_batchnorm

    def counting(module, batches, weight):
        def each():
            for b in batches:
                consumed.append(1)
                yield b
        return real(module, each(), weight)

    monkeypatch.setattr(bn_adapt, "adapt_batchnorm", counting)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        segment_volume(_volume(), [tiny_package], SegmentOptions(precision="fp32", bn_adapt=0.5, batch_size=1),
                       cancel=stop)
    assert consumed == []
    segment_volume(_volume(), [tiny_package], SegmentOptions(precision="fp32", bn_adapt=0.5, batch_size=1))
    assert consumed  # the spy does see the batches of a run nobody cancels
