"""The prediction path without PyTorch: ``--runtime openvino`` on a package whose converted graph is
cached never imports PyTorch, gives PyTorch's labels, and its NumPy arithmetic matches the tensors'."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.inference import onnx_runner
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "Sample" / "VB2_06_image.mha"

# Runs the command line in a fresh interpreter, then says whether PyTorch was ever imported.
_WRAPPER = """
import json, sys
from LumbarSegmentLib.cli.main import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}))
"""


def _openvino():
    pytest.importorskip("openvino", reason="the optional OpenVINO runtime is not installed (pip install openvino)")
    pytest.importorskip("onnx", reason="PyTorch's ONNX exporter needs the onnx package (pip install onnx)")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Eight central slices of the shipped sample (the whole case is slower than this test needs)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(SAMPLE))
    k0 = img.GetSize()[0] // 2 - 4
    path = tmp_path_factory.mktemp("sample") / "sample8.mha"
    sitk.WriteImage(img[k0:k0 + 8, :, :], str(path), True)
    return path


@pytest.fixture()
def default_package(tmp_path, monkeypatch):
    from LumbarSegmentLib.registry.catalog import resolve_model

    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))  # the shipped registry only
    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    return resolve_model(None)


def _labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_openvino_command_runs_without_torch_and_gives_torch_labels(sample, default_package, tmp_path):
    """First run in this process fills the cache (PyTorch imported for the export only); a fresh
    ``lumbarseg segment --runtime openvino`` then never imports PyTorch, and its label map is the one
    PyTorch fp32 gives."""
    _openvino()
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.inference import openvino_runner

    openvino_runner.clear_compiled()
    volume = read_volume(sample)
    cold = segment_volume(volume, [default_package], SegmentOptions(runtime="openvino", precision="fp32", threads=2))
    assert cold.report["timings_s"]["onnx_export"] > 0  # the cache was empty: exported through PyTorch
    assert cold.report["torch"] is None and cold.report["runtime"].startswith("openvino")
    ref = segment_volume(volume, [default_package], SegmentOptions(runtime="torch", precision="fp32", device="cpu"))
    out, report = tmp_path / "ov.nii.gz", tmp_path / "ov.json"
    argv = ["segment", str(sample), "-o", str(out), "--model", str(default_package.path), "--runtime", "openvino",
            "--precision", "fp32", "--threads", "2", "--no-progress", "--report", str(report)]
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"rc": 0, "torch": False}, proc.stderr
    rep = json.loads(report.read_text())
    assert rep["runtime"].startswith("openvino") and rep["models"][0]["runtime"] == "openvino"
    assert rep["torch"] is None and rep["precision"] == "float32" and "onnx_export" not in rep["timings_s"]
    labels = _labels(out)
    np.testing.assert_array_equal(labels, cold.labels.array)  # warm and cold cache: one result
    differing = int((labels != ref.labels.array).sum())
    assert differing == 0, f"{differing} voxels differ from PyTorch fp32"


def test_numpy_and_tensor_paths_agree_with_the_same_network(tiny_package, small_real_volume, tmp_path, monkeypatch):
    """The same OpenVINO network around NumPy arrays (a package: no PyTorch) and around tensors (a model
    in memory: the PyTorch path), with sliding windows, Gaussian blending, flips and the confidence map."""
    _openvino()
    from LumbarSegmentLib.inference.runners import LoadedModel

    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    opts = SegmentOptions(runtime="openvino", device="cpu", precision="fp32", threads=1, mode="tta", tile=64,
                          overlap=0.5, confidence=True)
    host = segment_volume(small_real_volume, [tiny_package], opts)
    tensors = segment_volume(small_real_volume, [LoadedModel.from_package(tiny_package)], opts)
    assert host.report["torch"] is None and tensors.report["torch"] is not None
    np.testing.assert_array_equal(host.labels.array, tensors.labels.array)
    np.testing.assert_allclose(host.confidence.array, tensors.confidence.array, atol=1e-5)
    ent = [r.report["uncertainty"]["mean_entropy_foreground"] for r in (host, tensors)]
    assert ent[0] == pytest.approx(ent[1], rel=1e-4)


def test_array_operations_agree_between_numpy_and_torch():
    torch = pytest.importorskip("torch")
    from LumbarSegmentLib.core.geometry import resize_planes
    from LumbarSegmentLib.inference.arrays import NUMPY, TORCH
    from LumbarSegmentLib.inference.slice_smoothing import SliceSmoother, neighbour_stack
    from LumbarSegmentLib.inference.windows import gaussian_weight

    rng = np.random.default_rng(0)
    x = rng.random((7, 3, 45, 61), dtype=np.float32)
    t = torch.from_numpy(x.copy())
    for size in ((90, 100), (20, 33), (45, 61)):
        np.testing.assert_allclose(resize_planes(x, size, mode="bilinear"),
                                   resize_planes(t, size, mode="bilinear").numpy(), atol=2e-6)
    lab = rng.integers(0, 4, (3, 45, 61))
    np.testing.assert_array_equal(resize_planes(lab, (90, 30), mode="nearest"),
                                  resize_planes(torch.from_numpy(lab), (90, 30), mode="nearest").numpy())
    np.testing.assert_allclose(gaussian_weight(40, 24, xp=NUMPY), gaussian_weight(40, 24, xp=TORCH).numpy(), atol=1e-6)
    np.testing.assert_array_equal(neighbour_stack(x[:, 0], 1, 6, 2), neighbour_stack(t[:, 0], 1, 6, 2).numpy())
    tie = np.zeros((1, 3, 2, 2), np.float32)  # all channels equal: the first wins, as in PyTorch
    tie[0, 2, 1, 1] = 1
    for a, b in zip(NUMPY.channel_max(tie), TORCH.channel_max(torch.from_numpy(tie))):
        np.testing.assert_array_equal(a, b)
    smooth = [SliceSmoother(7, 1.5, 4.0, chunk=3), SliceSmoother(7, 1.5, 4.0, chunk=3)]
    for c0 in range(0, 7, 3):
        got = [[(s0, np.asarray(b)) for s0, b in sm.push(chunk)]
               for sm, chunk in zip(smooth, (x[c0:c0 + 3], t[c0:c0 + 3].clone()))]
        assert [s0 for s0, _ in got[0]] == [s0 for s0, _ in got[1]]
        for (_, a), (_, b) in zip(*got):
            np.testing.assert_allclose(a, b, atol=2e-6)


def test_missing_openvino_is_one_clear_line(sample, default_package, tmp_path, monkeypatch, capsys):
    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import read_volume

    monkeypatch.setattr(onnx_runner, "openvino_available", lambda: False)
    with pytest.raises(EngineError, match="pip install openvino"):
        segment_volume(read_volume(sample), [default_package], SegmentOptions(runtime="openvino"))
    rc = main(["segment", str(sample), "-o", str(tmp_path / "o.nii.gz"), "--model", str(default_package.path),
               "--runtime", "openvino", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("lumbarseg: error: runtime 'openvino' needs OpenVINO") and "pip install openvino" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_blank_image_is_refused_in_one_line_without_torch(default_package, tmp_path):
    _openvino()
    import SimpleITK as sitk

    blank = tmp_path / "blank.mha"
    img = sitk.Image([12, 200, 200], sitk.sitkInt16)
    img.SetSpacing((3.0, 1.0, 1.0))
    sitk.WriteImage(img, str(blank))
    argv = ["segment", str(blank), "-o", str(tmp_path / "o.nii.gz"), "--model", str(default_package.path),
            "--runtime", "openvino", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 1, "torch": False}
    err = proc.stderr.strip()
    assert err.startswith("lumbarseg: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
