"""OpenVINO as the engine's runner: the torch labels on a real volume, float32 kept, the caches reused."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.inference import onnx_runner
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
from conftest import graph_prefix

OPTS = dict(device="cpu", precision="fp32", threads=1, mode="tta", confidence=True)


def _openvino():
    pytest.importorskip("openvino", reason="the optional OpenVINO runtime is not installed (pip install openvino)")
    pytest.importorskip("onnx", reason="PyTorch's ONNX exporter needs the onnx package (pip install onnx)")
    from LumbarSegmentLib.inference import openvino_runner

    return openvino_runner


def test_openvino_gives_the_torch_labels_and_reuses_its_cache(tiny_package, small_real_volume, tmp_path,
                                                             monkeypatch):
    ov_runner = _openvino()
    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    ov_runner.clear_compiled()
    ref = segment_volume(small_real_volume, [tiny_package], SegmentOptions(runtime="torch", **OPTS))
    first = segment_volume(small_real_volume, [tiny_package], SegmentOptions(runtime="openvino", **OPTS))
    assert first.report["runtime"].startswith("openvino") and first.report["models"][0]["runtime"] == "openvino"
    assert first.report["precision"] == "float32" and first.report["timings_s"]["onnx_export"] > 0
    np.testing.assert_array_equal(first.labels.array, ref.labels.array)
    np.testing.assert_allclose(first.confidence.array, ref.confidence.array, atol=1e-4)
    converted = list((tmp_path / "cache" / "openvino").glob(f"{graph_prefix(tiny_package)}-*.xml"))
    assert len(converted) == 1 and converted[0].with_suffix(".bin").is_file()
    ov_runner.clear_compiled()  # as in a new process: the converted model comes from the cache, no export
    again = segment_volume(small_real_volume, [tiny_package], SegmentOptions(runtime="openvino", **OPTS))
    assert "onnx_export" not in again.report["timings_s"]
    np.testing.assert_array_equal(again.labels.array, ref.labels.array)


def test_openvino_is_asked_for_float32_and_refuses_what_it_cannot_run(monkeypatch):
    ov_runner = _openvino()
    cfg = ov_runner.compile_config(2)
    assert cfg["INFERENCE_PRECISION_HINT"] == "f32" and cfg["INFERENCE_NUM_THREADS"] == "2"
    monkeypatch.setattr(onnx_runner, "openvino_available", lambda: True)
    with pytest.raises(EngineError, match="float32"):
        onnx_runner.choose_runtime("openvino", "cpu", "torch.float16", "x", 0.0)
    assert onnx_runner.choose_runtime("openvino", "cpu", "bfloat16", "x", 0.0) == "openvino"  # asked for: opt-in
    with pytest.raises(EngineError, match="float32"):
        onnx_runner.choose_runtime("onnx", "cpu", "bfloat16", "x", 0.0)
    with pytest.raises(EngineError, match="--bn-adapt"):
        onnx_runner.choose_runtime("openvino", "cpu", None, "x", 0.5)
    assert onnx_runner.choose_runtime("openvino", "cpu", None, "x", 0.0) == "openvino"
    monkeypatch.setattr(onnx_runner, "openvino_available", lambda: False)
    with pytest.raises(EngineError, match="pip install openvino"):
        onnx_runner.choose_runtime("openvino", "cpu", None, "x", 0.0)


def test_cli_takes_runtime_openvino():
    from LumbarSegmentLib.cli.main import build_parser

    args = build_parser().parse_args(["segment", "in.nii.gz", "-o", "o.nii.gz", "--runtime", "openvino"])
    assert args.runtime == "openvino"
