#!/usr/bin/env python
"""LumbarSegment inference benchmarks: end-to-end time, peak RSS, FLOP efficiency, nnU-Net side by side.

    python bench/run_benchmarks.py --out bench/results.json      # full run (10-20 min on 2 busy cores)
    python bench/run_benchmarks.py --quick --out /tmp/quick.json  # ~1-2 min smoke run
    python bench/run_benchmarks.py --smoke --out /tmp/smoke.json  # seconds: what Testing/test_bench_smoke.py runs

Writes the JSON given by ``--out`` and a Markdown report next to it (``--md`` to choose).
docs/benchmarks.md explains the method and discusses one real run.

Method, in short:

* every configuration (volume x model(s) x mode x device x engine options) runs in a **fresh
  worker process** (this file with ``--worker``); its peak RSS is the ``ru_maxrss`` that
  ``os.wait4`` returns for that one child. A worker reads the volume and calls
  ``segment_volume`` ``calls`` times: the first call is *cold* (includes oneDNN/cuDNN kernel
  set-up), the later ones *warm*. "end-to-end" = reading the volume file + ``segment_volume``
  (model package load and checksum, preprocessing, sliding window, resampling back, argmax):
  a CLI run minus the interpreter start, imports and writing the label map (reported apart);
* configurations are run **interleaved** (round r runs them all, in reverse order on odd
  rounds) and summarised by medians; the load average is recorded around every worker;
* FLOPs are counted, not estimated: a forward pre-hook records the shape of every batch the
  model really sees, and ``FlopCounterMode`` (2 x multiply-adds of convolutions and matmuls)
  counts one forward of each shape on the ``meta`` device;
* the hardware's limit is given twice: a theoretical peak (cores x clock x FLOP/cycle, from
  ``bench/cpu_probe.c`` and ``/proc/cpuinfo``) and a measured ``torch.mm`` peak for fp32 and
  bf16 (and fp16 on CUDA), measured in the same run;
* nnU-Net v2 (optional, ``pip install nnunetv2``): its own planner makes the 2D plan for the
  clinical stack and its own predictor runs it (see ``bench/nnunet_baseline.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = Path(os.environ.get("LUMBARSEG_DATA", ROOT.parent / "shared" / "data"))
RESULT_MARK = "BENCH_RESULT"

# The clinical stack: 15 sagittal slices of 512 x 512 at 0.586 mm (the in-plane spacing of SPIDER's
# 512-matrix series, e.g. 200_t2 / 98_t1), 4 mm apart, identity (LPS, slice axis first) direction
# like the SPIDER masks stored that way; intensities resampled from a real 1 mm case.
CLINICAL = {"source": "VB2_06", "size_ijk": (15, 512, 512), "spacing": (4.0, 0.586, 0.586)}
REAL_CASES = ("IVD_11", "VB3_01")
AGREEMENT_CASE = "VB1_07"  # 361 x 361 in-plane: "whole" (384) and "patch" (2 x 2 windows of 256) differ

#: Random-weight packages (timing does not depend on the weights).
MODELS = {
    "uvd-starter": {"variant": "UVD", "num_classes": 3, "init_filters": 16, "schema": "starter"},
    "umd-starter": {"variant": "UMD", "num_classes": 3, "init_filters": 16, "schema": "starter"},
    "uvd-seed": {"variant": "UVD", "num_classes": 12, "init_filters": 32, "schema": "midas12"},
}
ENSEMBLE = ("uvd-starter", "umd-starter")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


# ============================================================================ environment
def lscpu() -> dict:
    out = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def cpuinfo_mhz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except OSError:
        pass
    return None


def environment() -> dict:
    import numpy
    import torch

    info = lscpu()
    flags = set(info.get("Flags", "").split())
    env = {
        "cpu_model": info.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cores_per_socket": info.get("Core(s) per socket"), "sockets": info.get("Socket(s)"),
        "threads_per_core": info.get("Thread(s) per core"), "hypervisor": info.get("Hypervisor vendor"),
        "cpuinfo_mhz": cpuinfo_mhz(),
        "isa": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                               "amx_bf16", "amx_tile", "avx512_fp16")),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": numpy.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    try:
        import nnunetv2  # noqa: F401
        from importlib.metadata import version

        env["nnunetv2"] = version("nnunetv2")
        env["dynamic_network_architectures"] = version("dynamic_network_architectures")
    except Exception:
        env["nnunetv2"] = None
    return env


# ============================================================================ hardware peaks
def run_cpu_probe(work: Path) -> dict | None:
    """Compile and run bench/cpu_probe.c (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc or platform.machine() not in ("x86_64", "AMD64"):
        return None
    exe = work / "cpu_probe"
    try:
        subprocess.run([cc, "-O3", "-funroll-all-loops", "-march=native", "-o", str(exe), str(HERE / "cpu_probe.c")],
                       check=True, capture_output=True, timeout=120)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=120).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as exc:
        log(f"cpu probe unavailable: {exc}")
        return None


def _pow2(x: float) -> int:
    return 2 ** round(math.log2(x)) if x and x > 0 else 0


def theoretical_cpu_peak(env: dict, probes: list[dict]) -> dict:
    """cores x clock x FLOP/cycle, with the derivation spelled out."""
    cores = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    nominal = (env.get("cpuinfo_mhz") or 0) / 1000
    probes = [p for p in probes if p]
    measured = max((p["clock_ghz_max"] for p in probes), default=0.0)
    clock = max(measured, nominal)
    isa = set(env.get("isa", []))
    if probes:
        f32 = _pow2(statistics.median(p["fp32_flop_cycle_median"] for p in probes))
        b16 = _pow2(statistics.median(p["bf16_flop_cycle_median"] for p in probes)) or f32
        how = "FLOP/cycle measured by bench/cpu_probe.c (independent FMA / VDPBF16PS chains), rounded to a power of 2"
    else:  # documented figures for the widest units the flags announce (assumes two FMA pipes of the width)
        f32 = 32 if ("avx512f" in isa or "avx2" in isa) else 8
        b16 = 2 * f32 if "avx512_bf16" in isa else f32
        how = "FLOP/cycle assumed from the ISA flags (no C compiler for the probe)"
    clock_src = ("highest clock measured by bench/cpu_probe.c (dependent 1-cycle adds)" if measured >= nominal
                 else "/proc/cpuinfo 'cpu MHz'")
    return {
        "cores": cores, "clock_ghz": round(clock, 3), "clock_source": clock_src,
        "clock_nominal_ghz": round(nominal, 3), "clock_measured_ghz": round(measured, 3),
        "fp32_flop_per_cycle": f32, "bf16_flop_per_cycle": b16, "flop_per_cycle_source": how,
        "fp32_gflops": round(cores * clock * f32, 1), "bf16_gflops": round(cores * clock * b16, 1),
        "fp32_gflops_nominal_clock": round(cores * nominal * f32, 1),
        "bf16_gflops_nominal_clock": round(cores * nominal * b16, 1),
        "formula": f"{cores} cores x {clock:.2f} GHz x {f32} FLOP/cycle (fp32) | x {b16} FLOP/cycle (bf16)",
    }


