"""``--precision int8``: OpenVINO runs a copy of the network quantised after training (NNCF), calibrated on
the shipped replay slices, cached per plane size; asked for explicitly, never a silent default."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.inference import onnx_runner
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "VB2_06_image.mha"


def _needs_int8_tools():
    for name in ("openvino", "onnx", "nncf"):
        pytest.importorskip(name, reason=f"--precision int8 needs {name} (pip install openvino onnx nncf)")


@pytest.fixture(scope="module")
def sample_cut():
    """Four central slices of the shipped sample, cut in-plane to 160 x 160 (small windows: a quick
    calibration), physical positions kept."""
    from LumbarSegmentLib.formats.io import read_volume

    v = read_volume(str(SAMPLE))
    k, j, i = v.array.shape
    i0, j0, k0 = i // 2 - 2, j // 2 - 80, k // 2 - 80
    origin = (np.asarray(v.origin) + v.direction[:, 0] * v.spacing[0] * i0 + v.direction[:, 1] * v.spacing[1] * j0
              + v.direction[:, 2] * v.spacing[2] * k0)
    return Volume(v.array[k0:k0 + 160, j0:j0 + 160, i0:i0 + 4].copy(), spacing=v.spacing, origin=origin,
                  direction=v.direction)


def _opts(precision, runtime="openvino"):
    return SegmentOptions(device="cpu", runtime=runtime, precision=precision, threads=1)


def test_int8_is_openvinos_and_the_command_says_so(tiny_package, sample_cut, tmp_path, capsys):
    """int8 with PyTorch or ONNX Runtime is refused before any work, in one line that says what to use
    instead; nothing is written. (With ``--runtime auto`` OpenVINO computes it: the next test.)"""
    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import write_volume

    for runtime in ("torch", "onnx"):
        with pytest.raises(EngineError, match="use --runtime openvino"):
            segment_volume(sample_cut, [tiny_package], SegmentOptions(device="cpu", runtime=runtime,
                                                                      precision="int8", threads=1))
    for fields, says in (({"bn_adapt": 0.5}, "drop one of the two"), ({"device": "cuda"}, "runs on the CPU")):
        from LumbarSegmentLib.inference.onnx_runner import choose_runtime

        with pytest.raises(EngineError, match=says):  # the advice never points to a runtime without int8
            choose_runtime("auto", fields.get("device", "cpu"), "int8", None, fields.get("bn_adapt", 0))
        if "bn_adapt" in fields:
            with pytest.raises(EngineError, match=says):
                segment_volume(sample_cut, [tiny_package], SegmentOptions(device="cpu", precision="int8",
                                                                          threads=1, **fields))
    src = write_volume(sample_cut, tmp_path / "in.nrrd")
    out = tmp_path / "o.nii.gz"
    rc = main(["segment", str(src), "-o", str(out), "--model", str(tiny_package.path), "--precision", "int8",
               "--runtime", "torch", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--runtime openvino" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_int8_drafts_close_to_fp32_cached_and_reused_without_nncf(tiny_package, sample_cut, tmp_path,
                                                                   monkeypatch):
    """The first int8 run quantises and caches the network; a later process reads the cached int8 graph
    without NNCF (the same labels); the labels stay close to float32's and the report says int8."""
    _needs_int8_tools()
    from LumbarSegmentLib.inference import openvino_runner

    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    openvino_runner.clear_compiled()
    first = segment_volume(sample_cut, [tiny_package], _opts("int8"))
    assert first.report["precision"] == "int8" and first.report["runtime"].startswith("openvino")
    cached = sorted(p.name for p in openvino_runner.ir_dir().glob("*-int8-*.xml"))
    assert len(cached) == 1
    ref = segment_volume(sample_cut, [tiny_package], _opts("fp32"))
    assert ref.report["precision"] == "float32"
    # (a tiny untrained network has many near-ties; the shipped models agree far more: docs/benchmarks.md)
    assert np.mean(first.labels.array == ref.labels.array) > 0.9

    openvino_runner.clear_compiled()
    monkeypatch.setitem(sys.modules, "nncf", None)  # a later process without NNCF: the cache serves it
    again = segment_volume(sample_cut, [tiny_package], _opts("int8", runtime="auto"))  # auto: OpenVINO's int8
    np.testing.assert_array_equal(again.labels.array, first.labels.array)
    assert again.report["runtime"].startswith("openvino") and again.report["torch"] is None


def test_int8_without_nncf_and_no_cached_graph_is_a_clear_error(tiny_package, sample_cut, tmp_path, monkeypatch):
    for name in ("openvino", "onnx"):
        pytest.importorskip(name)
    from LumbarSegmentLib.inference import openvino_runner

    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "empty-cache"))
    openvino_runner.clear_compiled()
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(EngineError, match="pip install nncf"):
        segment_volume(sample_cut, [tiny_package], _opts("int8"))
    assert not list(openvino_runner.ir_dir().glob("*-int8-*"))  # nothing half-made in the cache


def test_calibration_windows_are_preprocessed_shipped_slices():
    """Windows of the asked shape, from every shipped replay image, normalised like the engine's input
    (mostly zero-mean, unit-variance tissue); a 2.5D model's neighbours and a guided model's empty click
    channels are there."""
    from LumbarSegmentLib.inference.int8 import calibration_images, calibration_tag, calibration_windows

    class Spec:
        spacing, normalisation, slice_context = (1.0, 1.0), "zscore_nonzero", 1

    images = calibration_images()
    assert len(images) >= 10
    windows = calibration_windows(Spec, (4, 128, 96))
    assert len(windows) >= len(images)
    for w in windows:
        assert w.shape == (1, 4, 128, 96) and w.dtype == np.float32 and np.isfinite(w).all()
        assert not w[0, 3].any()  # the click channel stays empty, as in a draft
    tissue = np.concatenate([w[0, :3][w[0, :3] != 0] for w in windows])
    assert abs(float(tissue.mean())) < 0.5 and 0.5 < float(tissue.std()) < 2.0
    assert len(calibration_tag()) == 12
