"""ONNX Runtime as the engine's runner: same labels as PyTorch, the report says which ran, the cache is reused."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.inference import onnx_runner
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
from LumbarSegmentLib.core.volume import Volume
from conftest import graph_prefix

SAGITTAL = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])


def volume() -> Volume:
    rng = np.random.default_rng(3)
    k, j, i = np.meshgrid(np.arange(4), np.arange(48), np.arange(40), indexing="ij")
    a = 60 + 40 * np.sin(j / 6.0) * np.cos(i / 5.0) + rng.normal(0, 2, j.shape)
    return Volume(a.astype(np.float32), spacing=(1.0, 1.0, 3.0), direction=SAGITTAL)


def test_onnx_runtime_gives_the_torch_labels_and_reuses_its_cache(tiny_package, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the optional ONNX Runtime is not installed")
    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    onnx_runner.clear_sessions()
    opts = dict(device="cpu", precision="fp32", threads=1, mode="tta", confidence=True)
    ref = segment_volume(volume(), [tiny_package], SegmentOptions(runtime="torch", **opts))
    first = segment_volume(volume(), [tiny_package], SegmentOptions(runtime="onnx", **opts))
    assert ref.report["runtime"].startswith("torch") and first.report["runtime"].startswith("onnxruntime")
    assert first.report["models"][0]["runtime"] == "onnx" and first.report["timings_s"]["onnx_export"] > 0
    np.testing.assert_array_equal(first.labels.array, ref.labels.array)
    np.testing.assert_allclose(first.confidence.array, ref.confidence.array, atol=1e-4)
    cached = list((tmp_path / "cache" / "onnx").glob(f"{graph_prefix(tiny_package)}-*.onnx"))
    assert len(cached) == 1
    onnx_runner.clear_sessions()  # a new process: the graph comes from the cache, no export
    again = segment_volume(volume(), [tiny_package], SegmentOptions(runtime="onnx", **opts))
    assert "onnx_export" not in again.report["timings_s"]
    np.testing.assert_array_equal(again.labels.array, ref.labels.array)


def test_auto_keeps_torch_and_onnx_refuses_what_it_cannot_run(tiny_package, monkeypatch):
    res = segment_volume(volume(), [tiny_package], SegmentOptions(device="cpu", threads=1))
    assert res.report["runtime"].startswith("torch") and res.report["models"][0]["runtime"] == "torch"
    with pytest.raises(EngineError, match="unknown runtime"):
        SegmentOptions(runtime="tensorrt").validate()
    monkeypatch.setattr(onnx_runner, "onnxruntime_available", lambda: True)
    with pytest.raises(EngineError, match="--bn-adapt"):
        onnx_runner.choose_runtime("onnx", "cpu", None, "x", 0.5)
    with pytest.raises(EngineError, match="float32"):
        onnx_runner.choose_runtime("onnx", "cpu", "bf16", "x", 0.0)
    with pytest.raises(EngineError, match="--device cpu"):
        onnx_runner.choose_runtime("onnx", "cuda", None, "x", 0.0)
    monkeypatch.setattr(onnx_runner, "onnxruntime_available", lambda: False)
    with pytest.raises(EngineError, match="pip install onnxruntime"):
        segment_volume(volume(), [tiny_package], SegmentOptions(device="cpu", runtime="onnx"))


def test_cli_takes_runtime():
    from LumbarSegmentLib.cli.main import build_parser

    args = build_parser().parse_args(["segment", "in.nii.gz", "-o", "o.nii.gz", "--runtime", "onnx"])
    assert args.runtime == "onnx"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "in.nii.gz", "-o", "o.nii.gz", "--runtime", "tvm"])
