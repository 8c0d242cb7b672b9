"""Drafts through OpenVINO without PyTorch in the warm worker, the worker's runtime per machine, and
OpenVINO's bf16 as an explicit, checked opt-in."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.cli import worker as worker_mod
from LumbarSegmentLib.inference import onnx_runner
from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
from LumbarSegmentLib.slicer.jobs import DONE
from LumbarSegmentLib.slicer.segment_job import SegmentController, SegmentRequest
from LumbarSegmentLib.slicer.worker_client import WarmWorker
from test_worker import smooth_volume


def _openvino():
    pytest.importorskip("openvino", reason="the optional OpenVINO runtime is not installed (pip install openvino)")
    pytest.importorskip("onnx", reason="PyTorch's ONNX exporter needs the onnx package (pip install onnx)")
    from LumbarSegmentLib.inference import openvino_runner

    return openvino_runner


def test_worker_drafts_through_openvino_give_the_torch_labels(tiny_package, tmp_path, monkeypatch):
    """A draft asking for OpenVINO runs without PyTorch in the worker (the report names no torch), twice
    in one process, and paints the labels PyTorch paints; a draft leaving the runtime automatic takes
    the worker's draft runtime."""
    _openvino()
    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    w = WarmWorker(preload=None, threads=1, workdir_parent=str(tmp_path), runtime="openvino")
    try:
        ctl = SegmentController(worker=w, workdir_parent=str(tmp_path))
        asked = SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1, runtime="openvino",
                                  precision="fp32")
        auto = SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1, precision="fp32")
        runs = [ctl.run(smooth_volume(shift), req, timeout=300, interval=0.02)
                for shift, req in ((0, asked), (3, asked), (3, auto))]
        assert ctl.status.state == DONE and w.starts == 1
    finally:
        w.close()
    for shift, run in zip((0, 3, 3), runs):
        ref = segment_volume(smooth_volume(shift), [tiny_package],
                             SegmentOptions(device="cpu", threads=1, runtime="torch", precision="fp32"))
        np.testing.assert_array_equal(run.labels.array, ref.labels.array)
        assert run.report["runtime"].startswith("openvino") and run.report["torch"] is None
        assert run.report["precision"] == "float32"


def test_draft_runtime_per_machine(monkeypatch):
    """auto: OpenVINO where no GPU is present and OpenVINO is installed, whether the CPU has bf16 or not
    (float32 labels on every CPU); PyTorch with a GPU or without OpenVINO; an explicit choice stays."""
    import importlib.util

    from LumbarSegmentLib.inference import openvino_runner as ov_runner  # (imports OpenVINO only when used)
    from LumbarSegmentLib.inference import runtime_choice

    real = importlib.util.find_spec
    monkeypatch.setattr(runtime_choice, "gpu_present", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("openvino", "onnx") else real(name))
    for bf16 in (False, True):
        monkeypatch.setattr(ov_runner, "cpu_has_bf16", lambda: bf16)
        assert worker_mod.draft_runtime("auto") == "openvino"
        assert worker_mod.draft_runtime("torch") == "torch"
    monkeypatch.setattr(runtime_choice, "gpu_present", lambda: True)
    assert worker_mod.draft_runtime("auto") == "torch"
    assert worker_mod.draft_runtime("openvino") == "openvino"
    monkeypatch.setattr(runtime_choice, "gpu_present", lambda: False)
    for absent in ("openvino", "onnx"):  # no OpenVINO, or no exporter to convert the network with
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name))
        assert worker_mod.draft_runtime("auto") == "torch"


def test_a_gpu_or_reduced_precision_request_keeps_pytorch(monkeypatch):
    """auto takes the machine's runtime only for requests OpenVINO serves as asked (CPU, float32/auto), in
    the command and in the worker alike; int8 stays auto (the engine's: OpenVINO); explicit stays."""
    from LumbarSegmentLib.cli.main import build_parser
    from LumbarSegmentLib.inference.runtime_choice import auto_runtime, openvino_serves

    def args(*extra):
        return SegmentOptions.from_namespace(build_parser().parse_args(["segment", "in.nii.gz", "-o", "o.nii.gz",
                                                                        *extra]))

    assert openvino_serves(args())
    assert openvino_serves(args("--device", "cpu", "--precision", "fp32"))
    assert not openvino_serves(args("--device", "cuda"))
    from LumbarSegmentLib.inference import openvino_runner as ov_runner

    monkeypatch.setattr(ov_runner, "cpu_has_bf16", lambda: True)
    assert openvino_serves(args("--precision", "bf16"))  # OpenVINO computes bf16 where the CPU has it
    monkeypatch.setattr(ov_runner, "cpu_has_bf16", lambda: False)
    assert not openvino_serves(args("--precision", "bf16"))  # elsewhere PyTorch takes (or refuses) it
    assert not openvino_serves(args("--bn-adapt", "0.5"))
    for extra, machine, want in [((), "openvino", "openvino"), ((), "torch", "torch"),
                                 (("--precision", "bf16"), "openvino", "torch"),
                                 (("--bn-adapt", "0.5"), "openvino", "torch"),
                                 (("--precision", "int8"), "torch", "auto"),
                                 (("--runtime", "onnx"), "openvino", "onnx")]:
        assert auto_runtime(args(*extra), machine) == want, (extra, machine)


