"""What a lossy step costs in quality: level-range Dice on the validation split, float32 on the whole plane
against ``--precision P``, ``--roi`` and/or ``--slice-step N``, through the engine and OpenVINO, per source and class and per case.

    python bench/precision_quality.py --precision int8 --avx2 --out bench/results/openvino_int8_quality.md
    python bench/precision_quality.py --precision int8 --roi --avx2 --out bench/results/roi_int8_quality.md
    python bench/precision_quality.py --precision bf16 --out bench/results/openvino_bf16_quality.md
    python bench/precision_quality.py --slice-step 2 --out bench/results/step2_fp32_quality.md
    python bench/precision_quality.py --tables runs/q/fp32 runs/q/int8 --precision int8   # tabulate only

Each variant is scored by ``scripts/score_sources.py --split val --runtime openvino`` in its own
process (``--avx2``: with oneDNN capped at AVX2, as on a CPU without AVX-512; int8 then runs the AVX2
integer kernels that such a CPU has). A lossy step is offered only when no pooled change exceeds 0.003.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from speed_e2e import AVX2_ENV, cpu_name, isa_flags  # noqa: E402

LIMIT = 0.003


def _cpu() -> str:
    """The CPU's name and whether it has AVX-512 BF16 (the benchmarks' own readers, :mod:`speed_e2e`)."""
    return cpu_name() + (" (AVX-512 BF16)" if "avx512_bf16" in isa_flags() else " (no AVX-512 BF16)")


def score(precision: str, out: Path, model: str, avx2: bool, threads: int, roi: bool = False, step: int = 1) -> None:
    env = dict(os.environ)
    if avx2:
        env.update(AVX2_ENV)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "score_sources.py"), "--models", model, "--split", "val",
                    "--runtime", "openvino", "--precision", precision, "--threads", str(threads), "--out", str(out)]
                   + (["--roi"] if roi else []) + (["--slice-step", str(step)] if step > 1 else []),
                   check=True, env=env, stdout=subprocess.DEVNULL)


def _dice(counts) -> float:
    inter, pred, truth = counts
    return 2 * inter / max(1, pred + truth)


def table(base: Path, other: Path, precision: str, model: str) -> str:
    a = next(iter(json.loads((base / "scores.json").read_text()).values()))
    b = next(iter(json.loads((other / "scores.json").read_text()).values()))
    rows = ["| source : class | Dice fp32 | Dice %s | change | predicted voxels fp32 | %s |" % (precision, precision),
            "|---|--:|--:|--:|--:|--:|"]
    pooled = []
    for key, counts in a["pooled"].items():
        d0, d1 = _dice(counts), _dice(b["pooled"][key])
        pooled.append(d1 - d0)
        rows.append(f"| {key.replace(':', ' : ')} | {d0:.4f} | {d1:.4f} | {d1 - d0:+.5f} | {counts[1]} | "
                    f"{b['pooled'][key][1]} |")
    changes = [(b["cases"][c][k] - v, c, k) for c, per in a["cases"].items() for k, v in per.items()]
    worst = max(changes, key=lambda t: abs(t[0]))
    verdict = "within" if max(map(abs, pooled)) <= LIMIT else "OUTSIDE"
    return "\n".join([
        f"Level-range Dice on the validation split, `{model}`, OpenVINO, float32 on the whole plane against "
        f"{precision}; "
        f"{_cpu()}, {len(a['cases'])} cases.", "", *rows, "",
        f"Per case: largest change {worst[0]:+.5f} ({worst[1]}, {worst[2]}); mean change "
        f"{sum(t[0] for t in changes) / len(changes):+.6f} over {len(changes)} case scores.",
        f"Largest pooled change: {max(pooled, key=abs):+.5f}: {verdict} the {LIMIT} allowed for a lossy step."])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    p.add_argument("--roi", action="store_true", help="the variant also segments inside a box around the spine")
    p.add_argument("--slice-step", type=int, default=1, help="the variant runs the network on every Nth thin slice")
    p.add_argument("--model", default="uvd-starter@6")
    p.add_argument("--avx2", action="store_true", help="cap oneDNN at AVX2 (a CPU without AVX-512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "runs" / "precision_quality"), help="score folders")
    p.add_argument("--tables", nargs=2, metavar=("FP32_DIR", "OTHER_DIR"), help="only tabulate two score folders")
    p.add_argument("--reuse", action="store_true", help="keep the fp32 scores already in --work (same model, CPU)")
    p.add_argument("--out", help="also write the table to this .md file")
    a = p.parse_args(argv)
    if a.precision == "fp32" and not a.roi and a.slice_step == 1:
        p.error("name a lossy step: --precision bf16|int8, --roi and/or --slice-step N")
    if a.tables:
        base, other = map(Path, a.tables)
    else:
        tag = "avx2" if a.avx2 else "native"
        base = Path(a.work) / f"fp32-{tag}"
        step = f"-step{a.slice_step}" if a.slice_step > 1 else ""
        other = Path(a.work) / f"{a.precision}{'-roi' if a.roi else ''}{step}-{tag}"
        if not (base / "scores.json").exists() or not a.reuse:
            score("fp32", base, a.model, a.avx2, a.threads)
        score(a.precision, other, a.model, a.avx2, a.threads, a.roi, a.slice_step)
    variant = a.precision + (" --roi" if a.roi else "") + (f" --slice-step {a.slice_step}" if a.slice_step > 1 else "")
    md = table(base, other, variant, a.model) + ("\n\noneDNN capped at AVX2." if a.avx2 else "")
    print(md)
    if a.out:
        Path(a.out).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
