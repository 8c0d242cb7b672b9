"""bench/runtime_compare.py: the agreement measure and the table it prints (no runtime is run here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "runtime_compare.py"


def test_agreement_counts_differing_voxels_and_the_lowest_dice(tmp_path):
    import SimpleITK as sitk

    bench = load_script(SCRIPT, "lumbarseg_runtime_compare")
    a = np.zeros((2, 4, 4), np.uint8)
    a[0, :2] = 1
    a[1] = 2
    b = a.copy()
    b[0, 0, 0] = 0  # one voxel of label 1 lost: Dice 2*7/(8+7)
    for name, arr in (("a", a), ("b", b)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{name}.nii.gz"))
    got = bench.agreement(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    assert got["differing_voxels"] == 1 and abs(got["min_dice"] - 14 / 15) < 1e-9
    row = {"volume": "v", "config": "openvino fp32 avx2", "agreement": got, "ratio_cold_cpu": 1.1,
           "ratio_warm_cpu": 0.9, "cold": {"wall_s": 2.0, "cpu_s": 3.0, "peak_mb": 900},
           "warm": {"runtime": "openvino 1", "warm": {"wall_s": 1.0, "cpu_s": 1.5}},
           "imports": {"import_s": 0.41, "torch": False, "top": [["SimpleITK", 0.06]]}}
    meta = {"cpu": "CPU", "cores": 2, "isa_flags": ["avx2"], "threads": 2, "load_start": 1.0, "load_end": 1.0,
            "openvino_avx2_conv": "kernel"}
    md = bench.markdown(meta, [row])
    assert ("| v | openvino fp32 avx2 | openvino 1 | 2.00 | 3.00 | 1.10 | 1.00 | 1.50 | 0.90 | 900 | 1 | 0.9333 "
            "| no | 0.41 |") in md
    assert "* openvino fp32 avx2: SimpleITK 0.06" in md
