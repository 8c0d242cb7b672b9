#!/usr/bin/env python
"""Per-click latency of click-guided correction (LumbarSegmentLib/inference/refine.py) with a warm model.

One real case (default: the demo sample VB2_06, 1 mm, and its 4 mm clinical stack), the default
model loaded once (``RefineSession``), then the protocol's clicks (scripts/click_protocol.py: the
deepest point of the largest remaining error), each applied to the last result with all clicks so
far, as ``lumbarseg refine`` is called. Two settings:

* ``lazy``: the session computes a slice's probabilities the first time a click reaches it (the
  first click in a new region pays for its slices);
* ``prefetched``: every slice computed right after loading (``RefineSession.prefetch``, what a
  worker does while the draft is on screen), so a click is only the region work. A click-guided
  model has nothing to compute ahead (each click changes its input): ``prefetch`` only runs the
  network once so the first click does not set it up.

By default it emulates an AVX2-only CPU in fp32 (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``, set before torch is imported) on 2 threads. Results:
``bench/results/refine_latency-<date>.json`` and a Markdown table on stdout.

    python bench/refine_latency.py [--cases VB2_06] [--clicks 10] [--native]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(case, pkg, options, n_clicks: int, prefetch: bool, draft_pkg=None) -> dict:
    from LumbarSegmentLib.inference.engine import segment_volume
    from LumbarSegmentLib.inference.refine import Click, RefineSession
    from LumbarSegmentLib.training.clicks import next_click

    structure = next(s for s in case.structures if s != "background")
    value, channel = pkg.schema[structure].value, pkg.schema.channel_of()[structure]
    labels = segment_volume(case.image, [draft_pkg or pkg], options).labels.array
    t = time.perf_counter()
    session = RefineSession(case.image, pkg, options)
    if prefetch:
        session.prefetch()
    load = time.perf_counter() - t
    clicks, times = [], []
    for _ in range(n_clicks):
        sim = next_click(labels, case.truth, case.image, value, channel)
        if sim is None:
            break
        clicks.append(Click(sim.point_lps, structure, sim.positive))
        t = time.perf_counter()
        labels = session.refine(labels, clicks, new=1).labels  # what the front ends do per click
        times.append(time.perf_counter() - t)
    return {"case": case.case_id, "shape": list(case.image.array.shape), "prefetch": prefetch,
            "load_s": round(load, 3), "click_s": [round(x, 4) for x in times]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--cases", default="VB2_06")
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--native", action="store_true", help="no AVX2 emulation; precision auto")
    p.add_argument("--model", default=None, help="the correcting model (default: the installed click-guided model, "
                   "else the default model)")
    p.add_argument("--draft-model", default=None, help="the drafting model (default: the default model)")
    a = p.parse_args(argv)
    if not a.native:
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    sys.path.insert(0, str(REPO))
    from LumbarSegmentLib.inference.engine import SegmentOptions
    from LumbarSegmentLib.registry.catalog import resolve_model, resolve_refine_model
    from LumbarSegmentLib.training.data import select_cases
    from LumbarSegmentLib.training.evaluate import prepare_cases

    pkg = resolve_refine_model(a.model)
    draft_pkg = resolve_model(a.draft_model)
    options = SegmentOptions(device="cpu", threads=a.threads, precision="auto" if a.native else "fp32")
    rows = []
    for case in select_cases(a.data, a.cases.split(",")):
        for slab in (None, 4.0):
            (ec,) = prepare_cases([case], pkg.schema, slab_mm=slab)
            for prefetch in (False, True):
                r = measure(ec, pkg, options, a.clicks, prefetch, draft_pkg)
                r["stack"] = "4 mm" if slab else "1 mm"
                rows.append(r)
                print(json.dumps(r), flush=True)
    cpu = f"{_cpu_name()}, {a.threads} threads, " + ("native ISA" if a.native else "AVX2 emulation, fp32")
    print(f"\n{pkg.ref} correcting drafts of {draft_pkg.ref}; {cpu}\n")
    print("| case | stack | slices computed | load (s) | first click (s) | median click (s) | max click (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["click_s"] or [0.0]
        print(f"| {r['case']} | {r['stack']} {tuple(r['shape'])} | {'all at load' if r['prefetch'] else 'per click'} "
              f"| {r['load_s']:.2f} | {c[0]:.2f} | {statistics.median(c):.3f} | {max(c):.2f} |")
    out = REPO / "bench" / "results" / f"refine_latency-{datetime.date.today()}.json"
    out.write_text(json.dumps({"model": pkg.ref, "draft_model": draft_pkg.ref, "cpu": cpu, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
