#!/usr/bin/env python
"""nnU-Net v2's 2D predictor and our engine side by side, native and AVX2-emulated, in one command.

    pip install nnunetv2          # see docs/benchmarks.md, "Installing nnU-Net next to the CPU build of torch"
    python bench/nnunet_compare.py                       # ~15-30 min on 2 busy cores
    python bench/nnunet_compare.py --isas avx2 --no-mirroring-warm

Each configuration runs in a fresh worker process (``run_benchmarks.run_worker``: wall time, CPU
time and peak memory of that process alone) on the 15 x 512 x 512 clinical stack; nnU-Net's plan
is made once by its own planner (``nnunet_baseline.plan``). Per ISA (``native``: the CPU as it is,
our engine in its default precision, bf16 on AVX-512 BF16; ``avx2``: PyTorch limited to AVX2 kernels
with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, everything fp32, an emulation of an
AVX2-only CPU): our ``fast`` and ``tta`` modes and nnU-Net without and with its default mirroring,
each called twice in its process (cold = the first call, warm = the second; ``--no-mirroring-warm``
calls nnU-Net with mirroring once, to save minutes). The ratios compare cold with cold and warm
with warm within one ISA, in the same run. Then our engine's growth with the number of slices
(``--slices``), from which the largest volume in 4 GB is extrapolated.

Results: ``bench/results/nnunet_compare-<date>[-tag].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run_benchmarks as rb  # noqa: E402
from speed_e2e import AVX2_ENV, cpu_name, isa_flags  # noqa: E402


def ours(work: Path, volume: Path, mode: str, isa: str, calls: int = 2) -> dict:
    from LumbarSegmentLib.registry.catalog import resolve_model

    options = {"device": "cpu", "mode": mode, "threads": 2, "precision": "fp32" if isa == "avx2" else "auto"}
    cfg = {"packages": [str(resolve_model(None).path)], "volume": str(volume), "options": options, "calls": calls,
           "env": AVX2_ENV if isa == "avx2" else {}}
    return rb.run_worker("ours", cfg, work)


def nnunet(work: Path, plan: dict, volume: Path, mirroring: bool, isa: str, calls: int) -> dict:
    cfg = {"root": str(work / "nnunet"), "plans": plan["plans"], "dataset_json": plan["dataset_json"],
           "volume": str(volume), "mirroring": mirroring, "device": "cpu", "calls": calls,
           "env": {**(AVX2_ENV if isa == "avx2" else {}), "OMP_WAIT_POLICY": "PASSIVE"}}
    return rb.run_worker("nnunet", cfg, work, timeout=3600)


def row(name: str, isa: str, res: dict) -> dict:
    calls = res["calls"]
    return {"name": name, "isa": isa, "cold_s": round(calls[0]["wall_s"], 2),
            "warm_s": round(calls[1]["wall_s"], 2) if len(calls) > 1 else None,
            "cold_cpu_s": round(calls[0]["cpu_s"], 2), "peak_mb": round(res["peak_rss_mb"]),
            "precision": res.get("precision") or (calls[0].get("precision")), "load": res.get("load_before")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--isas", default="native,avx2")
    p.add_argument("--slices", default="15,60,120", help="slice counts for the growth of our engine ('' for none)")
    p.add_argument("--no-mirroring-warm", action="store_true", help="one call of nnU-Net with mirroring, not two")
    p.add_argument("--tag", default="")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the Markdown of an earlier run")
    a = p.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        md = markdown(res["meta"], res["rows"], res["growth"])
        Path(a.render).with_suffix(".md").write_text(md)
        print(md)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lumbarseg-nnunet-"))
    image, label = rb.make_clinical_stack(Path(a.data), work)
    os.environ.setdefault("LUMBARSEG_HOME", str(work / "home"))  # the shipped models only
    plan = rb.run_worker("nnunet_plan", {"root": str(work / "nnunet"), "image": str(image), "label": str(label)}, work)
    rows = []
    for isa in [s for s in a.isas.split(",") if s]:
        for mode in ("fast", "tta"):
            rows.append(row(f"ours {mode}", isa, ours(work, image, mode, isa)))
            print(rows[-1], flush=True)
        for mirroring in (False, True):
            calls = 1 if mirroring and a.no_mirroring_warm else 2
            rows.append(row(f"nnU-Net 2D, mirroring {'on' if mirroring else 'off'}", isa,
                            nnunet(work, plan, image, mirroring, isa, calls)))
            print(rows[-1], flush=True)
    growth = []
    for n in [int(s) for s in a.slices.split(",") if s]:
        img, _ = rb.make_clinical_stack(Path(a.data), work / f"s{n}", n_slices=n)
        res = ours(work, img, "fast", "native", calls=1)
        growth.append({"slices": n, "voxels": n * 512 * 512, "wall_s": round(res["calls"][0]["wall_s"], 2),
                       "peak_mb": round(res["peak_rss_mb"])})
        print(growth[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "isa_flags": isa_flags(), "plan_2d_patch": plan["config_2d"]["patch_size"]}
    stamp = meta["date"] + (f"-{a.tag}" if a.tag else "")
    (HERE / "results" / f"nnunet_compare-{stamp}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "growth": growth}, indent=1))
    md = markdown(meta, rows, growth)
    (HERE / "results" / f"nnunet_compare-{stamp}.md").write_text(md)
    print(md)
    return 0


def markdown(meta: dict, rows: list[dict], growth: list[dict]) -> str:
    md = [f"CPU: {meta['cpu']} ({meta['cores']} cores; flags {', '.join(meta['isa_flags'])}); 15 x 512 x 512 "
          "clinical stack; each row one fresh process; ratio = nnU-Net time / ours (`fast` against mirroring off, "
          "`tta` against mirroring on), same ISA, same run.", "",
          "| ISA | configuration | precision | cold (s) | warm (s) | CPU cold (s) | peak (MB) | ratio cold "
          "| ratio warm | ratio CPU cold |", "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        mine = None
        if r["name"].startswith("nnU-Net"):
            mode = "fast" if "off" in r["name"] else "tta"
            mine = next((o for o in rows if o["isa"] == r["isa"] and o["name"] == f"ours {mode}"), None)
        rc = f"{r['cold_s'] / mine['cold_s']:.1f}x" if mine else ""
        rw = f"{r['warm_s'] / mine['warm_s']:.1f}x" if mine and r["warm_s"] and mine["warm_s"] else ""
        rcpu = f"{r['cold_cpu_s'] / mine['cold_cpu_s']:.1f}x" if mine else ""
        md.append(f"| {r['isa']} | {r['name']} | {r['precision']} | {r['cold_s']} | {r['warm_s'] or '–'} | "
                  f"{r['cold_cpu_s']} | {r['peak_mb']} | {rc} | {rw} | {rcpu} |")
    if len(growth) >= 2:
        g0, g1 = growth[0], growth[-1]
        per_mvox = (g1["peak_mb"] - g0["peak_mb"]) / ((g1["voxels"] - g0["voxels"]) / 1e6)
        largest = g0["voxels"] / 1e6 + (4096 - g0["peak_mb"]) / per_mvox if per_mvox > 0 else float("inf")
        md += ["", "| slices of 512 x 512 | wall (s) | peak (MB) |", "|--:|--:|--:|"]
        md += [f"| {g['slices']} | {g['wall_s']} | {g['peak_mb']} |" for g in growth]
        md += ["", f"Memory grows by {per_mvox:.0f} MB per million input voxels: about {largest:.0f} million voxels "
               f"(e.g. {largest * 1e6 / 512 / 512:.0f} slices of 512 x 512) fit in 4 GB (linear extrapolation)."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
