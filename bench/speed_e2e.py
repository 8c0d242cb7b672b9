#!/usr/bin/env python
"""Whole-command, draft and runtime benchmark on plain-AVX2 and native CPUs, in one command.

    python bench/speed_e2e.py --repeats 3                  # everything below, 10-20 min on 2 busy cores
    python bench/speed_e2e.py --repeats 1 --no-drafts      # the whole command only

1. *The command*: ``lumbarseg segment`` of the 15 x 512 x 512 clinical stack (``run_benchmarks.
   make_clinical_stack``) and of a 1 mm volume (the sample case VB2_06, 54 x 381 x 381; ``--volume``
   takes another), each run a fresh process, for every (ISA, runtime) configuration: ``native``
   (the CPU as it is: bf16 on AVX-512 BF16 / AMX) and ``avx2`` (PyTorch's kernels limited to AVX2 with
   ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, fp32: an *emulation* of an AVX2-only CPU;
   ONNX Runtime has no such switch and keeps its widest kernels). Per run: wall seconds, CPU
   seconds (user + system of the process, from ``os.wait4``: what a quiet machine would take
   split over the threads), peak resident memory, and the report's ``runtime`` and engine timings.
   Configurations interleave per repetition, so a load change hits all of them.
2. *Drafts*: the Slicer/browser path (``segment_job.SegmentController``) on the clinical stack,
   click to label map in memory: a new process per draft (the old way) against the warm worker
   (``worker_client.WarmWorker``): its first draft (start-up, imports and model load included)
   and the next ones.
3. *Agreement*: the label maps of each runtime against PyTorch fp32 on the same input (voxels that differ).
4. *Warm drafts per runtime* (``--worker-runtimes``; with ``--drafts-only`` nothing else): for each
   (ISA, worker runtime, request) configuration a fresh warm worker is started (``--preload``: the
   default model, as the Slicer module starts it) and the first draft is sent at once, so it pays the
   start-up, imports, model load and compilation: *first draft*; the next drafts are the warm latency,
   click to label map in memory. Also per configuration: the worker's engine seconds, its peak resident
   memory (``VmHWM``), the runtime and precision its report names, and the labels against the first
   configuration's (voxels that differ).

    python bench/speed_e2e.py --drafts-only --drafts 6 --tag worker-openvino

Results: ``bench/results/speed_e2e-<date>[-tag].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from run_benchmarks import make_clinical_stack  # noqa: E402

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# (name, ISA, extra segment options)
CONFIGS = [("native torch", "native", []),
           ("avx2 torch fp32", "avx2", ["--precision", "fp32", "--runtime", "torch"]),
           ("avx2 onnx fp32", "avx2", ["--precision", "fp32", "--runtime", "onnx"])]
# warm-worker draft configurations: (name, ISA, ``serve --runtime``, request option fields); the first is
# the reference of the label agreement.
WORKER_CONFIGS = {
    # what a draft gets with nothing chosen: the worker's own rule for this machine (inference/runtime_choice.py)
    "auto-native": ("native", "auto", {}),
    "auto-avx2": ("avx2", "auto", {}),
    "torch-fp32-avx2": ("avx2", "torch", {"precision": "fp32"}),
    "openvino-avx2": ("avx2", "openvino", {}),  # OpenVINO float32 (precision auto: float32)
    "torch-native": ("native", "torch", {}),  # PyTorch, precision auto: bf16 on a CPU that has it
    "openvino-native": ("native", "openvino", {}),
    "openvino-bf16-native": ("native", "openvino", {"runtime": "openvino", "precision": "bf16"}),  # opt-in
    "openvino-int8-avx2": ("avx2", "openvino", {"runtime": "openvino", "precision": "int8"}),  # opt-in, lossy
    "openvino-int8-native": ("native", "openvino", {"runtime": "openvino", "precision": "int8"}),
    # --roi as well: only a box around the spine (inference/roi.py)
    "openvino-int8-roi-avx2": ("avx2", "openvino", {"runtime": "openvino", "precision": "int8", "roi": True}),
    "openvino-roi-avx2": ("avx2", "openvino", {"runtime": "openvino", "roi": True}),  # float32 + the box
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni") if f in flags]


def run_command(image: Path, out: Path, isa: str, extra: list[str], env: dict, threads: int) -> dict:
    report = out.with_suffix("").with_suffix(".json")
    argv = [sys.executable, "-m", "LumbarSegmentLib.cli.main", "segment", str(image), "-o", str(out), "--threads",
            str(threads), "--no-progress", "--device", "cpu", "--report", str(report), *extra]
    child_env = {**env, **(AVX2_ENV if isa == "avx2" else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err}")
    rep = json.loads(report.read_text())
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_mb": round(usage.ru_maxrss / 1024), "runtime": rep["runtime"], "precision": rep["precision"],
            "timings_s": rep["timings_s"], "load1": round(os.getloadavg()[0], 2)}


def bench_commands(volumes: dict, repeats: int, env: dict, threads: int, work: Path) -> list[dict]:
    rows = {(v, c[0]): [] for v in volumes for c in CONFIGS}
    for rep in range(repeats):
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
        for vname, image in volumes.items():
            for name, isa, extra in order:
                out = work / f"{vname}_{name.replace(' ', '_')}.nii.gz"
                rows[(vname, name)].append(run_command(image, out, isa, extra, env, threads))
                print(vname, name, rows[(vname, name)][-1], flush=True)
    return [{"volume": v, "config": c, "runs": runs, "median_wall_s": statistics.median(r["wall_s"] for r in runs),
             "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
             "max_peak_mb": max(r["peak_mb"] for r in runs), "runtime": runs[-1]["runtime"],
             "precision": runs[-1]["precision"],
             "median_engine_s": statistics.median(r["timings_s"]["total"] for r in runs)}
            for (v, c), runs in rows.items()]


def agreement(volumes: dict, work: Path) -> list[dict]:
    import numpy as np
    import SimpleITK as sitk

    out = []
    for vname in volumes:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"{vname}_avx2_torch_fp32.nii.gz")))
        for name, _, _ in CONFIGS:
            lab = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"{vname}_{name.replace(' ', '_')}.nii.gz")))
            out.append({"volume": vname, "config": name, "differing_voxels": int((lab != ref).sum()),
                        "agreement": float(np.mean(lab == ref))})
    return out


def bench_drafts(image: Path, drafts: int, env: dict, threads: int, work: Path) -> dict:
    os.environ.update(env)
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.slicer.segment_job import SegmentController, SegmentRequest
    from LumbarSegmentLib.slicer.worker_client import WarmWorker

    volume = read_volume(image)
    request = SegmentRequest.of(device="cpu", threads=threads)
    out = {}
    for name in ("new process per draft", "warm worker"):
        worker = WarmWorker(threads=threads, workdir_parent=str(work)) if name == "warm worker" else None
        ctl = SegmentController(worker=worker, workdir_parent=str(work))
        times, engine = [], []
        for _ in range(drafts):
            t0 = time.perf_counter()
            run = ctl.run(volume, request, timeout=900, interval=0.01)
            times.append(round(time.perf_counter() - t0, 3))
            engine.append(run.report["timings_s"]["total"])
        ctl.close()
        out[name] = {"click_to_labels_s": times, "engine_s": engine}
        print(name, out[name], flush=True)
    return out


def peak_mb(pid: int | None) -> int | None:
    """A live process's peak resident memory (VmHWM, Linux), MB."""
    try:
        line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("VmHWM"))
        return round(int(line.split()[1]) / 1024)
    except (OSError, StopIteration, TypeError):
        return None