GPU_FLOP_PER_CYCLE_PER_SM = {  # dense tensor-core FLOP/cycle/SM (bf16/fp16) and CUDA-core fp32
    (9, 0): {"bf16": 4096, "fp16": 4096, "fp32": 256},  # H100 / H200
    (8, 0): {"bf16": 2048, "fp16": 2048, "fp32": 128},  # A100
    (8, 9): {"bf16": 1024, "fp16": 1024, "fp32": 256},  # L4 / L40 / RTX 40xx (dense, fp32 accumulate)
    (8, 6): {"bf16": 1024, "fp16": 1024, "fp32": 256},
}


def theoretical_gpu_peak() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    cc = (props.major, props.minor)
    clock = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        clock = float(out.strip().splitlines()[0]) / 1000
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    table = GPU_FLOP_PER_CYCLE_PER_SM.get(cc)
    res = {"name": props.name, "sms": props.multi_processor_count, "compute_capability": list(cc),
           "clock_ghz": clock, "memory_gb": round(props.total_memory / 2 ** 30, 1)}
    if table and clock:
        for k, v in table.items():
            res[f"{k}_gflops"] = round(props.multi_processor_count * clock * v, 0)
        res["formula"] = (f"{props.multi_processor_count} SMs x {clock:.2f} GHz (nvidia-smi max SM clock) x "
                          f"{table['bf16']} (bf16 tensor) / {table['fp32']} (fp32) FLOP/cycle/SM")
    return res


# ============================================================================ inputs
def make_clinical_stack(data: Path, out_dir: Path, n_slices: int | None = None) -> tuple[Path, Path]:
    """Resample the real source case onto the clinical grid (image: linear, label: nearest, VB -> 1)."""
    import numpy as np
    import SimpleITK as sitk

    size = list(CLINICAL["size_ijk"])
    if n_slices:
        size[0] = n_slices
    sp = CLINICAL["spacing"]
    src = sitk.ReadImage(str(data / "lumbar-mr" / f"{CLINICAL['source']}_image.mha"))
    lab = sitk.ReadImage(str(data / "lumbar-mr" / f"{CLINICAL['source']}_label.mha"))
    centre = np.array(src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()]))
    direction = np.eye(3)
    origin = centre - direction @ np.array([(n - 1) * s / 2 for n, s in zip(size, sp)])
    args = (size, sitk.Transform(), None, origin.tolist(), sp, direction.ravel().tolist())
    img = sitk.Resample(sitk.Cast(src, sitk.sitkFloat32), args[0], args[1], sitk.sitkLinear, args[3], args[4],
                        args[5], 0.0)
    img = sitk.Cast(sitk.RoundImageFilter().Execute(img), sitk.sitkInt16)
    seg = sitk.Resample(lab, args[0], args[1], sitk.sitkNearestNeighbor, args[3], args[4], args[5], 0)
    seg = sitk.Cast(seg > 0, sitk.sitkUInt8)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"clinical{size[0]}"
    ip, lp = out_dir / f"{tag}_image.mha", out_dir / f"{tag}_label.mha"
    sitk.WriteImage(img, str(ip), True)
    sitk.WriteImage(seg, str(lp), True)
    return ip, lp


