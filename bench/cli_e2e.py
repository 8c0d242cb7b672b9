#!/usr/bin/env python
"""Whole-command time of ``lumbarseg segment`` on the 15 x 512 x 512 clinical stack, per model and mode.

What a user waits for at the prompt: interpreter start, imports, reading the file, the engine,
writing the label map. Each configuration runs ``--repeats`` times as a fresh process (the first
one also pays the page cache); the table gives every run and the median. The clinical stack is
the one ``bench/run_benchmarks.py`` builds (the real VB2 case resampled to 15 slices of 512 x 512,
0.586 mm, 4 mm apart). Results go to ``bench/results/cli_e2e-<date>.json`` and a Markdown table.

    python bench/cli_e2e.py --threads 2 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
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

CONFIGS = [("uvd-starter@4", "fast", ""), ("uvd-starter@5", "fast", ""), ("uvd-starter@5", "tta", ""),
           ("uvd-starter@5,uvd-fit@1", "ensemble", "")]
FORWARDS = {"fast": 1, "tta": 2, "ensemble": 4}  # network passes per window, by engine mode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=None,
                   help="MODEL:MODE[:OPTIONS] separated by ';' instead of the default set (MODEL: a ref, a package "
                        "folder, or refs joined by ',' for an ensemble; OPTIONS: more segment options, e.g. "
                        "'--slice-smoothing 0')")
    p.add_argument("--tag", default="", help="suffix of the results files, so a second run on one day keeps the first")
    a = p.parse_args(argv)
    configs = CONFIGS if not a.configs else [tuple(c.split(":", 2)) for c in a.configs.split(";") if c.strip()]
    configs = [c if len(c) != 2 else (*c, "") for c in configs]
    if any(len(c) != 3 or c[1] not in FORWARDS for c in configs):
        p.error("--configs takes MODEL:MODE[:OPTIONS] separated by ';' (MODE: " + ", ".join(FORWARDS) + ")")
    work = Path(tempfile.mkdtemp(prefix="lumbarseg-e2e-"))
    image, _ = make_clinical_stack(Path(a.data), work)
    env = {**os.environ, "LUMBARSEG_HOME": str(work / "home")}  # an empty user registry: shipped models
    rows = []
    for model, mode, extra in configs:
        times = []
        for i in range(a.repeats):
            out = work / f"seg_{i}.nii.gz"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "LumbarSegmentLib.cli.main", "segment", str(image), "-o", str(out),
                            "--model", model, "--mode", mode, "--threads", str(a.threads), "--no-progress",
                            "--device", "cpu", *shlex.split(extra)], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
            out.unlink()
        rows.append({"model": model, "mode": mode, "options": extra, "seconds": [round(t, 2) for t in times],
                     "median_s": round(statistics.median(times), 2)})
        print(rows[-1], flush=True)
    load = os.getloadavg()
    meta = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": a.threads, "loadavg_1_5_15": [round(x, 2) for x in load],
            "python": platform.python_version()}
    stamp = meta["date"] + (f"-{a.tag}" if a.tag else "")
    res = REPO / "bench" / "results"
    (res / f"cli_e2e-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"Whole `lumbarseg segment` command, 15 x 512 x 512 clinical stack, {a.threads} threads, "
          f"{a.repeats} fresh processes each (load average during the run {meta['loadavg_1_5_15']}):", "",
          "| model | mode | other options | forwards per window | runs (s) | median (s) |", "|---|---|---|--:|---|--:|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['mode']} | {r['options'] or '–'} | {FORWARDS[r['mode']]} | "
                  f"{', '.join(map(str, r['seconds']))} | {r['median_s']} |")
    (res / f"cli_e2e-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