def cpu_seconds(pid: int | None) -> float:
    """A live process's CPU seconds so far (user + system, Linux ``/proc``); 0 where unreadable."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return 0.0


def share_scheduling_group(pid: int | None) -> None:
    """Give a child in its own session (the worker: ``start_new_session``) this process's autogroup
    weight. Linux shares the CPU equally between sessions' groups, whatever a process's ``nice``; a
    benchmark run in a group of raised weight (``echo -15 > /proc/self/autogroup``) to have two cores
    despite a low-priority job in another session would otherwise leave its worker at the default."""
    try:
        mine = open("/proc/self/autogroup").read().split("nice")[1].strip()
        if mine != "0":
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(mine)
    except (OSError, IndexError):
        pass


def bench_worker_drafts(image: Path, names: list[str], drafts: int, env: dict, threads: int, work: Path) -> dict:
    """Per configuration: a fresh warm worker, its first draft sent at once, then ``drafts - 1`` more."""
    import numpy as np

    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.slicer.segment_job import SegmentController, SegmentRequest
    from LumbarSegmentLib.slicer.worker_client import WarmWorker

    volume, out, ref = read_volume(image), {}, None
    if any(WORKER_CONFIGS[n][1] != "torch" for n in names):  # converted networks cached, as after a first use
        for precision in sorted({"fp32"} | {WORKER_CONFIGS[n][2].get("precision", "fp32") for n in names} - {"bf16"}):
            run_command(image, work / "fill-cache.nii.gz", "native", ["--runtime", "openvino", "--precision", precision],
                        env, threads)  # (int8: the quantised network, calibrated once)
    for name in names:
        isa, runtime, fields = WORKER_CONFIGS[name]
        worker = WarmWorker(threads=threads, workdir_parent=str(work), runtime=runtime,
                            env={**env, **(AVX2_ENV if isa == "avx2" else {})})
        worker.start()
        share_scheduling_group(worker.pid)
        ctl = SegmentController(worker=worker, workdir_parent=str(work))
        request = SegmentRequest.of(device="cpu", threads=threads, **fields)
        times, engine, load, cpu = [], [], [], []
        for _ in range(max(2, drafts)):
            t0, c0 = time.perf_counter(), cpu_seconds(worker.pid)
            run = ctl.run(volume, request, timeout=900, interval=0.005)
            times.append(round(time.perf_counter() - t0, 3))
            cpu.append(round(cpu_seconds(worker.pid) - c0, 2))  # the worker's (the first: from its start)
            engine.append(run.report["timings_s"]["total"])
            load.append(round(os.getloadavg()[0], 2))
        labels = run.labels.array
        ref = labels if ref is None else ref
        out[name] = {"isa": isa, "worker_runtime": runtime, "request": fields, "runtime": run.report["runtime"],
                     "precision": run.report["precision"], "click_to_labels_s": times, "engine_s": engine,
                     "worker_cpu_s": cpu, "warm_median_cpu_s": statistics.median(cpu[1:]),
                     "first_s": times[0], "warm_median_s": statistics.median(times[1:]), "load1": load,
                     "peak_mb": peak_mb(worker.pid), "differing_voxels": int(np.sum(labels != ref))}
        ctl.close()
        print(name, out[name], flush=True)
    return out


def worker_markdown(meta: dict, wd: dict) -> list[str]:
    md = ["", f"Warm worker drafts of the clinical stack (click to label map in memory; {meta['threads']} threads; the "
          "first draft sent as the worker starts, so it pays start-up, imports, model load and compilation):", "",
          "| configuration | CPU | runtime | precision | first draft (s) | warm drafts (s) | warm median (s) | "
          "worker CPU s per warm draft (median) | engine, warm (s) | worker peak (MB) | voxels differing | "
          "load average |", "|---|---|---|---|--:|---|--:|--:|---|--:|--:|---|"]
    for name, r in wd.items():
        md.append(f"| {name} | {r['isa']} | {r['runtime']} | {r['precision']} | {r['first_s']:.2f} | "
                  f"{', '.join(f'{t:.2f}' for t in r['click_to_labels_s'][1:])} | {r['warm_median_s']:.2f} | "
                  f"{r['warm_median_cpu_s']:.2f} | "
                  f"{', '.join(f'{t:.2f}' for t in r['engine_s'][1:])} | {r['peak_mb']} | {r['differing_voxels']} | "
                  f"{min(r['load1'])}-{max(r['load1'])} |")
    return md


def markdown(meta: dict, rows: list[dict], agree: list[dict], drafts: dict | None) -> str:
    md = [f"CPU: {meta['cpu']} ({meta['cores']} cores, flags {', '.join(meta['isa_flags'])}), {meta['threads']} "
          f"threads, load average {meta['loadavg_start']} at the start and {meta['loadavg_end']} at the end"
          + (f"; {meta['repeats']} fresh processes per row" if rows else "")
          + ". `avx2` = PyTorch (and OpenVINO) limited to AVX2 kernels ("
          + ("an emulation" if "avx512f" in meta["isa_flags"] else "all this CPU has: no AVX-512") + ")."]
    if not rows:  # --drafts-only
        return "\n".join(md) + "\n"
    md += ["", "| volume | configuration | runtime | precision | wall median (s) | CPU median (s) | engine median (s) | "
           "peak memory (MB) |", "|---|---|---|---|--:|--:|--:|--:|"]
    for r in rows:
        md.append(f"| {r['volume']} | {r['config']} | {r['runtime']} | {r['precision']} | {r['median_wall_s']:.2f} | "
                  f"{r['median_cpu_s']:.2f} | {r['median_engine_s']:.2f} | {r['max_peak_mb']} |")
    md += ["", "| volume | configuration | voxels differing from avx2 torch fp32 | agreement |", "|---|---|--:|--:|"]
    md += [f"| {a['volume']} | {a['config']} | {a['differing_voxels']} | {a['agreement']:.6f} |" for a in agree]
    if drafts:
        md += ["", "| draft of the clinical stack | click to labels (s), each draft | engine (s) |", "|---|---|---|"]
        md += [f"| {k} | {', '.join(map(str, v['click_to_labels_s']))} | "
               f"{', '.join(f'{x:.2f}' for x in v['engine_s'])} |" for k, v in drafts.items()]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--volume", default=str(REPO / "Resources" / "Sample" / "VB2_06_image.mha"),
                   help="the 1 mm volume (default: the sample case); '' for none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--drafts", type=int, default=4, help="drafts per front-end way (default 4)")
    p.add_argument("--no-drafts", action="store_true")
    p.add_argument("--worker-runtimes", default="",
                   help=f"warm-worker draft configurations, comma-separated, of {','.join(WORKER_CONFIGS)} ('all')")
    p.add_argument("--drafts-only", action="store_true", help="only the warm-worker drafts (all configurations "
                   "unless --worker-runtimes names some)")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lumbarseg-speed-"))
    clinical, _ = make_clinical_stack(Path(a.data), work)
    volumes = {"clinical 15x512x512": clinical}
    if a.volume:
        volumes["1 mm volume"] = Path(a.volume)
    # an empty user registry (the shipped models) and a private ONNX cache, filled by the first onnx run
    env = {**os.environ, "LUMBARSEG_HOME": str(work / "home"), "LUMBARSEG_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "isa_flags": isa_flags(), "threads": a.threads, "repeats": a.repeats,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()}
    names = list(WORKER_CONFIGS) if a.worker_runtimes == "all" or (a.drafts_only and not a.worker_runtimes) \
        else [n for n in a.worker_runtimes.split(",") if n]
    rows = agree = drafts = []
    if not a.drafts_only:
        rows = bench_commands(volumes, a.repeats, env, a.threads, work)
        agree = agreement(volumes, work)
        drafts = None if a.no_drafts else bench_drafts(clinical, a.drafts, env, a.threads, work)
    worker = bench_worker_drafts(clinical, names, a.drafts, env, a.threads, work) if names else None
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    stamp = meta["date"] + (f"-{a.tag}" if a.tag else "")
    res = REPO / "bench" / "results"
    (res / f"speed_e2e-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows, "agreement": agree,
                                                             "drafts": drafts, "worker_drafts": worker}, indent=1))
    md = markdown(meta, rows, agree, drafts) + ("\n".join(worker_markdown(meta, worker)) + "\n" if worker else "")
    (res / f"speed_e2e-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