def make_synthetic_stack(out_dir: Path, shape_kji=(96, 96, 4)) -> Path:
    """A small random sagittal stack (smoke runs need no shared data)."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    arr = (rng.random(shape_kji) * 200 + 20).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 1.0, 1.0))
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "synthetic_image.mha"
    sitk.WriteImage(img, str(p))
    return p


def build_packages(work: Path, names, init_filters_override: int | None = None) -> dict[str, str]:
    import torch

    from LumbarSegmentLib.models import build_model
    from LumbarSegmentLib.registry.package import default_input_contract, write_package
    from LumbarSegmentLib.core.schema import load_schema

    out = {}
    for name in names:
        spec = dict(MODELS[name])
        schema = load_schema(spec.pop("schema"))
        if init_filters_override:
            spec["init_filters"] = init_filters_override
        folder = work / "packages" / name
        if folder.exists():
            shutil.rmtree(folder)
        torch.manual_seed(0)
        model = build_model(**spec).eval()
        write_package(folder, model, name=name, schema=schema,
                      input_contract=default_input_contract(spacing_mm=(1.0, 1.0)))
        out[name] = str(folder)
    return out


def trained_packages() -> tuple[dict[str, str], list[str]]:
    """Packages shipped in Resources/Models (index.json), and its default ensemble."""
    from LumbarSegmentLib.registry.package import PackageError, shipped_registry_root
    from LumbarSegmentLib.registry.registry import Registry

    reg = Registry(shipped_registry_root(), read_only=True)
    if not reg.index_path.exists():
        return {}, []
    try:
        pkgs = {f"trained:{p.ref}": str(p.path) for p in reg.packages()}
        ens = [f"trained:{r}" for r in reg.ensemble_refs()]
    except PackageError as exc:
        log(f"Resources/Models unusable: {exc}")
        return {}, []
    return pkgs, [e for e in ens if e in pkgs]


# ============================================================================ workers (child processes)
_FLOP_CACHE: dict = {}


def model_forward_flops(arch: dict, shape) -> float:
    """FLOPs of one forward of ``build_model(**arch)`` on an input of ``shape`` (meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from LumbarSegmentLib.models import build_model

    key = (json.dumps(arch, sort_keys=True), tuple(shape))
    if key not in _FLOP_CACHE:
        with torch.device("meta"):
            model = build_model(**arch).eval()
            x = torch.empty(tuple(shape))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        _FLOP_CACHE[key] = float(counter.get_total_flops())
    return _FLOP_CACHE[key]


def _cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker_ours(cfg: dict) -> dict:
    t_imp = time.perf_counter()
    if cfg.get("torch_first"):  # torch (libgomp) initialised before the engine can choose the OpenMP wait policy
        import torch
    from LumbarSegmentLib.inference import engine  # noqa: F401  (like the CLI: the engine first, then torch)

    import torch
    from LumbarSegmentLib.inference import runners
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.registry.package import ModelPackage, read_package

    import_s = time.perf_counter() - t_imp
    if not cfg.get("fuse", True):  # the engine as it was before BN folding / PReLU-as-max
        runners.inference_graph = lambda model: model
    shapes: dict[str, list] = {}
    real_load = ModelPackage.load_model

    def load_model(self, device="cpu"):
        model = real_load(self, device)
        key = str(self.path)
        model.register_forward_pre_hook(lambda mod, args: shapes.setdefault(key, []).append(tuple(args[0].shape)))
        return model

    ModelPackage.load_model = load_model
    packages = [read_package(p) for p in cfg["packages"]]
    res = {"import_s": import_s, "calls": [], "load_start": loadavg(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default")}
    recorded = None
    for i in range(cfg["calls"]):
        shapes.clear()
        _cuda_sync()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        vol = read_volume(cfg["volume"])
        t_read = time.perf_counter() - t0
        out = segment_volume(vol, packages, SegmentOptions(**cfg["options"]))
        _cuda_sync()
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        res["calls"].append({"wall_s": wall, "read_s": t_read,
                             "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                             "timings_s": out.report["timings_s"]})
        if i == 0:
            recorded = {k: list(v) for k, v in shapes.items()}
            res.update(precision=out.report["precision"], device=out.report["device"], slices=out.report["slices"],
                       shape_kji=list(vol.shape), warnings=out.report["warnings"],
                       model_plane=out.report["input"]["normalisation"].get("model_plane_size"))
    res["load_end"] = loadavg()
    res["threads"] = torch.get_num_threads()
    flops, forwards = 0.0, 0
    for pkg in packages:
        for shape in (recorded or {}).get(str(pkg.path), []):
            flops += model_forward_flops(pkg.manifest["architecture"], shape)
            forwards += 1
    windows = sum(s[0] for v in (recorded or {}).values() for s in v)
    res.update(flops=flops, forwards=forwards, windows=windows,
               window_shapes=sorted({str(list(s[1:])) for v in (recorded or {}).values() for s in v}))
    if cfg.get("profile"):
        res["profile"] = _profile_call(cfg, packages)
    res["rss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and str(res.get("device", "")).startswith("cuda"):
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def _profile_call(cfg: dict, packages) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.formats.io import read_volume

    vol = read_volume(cfg["volume"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        segment_volume(vol, packages, SegmentOptions(**cfg["options"]))
        wall = time.perf_counter() - t
    rows = []
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:14]:
        rows.append({"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                     "pct": 100 * e.self_cpu_time_total / total})
    return {"wall_s_profiled": wall, "self_cpu_total_ms": total / 1e3, "top": rows}


def worker_nnunet(cfg: dict) -> dict:
    sys.path.insert(0, str(HERE))
    t_imp = time.perf_counter()
    import nnunet_baseline as nb

    nb._set_paths(Path(cfg["root"]))
    import torch  # noqa: F401  (imported by nnunet_baseline anyway; timed with it)
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401

    import_s = time.perf_counter() - t_imp
    res = nb.predict(cfg["plans"], cfg["dataset_json"], cfg["volume"], mirroring=cfg["mirroring"],
                     device=cfg["device"], calls=cfg["calls"])
    res["import_s"] = import_s
    res["load_end"] = loadavg()
    res["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "libgomp default")
    flops = 0.0
    per_shape = {}
    for s in res["forward_shapes"]:
        key = tuple(s)
        if key not in per_shape:
            per_shape[key] = nb.forward_flops(cfg["plans"], cfg["dataset_json"], key)
        flops += per_shape[key]
    res["flops"] = flops
    res["forwards"] = len(res["forward_shapes"])
    res["windows"] = sum(s[0] for s in res["forward_shapes"])
    res["window_shapes"] = sorted({str(list(s[1:])) for s in res["forward_shapes"]})
    res.pop("forward_shapes")
    res["precision"] = "float32" if cfg["device"] == "cpu" else "autocast fp16"
    res["rss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def worker_nnunet_plan(cfg: dict) -> dict:
    sys.path.insert(0, str(HERE))
    import nnunet_baseline as nb

    return nb.plan(cfg["root"], cfg["image"], cfg["label"])


def worker_matmul(cfg: dict) -> dict:
    """Best and median GFLOP/s of torch.mm on large square matrices, dtypes interleaved."""
    import torch

    dev = torch.device(cfg["device"])
    n = cfg["n"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if dev.type == "cuda":
        dtypes["fp16"] = torch.float16
        torch.backends.cuda.matmul.allow_tf32 = False
    mats = {k: (torch.randn(n, n, device=dev).to(dt), torch.randn(n, n, device=dev).to(dt)) for k, dt in dtypes.items()}
    times = {k: [] for k in dtypes}
    for k, (a, b) in mats.items():  # warm-up
        torch.mm(a, b)
    for _ in range(cfg["reps"]):
        for k, (a, b) in mats.items():
            _cuda_sync()
            t = time.perf_counter()
            for _ in range(cfg.get("inner", 1)):
                torch.mm(a, b)
            _cuda_sync()
            times[k].append((time.perf_counter() - t) / cfg.get("inner", 1))
    flop = 2.0 * n ** 3
    out = {"n": n, "device": str(dev), "threads": torch.get_num_threads(), "load": loadavg()}
    for k, ts in times.items():
        out[k] = {"best_gflops": flop / min(ts) / 1e9, "median_gflops": flop / statistics.median(ts) / 1e9}
    return out


def worker_agreement(cfg: dict) -> dict:
    """Label agreement between precisions, tile modes and the pre-change engine on one real case."""
    import numpy as np

    from LumbarSegmentLib.inference import runners
    from LumbarSegmentLib.inference.devices import cpu_has_bf16
    from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.registry.package import read_package
    from LumbarSegmentLib.core.volume import Volume

    vol = read_volume(cfg["volume"])
    n = cfg.get("crop_slices")
    lr = int(np.argmax(np.abs(vol.direction[0, :])))
    if n and lr == 0 and vol.shape[2] > n:  # keep the central n sagittal slices, physical positions kept
        i0 = vol.shape[2] // 2 - n // 2
        origin = np.asarray(vol.origin) + vol.direction[:, 0] * vol.spacing[0] * i0
        vol = Volume(vol.array[:, :, i0:i0 + n].copy(), spacing=vol.spacing, origin=origin,
                     direction=vol.direction)
    pkg = read_package(cfg["package"])
    runs = {}
    real_graph = runners.inference_graph
    for name, opts, fuse in (("fp32/whole", dict(precision="fp32", tile="whole"), True),
                             ("bf16/whole", dict(precision="bf16", tile="whole"), True),
                             ("fp32/patch", dict(precision="fp32", tile="patch"), True),
                             ("bf16/patch", dict(precision="bf16", tile="patch"), True),
                             ("fp32/whole/unfused", dict(precision="fp32", tile="whole"), False)):
        if opts["precision"] == "bf16" and not cpu_has_bf16():
            continue
        runners.inference_graph = real_graph if fuse else (lambda model: model)
        runs[name] = segment_volume(vol, [pkg], SegmentOptions(device="cpu", **opts)).labels.array
    runners.inference_graph = real_graph
    schema = pkg.schema
    pairs = [("bf16/whole", "fp32/whole"), ("fp32/patch", "fp32/whole"), ("bf16/patch", "bf16/whole"),
             ("fp32/whole/unfused", "fp32/whole"), ("bf16/whole/unfused", "bf16/whole")]
    out = {"case": Path(cfg["volume"]).name, "shape_kji": list(vol.shape), "package": pkg.ref,
           "trained": bool(cfg.get("trained")), "pairs": []}
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        la, lb = runs[a], runs[b]
        dice = {}
        for c in schema.foreground:
            x, y = la == c.value, lb == c.value
            s = int(x.sum()) + int(y.sum())
            dice[c.id] = (2 * int((x & y).sum()) / s) if s else None
        fg = (la != 0) | (lb != 0)
        out["pairs"].append({"a": a, "b": b, "agreement": float((la == lb).mean()),
                             "agreement_foreground": float((la == lb)[fg].mean()) if fg.any() else None,
                             "dice": dice,
                             "foreground_fraction": float((la != 0).mean())})
    return out


def worker_graph_ab(cfg: dict) -> dict:
    """Forward-only A/B of the engine's inference graph rewrite, one process, repetitions interleaved.

    End-to-end runs in separate processes are too noisy on a shared machine to resolve a 10-20 %
    difference; here the same batch goes through the loaded model and through its rewritten copy
    (``graph_rewrite.inference_graph``) alternately, in the engine's precision and memory format.
    """
    import copy

    from LumbarSegmentLib.inference import engine  # noqa: F401  (before torch, as in the CLI)

    import torch

    from LumbarSegmentLib.inference.devices import autocast_dtype
    from LumbarSegmentLib.inference.graph_rewrite import inference_graph
    from LumbarSegmentLib.registry.package import read_package

    out = {"batch": cfg["batch"], "plane": cfg["plane"], "reps": cfg["reps"], "models": {}}
    dtype = autocast_dtype(torch.device("cpu"), "auto")
    out["precision"] = str(dtype).replace("torch.", "") if dtype else "float32"
    x = torch.randn(cfg["batch"], 1, *cfg["plane"]).contiguous(memory_format=torch.channels_last)
    for name, path in cfg["packages"].items():
        base = read_package(path).load_model("cpu")
        variants = {"as loaded": base.to(memory_format=torch.channels_last),
                    "inference_graph": inference_graph(copy.deepcopy(base)).to(memory_format=torch.channels_last)}
        times = {k: [] for k in variants}

        def fwd(m):
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return m(x).float()

        ref = {k: fwd(m) for k, m in variants.items()}  # warm-up (kernel set-up), and the outputs
        for _ in range(cfg["reps"]):
            for k, m in variants.items():
                t = time.perf_counter()
                fwd(m)
                times[k].append(time.perf_counter() - t)
        a, b = ref["as loaded"], ref["inference_graph"]
        med = {k: statistics.median(v) for k, v in times.items()}
        out["models"][name] = {"median_s": med, "times_s": times, "speedup": med["as loaded"] / med["inference_graph"],
                               "argmax_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
                               "max_abs_logit_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max())}
    out["load"] = loadavg()
    return out


WORKERS = {"ours": worker_ours, "graph_ab": worker_graph_ab, "nnunet": worker_nnunet, "nnunet_plan": worker_nnunet_plan,
           "matmul": worker_matmul, "agreement": worker_agreement}


def worker_main(kind: str, cfg: dict) -> int:
    result = WORKERS[kind](cfg)
    Path(cfg["result_path"]).write_text(json.dumps(result))
    return 0


# ============================================================================ parent: running workers
class WorkerError(RuntimeError):
    pass


def run_worker(kind: str, cfg: dict, work: Path, timeout: float = 900) -> dict:
    """Run one worker in a fresh process; returns its result plus wall time and peak RSS (os.wait4)."""
    n = len(list((work / "runs").glob("*.json"))) if (work / "runs").exists() else 0
    (work / "runs").mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, result_path=str(work / "runs" / f"{n:03d}_{kind}.json"))
    logf = work / "runs" / f"{n:03d}_{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--cfg", json.dumps(cfg)]
    load0 = loadavg()
    t0 = time.perf_counter()
    env = dict(os.environ)
    if cfg.get("torch_first") or kind == "nnunet":  # libgomp's default policy unless the config sets one
        env.pop("OMP_WAIT_POLICY", None)
    env.update(cfg.get("env", {}))
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(cfg["result_path"]).exists():
        tail = logf.read_text()[-3000:]
        raise WorkerError(f"{kind} worker failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(Path(cfg["result_path"]).read_text())
    res["process_wall_s"] = wall
    # ru_maxrss of this one child: KiB on Linux, bytes on macOS
    res["peak_rss_mb"] = ru.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)
    res["load_before"] = load0
    return res


# ============================================================================ schedule
def config_id(c: dict) -> str:
    if c["kind"] == "nnunet":
        return f"{c['volume_key']}|nnU-Net 2D {'mirroring' if c['mirroring'] else 'no mirroring'}|{c['device']}"
    opts = ",".join(f"{k}={v}" for k, v in sorted(c.get("knobs", {}).items()))
    return f"{c['volume_key']}|{'+'.join(c['models'])}|{c['mode']}|{c['device']}" + (f"|{opts}" if opts else "")


def our_cfg(volume_key, volume, models, mode, device, packages, calls, knobs=None, group="main"):
    knobs = dict(knobs or {})
    shown = dict(knobs)
    # graph=unfused: no BN folding / PReLU-as-max; omp=spin: libgomp's default (spinning) wait policy;
    # engine=pre-change: both, i.e. the engine as it was before this benchmark's changes
    pre = knobs.pop("engine", "current") == "pre-change"
    unfused = knobs.pop("graph", None) == "unfused" or pre
    torch_first = knobs.pop("omp", None) == "spin" or pre
    options = {"device": device, "mode": mode, **knobs}
    c = {"kind": "ours", "volume_key": volume_key, "volume": str(volume), "models": list(models), "mode": mode,
         "device": device, "packages": [packages[m] for m in models], "options": options, "fuse": not unfused,
         "torch_first": torch_first, "calls": calls, "group": group, "knobs": shown}
    c["id"] = config_id(c)
    return c


def build_schedule(args, volumes: dict, packages: dict, trained_ens: list, devices: list, nn: dict | None):
    """Lists of configurations: clinical (interleaved rounds) and real cases (one round)."""
    clinical, real = [], []
    model_names = [m for m in packages if m in MODELS or m.startswith("trained:")]
    quick = args.quick
    for dev in devices:
        for vkey, vpath in volumes.items():
            is_clin = vkey.startswith("clinical")
            calls = args.calls if (is_clin or args.smoke) else args.real_calls
            target = clinical if is_clin else real
            names = (["uvd-starter"] if quick else model_names)
            for m in names:
                for mode in (("fast",) if args.smoke else ("fast", "tta")):
                    target.append(our_cfg(vkey, vpath, [m], mode, dev, packages, calls))
            if all(e in packages for e in ENSEMBLE):
                target.append(our_cfg(vkey, vpath, list(ENSEMBLE), "ensemble", dev, packages, calls))
            if len(trained_ens) >= 2 and not quick:
                target.append(our_cfg(vkey, vpath, trained_ens, "ensemble", dev, packages, calls))
            if is_clin and dev == "cpu" and not args.no_knobs:
                knob_sets = [("uvd-starter", {"precision": "fp32"}), ("uvd-starter", {"engine": "pre-change"}),
                             ("uvd-starter", {"omp": "spin"}), ("uvd-starter", {"graph": "unfused"}),
                             ("uvd-starter", {"threads": 1})]
                if not quick:
                    knob_sets += [("uvd-starter", {"tile": "patch"}), ("uvd-starter", {"batch_size": 16}),
                                  ("uvd-seed", {"precision": "fp32"}), ("uvd-seed", {"omp": "spin"}),
                                  ("uvd-seed", {"engine": "pre-change"})]
                for m, kn in knob_sets:
                    if m in packages:
                        clinical.append(our_cfg(vkey, vpath, [m], "fast", dev, packages, calls, kn, group="knob"))
            if is_clin and nn:
                variants = [(False, {})] if quick else [(False, {}), (True, {})]
                if not quick and dev == "cpu":  # nnU-Net with the wait policy our engine picks
                    variants.append((False, {"OMP_WAIT_POLICY": "PASSIVE"}))
                for mirroring, env in variants:
                    c = {"kind": "nnunet", "volume_key": vkey, "volume": str(vpath), "mirroring": mirroring,
                         "device": dev, "calls": 1, "group": "nnunet" if not env else "knob", "env": env,
                         "root": nn["root"], "plans": nn["plans"], "dataset_json": nn["dataset_json"]}
                    c["id"] = config_id(c) + ("|" + ",".join(f"{k}={v}" for k, v in env.items()) if env else "")
                    clinical.append(c)
    return clinical, real


def run_rounds(configs: list, rounds: int, work: Path, budget_end: float | None) -> dict:
    """Round r runs every configuration once, forward on even rounds and reversed on odd ones.

    nnU-Net configurations (minutes each on a CPU) and the engine-option variants run in round 0
    only; nnU-Net in the middle of it, between our runs.
    """
    runs: dict[str, list] = {c["id"]: [] for c in configs}
    for r in range(rounds):
        order = [c for c in configs if c["group"] == "main" or r == 0]
        if r == 0:  # put nnU-Net between our runs rather than at one end
            nn = [c for c in order if c["kind"] == "nnunet" and c["group"] == "nnunet"]
            ours = [c for c in order if c not in nn]
            mid = len(ours) // 2
            order = ours[:mid] + nn + ours[mid:]
        if r % 2:
            order = order[::-1]
        for c in order:
            if budget_end and time.time() > budget_end and runs[c["id"]]:
                continue  # over the time budget: keep what we have for configurations already measured
            log(f"round {r}: {c['id']}")
            try:
                res = run_worker(c["kind"], c, work)
            except WorkerError as exc:
                log(str(exc))
                res = {"error": str(exc)[-800:]}
            res["round"] = r
            runs[c["id"]].append(res)
    return runs


# ============================================================================ summary
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(configs: list, runs: dict, peaks: dict) -> list[dict]:
    rows = []
    for c in configs:
        rs = [r for r in runs.get(c["id"], []) if "error" not in r]
        errs = [r["error"] for r in runs.get(c["id"], []) if "error" in r]
        row = {"id": c["id"], "kind": c["kind"], "group": c["group"], "volume": c["volume_key"], "device": c["device"],
               "n_runs": len(rs), "errors": errs}
        if c["kind"] == "ours":
            row.update(models="+".join(c["models"]), mode=c["mode"], knobs=c.get("knobs", {}))
        else:
            row.update(models="nnU-Net 2D (PlainConvUNet)", mode="mirroring" if c["mirroring"] else "no mirroring",
                       knobs=dict(c.get("env", {})))
        if not rs:
            rows.append(row)
            continue
        cold = [r["calls"][0]["wall_s"] for r in rs]
        warm = [x["wall_s"] for r in rs for x in r["calls"][1:]]
        warm_cpu = [x["cpu_s"] for r in rs for x in r["calls"][1:]]
        cold_cpu = [r["calls"][0]["cpu_s"] for r in rs]
        infer = [x.get("timings_s", {}).get("inference") for r in rs for x in (r["calls"][1:] or r["calls"][:1])]
        first = rs[0]
        # nnU-Net returns the label map as a [z, y, x] array: x is the sagittal slice axis here
        slices = first.get("seg_shape", [None])[-1] if c["kind"] == "nnunet" else first.get("slices")
        e2e = _median(warm) if warm else _median(cold)
        precision = first.get("precision", "float32")
        pk = "bf16" if "bfloat16" in precision or precision == "bf16" else "fp32"
        flops = first.get("flops", 0.0)
        row.update(
            slices=slices, precision=precision, cold_s=_median(cold), warm_s=_median(warm) if warm else None,
            cold_cpu_s=_median(cold_cpu), warm_cpu_s=_median(warm_cpu) if warm_cpu else None,
            inference_s=_median(infer), e2e_s=e2e,
            slices_per_s=(slices / e2e) if (slices and e2e) else None,
            gflop=flops / 1e9, forwards=first.get("forwards"), windows=first.get("windows"),
            window_shapes=first.get("window_shapes"),
            peak_rss_mb=max(r["peak_rss_mb"] for r in rs), import_s=_median([r.get("import_s") for r in rs]),
            process_wall_s=_median([r["process_wall_s"] for r in rs]),
            load=[r.get("load_before") for r in rs],
            cuda_peak_mb=max((r.get("cuda_peak_mb") or 0) for r in rs) or None,
            threads=first.get("threads"), model_plane=first.get("model_plane"),
        )
        ach = flops / e2e / 1e9 if e2e else None
        ach_inf = flops / row["inference_s"] / 1e9 if row.get("inference_s") else None
        dev_peaks = peaks.get(c["device"], {})
        th = dev_peaks.get("theoretical", {}) or {}
        mm = dev_peaks.get("matmul", {}) or {}
        th_key = "bf16_gflops" if pk == "bf16" else "fp32_gflops"
        if c["device"] == "cuda" and precision.startswith("autocast fp16"):
            th_key, pk = "fp16_gflops", "fp16"
        row.update(achieved_gflops=ach, achieved_gflops_inference=ach_inf, peak_precision=pk,
                   pct_theoretical=(100 * ach / th[th_key]) if (ach and th.get(th_key)) else None,
                   pct_matmul=(100 * ach / mm[pk]["best_gflops"]) if (ach and mm.get(pk)) else None,
                   pct_matmul_inference=(100 * ach_inf / mm[pk]["best_gflops"]) if (ach_inf and mm.get(pk)) else None)
        rows.append(row)
    # nnU-Net / ours ratios (cold vs cold: both are a fresh process's first prediction)
    for row in rows:
        if row["kind"] != "ours" or not row.get("cold_s"):
            continue
        for other in rows:
            if other["kind"] == "nnunet" and other["volume"] == row["volume"] and other["device"] == row["device"] \
                    and other.get("cold_s") and other["group"] == "nnunet":
                key = "x_vs_nnunet_mirroring" if other["mode"] == "mirroring" else "x_vs_nnunet_no_mirroring"
                row[key] = other["cold_s"] / row["cold_s"]
    return rows


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    env, peaks = results["environment"], results["peaks"]
    L = [f"# LumbarSegment benchmark results ({results['started']})", ""]
    L += [f"Command: `{results['command']}`  ", f"Total wall time: {results['total_s']:.0f} s  ",
          f"Load average (1/5/15 min) at start {results['load_start']}, at end {results['load_end']}  ",
          f"CPU: {env['cpu_model']}, {env['cpus']} logical CPUs ({env.get('cores_per_socket')} cores/socket x "
          f"{env.get('sockets')} socket, {env.get('threads_per_core')} thread/core, hypervisor "
          f"{env.get('hypervisor')}), ISA {', '.join(env['isa'])}, {env.get('mem_total_gb')} GB RAM  ",
          f"torch {env['torch']} ({env['torch_threads']} threads), numpy {env['numpy']}, Python {env['python']}, "
          f"nnunetv2 {env.get('nnunetv2')}  ", f"GPU: {env.get('gpu') or 'none (CUDA not available)'}", ""]
    L += ["## Hardware limits", ""]
    for dev, p in peaks.items():
        th, mm = p.get("theoretical") or {}, p.get("matmul") or {}
        if dev == "cpu" and th:
            L.append(f"* CPU theoretical: {th['formula']} = **{th['fp32_gflops']} GFLOP/s fp32, "
                     f"{th['bf16_gflops']} GFLOP/s bf16**; clock: {th['clock_source']} ({th['clock_measured_ghz']} GHz; "
                     f"/proc/cpuinfo says {th['clock_nominal_ghz']} GHz, which would give {th['fp32_gflops_nominal_clock']}"
                     f" / {th['bf16_gflops_nominal_clock']}); {th['flop_per_cycle_source']}.")
        elif th:
            L.append(f"* {dev} theoretical: {th.get('formula', th)}")
        if mm:
            parts = [f"{k} {v['best_gflops']:.0f} (median {v['median_gflops']:.0f})" for k, v in mm.items()
                     if isinstance(v, dict)]
            L.append(f"* {dev} measured torch.mm {mm['n']}x{mm['n']}: " + ", ".join(parts) + " GFLOP/s")
    if peaks.get("cpu", {}).get("probe"):
        pr = peaks["cpu"]["probe"]
        L.append(f"* cpu_probe (one core): clock max {pr['clock_ghz_max']:.2f} GHz (median {pr['clock_ghz_median']:.2f}),"
                 f" fp32 {pr['fp32_flop_cycle_median']:.1f} FLOP/cycle, bf16 {pr['bf16_flop_cycle_median']:.1f} FLOP/cycle")
    L.append("")
    rows = results["rows"]

    def table(sel, title, note=""):
        if not sel:
            return
        L.extend([f"## {title}", ""] + ([note, ""] if note else []))
        L.append("| volume | model(s) | mode | device | precision | options | slices | cold s | warm s | infer s "
                 "| slices/s | GFLOP | GFLOP/s | % theor. | % mm peak | peak RSS MB | nnU-Net/ours (mirr.) "
                 "| nnU-Net/ours (no mirr.) |")
        L.append("|" + "---|" * 6 + "--:|" * 12)
        for r in sel:
            if not r.get("n_runs"):
                L.append(f"| {r['volume']} | {r['models']} | {r['mode']} | {r['device']} | failed: "
                         f"{(r['errors'] or ['?'])[0][-120:]!r} |" + " |" * 13)
                continue
            knobs = ", ".join(f"{k}={v}" for k, v in r.get("knobs", {}).items()) or "default"
            L.append(
                f"| {r['volume']} | {r['models']} | {r['mode']} | {r['device']} | {r['precision']} | {knobs} "
                f"| {r['slices']} | {_f(r['cold_s'])} | {_f(r['warm_s'])} | {_f(r.get('inference_s'))} "
                f"| {_f(r['slices_per_s'], '{:.1f}')} | {_f(r['gflop'], '{:.0f}')} | {_f(r['achieved_gflops'], '{:.0f}')} "
                f"| {_f(r['pct_theoretical'], '{:.0f}%')} | {_f(r['pct_matmul'], '{:.0f}%')} "
                f"| {_f(r['peak_rss_mb'], '{:.0f}')} | {_f(r.get('x_vs_nnunet_mirroring'), '{:.1f}x')} "
                f"| {_f(r.get('x_vs_nnunet_no_mirroring'), '{:.1f}x')} |")
        L.append("")

    clin = [r for r in rows if r["volume"].startswith("clinical")]
    n_clin = next((r["slices"] for r in clin if r.get("slices")), CLINICAL["size_ijk"][0])
    table([r for r in clin if r["group"] in ("main", "nnunet")],
          f"Clinical stack ({n_clin} x 512 x 512, {CLINICAL['spacing'][1]} mm, {CLINICAL['spacing'][0]:g} mm gap)",
          "cold = first call in a fresh process, warm = median of later calls; both end-to-end (read + "
          "segment_volume). GFLOP/s and the % columns use the warm time (cold when there is none); nnU-Net ratios "
          "compare cold with cold.")
    table([r for r in clin if r["group"] == "knob"], "Clinical stack: engine options (fast mode, round 0 only)")
    table([r for r in rows if r["volume"] in REAL_CASES or r["volume"].split("_")[0] in ("IVD", "VB1", "VB2", "VB3")],
          "Real 1 mm cases")
    table([r for r in rows if not r["volume"].startswith("clinical") and r["volume"].split("_")[0]
           not in ("IVD", "VB1", "VB2", "VB3")], "Other volumes")
    ag = results.get("agreement")
    if ag and ag.get("pairs"):
        L += [f"## Label agreement on {ag['case']} (central {ag['shape_kji'][2]} slices), model {ag['package']} "
              f"({'trained' if ag['trained'] else 'random weights: a weak proxy'})", "",
              "| A | B | voxels equal | equal among foreground | Dice per class | foreground fraction |",
              "|---|---|--:|--:|---|--:|"]
        for p in ag["pairs"]:
            d = ", ".join(f"{k} {_f(v, '{:.4f}')}" for k, v in p["dice"].items())
            L.append(f"| {p['a']} | {p['b']} | {p['agreement']:.5f} | {_f(p['agreement_foreground'], '{:.5f}')} | {d} "
                     f"| {p['foreground_fraction']:.3f} |")
        L.append("")
    gab = results.get("graph_ab")
    if gab and gab.get("models"):
        L += [f"## Inference-graph rewrite, forward only ({gab['batch']} x 1 x {gab['plane'][0]} x {gab['plane'][1]}, "
              f"{gab['precision']}, channels_last, {gab['reps']} interleaved repetitions in one process)", "",
              "| model | as loaded s | inference_graph s | speed-up | argmax agreement | max abs logit diff "
              "| max abs logit |", "|---|--:|--:|--:|--:|--:|--:|"]
        for m, g in gab["models"].items():
            L.append(f"| {m} | {g['median_s']['as loaded']:.3f} | {g['median_s']['inference_graph']:.3f} "
                     f"| {g['speedup']:.2f}x | {g['argmax_agreement']:.5f} | {g['max_abs_logit_diff']:.3g} "
                     f"| {_f(g.get('max_abs_logit'), '{:.3g}')} |")
        L.append("")
    prof = results.get("profile")
    if prof:
        L += [f"## Profile: {prof['id']} (torch.profiler, self CPU time, {prof['self_cpu_total_ms']:.0f} ms total "
              f"over {prof['wall_s_profiled']:.2f} s wall)", "", "| op | self CPU ms | % | calls |", "|---|--:|--:|--:|"]
        for t in prof["top"]:
            L.append(f"| {t['op']} | {t['self_cpu_ms']:.0f} | {t['pct']:.1f} | {t['calls']} |")
        L.append("")
    tg = results.get("targets")
    if tg:
        L += ["## Targets", "", "| target | result | met |", "|---|---|---|"]
        for t in tg:
            L.append(f"| {t['target']} | {t['result']} | {t['met']} |")
        L.append("")
    return "\n".join(L)


def targets(rows: list, env: dict) -> list[dict]:
    out = []
    clin = [r for r in rows if r["volume"] == "clinical15" and r["kind"] == "ours" and r["group"] == "main"
            and r.get("n_runs") and r["device"] == "cpu"]
    fast = [r for r in clin if r["mode"] == "fast"]
    for r in fast:
        ratio_m, ratio_n = r.get("x_vs_nnunet_mirroring"), r.get("x_vs_nnunet_no_mirroring")
        if ratio_m or ratio_n:
            out.append({"target": f">= 3x faster than nnU-Net 2D ({r['models']}, fast)",
                        "result": f"{_f(ratio_m, '{:.1f}x')} vs nnU-Net with mirroring, "
                                  f"{_f(ratio_n, '{:.1f}x')} without (cold vs cold)",
                        "met": "yes" if min(x for x in (ratio_m, ratio_n) if x) >= 3 else "no"})
    for r in fast:
        worst = max(x for x in (r["cold_s"], r["warm_s"]) if x is not None)
        out.append({"target": f"<= 5 s per 15 x 512^2 stack on the CPU ({r['models']}, fast)",
                    "result": f"cold {_f(r['cold_s'])} s, warm {_f(r['warm_s'])} s ({r['threads']} threads)",
                    "met": "yes" if worst <= 5 else "no"})
    gpu = [r for r in rows if r["volume"] == "clinical15" and r["kind"] == "ours" and r["device"] == "cuda"
           and r.get("n_runs") and r["mode"] == "fast"]
    if gpu:
        for r in gpu:
            out.append({"target": f"<= 0.5 s per stack on one GPU ({r['models']}, fast)",
                        "result": f"cold {_f(r['cold_s'])} s, warm {_f(r['warm_s'])} s on {env.get('gpu')}",
                        "met": "yes" if (r["warm_s"] or r["cold_s"]) <= 0.5 else "no"})
    else:
        out.append({"target": "<= 0.5 s per stack on one H100", "result": "not measured: no CUDA device in this run",
                    "met": "n/a"})
    ours = [r for r in rows if r["kind"] == "ours" and r.get("n_runs") and r["group"] == "main"]
    if ours:
        worst = max(ours, key=lambda r: r["peak_rss_mb"])
        clin_worst = max(clin, key=lambda r: r["peak_rss_mb"]) if clin else worst
        out.append({"target": "peak RAM <= 1.5 GB",
                    "result": f"clinical stack max {clin_worst['peak_rss_mb']:.0f} MB ({clin_worst['models']}, "
                              f"{clin_worst['mode']}); all volumes max {worst['peak_rss_mb']:.0f} MB ({worst['id']})",
                    "met": "yes" if worst["peak_rss_mb"] <= 1536 else
                    ("clinical stack yes, larger volumes no" if clin_worst["peak_rss_mb"] <= 1536 else "no")})
    return out


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~1-2 min smoke run (3-slice clinical stack, one model)")
    p.add_argument("--smoke", action="store_true", help="seconds: synthetic volume, tiny model, no nnU-Net")
    p.add_argument("--out", default=str(HERE / "results.json"), help="JSON output (Markdown next to it)")
    p.add_argument("--md", default=None, help="Markdown output (default: --out with .md)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="shared data folder (lumbar-mr/, spider-masks/)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--cases", default=",".join(REAL_CASES), help="real 1 mm cases (comma-separated, '' for none)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds on the clinical stack")
    p.add_argument("--calls", type=int, default=None, help="segment_volume calls per worker (clinical)")
    p.add_argument("--real-calls", type=int, default=None, help="segment_volume calls per worker (real cases)")
    p.add_argument("--devices", default="auto", help="'auto' (cpu, and cuda when available) or a list: cpu,cuda")
    p.add_argument("--no-nnunet", action="store_true")
    p.add_argument("--no-knobs", action="store_true", help="skip the engine-option comparisons")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting repetitions after this many seconds")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds is None:
        a.rounds = 1 if (a.quick or a.smoke) else 2
    if a.calls is None:
        a.calls = 2
    if a.real_calls is None:
        a.real_calls = 1
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.cfg))
    import torch

    t_start = time.time()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = loadavg()
    own_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="lumbarseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else [d.strip() for d in args.devices.split(",") if d.strip()]
    results = {"started": started, "command": " ".join(["python", "bench/run_benchmarks.py"] + list(argv or sys.argv[1:])),
               "load_start": load_start, "devices": devices}
    try:
        log(f"work folder {work}; devices {devices}; load {load_start}")
        env = environment()
        results["environment"] = env

        # --- hardware limits (probe and matmul at the start; probe again at the end)
        peaks: dict = {}
        probe0 = None if args.smoke else run_cpu_probe(work)
        mm_n = 256 if args.smoke else 2048
        mm_cfg = {"device": "cpu", "n": mm_n, "reps": 3 if args.smoke else 6}
        # (the smoke run measures in this process: one worker process fewer)
        peaks["cpu"] = {"probe": probe0, "matmul": worker_matmul(mm_cfg) if args.smoke else run_worker("matmul", mm_cfg, work)}
        if "cuda" in devices:
            peaks["cuda"] = {"matmul": run_worker("matmul", {"device": "cuda", "n": 8192, "reps": 10, "inner": 5}, work),
                             "theoretical": theoretical_gpu_peak()}

        # --- inputs
        volumes: dict[str, Path] = {}
        if args.smoke:
            volumes["synthetic4"] = make_synthetic_stack(work / "volumes")
            packages = build_packages(work, ["uvd-starter"], init_filters_override=4)
        else:
            if not (data / "lumbar-mr").is_dir():
                raise SystemExit(f"shared data not found at {data} (use --data, or --smoke)")
            n = 3 if args.quick else None
            img, lab = make_clinical_stack(data, work / "volumes", n)
            volumes[f"clinical{n or CLINICAL['size_ijk'][0]}"] = img
            if not args.quick:
                for case in [c for c in args.cases.split(",") if c]:
                    volumes[case] = data / "lumbar-mr" / f"{case}_image.mha"
            packages = build_packages(work, ["uvd-starter"] + ([] if args.quick else ["umd-starter", "uvd-seed"]))
            if args.quick:
                packages.update(build_packages(work, ["umd-starter"]))
        trained, trained_ens = ({}, []) if args.smoke else trained_packages()
        packages.update(trained)
        results["packages"] = {k: str(v) for k, v in packages.items()}
        results["trained_packages"] = sorted(trained)

        # --- nnU-Net plan
        nn = None
        if not (args.no_nnunet or args.smoke) and env.get("nnunetv2"):
            clin_key = next(k for k in volumes if k.startswith("clinical"))
            root = work / "nnunet"
            log("planning nnU-Net (fingerprint + ExperimentPlanner)")
            try:
                plan = run_worker("nnunet_plan", {"root": str(root), "image": str(volumes[clin_key]),
                                                  "label": str(lab)}, work, timeout=600)
                nn = {"root": str(root), "plans": plan["plans"], "dataset_json": plan["dataset_json"]}
                results["nnunet_plan"] = {k: plan[k] for k in ("plan_s", "config_2d", "transpose_forward")}
            except WorkerError as exc:
                log(f"nnU-Net planning failed; skipping nnU-Net: {exc}")
                results["nnunet_plan"] = {"error": str(exc)[-800:]}
        elif not args.smoke and not args.no_nnunet:
            results["nnunet_plan"] = {"error": "nnunetv2 is not installed (pip install nnunetv2)"}

        # --- runs
        clinical, real = build_schedule(args, volumes, packages, trained_ens, devices, nn)
        budget_end = (t_start + args.budget_s) if args.budget_s else None
        runs = run_rounds(clinical, args.rounds, work, budget_end)
        runs.update(run_rounds(real, 1, work, budget_end))
        configs = clinical + real

        # --- agreement and profile (CPU)
        if not (args.smoke or args.quick) and (data / "lumbar-mr").is_dir():
            ag_case = data / "lumbar-mr" / f"{AGREEMENT_CASE}_image.mha"
            ag_pkg = next(iter(trained.values()), None) or packages["uvd-starter"]
            log(f"agreement on {ag_case.name} with {ag_pkg}")
            try:
                results["agreement"] = run_worker("agreement", {"volume": str(ag_case), "package": ag_pkg,
                                                                "crop_slices": 16, "trained": bool(trained)}, work)
            except WorkerError as exc:
                results["agreement"] = {"error": str(exc)[-800:]}
            ab = {m: packages[m] for m in MODELS if m in packages}
            log(f"inference-graph A/B on {', '.join(ab)}")
            try:
                results["graph_ab"] = run_worker("graph_ab", {"packages": ab, "batch": 8, "plane": [320, 320],
                                                              "reps": 5}, work)
            except WorkerError as exc:
                results["graph_ab"] = {"error": str(exc)[-800:]}
            prof_model = "uvd-seed" if "uvd-seed" in packages else "uvd-starter"
            pc = our_cfg(next(iter(volumes)), next(iter(volumes.values())), [prof_model], "fast", "cpu", packages, 1)
            pc["profile"] = True
            log(f"profiling {pc['id']}")
            try:
                pr = run_worker("ours", pc, work)
                results["profile"] = dict(pr["profile"], id=pc["id"])
            except WorkerError as exc:
                results["profile"] = None
                log(str(exc))

        # --- peaks again at the end (the load changes); keep the best of both
        probe1 = None if args.smoke else run_cpu_probe(work)
        mm1 = worker_matmul(mm_cfg) if args.smoke else run_worker("matmul", mm_cfg, work)
        for k in ("fp32", "bf16"):
            a, b = peaks["cpu"]["matmul"][k], mm1[k]
            peaks["cpu"]["matmul"][k] = {"best_gflops": max(a["best_gflops"], b["best_gflops"]),
                                         "median_gflops": max(a["median_gflops"], b["median_gflops"]),
                                         "start_best_gflops": a["best_gflops"], "end_best_gflops": b["best_gflops"]}
        peaks["cpu"]["probe_end"] = probe1
        best_probe = max([p for p in (probe0, probe1) if p], key=lambda p: p["clock_ghz_max"], default=None)
        peaks["cpu"]["probe"] = best_probe
        peaks["cpu"]["theoretical"] = theoretical_cpu_peak(env, [p for p in (probe0, probe1) if p])
        results["peaks"] = peaks

        rows = summarise(configs, runs, peaks)
        results["rows"] = rows
        results["runs"] = runs
        results["targets"] = targets(rows, env)
        results["load_end"] = loadavg()
        results["total_s"] = time.time() - t_start
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        md = Path(args.md) if args.md else out.with_suffix(".md")
        md.write_text(markdown(results))
        log(f"wrote {out} and {md} in {results['total_s']:.0f} s")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
