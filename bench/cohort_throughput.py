"""Cohort throughput: cases per minute with 1 process vs N torchrun processes (same cohort, same model).

    python bench/cohort_throughput.py [--cases 8] [--slices 16] [--procs 1,2] [--model NAME] \\
        [--device cpu] [--out bench/results/cohort_throughput.json]

The cohort is the held-out sample case (Resources/Sample/VB2_06), stored as sagittal images and cut to
``--slices`` central slices, written ``--cases`` times under different names: real anatomy, a fixed
amount of work per case. Each configuration is the real command line, timed from start to exit (process
start, model loading and the summary included), because that is what a site running a cohort waits for:

    1 process:  python -m LumbarSegmentLib.cli.main segment COHORT -o OUT --threads T
    N ranks:    python -m torch.distributed.run --standalone --nproc-per-node N -m LumbarSegmentLib.cli.main ...
                (each rank gets cores // N threads, see LumbarSegmentLib/core/distributed.py)

On CPU the ranks share the machine's cores, so N processes mainly remove per-process serial parts; on a
machine with one GPU per rank the speed-up is close to N. Results go to JSON and are summarised in
docs/benchmarks.md with the machine they were measured on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_cohort(folder: Path, cases: int, slices: int) -> None:
    import numpy as np
    import SimpleITK as sitk

    from LumbarSegmentLib.formats.io import read_volume, to_sitk, write_volume
    from LumbarSegmentLib.core.volume import Volume

    img = sitk.DICOMOrient(to_sitk(read_volume(ROOT / "Resources" / "Sample" / "VB2_06_image.mha")), "PIR")
    vol = Volume(sitk.GetArrayFromImage(img), spacing=img.GetSpacing(), origin=img.GetOrigin(),
                 direction=np.reshape(img.GetDirection(), (3, 3)))
    k0 = max(0, vol.array.shape[0] // 2 - slices // 2)
    origin = np.asarray(vol.origin) + vol.direction[:, 2] * vol.spacing[2] * k0
    crop = Volume(vol.array[k0:k0 + slices].copy(), spacing=vol.spacing, origin=origin, direction=vol.direction)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        write_volume(crop, folder / f"case{i:03d}.nii.gz")


def run(procs: int, cohort: Path, out: Path, args) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    seg = ["segment", str(cohort), "-o", str(out), "--device", args.device, "--no-progress"]
    if args.model:
        seg += ["--model", args.model]
    if procs == 1:
        cmd = [sys.executable, "-m", "LumbarSegmentLib.cli.main", *seg, "--threads", str(cores), "--report"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(procs), "-m", "LumbarSegmentLib.cli.main", *seg]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == args.cases and summary["failed"] == 0
    return {"processes": procs, "wall_s": round(wall, 2), "cases": args.cases,
            "cases_per_min": round(60 * args.cases / wall, 2),
            "threads_per_process": cores if procs == 1 else max(1, cores // procs),
            "segmenting_wall_s_rank0": summary["wall_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--slices", type=int, default=16, help="central sagittal slices per case")
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts to compare")
    ap.add_argument("--model", default=None, help="model ref (default: the shipped default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cohort_throughput.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="lumbarseg-cohort-") as tmp:
        cohort = Path(tmp) / "cohort"
        make_cohort(cohort, args.cases, args.slices)
        for rep in range(args.repeats):
            for procs in (int(p) for p in args.procs.split(",")):
                out = Path(tmp) / f"out-{procs}-{rep}"
                res = run(procs, cohort, out, args)
                res["repeat"] = rep
                print(json.dumps(res), flush=True)
                results.append(res)
    import torch

    doc = {"benchmark": "cohort_throughput", "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                       "torch": torch.__version__},
           "settings": {"cases": args.cases, "slices_per_case": args.slices, "model": args.model or "default",
                        "device": args.device},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