def test_openvino_bf16_is_refused_on_a_cpu_without_it(tiny_package, small_real_volume, tmp_path, monkeypatch,
                                                      capsys):
    ov_runner = _openvino()
    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(ov_runner, "cpu_has_bf16", lambda: False)
    with pytest.raises(EngineError, match="bf16 arithmetic"):
        segment_volume(small_real_volume, [tiny_package], SegmentOptions(device="cpu", runtime="openvino",
                                                                          precision="bf16", threads=1))
    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import write_volume

    src = write_volume(small_real_volume, tmp_path / "in.nrrd")
    rc = main(["segment", str(src), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_package.path),
               "--runtime", "openvino", "--precision", "bf16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "bf16" in err and "--precision fp32" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(EngineError, match="fp32, bf16 or int8"):
        ov_runner.check_precision("fp16")


def test_a_onednn_capped_below_bf16_has_no_openvino_bf16(monkeypatch):
    """``ONEDNN_MAX_CPU_ISA=AVX2`` (how an AVX2-only CPU is emulated) leaves OpenVINO without bf16 kernels,
    though the CPU reports bf16: the check says no, so the request is refused up front."""
    from LumbarSegmentLib.inference import openvino_runner as ov_runner
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not ov_runner.cpu_has_bf16()
    with pytest.raises(EngineError, match="bf16 arithmetic"):
        ov_runner.check_precision("bf16")


def test_openvino_bf16_when_asked_and_available(tiny_package, small_real_volume, tmp_path, monkeypatch):
    """Asked for bf16 on a CPU that has it, OpenVINO is told to compute in bf16 and the report says so;
    ``auto`` means bf16 exactly where the CPU has it (as for PyTorch)."""
    ov_runner = _openvino()
    assert ov_runner.compile_config(2, "bf16")["INFERENCE_PRECISION_HINT"] == "bf16"
    for has in (False, True):
        monkeypatch.setattr(ov_runner, "cpu_has_bf16", lambda: has)
        assert ov_runner.check_precision("auto") == ("bf16" if has else "fp32")
    monkeypatch.undo()
    if not ov_runner.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 arithmetic for OpenVINO")
    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    try:
        res = segment_volume(small_real_volume, [tiny_package], SegmentOptions(device="cpu", runtime="openvino",
                                                                               precision="bf16", threads=1))
    except EngineError as exc:  # a CPU that reports bf16 but lacks its kernels (oneDNN limited by its ISA cap)
        pytest.skip(str(exc))
    assert res.report["precision"] == "bfloat16" and res.report["runtime"].startswith("openvino")
    ref = segment_volume(small_real_volume, [tiny_package], SegmentOptions(device="cpu", runtime="openvino",
                                                                           precision="fp32", threads=1))
    assert np.mean(res.labels.array == ref.labels.array) > 0.99


@pytest.mark.parametrize("isa", ["AVX2", None])
def test_the_command_runs_openvino_by_default(tiny_package, small_real_volume, tmp_path, monkeypatch, isa):
    """``lumbarseg segment`` with runtime and precision left at auto, no GPU: OpenVINO, in float32 on a CPU
    without bf16 (made so with oneDNN's AVX2 cap: PyTorch float32's labels) and in bf16 where the CPU has
    it (as PyTorch's automatic precision there); the report says which; ``--runtime torch`` still gets
    PyTorch."""
    ov_runner = _openvino()
    import json

    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import read_volume, write_volume
    from LumbarSegmentLib.inference import runtime_choice

    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    if isa:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    bf16 = ov_runner.cpu_has_bf16()
    monkeypatch.setattr(runtime_choice, "gpu_present", lambda: False)
    src = write_volume(small_real_volume, tmp_path / "in.nrrd")
    reports, labels = {}, {}
    for name, extra in (("auto", []), ("torch", ["--runtime", "torch", "--precision", "bf16" if bf16 else "fp32"])):
        out, rep = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.json"
        assert main(["segment", str(src), "-o", str(out), "--model", str(tiny_package.path), "--threads", "1",
                     "--report", str(rep), "--no-progress", *extra]) == 0
        reports[name], labels[name] = json.loads(rep.read_text()), read_volume(out).array
    assert reports["auto"]["runtime"].startswith("openvino") and reports["torch"]["runtime"].startswith("torch")
    assert reports["auto"]["precision"] == reports["torch"]["precision"] == ("bfloat16" if bf16 else "float32")
    if bf16:  # two bf16 computations: a few voxels may differ
        assert np.mean(labels["auto"] != labels["torch"]) < 0.01
    else:
        np.testing.assert_array_equal(labels["auto"], labels["torch"])


def test_an_edited_architecture_does_not_reuse_the_cached_graph(tiny_package, small_real_volume, tmp_path,
                                                                monkeypatch, capsys):
    """The converted graph is cached by weights *and* architecture: a package re-sealed around the same
    weights with an architecture this version does not know is refused in one line by OpenVINO too,
    after the original filled the cache."""
    _openvino()
    import json
    import shutil

    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import write_volume
    from LumbarSegmentLib.registry.manifest import seal

    monkeypatch.setenv(onnx_runner.CACHE_ENV, str(tmp_path / "cache"))
    src = write_volume(small_real_volume, tmp_path / "in.nrrd")

    def segment(model, out):
        return main(["segment", str(src), "-o", str(tmp_path / out), "--model", str(model), "--threads", "1",
                     "--runtime", "openvino", "--no-progress"])

    assert segment(tiny_package.path, "a.nii.gz") == 0
    edited = tmp_path / "edited"
    shutil.copytree(tiny_package.path, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["architecture"]["foo"] = 1
    (edited / "manifest.json").write_text(json.dumps(seal(manifest)))
    capsys.readouterr()
    assert segment(edited, "b.nii.gz") == 1
    err = capsys.readouterr().err
    assert "unknown architecture key(s) ['foo']" in err and "Traceback" not in err
    assert not (tmp_path / "b.nii.gz").exists()
