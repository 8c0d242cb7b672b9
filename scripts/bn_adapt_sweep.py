#!/usr/bin/env python
"""What test-time BatchNorm adaptation (``--bn-adapt W``) changes, per source: one model scored
through the engine at several weights W on the same cases (level-range and strict Dice).

    python scripts/bn_adapt_sweep.py --model runs/adabn/nowf-domain-s1/package \
        --cases VB3_04,VB3_15,VB3_25,VB3_35,VB3_46 --weights 0,0.5,1 --out runs/adabn/sweep-nowf

Writes ``<out>/w<W>.json`` (the evaluator's results for each weight) and ``<out>/table.md``, and
prints the table. With ``--thick-slab 4`` the cases are first turned into 4 mm clinical stacks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LumbarSegmentLib.inference.bn_adapt import bn_adapt_arg  # noqa: E402


def table(results: dict[float, dict], structures: list[str]) -> str:
    """Markdown: a row per (source, structure, metric), a column per weight."""
    weights = sorted(results)
    lines = ["| source | structure | metric | " + " | ".join(f"W = {w:g}" for w in weights) + " |",
             "|---|---|---|" + "--:|" * len(weights)]
    first = results[weights[0]]
    for src in sorted(first["level_range"], key=lambda s: (s == "all", s)):
        for st in structures:
            if st not in first["level_range"][src]:
                continue
            row = [f"{results[w]['level_range'][src][st]:.3f}" for w in weights]
            lines.append(f"| {src} | {st} | level range | " + " | ".join(row) + " |")
            strict = [(results[w]["metrics"] if src == "all" else results[w]["per_source"][src])["dice"].get(st)
                      for w in weights]
            if all(v is not None for v in strict):
                lines.append(f"| {src} | {st} | strict | " + " | ".join(f"{v:.3f}" for v in strict) + " |")
    lines.append("| | | seconds | " + " | ".join(f"{results[w]['seconds']:.0f}" for w in weights) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="package folder or registry ref")
    p.add_argument("--registry", default=None)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--cases", required=True, help="comma-separated case ids")
    p.add_argument("--weights", default="0,0.5,1", help="comma-separated W values (0 = off)")
    p.add_argument("--thick-slab", type=float, default=None, metavar="MM")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        weights = [bn_adapt_arg(w) for w in a.weights.split(",") if w.strip()]
    except argparse.ArgumentTypeError as exc:
        p.error(f"--weights: {exc}")
    import torch

    from LumbarSegmentLib.training import evaluate as ev
    from LumbarSegmentLib.training.data import select_cases

    if a.threads:
        torch.set_num_threads(a.threads)
    entries = ev.resolve_entries(a.model, a.registry)
    name = next(iter(entries))
    cases = select_cases(a.data, [c.strip() for c in a.cases.split(",") if c.strip()], [])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for w in weights:
        r = ev.evaluate_packages(entries, cases, ev.eval_options(device="cpu", precision=a.precision, bn_adapt=w),
                                 slab_mm=a.thick_slab)[name]
        (out / f"w{w:g}.json").write_text(json.dumps(r, indent=1, default=float))
        results[w] = r
        print(f"W = {w:g}: level range {r['level_range']['all']}  ({r['seconds']:.0f} s)", flush=True)
    md = table(results, list(entries[name][0].schema.ids)[1:])
    head = (f"{name} on {len(cases)} cases ({a.cases})"
            f"{f', {a.thick_slab:g} mm stacks' if a.thick_slab else ''}; bn-adapt weights {a.weights}\n\n")
    (out / "table.md").write_text(head + md + "\n")
    print(head + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
