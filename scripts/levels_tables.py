"""Tables and Bland-Altman plots for scripts/levels_report.py (imported by it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from LumbarSegmentLib.spine.levels import FLAGS

SOURCES = {"VB3": "lumbar-mr VB3 (water-fat T1, L1-L5 bodies)", "VB2": "lumbar-mr VB2 (T2, T11-L5 bodies)",
           "VB1": "lumbar-mr VB1 (mixed, pathologies; lowest = S1)", "IVD": "lumbar-mr IVD (T2, 5 discs)",
           "T1L": "t1-levels (T1 single slices, L1-L5 + S1)", "SP": "spider-t2space (T2 SPACE, discs)"}
HEIGHT_KEYS = ("anterior_height_mm", "middle_height_mm", "posterior_height_mm")


def bland_altman(pairs: list[tuple[float, float]]) -> dict:
    """Bias (draft - manual) and 95 % limits of agreement (bias +- 1.96 SD)."""
    d = np.array([b - a for a, b in pairs], float)
    if d.size == 0:
        return {"n": 0}
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    bias = float(d.mean())
    return {"n": int(d.size), "bias": bias, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd,
            "within_2mm": float(np.mean(np.abs(d) <= 2.0))}


def _naming_row(title: str, rows: list[dict], keep=lambda level: True) -> str:
    lv = [x for r in rows for x in r["levels"] if keep(x["level"])]
    right = sum(x["right"] for x in lv)
    dice = [x["dice"] for x in lv]
    allright = sum(all(x["right"] for x in r["levels"] if keep(x["level"])) for r in rows)
    flagged = sum(any(FLAGS[f][0] < 1.0 for f in r["flags"]) for r in rows)
    wrong = [r for r in rows if not all(x["right"] for x in r["levels"] if keep(x["level"]))]
    wrong_flagged = sum(r["confidence"] < 1.0 for r in wrong)
    return (f"| {title} | {len(rows)} | {len(lv)} | {right} ({100 * right / max(1, len(lv)):.1f} %) | "
            f"{allright}/{len(rows)} | {np.median(dice):.3f} | {100 * np.mean(np.array(dice) >= 0.85):.0f} % | "
            f"{np.mean([r['confidence'] for r in rows]):.2f} | {flagged} | {wrong_flagged}/{len(wrong)} |")


def _naming_rows(results: list[dict]) -> list[str]:
    lines = ["| source | cases | labelled levels | named right | cases all right | per-level Dice (median) | "
             "Dice >= 0.85 | mean confidence | cases flagged | misnamed cases flagged |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for src, title in SOURCES.items():
        rows = [r for r in results if r["source"] == src]
        if not rows:
            continue
        lines.append(_naming_row(title, rows))
        held_out = [r for r in rows if not r.get("tuning")]
        if 0 < len(held_out) < len(rows):
            lines.append(_naming_row("&nbsp;&nbsp;of which held out from tuning", held_out))
        if any(x["level"] == "S1" for r in rows for x in r["levels"]):
            lines.append(_naming_row("&nbsp;&nbsp;of which L1-L5 (and discs)", rows, lambda lvl: lvl != "S1"))
            lines.append(_naming_row("&nbsp;&nbsp;of which S1", rows, lambda lvl: lvl == "S1"))
    return lines


def _measure_rows(results: list[dict]) -> tuple[list[str], dict]:
    lines = ["| source | structure | measurement | pairs | bias (mm) | 95 % limits of agreement (mm) | within +-2 mm |",
             "|---|---|---|--:|--:|--:|--:|"]
    stats = {}
    for src, title in SOURCES.items():
        for structure in ("body", "disc"):
            for key in HEIGHT_KEYS:
                pairs = [(m["manual"], m["draft"]) for r in results if r["source"] == src for m in r["measures"]
                         if m["what"] == key and ("-" in m["level"]) == (structure == "disc")
                         and _right(r, m["level"]) and m["level"] != "S1"]  # S1: part of the sacrum
                if not pairs:
                    continue
                ba = bland_altman(pairs)
                stats[(src, structure, key)] = (pairs, ba)
                lines.append(f"| {src} | {structure} | {key.replace('_mm', '').replace('_', ' ')} | {ba['n']} | "
                             f"{ba['bias']:+.2f} | {ba['loa_low']:+.2f} .. {ba['loa_high']:+.2f} | "
                             f"{100 * ba['within_2mm']:.0f} % |")
    return lines, stats


def _right(result: dict, level: str) -> bool:
    """Measurements are paired only for levels the draft named right (a misnamed level is a naming error)."""
    return any(x["level"] == level and x["right"] for x in result["levels"])


def _plot(stats: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(stats)
    if not keys:
        return
    cols = 3
    rows = int(np.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.ravel(), keys):
        pairs, ba = stats[key]
        a, b = np.array(pairs).T
        ax.scatter((a + b) / 2, b - a, s=8, alpha=0.6)
        for y, style in ((ba["bias"], "-"), (ba["loa_low"], "--"), (ba["loa_high"], "--")):
            ax.axhline(y, color="k", ls=style, lw=0.8)
        ax.set_title(f"{key[0]} {key[1]} {key[2].replace('_height_mm', '')} (n={ba['n']})", fontsize=9)
        ax.set_xlabel("mean of draft and manual (mm)", fontsize=8)
        ax.set_ylabel("draft - manual (mm)", fontsize=8)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_tables(results: list[dict], out: Path) -> None:
    naming = _naming_rows(results)
    measures, stats = _measure_rows(results)
    text = "\n".join(["## Levels named right and per-level Dice", "", *naming, "",
                      "## Heights: draft vs manual (levels named right)", "", *measures, ""])
    (out / "table.md").write_text(text)
    (out / "bland_altman.json").write_text(json.dumps({"|".join(k): v[1] for k, v in stats.items()}, indent=1))
    _plot(stats, out / "bland_altman.png")
    print(text)
