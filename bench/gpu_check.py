"""The speed check for a lent GPU, in one short command: the clinical stack on CUDA (fp16, bf16, fp32)
and on that machine's CPU, through the engine users run, cold and warm.

The GPU machine has PyTorch and safetensors but not SimpleITK, and the shared data does not travel
with the working tree. So the stack is prepared here first (SimpleITK reads the real case and resamples
it onto the clinical grid, as ``run_benchmarks.py`` does) and carried as one ``.npz``:

    python bench/gpu_check.py --prepare runs/gpu/clinical15.npz          # here, once
    python bench/gpu_check.py --stack runs/gpu/clinical15.npz --out $OUT  # there (device tool: carry runs/gpu)

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``: per device and precision the first run
in the process (CUDA start-up, cuDNN autotuning), the median of the warm runs, the labels' agreement
with float32 and the peak GPU memory. Without a GPU it measures the CPU rows only (``--devices cpu``:
what the test suite runs on a small synthetic stack).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = {"cuda": ("fp16", "bf16", "fp32"), "cpu": ("auto",)}


def prepare(target: Path, data: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from run_benchmarks import make_clinical_stack

    from LumbarSegmentLib.formats.io import read_volume

    image, _ = make_clinical_stack(data, target.parent / "work")
    vol = read_volume(image)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, array=np.asarray(vol.array), spacing=np.asarray(vol.spacing),
                        origin=np.asarray(vol.origin), direction=np.asarray(vol.direction))


def load_stack(path: Path):
    from LumbarSegmentLib.core.volume import Volume

    z = np.load(path)
    return Volume(z["array"], spacing=tuple(z["spacing"]), origin=tuple(z["origin"]), direction=z["direction"])


def measure(volume, device: str, precision: str, warm: int, model: str | None) -> dict:
    import torch

    from LumbarSegmentLib.cli.main import resolve_models
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume

    packages = resolve_models(model, "fast")
    opts = SegmentOptions(device=device, precision=precision, runtime="torch")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(1 + warm):
        t = time.perf_counter()
        result = segment_volume(volume, packages, opts)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"device": device, "precision": result.report["precision"], "first_s": round(times[0], 3),
            "warm_median_s": round(statistics.median(times[1:]), 3) if warm else None,
            "peak_gpu_mb": round(peak) if peak is not None else None, "labels": np.asarray(result.labels.array),
            "name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepare", type=Path, help="write the clinical stack to this .npz (needs SimpleITK, shared data)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--stack", type=Path, help="the .npz written by --prepare")
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--devices", default="cuda,cpu", help="cuda and/or cpu (cuda is skipped where there is none)")
    p.add_argument("--warm", type=int, default=5, help="warm runs after the first (default 5)")
    p.add_argument("--model", default=None, help="model reference (default: the default model)")
    a = p.parse_args(argv)
    if a.prepare:
        prepare(a.prepare, a.data)
        return 0
    if a.stack is None:
        p.error("give --stack (made with --prepare) or --prepare")
    import torch

    volume = load_stack(a.stack)
    rows = []
    for device in [d.strip() for d in a.devices.split(",") if d.strip()]:
        if device == "cuda" and not torch.cuda.is_available():
            print("no CUDA device here: the CUDA rows are left out", flush=True)
            continue
        for precision in CONFIGS[device]:
            rows.append(measure(volume, device, precision, a.warm, a.model))
            print({k: v for k, v in rows[-1].items() if k != "labels"}, flush=True)
    ref = next((r["labels"] for r in rows if r["precision"] == "float32"), rows[0]["labels"] if rows else None)
    for r in rows:
        r["voxels_differing_from_fp32"] = int((r.pop("labels") != ref).sum())
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "slices": int(volume.array.shape[0]), "shape": list(volume.array.shape)}
    (a.out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Clinical stack {meta['shape']}, engine `fast`, PyTorch {meta['torch']}.", "",
             "| device | precision | first run (s) | warm median (s) | peak GPU memory (MB) | voxels differing from fp32 |",
             "|---|---|--:|--:|--:|--:|"]
    lines += [f"| {r['name']} | {r['precision']} | {r['first_s']} | {r['warm_median_s']} | {r['peak_gpu_mb'] or '-'} "
              f"| {r['voxels_differing_from_fp32']} |" for r in rows]
    (a.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
