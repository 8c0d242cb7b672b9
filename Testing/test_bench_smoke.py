"""The benchmark script must keep working: import it and run its smallest configuration.

``--smoke`` segments a synthetic 4-slice stack with a tiny random-weight model in one worker
process (no shared data, no nnU-Net) and writes the JSON and Markdown reports; a few seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run_benchmarks.py"


def _load():
    return load_script(BENCH, "lumbarseg_run_benchmarks")


def test_benchmark_smoke_run(tmp_path):
    bench = _load()
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["kind"] == "ours" and row["n_runs"] == 1 and not row["errors"]
    assert row["slices"] == 4 and row["cold_s"] > 0 and row["warm_s"] > 0
    assert row["gflop"] > 0 and row["forwards"] >= 1 and row["peak_rss_mb"] > 50
    assert res["peaks"]["cpu"]["matmul"]["fp32"]["best_gflops"] > 0
    assert res["peaks"]["cpu"]["theoretical"]["fp32_gflops"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| synthetic4 | uvd-starter | fast | cpu |" in md and "Targets" in md


def test_flop_count_matches_the_model_table():
    """The per-forward FLOP count is the one ``python -m LumbarSegmentLib.models --table`` prints."""
    bench = _load()
    from LumbarSegmentLib.models.__main__ import measure

    arch = {"variant": "UVD", "num_classes": 3, "init_filters": 16}
    one = bench.model_forward_flops(arch, (1, 1, 256, 256))
    assert abs(one / 1e9 - measure(arch, 256)["gflops"]) < 1e-6
    assert abs(bench.model_forward_flops(arch, (3, 1, 256, 256)) - 3 * one) < 1e-3 * one


def test_gpu_check_runs_its_cpu_rows_from_a_carried_stack(tmp_path):
    """``bench/gpu_check.py`` (the prepared script for a lent GPU) reads its stack from an ``.npz`` and,
    without a GPU, measures the CPU row and writes both reports."""
    import numpy as np

    gpu = load_script(BENCH.parent / "gpu_check.py", "lumbarseg_gpu_check")
    rng = np.random.default_rng(0)
    stack = tmp_path / "stack.npz"
    np.savez_compressed(stack, array=rng.integers(0, 400, (64, 64, 3)).astype(np.int16),
                        spacing=np.array([4.0, 1.0, 1.0]), origin=np.zeros(3), direction=np.eye(3))
    assert gpu.main(["--stack", str(stack), "--out", str(tmp_path / "out"), "--devices", "cpu", "--warm", "1"]) == 0
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    (row,) = res["rows"]
    assert row["device"] == "cpu" and row["first_s"] > 0 and row["warm_median_s"] > 0
    assert row["voxels_differing_from_fp32"] == 0 and "| cpu |" in (tmp_path / "out" / "gpu_check.md").read_text()
