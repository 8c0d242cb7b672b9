#!/usr/bin/env python
"""PyTorch, ONNX Runtime and OpenVINO side by side, on an emulated AVX2-only CPU, in one command.

    python bench/runtime_compare.py                        # clinical stack + the 77-slice 1 mm case
    python bench/runtime_compare.py --volume-slices 16     # the 1 mm case cut to 16 central slices (shorter)
    python bench/runtime_compare.py --volume '' --repeats 5 --tag torch-free   # the clinical stack only

Inputs: the 15 x 512 x 512 clinical stack (``run_benchmarks.make_clinical_stack``) and a 1 mm volume
(default: the real case VB2_06, 77 x 381 x 381, from the shared data folder). Configurations, all fp32
under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's kernels, oneDNN and OpenVINO's CPU
plugin, which carries its own oneDNN and reads the same variable, then use AVX2 code only): ``--runtime
torch``, ``onnx`` and ``openvino``; plus, on the CPU as it is when it has AVX-512 BF16 or AMX, PyTorch bf16
and OpenVINO in fp32 and bf16 (``--configs`` picks by name:

    python bench/runtime_compare.py --volume '' --repeats 5 --configs \
        "torch fp32 avx2,openvino fp32 avx2,openvino fp32 native,openvino bf16 native,torch bf16 native"

). Per configuration and volume, in this order:

1. *warm, in-process*: a child process loads the model and segments the volume twice; the second run's
   wall and CPU seconds are what a warm worker (Slicer / browser drafts) pays; the first run fills the
   export caches, so the next step measures a user's second and later commands;
2. *cold command*: ``lumbarseg segment`` as a fresh process (interpreter, imports, file I/O included),
   ``--repeats`` times, the median by wall time kept: wall seconds, CPU seconds (user + system,
   ``os.wait4``), peak resident memory and the load average after it;
3. *agreement*: the command's label map against PyTorch fp32's: voxels that differ and the lowest
   per-label Dice;
4. *imports* (first volume only): the cold command once more under ``python -X importtime``: the seconds
   spent importing, whether PyTorch was imported (``--runtime openvino`` and ``onnx`` run without it
   when their converted graph is cached) and those seconds by top-level package.

Ratios are against PyTorch fp32 on the same volume in the same run; on a shared machine compare those,
not the seconds. The table goes to stdout and ``bench/results/runtime_compare-<date>[-tag].md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from run_benchmarks import make_clinical_stack  # noqa: E402
from speed_e2e import AVX2_ENV, cpu_name, isa_flags, run_command  # noqa: E402

# (name, ISA, precision, runtime); the first is the reference of the ratios and the agreement
CONFIGS = [("torch fp32 avx2", "avx2", "fp32", "torch"), ("onnx fp32 avx2", "avx2", "fp32", "onnx"),
           ("openvino fp32 avx2", "avx2", "fp32", "openvino"), ("torch bf16 native", "native", "bf16", "torch"),
           ("openvino fp32 native", "native", "fp32", "openvino"),
           ("openvino bf16 native", "native", "bf16", "openvino"),
           ("openvino int8 avx2", "avx2", "int8", "openvino"), ("openvino int8 native", "native", "int8", "openvino"),
           # --roi: only a box around the spine is segmented (inference/roi.py)
           ("openvino fp32 roi avx2", "avx2", "fp32", "openvino", {"roi": True}),
           ("openvino int8 roi avx2", "avx2", "int8", "openvino", {"roi": True}),
           ("openvino int8 roi native", "native", "int8", "openvino", {"roi": True}),
           # --slice-step: the network on every 2nd thin slice (inference/slice_step.py)
           ("openvino fp32 step2 avx2", "avx2", "fp32", "openvino", {"slice_step": 2}),
           ("openvino int8 step2 avx2", "avx2", "int8", "openvino", {"slice_step": 2}),
           ("openvino int8 roi step2 avx2", "avx2", "int8", "openvino", {"roi": True, "slice_step": 2}),
           ("openvino fp32 roi step2 avx2", "avx2", "fp32", "openvino", {"roi": True, "slice_step": 2}),
           # the light model (uvd-spine-lite: a quarter of the arithmetic, models/slim.py), alone and with the options
           ("openvino fp32 lite avx2", "avx2", "fp32", "openvino", {"model": "uvd-spine-lite"}),
           ("openvino fp32 lite roi step2 avx2", "avx2", "fp32", "openvino",
            {"model": "uvd-spine-lite", "roi": True, "slice_step": 2}),
           ("openvino bf16 lite native", "native", "bf16", "openvino", {"model": "uvd-spine-lite"}),
           ("default lite avx2", "avx2", "auto", "auto", {"model": "uvd-spine-lite"}),
           # the defaults (--runtime auto --precision auto): what the command picks on each CPU class
           ("default avx2", "avx2", "auto", "auto"), ("default native", "native", "auto", "auto")]


def _unpack(config: tuple):
    """``(name, isa, precision, runtime, extra)`` of a configuration; ``extra``: more ``SegmentOptions`` fields
    (``{"roi": True}``), empty when not given."""
    return (*config[:4], dict(config[4]) if len(config) > 4 else {})


_CONV_PROBE = """
import numpy as np, openvino as ov, openvino.opset13 as ops
x = ops.parameter([1, 8, 32, 32], np.float32)
y = ops.convolution(x, ops.constant(np.ones((8, 8, 3, 3), np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
c = ov.Core().compile_model(ov.Model([y], [x]), "CPU", {"PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": "f32"})
r = c.create_infer_request(); r.infer({0: np.ones((1, 8, 32, 32), np.float32)})
print(next(p.exec_type for p in r.profiling_info if p.node_type == "Convolution"))
"""


def child(image: str, precision: str, runtime: str, threads: int, extra: dict | None = None) -> None:
    """Segment ``image`` twice in this process; print the timings of both runs as JSON."""
    from LumbarSegmentLib.cli.main import resolve_models
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume

    from LumbarSegmentLib.inference.runtime_choice import auto_runtime

    extra = dict(extra or {})
    volume, packages = read_volume(image), resolve_models(extra.pop("model", None), "fast")
    runtime = auto_runtime(SegmentOptions(device="cpu", precision=precision, runtime=runtime))  # as the command
    opts = SegmentOptions(device="cpu", precision=precision, runtime=runtime, threads=threads, **(extra or {}))
    out = {}
    for run in ("first", "warm"):
        t, c = time.perf_counter(), time.process_time()
        res = segment_volume(volume, packages, opts)
        out[run] = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(time.process_time() - c, 3),
                    "engine_s": round(res.report["timings_s"]["total"], 3)}
    out["runtime"] = res.report["runtime"]
    print(json.dumps(out))


def warm_run(image: Path, isa: str, precision: str, runtime: str, env: dict, threads: int,
             extra: dict | None = None) -> dict:
    child_env = {**env, **(AVX2_ENV if isa == "avx2" else {})}
    argv = [sys.executable, __file__, "--child", str(image), precision, runtime, "--threads", str(threads),
            "--child-options", json.dumps(extra or {})]
    proc = subprocess.run(argv, env=child_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_runs(image: Path, out: Path, config: tuple, env: dict, threads: int, repeats: int) -> dict:
    """``repeats`` fresh commands; the one of median wall time, with every run's wall and CPU seconds."""
    from LumbarSegmentLib.inference.options import SegmentOptions

    _, isa, precision, runtime, extra = _unpack(config)
    model = extra.pop("model", None)
    flags = ["--precision", precision, "--runtime", runtime, *SegmentOptions(**extra).to_argv(),
             *(["--model", model] if model else [])]
    runs = [run_command(image, out, isa, flags, env, threads)
            for _ in range(max(1, repeats))]
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {**median, "all_wall_s": [r["wall_s"] for r in runs], "all_cpu_s": [r["cpu_s"] for r in runs]}


def import_profile(image: Path, config: tuple, env: dict, threads: int, work: Path) -> dict:
    """The cold command under ``-X importtime``: import seconds, PyTorch imported or not, the largest imports."""
    _, isa, precision, runtime, _ = _unpack(config)
    argv = [sys.executable, "-X", "importtime", "-m", "LumbarSegmentLib.cli.main", "segment", str(image), "-o",
            str(work / "importtime.nii.gz"), "--threads", str(threads), "--no-progress", "--device", "cpu",
            "--precision", precision, "--runtime", runtime]
    proc = subprocess.run(argv, env={**env, **(AVX2_ENV if isa == "avx2" else {})}, capture_output=True, text=True)
    # Seconds per top-level package, from each module's own ("self") time. Not the nesting: OpenVINO
    # imports from a second thread, which garbles the nesting and can make one entry's self time negative
    # (counted as 0 here).
    per_package: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, _, name = line[len("import time:"):].split("|")
            root = name.strip().split(".")[0]
            per_package[root] = per_package.get(root, 0) + max(0, int(own))
    top = sorted(per_package.items(), key=lambda kv: -kv[1])[:8]
    return {"import_s": round(sum(per_package.values()) / 1e6, 3), "torch": "torch" in per_package,
            "top": [[name, round(us / 1e6, 3)] for name, us in top]}


def agreement(ref: Path, other: Path) -> dict:
    """Voxels that differ and the lowest Dice over the labels either map holds."""
    import numpy as np
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(ref)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(other)))
    dice = []
    for v in set(np.unique(a).tolist()) | set(np.unique(b).tolist()):
        if v:
            x, y = a == v, b == v
            dice.append(2 * float((x & y).sum()) / max(1, int(x.sum()) + int(y.sum())))
    return {"differing_voxels": int((a != b).sum()), "min_dice": min(dice) if dice else 1.0}


def crop_slices(image: Path, n: int, work: Path) -> Path:
    """``n`` central sagittal slices of ``image`` (a shorter run with the same plane size)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(image))
    k0 = max(0, (img.GetSize()[0] - n) // 2)
    out = work / f"{image.stem}_{n}slices.mha"
    sitk.WriteImage(img[k0:k0 + n, :, :], str(out), True)
    return out


def measure(volumes: dict, configs: list, env: dict, threads: int, work: Path, repeats: int = 1) -> list[dict]:
    rows = []
    for vname, image in volumes.items():
        for config in configs:
            name, isa, precision, runtime, extra = _unpack(config)
            warm = warm_run(image, isa, precision, runtime, env, threads, extra)
            out = work / f"{vname.split()[0]}_{name.replace(' ', '_')}.nii.gz"
            cold = cold_runs(image, out, config, env, threads, repeats)
            rows.append({"volume": vname, "config": name, "warm": warm, "cold": cold, "out": str(out)})
            if image == next(iter(volumes.values())):
                rows[-1]["imports"] = import_profile(image, config, env, threads, work)
            print(vname, name, json.dumps(rows[-1]), flush=True)
        ref = next(r for r in rows if r["volume"] == vname and r["config"] == configs[0][0])
        for r in rows:
            if r["volume"] == vname:
                r["agreement"] = agreement(Path(ref["out"]), Path(r["out"]))
                r["ratio_cold_cpu"] = r["cold"]["cpu_s"] / ref["cold"]["cpu_s"]
                r["ratio_warm_cpu"] = r["warm"]["warm"]["cpu_s"] / ref["warm"]["warm"]["cpu_s"]
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    emulated = "an emulation" if "avx512f" in meta["isa_flags"] else "which is all this CPU has (no AVX-512)"
    md = [f"CPU: {meta['cpu']} ({meta['cores']} cores; flags {', '.join(meta['isa_flags'])}); {meta['threads']} "
          f"threads; load average {meta['load_start']} at the start, {meta['load_end']} at the end. `avx2`: "
          f"PyTorch, oneDNN and OpenVINO limited to AVX2 kernels ({meta['openvino_avx2_conv']}), {emulated}. "
          f"Ratios: CPU seconds against {rows[0]['config'] if rows else 'the first configuration'} on the same "
          "volume; voxels differing and min Dice (the lowest over classes) against it too. Cold: the median of "
          f"{meta.get('repeats', 1)} fresh commands; imports: one more under `python -X importtime`.", "",
          "| volume | configuration | runtime | cold wall (s) | cold CPU (s) | ratio | warm wall (s) | warm CPU (s) "
          "| ratio | peak (MB) | voxels differing | min Dice | PyTorch imported | imports (s) |",
          "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        c, w, a = r["cold"], r["warm"]["warm"], r["agreement"]
        imp = r.get("imports")
        shown = f"{'yes' if imp['torch'] else 'no'} | {imp['import_s']:.2f}" if imp else "| "
        md.append(f"| {r['volume']} | {r['config']} | {r['warm']['runtime']} | {c['wall_s']:.2f} | {c['cpu_s']:.2f} | "
                  f"{r['ratio_cold_cpu']:.2f} | {w['wall_s']:.2f} | {w['cpu_s']:.2f} | {r['ratio_warm_cpu']:.2f} | "
                  f"{c['peak_mb']} | {a['differing_voxels']} | {a['min_dice']:.4f} | {shown} |")
    md += ["", "Import seconds of each cold command by top-level package (the first volume):", ""]
    md += [f"* {r['config']}: " + ", ".join(f"{n} {t:.2f}" for n, t in r["imports"]["top"])
           for r in rows if r.get("imports")]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs=3, metavar=("IMAGE", "PRECISION", "RUNTIME"), help=argparse.SUPPRESS)
    p.add_argument("--child-options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--volume", default=None, help="the 1 mm volume (default: VB2_06 of the shared data); '' for none")
    p.add_argument("--volume-slices", type=int, default=0, help="cut the 1 mm volume to this many central slices")
    p.add_argument("--runtimes", default="torch,onnx,openvino", help="which of torch,onnx,openvino to compare")
    p.add_argument("--configs", default="", help="only these configurations (comma-separated names, e.g. "
                   "'torch fp32 avx2,openvino bf16 native'); the first is the reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="cold commands per configuration (the median is kept)")
    p.add_argument("--tag", default="")
    p.add_argument("--model", default=None, help="the model every configuration runs (default: the default model)")
    a = p.parse_args(argv)
    if a.child:
        child(*a.child, a.threads, json.loads(a.child_options))
        return 0
    work = Path(tempfile.mkdtemp(prefix="lumbarseg-runtimes-"))
    volumes = {"clinical 15x512x512": make_clinical_stack(Path(a.data), work)[0]}
    vol = Path(a.data) / "lumbar-mr" / "VB2_06_image.mha" if a.volume is None else (Path(a.volume) if a.volume else None)
    if vol is not None:
        n = a.volume_slices
        volumes[f"1 mm {vol.stem}" + (f", {n} central slices" if n else "")] = crop_slices(vol, n, work) if n else vol
    wanted = set(a.runtimes.split(","))
    flags = isa_flags()
    configs = [c for c in CONFIGS if c[3] in wanted and not _unpack(c)[4]
               and (c[1] == "avx2" or {"avx512_bf16", "amx_bf16"} & set(flags))]
    if a.configs:
        by_name = {c[0]: c for c in CONFIGS}
        configs = [by_name[n.strip()] for n in a.configs.split(",") if n.strip()]
    if a.model:
        configs = [(*c[:4], {**_unpack(c)[4], "model": a.model}) for c in configs]
    env = {**os.environ, "LUMBARSEG_HOME": str(work / "home"), "LUMBARSEG_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", _CONV_PROBE], env={**env, **AVX2_ENV}, capture_output=True, text=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "isa_flags": flags, "threads": a.threads, "repeats": a.repeats, "load_start": round(os.getloadavg()[0], 2),
            "openvino_avx2_conv": f"OpenVINO convolution kernel: {probe.stdout.strip() or 'n/a'}"}
    rows = measure(volumes, configs, env, a.threads, work, a.repeats)
    meta["load_end"] = round(os.getloadavg()[0], 2)
    md = markdown(meta, rows)
    stamp = meta["date"] + (f"-{a.tag}" if a.tag else "")
    res = REPO / "bench" / "results"
    res.mkdir(exist_ok=True)
    (res / f"runtime_compare-{stamp}.json").write_text(json.dumps(
        {"meta": meta, "rows": [{k: v for k, v in r.items() if k != "out"} for r in rows]}, indent=1))
    (res / f"runtime_compare-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
